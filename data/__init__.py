"""The bottom layer: canonical dataset schema, synthetic generator, converters, feature cache, mask
geometry, and the formats actors exchange (the trajectory table, packed weights). No Ray."""
