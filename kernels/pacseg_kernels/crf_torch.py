"""Plain-torch mean field of ``pac_crf3d`` (no autograd): the adapting weights are computed once.

The weights ``w(i, t)`` depend on the guide only, so recomputing them every step (an ``exp``
per voxel and tap) wastes most of the time. Keeping them for the whole volume would cost one
float per voxel and tap (75-125x the unary), so the steps run as a wavefront over z slabs:
at wavefront position ``j`` the weights of slab ``j`` are computed, step 1 runs on slab ``j``,
step 2 on slab ``j - L``, ..., step ``S`` on slab ``j - (S - 1) L``, where ``L`` slabs cover
the window's reach in z. Every step then finds the previous step's probabilities it reads
already computed, and only the weights of the last ``(S - 1) L + 1`` slabs are alive.

Two probability buffers suffice (even steps in one, odd steps in the other): step ``s`` on
slab ``j`` overwrites step ``s - 2`` there, whose last reader (step ``s - 1`` on slab
``j + L``) ran earlier at the same wavefront position, since steps run in increasing order.

When even one-plane slabs would need more memory than ``RING_BUDGET`` times the inputs and the
output (large planes with windows that reach 2+ planes in z, or many steps), every step
recomputes the weights instead, tile by tile (``pac_torch``).
"""

from __future__ import annotations

import math

import torch

from . import pac_torch
from .pac_torch import PacGeometry

# The weights kept alive may take this many times the bytes of unary + guide + output.
RING_BUDGET = 2.0
# Voxels per slab worth one torch call: planes smaller than this are grouped.
SLAB_VOXELS = 1 << 14


def mean_field(
    unary: torch.Tensor,
    guide: torch.Tensor,
    iterations: int,
    kernel: tuple[int, int, int],
    dilation: tuple[int, int, int],
    compat: float,
    scale: list[float],
    out: torch.Tensor,
) -> None:
    """Write the refined logits of ``iterations >= 1`` mean-field steps into ``out``.

    unary : ``(N, K, D, H, W)``, guide : ``(N, F, D, H, W)``, out : ``(N, K, D, H, W)``
    contiguous, all of one float dtype; ``scale`` the spatial tap weights in ``geo.taps()``
    order (0 for the centre).
    """
    slab = _slab_planes(unary, guide, iterations, kernel, dilation)
    if slab is None:
        _recomputing(unary, guide, iterations, kernel, dilation, compat, scale, out)
    else:
        _wavefront(unary, guide, iterations, kernel, dilation, compat, scale, out, slab)


