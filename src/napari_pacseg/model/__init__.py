"""The model: its configuration, classes, feature bank, intensity normalisation and the network."""
