"""Data: reading sources, the token store, mixtures, training and calibration rows."""