def _slab_planes(unary, guide, iterations, kernel, dilation) -> int | None:
    """Planes per slab for the wavefront, or None when its weights would not fit the budget."""
    d, h, w = unary.shape[2:]
    planes = max(1, min(d, -(-SLAB_VOXELS // (h * w))))
    taps = math.prod(kernel)
    budget = RING_BUDGET * unary.element_size() * (2 * unary[0].numel() + guide[0].numel())
    while True:
        if _ring_slabs(iterations, kernel, dilation, planes) * (taps + 2) * planes * h * w * unary.element_size() <= budget:  # fmt: skip
            return planes
        if planes == 1:
            return None
        planes = max(1, planes // 2)


def _ring_slabs(iterations, kernel, dilation, planes) -> int:
    """Slabs whose weights are alive at once: ``(S - 1) L + 1``."""
    reach = (kernel[0] - 1) // 2 * dilation[0]
    return (iterations - 1) * -(-reach // planes) + 1


def _windows(t: torch.Tensor, first: int, z: int, n_planes: int, kernel, dilation, shape):
    """``(kh, kw, n_planes, H, W)`` view of the padded ``(Dp, Hp, Wp)`` tensor ``t``: the
    in-plane taps of the window row whose z offset index is ``first``, for output planes
    ``z .. z + n_planes`` of an output of in-plane ``shape``."""
    sd, sh, sw = t.stride()
    return t.as_strided(
        (kernel[1], kernel[2], n_planes, *shape),
        (sh * dilation[1], sw * dilation[2], sd, sh, sw),
        t.storage_offset() + (z + first * dilation[0]) * sd,
    )


def _wavefront(unary, guide, iterations, kernel, dilation, compat, scale, out, planes) -> None:
    """The wavefront of the module docstring over slabs of ``planes`` planes; arguments as in
    ``mean_field``. Per image: the padded guide, two ``(K - 1)``-channel padded probability
    buffers, and the ring of weights ``(ring, kd, kh, kw, planes, H, W)`` with each slab's
    ``1 / sum_t w`` and ``sum_t w > 0``."""
    n_img, k, d, h, w = unary.shape
    dtype, device = out.dtype, out.device
    reach = tuple((kk - 1) // 2 * dd for kk, dd in zip(kernel, dilation))
    padded = tuple(s + 2 * r for s, r in zip((d, h, w), reach))
    interior = tuple(slice(r, r + s) for s, r in zip((d, h, w), reach))
    lag = -(-reach[0] // planes)
    ring = _ring_slabs(iterations, kernel, dilation, planes)
    n_slabs = -(-d // planes)
    kd, kh, kw = kernel
    floor, cut = pac_torch.exp_limits(dtype)
    # log of the tap scale; -inf (a weight of exactly 0 after the cut) for the centre.
    log_scale = torch.tensor(
        [math.log(v) if v > 0 else -math.inf for v in scale], dtype=dtype, device=device
    ).view(kd, kh, kw, 1, 1, 1)
    weights = torch.empty((ring, kd, kh, kw, planes, h, w), dtype=dtype, device=device)
    rden = torch.empty((ring, planes, h, w), dtype=dtype, device=device)
    has = torch.empty((ring, planes, h, w), dtype=dtype, device=device)
    diff = torch.empty((kh, kw, planes, h, w), dtype=dtype, device=device)
    products = torch.empty((kh, kw, planes, h, w), dtype=dtype, device=device)
    part = torch.empty((planes, h, w), dtype=dtype, device=device)
    message = torch.empty((k, planes, h, w), dtype=dtype, device=device)
    g_pad = torch.full((guide.shape[1], *padded), pac_torch.FAR_GUIDE, dtype=dtype, device=device)
    # Only the first K - 1 classes' probabilities are ever read (the last one's message is what
    # the others leave), so only they are kept.
    probs = [torch.zeros((k - 1, *padded), dtype=dtype, device=device) for _ in range(2)]
    exps = torch.empty((k, planes, h, w), dtype=dtype, device=device)

    def softmax_head(logits: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst`` ``(K - 1, nz, h, w)`` = the first K - 1 channels of softmax(logits, 0)."""
        e = exps[:, : logits.shape[1]]
        torch.sub(logits, logits.amax(0, keepdim=True), out=e).exp_()
        torch.div(e[: k - 1], e.sum(0, keepdim=True), out=dst)

    def guide_weights(slot: int, z0: int, nz: int) -> None:
        den = rden[slot, :nz]
        for a in range(kd):
            kern = weights[slot, a, :, :, :nz]
            for f in range(g_pad.shape[0]):
                taps = _windows(g_pad[f], a, z0, nz, kernel, dilation, (h, w))
                centre = g_pad[f, z0 + reach[0] : z0 + reach[0] + nz, interior[1], interior[2]]
                if f == 0:
                    torch.sub(taps, centre, out=kern).square_()
                else:
                    torch.sub(taps, centre, out=diff[:, :, :nz]).square_()
                    kern.add_(diff[:, :, :nz])
            kern.mul_(-0.5).add_(log_scale[a]).clamp_(min=floor).exp_()
            torch.nn.functional.threshold_(kern, cut, 0.0)
            if a == 0:
                torch.sum(kern, (0, 1), out=den)
            else:
                torch.sum(kern, (0, 1), out=part[:nz])
                den.add_(part[:nz])
        torch.gt(den, 0, out=has[slot, :nz])
        den.masked_fill_(den == 0, 1.0).reciprocal_()

    def step(n: int, s: int, slot: int, z0: int, nz: int) -> None:
        """Mean-field step ``s`` (1-based) of image ``n`` on output planes ``z0 .. z0 + nz``."""
        src, msg = probs[(s - 1) % 2], message[:, :nz]
        for c in range(k - 1):  # the last class's message is what the others leave
            for a in range(kd):
                taps = _windows(src[c], a, z0, nz, kernel, dilation, (h, w))
                torch.mul(taps, weights[slot, a, :, :, :nz], out=products[:, :, :nz])
                if a == 0:
                    torch.sum(products[:, :, :nz], (0, 1), out=msg[c])
                else:
                    torch.sum(products[:, :, :nz], (0, 1), out=part[:nz])
                    msg[c].add_(part[:nz])
        msg[: k - 1].mul_(rden[slot, :nz])
        # sum_c M_c = 1 where a voxel has any weight (the probabilities sum to 1), else 0.
        torch.sub(has[slot, :nz], msg[: k - 1].sum(0), out=msg[k - 1])
        logits = out[n, :, z0 : z0 + nz]
        torch.sub(msg, 1, out=logits).mul_(compat).add_(unary[n, :, z0 : z0 + nz])
        if s < iterations:
            dst = probs[s % 2][:, z0 + reach[0] : z0 + reach[0] + nz, interior[1], interior[2]]
            softmax_head(logits, dst)

    for n in range(n_img):
        g_pad[(slice(None), *interior)] = guide[n]
        for z0 in range(0, d, planes):
            nz = min(planes, d - z0)
            dst = probs[0][:, reach[0] + z0 : reach[0] + z0 + nz, interior[1], interior[2]]
            softmax_head(unary[n, :, z0 : z0 + nz], dst)
        for j in range(n_slabs + (iterations - 1) * lag):
            if j < n_slabs:
                z0 = j * planes
                guide_weights(j % ring, z0, min(planes, d - z0))
            for s in range(1, iterations + 1):
                slab = j - (s - 1) * lag
                if 0 <= slab < n_slabs:
                    z0 = slab * planes
                    step(n, s, slab % ring, z0, min(planes, d - z0))


def _recomputing(unary, guide, iterations, kernel, dilation, compat, scale, out) -> None:
    """Every step recomputes the weights tile by tile (``pac_torch``): memory a few tiles."""
    n_img, shape = unary.shape[0], unary.shape[2:]
    dtype, device = out.dtype, out.device
    pad = tuple((k - 1) // 2 * d for k, d in zip(kernel, dilation))
    padded = tuple(s + 2 * p for s, p in zip(shape, pad))
    inner = (slice(None), slice(None), *(slice(p, p + s) for s, p in zip(shape, pad)))
    # Pad q and the guide once: every tile then reads views, no per-tile copies. The guide's
    # padding is FAR_GUIDE (exact zero weights), valid because 'same' padding keeps every window
    # centre inside; the padded geometry has no padding of its own.
    g_pad = torch.full(
        (n_img, guide.shape[1], *padded), pac_torch.FAR_GUIDE, dtype=dtype, device=device
    )
    g_pad[inner] = guide
    q_pad = torch.zeros((n_img, unary.shape[1], *padded), dtype=dtype, device=device)
    _softmax_into(unary, q_pad[inner])
    geo_pad = PacGeometry(padded, kernel, (1, 1, 1), (0, 0, 0), dilation)
    den = torch.empty((n_img, *shape), dtype=dtype, device=device)
    for step in range(iterations):
        pac_torch.pac_forward(q_pad, g_pad, None, None, geo_pad, 1, True, scale, out, den, step > 0)
        out.sub_(1).mul_(float(compat)).add_(unary)  # unary - compat * (1 - M)
        if step < iterations - 1:
            _softmax_into(out, q_pad[inner])


def _softmax_into(logits: torch.Tensor, q: torch.Tensor) -> None:
    """``q = softmax(logits, dim=1)`` written into ``q`` without volume-sized temporaries."""
    torch.sub(logits, logits.amax(dim=1, keepdim=True), out=q)
    q.exp_()
    q.div_(q.sum(dim=1, keepdim=True))
