"""Where a result or a model came from: library versions, file digests, timestamps, and the
provenance a trained model carries."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from napari_pacseg._version import __version__

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


# Inputs up to this size are hashed whole; a larger file by its size and its first and last MiB.
WHOLE_HASH_BYTES = 64 << 20
END_BYTES = 1 << 20
# A folder (zarr) is hashed by every file's name and size and the content of its files, in
# name order, up to this many bytes read.
FOLDER_HASH_BYTES = 64 << 20


def _hash_file(h, path, budget: int | None = None) -> int:
    """Feed ``path``'s size and content into ``h``: all of it up to ``WHOLE_HASH_BYTES`` (or
    ``budget``), else its first and last ``END_BYTES``; returns the bytes read."""
    size = os.path.getsize(path)
    limit = WHOLE_HASH_BYTES if budget is None else min(budget, WHOLE_HASH_BYTES)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return size
        ends = min(END_BYTES, limit // 2)
        h.update(f.read(ends))
        f.seek(size - ends)
        h.update(f.read(ends))
        return 2 * ends


def input_digest(path) -> str:
    """What tells one input's content from another's, for a record's "same input" check:
    ``"sha256:<hex>"`` of a file's bytes (files over 64 MiB: of the size and the first and last
    MiB), or of a folder's (a zarr's) relative file names, sizes and contents in name order (the
    contents up to 64 MiB read in all). ``OSError`` when it cannot be read."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.is_dir():
        _hash_file(h, path)
        return "sha256:" + h.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    budget = FOLDER_HASH_BYTES
    for p in files:
        h.update(str(p.relative_to(path).as_posix()).encode("utf-8", "surrogateescape") + b"\0")
        if budget > 0:
            budget -= _hash_file(h, p, budget)
        else:
            h.update(os.path.getsize(p).to_bytes(8, "little"))
    return "sha256:" + h.hexdigest()


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
