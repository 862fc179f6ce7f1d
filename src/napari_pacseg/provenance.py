"""Where a result or a model came from: library versions, file digests, timestamps, and the
provenance a trained model carries."""

from __future__ import annotations

import datetime
import hashlib
import platform
import sys

import numpy as np
import torch

from ._version import __version__

LIBRARY = f"napari-pacseg {__version__}"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of what computed a result: napari-pacseg, torch, numpy, python (+ the io
    libraries that are loaded)."""
    out = {"napari-pacseg": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}  # fmt: skip
    for name in ("dask", "distributed", "zarr", "tifffile"):
        if name in sys.modules:
            out[name] = getattr(sys.modules[name], "__version__", "unknown")
    return out


def training_provenance(labelled_voxels: int, seed: int, images: int = 1) -> dict[str, str]:
    """The ``provenance`` of a model made by ``train()`` (from ``images`` images)."""
    out = {
        "method": "train() from scribbles",
        "date": now(),
        "library": LIBRARY,
        "labelled_voxels": str(int(labelled_voxels)),
        "seed": str(seed),
    }
    if images > 1:
        out["images"] = str(int(images))
    return out
