"""napari-pacseg: interactive volumetric segmentation for napari with PAC refinement."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-pacseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
