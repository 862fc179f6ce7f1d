"""Files: the model file, volumes and 2D images, atomic writes, provenance."""
