"""Plain-torch path of the pixel-adaptive convolution: a loop over taps on cache-sized tiles.

No unfold: for each output tile the zero-padded input and guide slabs it reads are gathered once,
then every tap is a strided view of the slabs. The adapting kernel ``K`` of one tap is computed
into a tile-sized buffer, used, and overwritten by the next tap, so extra memory is a few tile
buffers whatever the volume size.

The same engine serves ``pac3d`` and, where ``crf_torch`` cannot keep the weights, the mean-field
message of ``pac_crf3d``: a per-tap scale
``s_t`` multiplies ``K`` (``w = s_t * K``; a zero scale skips the tap), and with ``normalize`` the
result is divided by ``sum_t w`` over the in-bounds taps (0 where that sum is 0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .blocks import spatial_blocks

# Output voxels per tile in the forward pass and in the backward pass, where autograd keeps every
# tap's intermediates of one tile alive. Forward tiles are large enough (512 KiB per channel
# buffer, in L2/L3) that torch's elementwise ops split them over the cores: measured on 2 cores,
# 2^17 ran pac_crf3d 1.8x faster than 2^15, whose ops stayed on one thread.
TILE_VOXELS = 1 << 17
BACKWARD_TILE_VOXELS = 1 << 12

# Guide value written where a window leaves the volume when no window centre can fall there: its
# adapting weight exp(-0.5 * (FAR - g)^2) is exactly 0, so out-of-bounds taps drop out of the
# normalisation without a validity mask. (Squared, it stays finite in float32.)
FAR_GUIDE = 1e15


def exp_limits(dtype: torch.dtype) -> tuple[float, float]:
    """``(floor, cut)``: exponents are clamped to ``floor`` and weights ``<= cut`` set to 0.

    ``torch.exp`` takes a 10-30x slower path on CPU when its result would be subnormal or 0
    (measured: 43 us vs 510-1365 us per 2^17 floats), and guide differences that large are
    common. Clamping first keeps exp fast; the cut then turns those weights into exact zeros,
    so a voxel whose weights all 'underflow' (below the smallest normal float) gets none.
    """
    floor = math.log(torch.finfo(dtype).tiny) + 0.5
    return floor, math.exp(floor) * 1.01


@dataclass(frozen=True)
class PacGeometry:
    """Sizes of one pixel-adaptive convolution; every field is a (d, h, w) triple of ints."""

    in_shape: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                self.in_shape, self.kernel, self.stride, self.padding, self.dilation
            )
        )

    def taps(self) -> list[tuple[int, int, int]]:
        return list(itertools.product(*(range(k) for k in self.kernel)))

    @property
    def centre(self) -> tuple[int, int, int]:
        return tuple((k - 1) // 2 for k in self.kernel)

    def slab_range(self, axis: int, lo: int, hi: int) -> tuple[int, int]:
        """Padded-coordinate range ``[start, stop)`` read by outputs ``[lo, hi)`` along ``axis``."""
        s, d, k = self.stride[axis], self.dilation[axis], self.kernel[axis]
        return lo * s, (hi - 1) * s + (k - 1) * d + 1


def _ranges(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[lo, hi)`` per axis of a block index from ``spatial_blocks``."""
    ranges = []
    for axis, size in enumerate(shape):
        if axis < len(index):
            ix = index[axis]
            ranges.append((ix.start, ix.stop) if isinstance(ix, slice) else (ix, ix + 1))
        else:
            ranges.append((0, size))
    return ranges


class Workspace:
    """Flat buffers reused from tile to tile.

    A fresh large allocation is mapped and page-faulted again on every first touch (measured:
    filling a new 3 MiB slab took ~0.9 ms, ~5x the time of refilling a warm one).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape``, sharing memory with earlier takes of
        ``role`` (whose contents it overwrites)."""
        numel = math.prod(shape)
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[role] = buf
        return buf[:numel].view(tuple(shape))


