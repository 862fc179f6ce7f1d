"""The features' 1-D filter along one axis as a compiled loop (numba; imported on first use).

``features._filter_axis`` sums ``2r + 1`` shifted views with one torch call per tap: each call
reads and writes the whole output again, and each is a parallel region of its own (hundreds of
thousands per 256^3 segmentation). Here every output row (a run of voxels contiguous in
memory) is summed over the taps in a row buffer and written once: one parallel region per
call. Each output value is summed over the taps in the same order by one thread, so the result
does not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np

# Values of a row summed in one buffer: 2 KiB of float32 stays in the first-level cache.
BLOCK = 512


@numba.njit(parallel=True, cache=True, fastmath={"contract"})
def filter_rows(src, weights, outer, n_src, inner, first, n_out, out):
    """``out[o, i, j] = sum_k weights[k] * src[o, first + i + k, j]`` for the flat, contiguous
    ``src`` ``(outer, n_src, inner)`` and ``out`` ``(outer, n_out, inner)``, ``inner > 1``:
    a column of ``BLOCK`` values of ``j`` at a time, down all ``i`` (the rows a sum reads are
    read again by the next ``2r`` sums, from cache), each sum in a buffer."""
    taps = weights.shape[0]
    blocks = (inner + BLOCK - 1) // BLOCK
    for unit in numba.prange(outer * blocks):
        o = unit // blocks
        j0 = (unit % blocks) * BLOCK
        size = min(BLOCK, inner - j0)
        acc = np.empty(size, dtype=out.dtype)
        for i in range(n_out):
            acc[:] = 0.0
            for k in range(taps):
                start = (o * n_src + first + i + k) * inner + j0
                line = src[start : start + size]
                wk = weights[k]
                for j in range(size):
                    acc[j] += wk * line[j]
            begin = (o * n_out + i) * inner + j0
            dst = out[begin : begin + size]
            for j in range(size):
                dst[j] = acc[j]


@numba.njit(parallel=True, cache=True, fastmath={"contract"})
def filter_lines(src, weights, outer, n_src, first, n_out, out):
    """The same for ``inner == 1``: the filtered axis is the contiguous one; each line of
    ``n_out`` outputs is summed tap by tap in a line buffer."""
    taps = weights.shape[0]
    for o in numba.prange(outer):
        acc = np.zeros(n_out, dtype=out.dtype)
        for k in range(taps):
            start = o * n_src + first + k
            line = src[start : start + n_out]
            wk = weights[k]
            for i in range(n_out):
                acc[i] += wk * line[i]
        dst = out[o * n_out : o * n_out + n_out]
        for i in range(n_out):
            dst[i] = acc[i]
