"""The napari face: dock widget, its session state, background workers, layers, controls, reader, samples, demo."""
