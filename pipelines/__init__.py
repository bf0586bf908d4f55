"""segrl: pipelines."""
