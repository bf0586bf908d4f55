"""segrl: actors."""