def slab(
    t: torch.Tensor,
    geo: PacGeometry,
    ranges,
    dtype: torch.dtype,
    fill: float = 0.0,
    work: tuple[Workspace, str] | None = None,
) -> torch.Tensor:
    """Padded region of ``t`` (``(C, D, H, W)``) read by the output tile ``ranges``.

    Returns a view of ``t`` when the region lies inside it and no conversion is needed, else a
    ``(C, sd, sh, sw)`` tensor of ``dtype`` holding ``fill`` where the region leaves ``t``: fresh,
    or the ``(workspace, role)`` buffer given in ``work``.
    """
    spans = [geo.slab_range(a, lo, hi) for a, (lo, hi) in enumerate(ranges)]
    src = [(start - p, stop - p) for (start, stop), p in zip(spans, geo.padding)]
    inside = all(lo >= 0 and hi <= n for (lo, hi), n in zip(src, t.shape[1:]))
    if inside:
        view = t[:, src[0][0] : src[0][1], src[1][0] : src[1][1], src[2][0] : src[2][1]]
        return view if view.dtype == dtype else view.to(dtype)
    shape = (t.shape[0], *(hi - lo for lo, hi in src))
    if work is None:
        out = torch.empty(shape, dtype=dtype, device=t.device)
    else:
        out = work[0].take(work[1], shape)
    out.fill_(fill)
    clip = [(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(src, t.shape[1:])]
    if all(hi > lo for lo, hi in clip):
        dst = tuple(slice(c_lo - lo, c_hi - lo) for (lo, _), (c_lo, c_hi) in zip(src, clip))
        out[(slice(None), *dst)] = t[(slice(None), *(slice(lo, hi) for lo, hi in clip))]
    return out


def tap_view(s: torch.Tensor, geo: PacGeometry, tap, out_tile) -> torch.Tensor:
    """The ``(C, *out_tile)`` strided view of slab ``s`` that tap ``tap`` reads."""
    idx = [slice(None)]
    for t, d, st, n in zip(tap, geo.dilation, geo.stride, out_tile):
        idx.append(slice(t * d, t * d + st * (n - 1) + 1, st))
    return s[tuple(idx)]


def centres_inside(geo: PacGeometry) -> bool:
    """True when no window centre can fall in the padding (padding <= 'same' on every axis)."""
    return all(p <= (k - 1) // 2 * d for p, k, d in zip(geo.padding, geo.kernel, geo.dilation))


def guide_fill(geo: PacGeometry) -> float:
    """Value of the padded guide: ``FAR_GUIDE`` where that is exact, else 0 (DESIGN: zero-padded)."""
    return FAR_GUIDE if centres_inside(geo) else 0.0


def _needs_valid_mask(geo: PacGeometry, normalize: bool) -> bool:
    # With a FAR_GUIDE fill, out-of-bounds taps already weigh exactly 0.
    return normalize and not centres_inside(geo)


def pac_forward(
    x: torch.Tensor,
    guide: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    geo: PacGeometry,
    groups: int,
    normalize: bool,
    tap_scale: list[float] | None,
    out: torch.Tensor,
    den: torch.Tensor | None = None,
    den_ready: bool = False,
    valid=None,
) -> None:
    """Write the pixel-adaptive convolution of ``x`` into ``out`` (no autograd).

    Parameters
    ----------
    x : Tensor ``(N, C_in, D, H, W)``; guide : Tensor ``(N, F, D, H, W)``; any strides and float
        dtypes (converted tile by tile to ``out.dtype``).
    weight : Tensor ``(C_out, C_in // groups, kd, kh, kw)`` of ``out.dtype``, or None (depthwise
        all-ones, ``C_out == C_in``).
    bias : Tensor ``(C_out,)`` or None.
    tap_scale : per-tap factors in ``geo.taps()`` order, or None for all ones.
    out : Tensor ``(N, C_out, *geo.out_shape)``, contiguous, written in place.
    den : Tensor ``(N, *geo.out_shape)``, contiguous, or None
        With ``normalize``: where the per-voxel normaliser ``sum_t w`` (0 replaced by 1) is
        written, or, with ``den_ready``, read from instead of recomputed. It depends on the guide
        only, so mean-field steps compute it once.
    valid : 3 ``(start, stop)`` ranges of the padded input (``geo``'s padding included) where
        it holds data, or None for the geometry's own (``padding .. padding + in_shape``).
        Outside it a tap must contribute exactly nothing (there ``x`` is 0 and the weight 0 or
        masked, as in the padding), and each tap is computed only on the outputs whose source
        lies inside: a thin region under a deep window skips most of its taps.
    """
    dtype = out.dtype
    taps = geo.taps()
    scale = tap_scale or [1.0] * len(taps)
    # exp(-0.5 * |dg|^2 + log s) folds the tap scale into the one exp pass.
    log_scale = [torch.tensor(math.log(v) if v > 0 else 0.0, dtype=dtype) for v in scale]
    floor, cut = exp_limits(dtype)
    c_out, n_guide = out.shape[1], guide.shape[1]
    if weight is not None:
        # (T, groups, C_out/g, C_in/g): one batched product per tap covers every group.
        w_taps = weight.reshape(groups, c_out // groups, weight.shape[1], -1).permute(3, 0, 1, 2)
        w_taps = w_taps.contiguous()
    use_mask = _needs_valid_mask(geo, normalize)
    fill = guide_fill(geo)
    ones = torch.ones((1, *x.shape[2:]), dtype=dtype, device=x.device) if use_mask else None
    work = Workspace(dtype, x.device)
    if valid is None:
        valid = [(p, p + n) for p, n in zip(geo.padding, geo.in_shape)]
    for n in range(x.shape[0]):
        for index, nvox in spatial_blocks(geo.out_shape, TILE_VOXELS):
            ranges = _ranges(index, geo.out_shape)
            tile = tuple(hi - lo for lo, hi in ranges)
            whole_tile = tuple((0, n) for n in tile)
            xs = slab(x[n], geo, ranges, dtype, work=(work, "x"))
            gs = slab(guide[n], geo, ranges, dtype, fill, work=(work, "guide"))
            vs = slab(ones, geo, ranges, dtype, work=(work, "valid")) if use_mask else None
            acc = out[n][(slice(None), *(slice(lo, hi) for lo, hi in ranges))].view(c_out, nvox)
            acc.zero_()
            g_centre = tap_view(gs, geo, geo.centre, tile)
            diff = work.take("diff", tile)
            k = work.take("k", tile)
            accumulate = normalize and not den_ready
            if not normalize:
                ksum = None
            elif den is None:
                ksum = work.take("ksum", tile).zero_()
            else:
                ksum = den[n][tuple(slice(lo, hi) for lo, hi in ranges)]
                if accumulate:
                    ksum.zero_()
            y = (
                torch.empty((x.shape[1], *tile), dtype=dtype, device=x.device)
                if weight is not None
                else None
            )
            for ti, tap in enumerate(taps):
                if scale[ti] == 0:
                    continue
                part = _inside_part(geo, ranges, tap, valid)
                if part is None:  # every output's source is outside: nothing to add
                    continue
                if weight is not None:
                    part = whole_tile  # its products need whole tiles
                cut_ = (slice(None), *(slice(a, b) for a, b in part))  # of (C, *tile) views
                g_tap = tap_view(gs, geo, tap, tile)[cut_]
                g_mid, diff_p, k_p = g_centre[cut_], diff[cut_[1:]], k[cut_[1:]]
                for f in range(n_guide):
                    torch.sub(g_tap[f], g_mid[f], out=diff_p)
                    if f == 0:
                        torch.addcmul(log_scale[ti], diff_p, diff_p, value=-0.5, out=k_p)
                    else:
                        k_p.addcmul_(diff_p, diff_p, value=-0.5)
                torch.nn.functional.threshold_(k_p.clamp_(min=floor).exp_(), cut, 0.0)
                if accumulate:
                    if vs is None:
                        ksum[cut_[1:]].add_(k_p)
                    else:
                        ksum[cut_[1:]].addcmul_(k_p, tap_view(vs, geo, tap, tile)[cut_][0])
                xt = tap_view(xs, geo, tap, tile)
                if weight is None:
                    acc.view(c_out, *tile)[cut_].addcmul_(xt[cut_], k_p)
                else:
                    torch.mul(xt, k, out=y)
                    acc_g = acc.view(groups, c_out // groups, nvox)
                    acc_g.baddbmm_(w_taps[ti], y.view(groups, -1, nvox))
            if normalize:
                if accumulate:
                    ksum.masked_fill_(ksum == 0, 1.0)  # no weight at all: the sum is 0 too
                acc.div_(ksum.reshape(1, nvox))
            if bias is not None:
                acc.add_(bias.view(c_out, 1).to(dtype))


def _inside_part(geo: PacGeometry, ranges, tap, valid):
    """3 ``(start, stop)`` ranges, in the tile's own coordinates, of the outputs of the tile
    ``ranges`` whose source under ``tap`` lies inside ``valid`` (padded input coordinates), or
    None when there are none."""
    part = []
    for (lo, hi), t, d, st, (v0, v1) in zip(ranges, tap, geo.dilation, geo.stride, valid):
        # output o reads padded input o * st + t * d
        a = max(lo, -(-(v0 - t * d) // st))
        b = min(hi, -(-(v1 - t * d) // st))
        if b <= a:
            return None
        part.append((a - lo, b - lo))
    return tuple(part)


def pac_tile(xs, gs, vs, weight, geo: PacGeometry, tile, groups, normalize, tap_scale):
    """Differentiable pixel-adaptive convolution of one tile from its slabs (no bias).

    xs : ``(C_in, *slab)``, gs : ``(F, *slab)``, vs : ``(1, *slab)`` or None; returns
    ``(C_out, *tile)``. Out-of-place ops only, so autograd can differentiate it.
    """
    taps = geo.taps()
    scale = tap_scale or [1.0] * len(taps)
    g_centre = tap_view(gs, geo, geo.centre, tile)
    floor, cut = exp_limits(gs.dtype)
    acc, ksum = 0, 0
    for ti, tap in enumerate(taps):
        if scale[ti] == 0:
            continue
        arg = -0.5 * (tap_view(gs, geo, tap, tile) - g_centre).square().sum(0) + math.log(scale[ti])
        k = torch.nn.functional.threshold(torch.exp(arg.clamp(min=floor)), cut, 0.0)
        if normalize:
            ksum = ksum + (k if vs is None else k * tap_view(vs, geo, tap, tile)[0])
        y = tap_view(xs, geo, tap, tile) * k
        if weight is None:
            acc = acc + y
        else:
            wt = weight[..., tap[0], tap[1], tap[2]]  # (C_out, C_in/g)
            c_out, c_in = weight.shape[0], y.shape[0]
            yg = y.reshape(groups, c_in // groups, -1)
            wg = wt.reshape(groups, c_out // groups, -1)
            acc = acc + torch.bmm(wg, yg).reshape(c_out, *tile)
    if normalize:
        ksum = torch.where(ksum == 0, torch.ones_like(ksum), ksum)
        acc = acc / ksum
    return acc


def pac_backward(
    x, guide, weight, geo: PacGeometry, groups, normalize, tap_scale, grad_out, needs
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for ``x``, ``guide``, ``weight`` and ``bias`` by recomputing tile by tile.

    ``grad_out`` is ``(N, C_out, *out_shape)``; ``needs`` is the 4-tuple of booleans saying which
    gradients are wanted. Memory is bounded by ``BACKWARD_TILE_VOXELS``, never a full unfold.
    """
    dtype = grad_out.dtype
    need_x, need_g, need_w, need_b = needs
    gx = torch.zeros(x.shape, dtype=dtype, device=x.device) if need_x else None
    gg = torch.zeros(guide.shape, dtype=dtype, device=x.device) if need_g else None
    gw = torch.zeros(weight.shape, dtype=dtype, device=x.device) if need_w else None
    gb = grad_out.sum(dim=(0, 2, 3, 4)) if need_b else None
    if not (need_x or need_g or need_w):
        return gx, gg, gw, gb
    use_mask = _needs_valid_mask(geo, normalize)
    ones = torch.ones((1, *x.shape[2:]), dtype=dtype, device=x.device) if use_mask else None
    w_leaf = weight.detach().to(dtype).requires_grad_(need_w) if weight is not None else None
    for n in range(x.shape[0]):
        for index, _ in spatial_blocks(geo.out_shape, BACKWARD_TILE_VOXELS):
            ranges = _ranges(index, geo.out_shape)
            tile = tuple(hi - lo for lo, hi in ranges)
            xs = slab(x[n].detach(), geo, ranges, dtype).requires_grad_(need_x)
            gs = slab(guide[n].detach(), geo, ranges, dtype, guide_fill(geo)).requires_grad_(need_g)
            vs = slab(ones, geo, ranges, dtype) if use_mask else None
            g_tile = grad_out[n][(slice(None), *(slice(lo, hi) for lo, hi in ranges))]
            with torch.enable_grad():
                res = pac_tile(xs, gs, vs, w_leaf, geo, tile, groups, normalize, tap_scale)
                wanted = [t for t, need in ((xs, need_x), (gs, need_g), (w_leaf, need_w)) if need]
                grads = list(torch.autograd.grad(res, wanted, g_tile, allow_unused=True))
            for target, need in ((gx, need_x), (gg, need_g)):
                if need:
                    grad = grads.pop(0)
                    if grad is not None:
                        _scatter_slab(target[n], grad, geo, ranges)
            if need_w:
                grad = grads.pop(0)
                if grad is not None:
                    gw += grad
    return gx, gg, gw, gb


def _scatter_slab(target: torch.Tensor, grad: torch.Tensor, geo: PacGeometry, ranges) -> None:
    """Add a slab-shaped gradient into ``target`` (``(C, D, H, W)``), dropping the padding."""
    spans = [geo.slab_range(a, lo, hi) for a, (lo, hi) in enumerate(ranges)]
    src = [(start - p, stop - p) for (start, stop), p in zip(spans, geo.padding)]
    clip = [(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(src, target.shape[1:])]
    if any(hi <= lo for lo, hi in clip):
        return
    part = grad[
        (slice(None), *(slice(c_lo - lo, c_hi - lo) for (lo, _), (c_lo, c_hi) in zip(src, clip)))
    ]
    target[(slice(None), *(slice(lo, hi) for lo, hi in clip))] += part
