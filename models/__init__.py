"""segrl: models."""
