"""Datasets: canonical schema, synthetic generator, converters, feature cache."""
