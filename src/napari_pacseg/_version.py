"""The installed distribution's version (read from its metadata, so there is one source)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-pacseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
