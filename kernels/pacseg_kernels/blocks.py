"""Iteration over a tensor's spatial box in cache-sized pieces, in row-major order."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator


def spatial_blocks(shape: tuple[int, ...], max_voxels: int) -> Iterator[tuple[tuple, int]]:
    """Split a box of ``shape`` into row-major-contiguous blocks of at most ``max_voxels`` voxels.

    Each block is a full slab of trailing dimensions: indices on the leading dimensions, a slice
    on one dimension, everything on the dimensions after it. A block therefore covers a range of
    the row-major flattened index, and a contiguous tensor of this shape views it as one row.
    When even one index of the last dimension's trailing slab exceeds ``max_voxels`` (impossible:
    it is one voxel) the block is a single voxel.

    Yields
    ------
    index : tuple
        Index to apply to the spatial dimensions (ints and one slice).
    voxels : int
        Number of voxels in the block.
    """
    if not shape:
        yield (), 1
        return
    if math.prod(shape) == 0:
        return
    trailing = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    split = next(i for i, t in enumerate(trailing) if t <= max_voxels)
    step = max(1, max_voxels // trailing[split])
    for lead in itertools.product(*(range(s) for s in shape[:split])):
        for start in range(0, shape[split], step):
            stop = min(start + step, shape[split])
            yield (*lead, slice(start, stop)), (stop - start) * trailing[split]
