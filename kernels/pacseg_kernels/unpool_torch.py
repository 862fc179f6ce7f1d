"""Plain-torch path of ``max_unpool3d``.

A zero fill and one ``scatter_``, then a check that makes it deterministic: gathering the output
back at the indices must return every value. It does whenever no two different values share an
index (always, for indices from max pooling with non-overlapping windows; and when overlapping
windows store the same maximum twice). Otherwise the order of ``scatter_`` would decide, so the
plane chunk is redone by the exact rule: the last value in input order wins, as torch does on
CPU. (A gather form that writes each output voxel once from its window's offset measured ~5x
slower here than zero + scatter: its index arithmetic on the pooled grid costs more than the
fill it saves. It is what the Triton kernel does, where that arithmetic is free.)
"""

from __future__ import annotations

import math

import torch

# Pooled voxels handled per chunk, bounding the temporaries.
CHUNK_VOXELS = 1 << 18


def indices_in_windows(indices: torch.Tensor, kernel, out_size) -> bool:
    """True when every index lies inside its own non-overlapping window (as max pooling makes).

    ``indices``: ``(..., D, H, W)`` on the pooled grid, flattened per plane of ``out_size``.
    """
    _, oh, ow = out_size
    idx = indices.long()
    d, rem = idx.div(oh * ow, rounding_mode="floor"), idx.remainder(oh * ow)
    coords = (d, rem.div(ow, rounding_mode="floor"), rem.remainder(ow))
    inside = torch.ones((), dtype=torch.bool, device=indices.device)
    for axis, (coord, k, size) in enumerate(zip(coords, kernel, indices.shape[-3:])):
        window = torch.arange(size, device=indices.device).view(
            [-1 if i == axis else 1 for i in range(3)]
        )
        offset = coord - window * k
        inside = inside & (offset >= 0) & (offset < k)
    return bool(inside.all())


def unpool(values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> None:
    """Write the unpooled ``values`` (``(N, C, *in)``) into ``out`` (``(N, C, *out_size)``)."""
    n, c = values.shape[:2]
    planes = n * c
    vals = values.reshape(planes, -1)
    idx = indices.reshape(planes, -1)
    if idx.dtype != torch.long:
        idx = idx.long()
    dst = out.view(planes, -1)
    step = max(1, CHUNK_VOXELS // max(1, vals.shape[1]))
    for p0 in range(0, planes, step):
        v, i, o = vals[p0 : p0 + step], idx[p0 : p0 + step], dst[p0 : p0 + step]
        o.zero_()
        o.scatter_(1, i, v)
        if not torch.equal(o.gather(1, i), v):  # differing values share an index
            _scatter_last_wins(v, i, o)


def _winners(flat_idx: torch.Tensor, plane_size: int) -> torch.Tensor:
    """For every output position of each plane, the last input position writing it (or -1)."""
    p = flat_idx.shape[0]
    order = torch.arange(flat_idx.shape[1], device=flat_idx.device).expand(p, -1)
    winner = torch.full((p, plane_size), -1, dtype=torch.long, device=flat_idx.device)
    return winner.scatter_reduce_(1, flat_idx, order, reduce="amax")


def _scatter_last_wins(vals, flat_idx, dst) -> None:
    """``dst[idx[i]] = vals[i]``, the last ``i`` in input order winning ties; all ``(P, L)``."""
    winner = _winners(flat_idx, dst.shape[1])
    gathered = vals.gather(1, winner.clamp(min=0))
    torch.where(winner >= 0, gathered, torch.zeros((), dtype=vals.dtype), out=dst)


def unpool_backward(grad_out, indices, out_size, unique: bool) -> torch.Tensor:
    """Gradient for ``values``: the output gradient at each value's index, 0 for every value that
    lost its position to a later one. ``unique``: the indices are known to be distinct."""
    n, c = indices.shape[:2]
    planes = n * c
    g = grad_out.reshape(planes, -1)
    flat_idx = indices.reshape(planes, -1).long()
    grad = g.gather(1, flat_idx)
    if not unique:
        order = torch.arange(flat_idx.shape[1], device=g.device).expand(planes, -1)
        won = _winners(flat_idx, math.prod(out_size)).gather(1, flat_idx) == order
        grad = torch.where(won, grad, torch.zeros((), dtype=grad.dtype))
    return grad.view(indices.shape)
