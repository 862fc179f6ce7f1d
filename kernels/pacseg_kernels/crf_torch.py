"""Plain-torch mean field of ``pac_crf3d`` (no autograd): the adapting weights are computed once.

The weights ``w(i, t)`` depend on the guide only, so recomputing them every step (an ``exp``
per voxel and tap) wastes most of the time. Keeping them for the whole volume would cost one
float per voxel and tap (75-125x the unary), so the steps run as a wavefront over z slabs:
at wavefront position ``j`` the weights of slab ``j`` are computed, step 1 runs on slab ``j``,
step 2 on slab ``j - L``, ..., step ``S`` on slab ``j - (S - 1) L``, where ``L`` slabs cover
the window's reach in z. Every step then finds the previous step's probabilities it reads
already computed, and only the weights of the last ``(S - 1) L + 1`` slabs are alive (every
slab's, when the region has fewer: a thin region under many steps).

Two probability buffers suffice (even steps in one, odd steps in the other): step ``s`` on
slab ``j`` overwrites step ``s - 2`` there, whose last reader (step ``s - 1`` on slab
``j + L``) ran earlier at the same wavefront position, since steps run in increasing order.

The wavefront runs over z when its weights fit ``RING_BUDGET`` times the inputs and the
output (or ``RING_FLOOR_BYTES``, whichever is more, for regions of at most ``THIN_PLANES``
planes), else over y (on ``(H, D, W)`` views of the same memory): a y plane is smaller than a
z plane in volumes thinner than they are tall, such as refinement tiles with windows that
reach 2+ planes in z. When neither fits (or many steps), every step recomputes the weights
instead, tile by tile (``pac_torch``).

With ``fused`` (``pac_crf3d``'s CPU default when numba imports) a slab's weights and each of its
steps are one compiled loop each (``crf_numba``), in place of the torch calls below; the
wavefront, its ring and the ``keep`` cone are the same.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch

from . import pac_torch
from .pac_torch import PacGeometry

Progress = Callable[[int, int], None]

# The weights kept alive may take this many times the bytes of unary + guide + output.
RING_BUDGET = 2.0
# ... or this many bytes, whichever is more, for a region of at most THIN_PLANES planes (a live
# preview's few planes and their reach): the z wavefront is the one that ``keep`` lets skip
# planes (the default preview's 13 x 256 x 256 region, 5 steps, 3 planes kept: z 0.13 s, y
# 0.19 s; z without ``keep`` 0.19 s; benchmarks/bench_preview.py). On 256 x 256 planes its weights
# take ~100 MiB whatever the depth, so deeper regions keep the rule above.
RING_FLOOR_BYTES = 128 << 20
THIN_PLANES = 16
# Voxels per slab worth one torch call: planes smaller than this are grouped.
SLAB_VOXELS = 1 << 14
# Slab voxels per torch thread from which a step's message is summed tap by tap on the CPU: a
# call per tap costs a few microseconds, and torch runs an elementwise call of fewer than 32768
# elements on one thread, so smaller slabs keep the one call over all taps.
PER_TAP_VOXELS = 1 << 14
# Axes the wavefront may run over, in order of preference (0: z, 1: y).
WAVEFRONT_AXES = (0, 1)


def mean_field(
    unary: torch.Tensor,
    guide: torch.Tensor,
    iterations: int,
    kernel: tuple[int, int, int],
    dilation: tuple[int, int, int],
    compat: float,
    scale: list[float],
    out: torch.Tensor,
    progress: Progress | None = None,
    keep=None,
    fused: bool = False,
) -> None:
    """Write the refined logits of ``iterations >= 1`` mean-field steps into ``out``.

    unary : ``(N, K, D, H, W)``, guide : ``(N, F, D, H, W)``, out : ``(N, K, D, H, W)``
    contiguous, all of one float dtype; ``scale`` the spatial tap weights in ``geo.taps()``
    order (0 for the centre). ``progress(done, total)`` is called after each unit of work (a
    wavefront position, or a step when the weights are recomputed). ``fused``: run each
    wavefront step as one compiled loop (``crf_numba``; the caller checks it is available).
    """
    plan = wavefront_plan(unary, guide, iterations, kernel, dilation)
    if plan is None:
        _recomputing(unary, guide, iterations, kernel, dilation, compat, scale, out, progress)
    elif plan[0] == 0:
        cone = None if keep is None else keep[0]
        _wavefront(
            unary, guide, iterations, kernel, dilation, compat, scale, out, plan[1], progress,
            cone, fused,
        )  # fmt: skip
    else:  # over y: the same maths on (N, C, H, D, W) views, taps reordered to match
        order = (1, 0, 2)
        scale_yzx = (
            torch.tensor(scale, dtype=torch.float64).view(kernel).permute(order).flatten().tolist()
        )
        kernel, dilation = (tuple(t[i] for i in order) for t in (kernel, dilation))
        unary, guide, out = (t.transpose(2, 3) for t in (unary, guide, out))
        cone = None if keep is None else keep[1]
        _wavefront(
            unary, guide, iterations, kernel, dilation, compat, scale_yzx, out, plan[1], progress,
            cone, fused,
        )  # fmt: skip


def wavefront_plan(unary, guide, iterations, kernel, dilation) -> tuple[int, int] | None:
    """``(axis, planes)``: the wavefront's axis (0: z, 1: y) and planes per slab, or None when
    its weights fit the budget along neither axis. z is tried first: its planes are
    contiguous. A region of at most ``THIN_PLANES`` planes may give the z wavefront's weights
    ``RING_FLOOR_BYTES``."""
    base = RING_BUDGET * unary.element_size() * (2 * unary[0].numel() + guide[0].numel())
    thin = unary.shape[2] <= THIN_PLANES
    for axis in WAVEFRONT_AXES:
        budget = max(base, RING_FLOOR_BYTES) if axis == 0 and thin else base
        order = (axis, 1 - axis, 2)
        planes = _slab_planes(
            tuple(unary.shape[2 + i] for i in order),
            iterations,
            tuple(kernel[i] for i in order),
            tuple(dilation[i] for i in order),
            budget / unary.element_size(),
        )
        if planes is not None:
            return axis, planes
    return None


def _slab_planes(shape, iterations, kernel, dilation, budget) -> int | None:
    """Planes per slab of a wavefront over the first axis of ``shape`` whose weights (and
    their sums) take at most ``budget`` elements, or None."""
    d, h, w = shape
    planes = max(1, min(d, -(-SLAB_VOXELS // (h * w))))
    taps = math.prod(kernel)
    while True:
        if (
            _ring_slabs(iterations, kernel, dilation, planes, d) * (taps + 2) * planes * h * w
            <= budget
        ):
            return planes
        if planes == 1:
            return None
        planes = max(1, planes // 2)


def _ring_slabs(iterations, kernel, dilation, planes, depth) -> int:
    """Slabs whose weights are alive at once: ``(S - 1) L + 1``, or every slab of a region of
    ``depth`` planes when that is fewer (a thin region under many steps keeps all its weights)."""
    reach = (kernel[0] - 1) // 2 * dilation[0]
    return min((iterations - 1) * -(-reach // planes) + 1, -(-depth // planes))


def _windows(t: torch.Tensor, z: int, n_planes: int, kernel, dilation, shape):
    """``(kd, kh, kw, n_planes, H, W)`` view of the padded ``(Dp, Hp, Wp)`` tensor ``t``: every
    tap of the window, for output planes ``z .. z + n_planes`` of an output of in-plane
    ``shape``."""
    sd, sh, sw = t.stride()
    return t.as_strided(
        (*kernel, n_planes, *shape),
        (sd * dilation[0], sh * dilation[1], sw * dilation[2], sd, sh, sw),
        t.storage_offset() + z * sd,
    )


class _SlabViews:
    """Flat work buffers and, per slab thickness ``nz`` (the last slab may be thinner), the
    views of them a slab uses, made once. The weights' passes over the taps are one torch call
    over all of them (a kernel launch per pass on a GPU). A step's message is one call too on
    a GPU (a products buffer of all taps, then its sum), but on the CPU a loop of ``addcmul_``,
    a call per tap with no products buffer, on slabs of at least ``PER_TAP_VOXELS`` voxels per
    thread: on a 256 x 256 plane of a 3 x 5 x 5 window 2.2x faster at one thread, 1.9x at two,
    the one call over the strided taps running far below the memory's speed (on slabs of
    7,700 voxels at one thread, the loop's calls cost more than they save)."""

    def __init__(
        self, ring, kernel, planes, plane_shape, k, n_guide, dtype, device, fused=False
    ):  # fmt: skip
        new = functools.partial(torch.empty, dtype=dtype, device=device)
        self.kernel, self.plane_shape, self.k = kernel, plane_shape, k
        self.taps = math.prod(kernel)
        size = planes * plane_shape[0] * plane_shape[1]
        self.weights = new((ring, self.taps * size))
        self.rden, self.has = new((ring, size)), new((ring, size))
        self.per_tap = fused or (
            torch.device(device).type == "cpu" and size >= PER_TAP_VOXELS * torch.get_num_threads()
        )
        # The fused loops (``crf_numba``) need only the weights, 1 / sum and has.
        self.products = None if self.per_tap else new(self.taps * size)
        self.message, self.exps = new(k * size), new(k * size)
        self.squares = new(self.taps * size) if n_guide > 1 and not fused else None
        self._cache: dict[int, dict] = {}

    def __call__(self, nz: int) -> dict:
        views = self._cache.get(nz)
        if views is None:
            n = nz * self.plane_shape[0] * self.plane_shape[1]
            slab, taps = (nz, *self.plane_shape), (*self.kernel, nz, *self.plane_shape)
            weights = [w[: self.taps * n] for w in self.weights]
            message = self.message[: self.k * n]
            views = self._cache[nz] = {
                "weights": [w.view(self.taps, n) for w in weights],  # (T, n)
                "weights_taps": [w.view(taps) for w in weights],  # (kd, kh, kw, nz, H, W)
                "den": [r[:n] for r in self.rden],  # (n,)
                "rden": [r[:n].view(slab) for r in self.rden],
                "has": [h[:n].view(slab) for h in self.has],
                "has_flat": [h[:n] for h in self.has],  # (n,)
                "message": message.view(self.k, *slab),
                "message_rows": list(message.view(self.k, n)),
                "exps": self.exps[: self.k * n].view(self.k, *slab),
            }
            if self.per_tap:  # per ring slot, the weights of each tap (T of (nz, H, W))
                views["weights_list"] = [list(w.view(self.taps, *slab)) for w in weights]
            else:
                views["products"] = self.products[: self.taps * n].view(self.taps, n)
                views["products_taps"] = self.products[: self.taps * n].view(taps)
            if self.squares is not None:
                views["squares_taps"] = self.squares[: self.taps * n].view(taps)
        return views


def _wavefront(
    unary, guide, iterations, kernel, dilation, compat, scale, out, planes, progress=None,
    cone=None, fused=False,
) -> None:  # fmt: skip
    """The wavefront of the module docstring over slabs of ``planes`` planes of the first
    spatial axis; arguments as in ``mean_field``, but ``unary``, ``guide`` and ``out`` may be
    strided views (the y wavefront passes transposed ones). Per image: the padded guide, two
    ``(K - 1)``-channel padded probability buffers, and the ring of weights
    ``(ring, T, planes * H * W)`` (``T`` taps, in ``geo.taps()`` order) with each slab's
    ``1 / sum_t w`` and ``sum_t w > 0``. ``cone``: None, or the ``(start, stop)`` planes of the
    first spatial axis whose output is wanted; step ``s`` then runs only on the slabs that hold
    planes within ``(iterations - s) * reach`` of them (what those planes depend on, rounded
    out to whole slabs; the other planes of ``out`` are left unwritten). ``fused``: each step
    on a slab is one ``crf_numba.step`` call."""
    n_img, k, d, h, w = unary.shape
    dtype, device = out.dtype, out.device
    reach = tuple((kk - 1) // 2 * dd for kk, dd in zip(kernel, dilation))
    padded = tuple(s + 2 * r for s, r in zip((d, h, w), reach))
    interior = tuple(slice(r, r + s) for s, r in zip((d, h, w), reach))
    lag = -(-reach[0] // planes)
    ring = _ring_slabs(iterations, kernel, dilation, planes, d)
    n_slabs = -(-d // planes)
    floor, cut = pac_torch.exp_limits(dtype)
    tiny = torch.finfo(dtype).tiny
    # log of the tap scale; -inf (a weight of exactly 0 after the cut) for the centre.
    log_scale = torch.tensor(
        [math.log(v) if v > 0 else -math.inf for v in scale], dtype=dtype, device=device
    ).view(-1, 1)
    n_guide = guide.shape[1]
    views = _SlabViews(ring, kernel, planes, (h, w), k, n_guide, dtype, device, fused)
    g_pad = torch.full((n_guide, *padded), pac_torch.FAR_GUIDE, dtype=dtype, device=device)
    g_inner = g_pad[(slice(None), *interior)]
    g_rows, g_centres = list(g_pad), list(g_inner)
    # Only the first K - 1 classes' probabilities are ever read (the last one's message is what
    # the others leave), so only they are kept.
    probs = [torch.zeros((k - 1, *padded), dtype=dtype, device=device) for _ in range(2)]
    prob_rows = [list(p) for p in probs]
    prob_inner = [p[(slice(None), *interior)] for p in probs]

    def windows(t, z0, nz):
        return _windows(t, z0, nz, kernel, dilation, (h, w))

    def softmax_head(logits: torch.Tensor, dst: torch.Tensor, exps: torch.Tensor) -> None:
        """``dst`` ``(K - 1, nz, H, W)`` = the first K - 1 channels of softmax(logits, 0)."""
        torch.sub(logits, logits.amax(0, keepdim=True), out=exps).exp_()
        torch.div(exps[: k - 1], exps.sum(0, keepdim=True), out=dst)

    def guide_weights(slot: int, z0: int, nz: int) -> None:
        v = views(nz)
        if fused:
            crf_numba.guide_weights(
                g_pad, tap_offsets, reach, log_scale_flat, v["weights"][slot], v["den"][slot],
                v["has_flat"][slot], z0, nz, (h, w), floor, cut,
            )  # fmt: skip
            return
        kern, kern_taps = v["weights"][slot], v["weights_taps"][slot]
        for f in range(n_guide):
            centre = g_centres[f].narrow(0, z0, nz)
            target = kern_taps if f == 0 else v["squares_taps"]
            torch.sub(windows(g_rows[f], z0, nz), centre, out=target)
            if n_guide > 1:
                target.square_()
                if f > 0:
                    kern_taps.add_(target)
        if n_guide == 1:  # log_scale - d^2 / 2 in one pass
            torch.addcmul(log_scale, kern, kern, value=-0.5, out=kern)
        else:
            torch.add(log_scale, kern, alpha=-0.5, out=kern)
        kern.clamp_(min=floor).exp_()
        torch.nn.functional.threshold_(kern, cut, 0.0)
        den = v["den"][slot]
        torch.sum(kern, 0, out=den)
        torch.gt(den, 0, out=v["has_flat"][slot])
        # The weights are 0 or >= cut > tiny, so the clamp only turns 0 into tiny: a voxel with
        # no weight gets a finite 1 / sum that multiplies messages of exactly 0.
        den.clamp_(min=tiny).reciprocal_()

    if fused:
        from . import crf_numba

        # Each tap's offset in a padded probability buffer from its window's first voxel.
        p_strides = probs[0].stride()[1:]
        tap_offsets = torch.tensor(
            [
                sum(i * dd * st for i, dd, st in zip(tap, dilation, p_strides))
                for tap in itertools.product(*(range(kk) for kk in kernel))
            ],
            dtype=torch.int64,
        )
        log_scale_flat = log_scale.view(-1)

    def step(s: int, slot: int, z0: int, nz: int, unary_n, out_n) -> None:
        """Mean-field step ``s`` (1-based) on output planes ``z0 .. z0 + nz`` of one image."""
        v = views(nz)
        if fused:
            crf_numba.step(
                v["weights"][slot], v["den"][slot], v["has_flat"][slot], probs[(s - 1) % 2],
                probs[s % 2], tap_offsets, reach, unary_n, out_n, z0, nz, compat,
                s < iterations,
            )  # fmt: skip
            return
        msg, rows = v["message"], v["message_rows"]
        for c in range(k - 1):  # the last class's message is what the others leave
            src = windows(prob_rows[(s - 1) % 2][c], z0, nz)
            if views.per_tap:  # sum_t w_t q_t tap by tap, in geo.taps() order
                taps = [q for a in src.unbind(0) for b in a.unbind(0) for q in b.unbind(0)]
                weights, m = v["weights_list"][slot], msg[c]
                torch.mul(taps[0], weights[0], out=m)
                for q, wt in zip(taps[1:], weights[1:]):
                    m.addcmul_(q, wt)
            else:
                torch.mul(src, v["weights_taps"][slot], out=v["products_taps"])
                torch.sum(v["products"], 0, out=rows[c])
        head = msg[: k - 1]
        head.mul_(v["rden"][slot])
        # sum_c M_c = 1 where a voxel has any weight (the probabilities sum to 1), else 0.
        if k == 2:
            torch.sub(v["has"][slot], msg[0], out=msg[1])
        else:
            torch.sum(head, 0, out=msg[k - 1])
            torch.sub(v["has"][slot], msg[k - 1], out=msg[k - 1])
        logits = out_n.narrow(1, z0, nz)
        torch.add(unary_n.narrow(1, z0, nz), msg.sub_(1), alpha=compat, out=logits)
        if s < iterations:
            softmax_head(logits, prob_inner[s % 2].narrow(1, z0, nz), v["exps"])

    positions = n_slabs + (iterations - 1) * lag
    if cone is None:
        cone = (0, d)
    # Slabs [first, last) that step s (1-based) runs on, from the last step back: the slabs
    # holding the planes the next step's slabs read.
    needed, (lo, hi) = [], cone
    for _ in range(iterations):
        first, last = lo // planes, -(-hi // planes)
        needed.insert(0, (first, last))
        lo, hi = max(0, first * planes - reach[0]), min(d, last * planes + reach[0])
    for n in range(n_img):
        g_inner.copy_(guide[n])
        unary_n, out_n = unary[n], out[n]
        for z0 in range(0, d, planes):
            nz = min(planes, d - z0)
            softmax_head(
                unary_n.narrow(1, z0, nz), prob_inner[0].narrow(1, z0, nz), views(nz)["exps"]
            )
        for j in range(positions):
            if needed[0][0] <= j < needed[0][1]:
                z0 = j * planes
                guide_weights(j % ring, z0, min(planes, d - z0))
            for s in range(1, iterations + 1):
                slab = j - (s - 1) * lag
                if needed[s - 1][0] <= slab < needed[s - 1][1]:
                    z0 = slab * planes
                    step(s, slab % ring, z0, min(planes, d - z0), unary_n, out_n)
            if progress is not None:
                progress(n * positions + j + 1, n_img * positions)


def _recomputing(
    unary, guide, iterations, kernel, dilation, compat, scale, out, progress=None
) -> None:
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
    valid = [(p, p + s) for s, p in zip(shape, pad)]  # taps into the padding weigh exactly 0
    den = torch.empty((n_img, *shape), dtype=dtype, device=device)
    for step in range(iterations):
        pac_torch.pac_forward(
            q_pad, g_pad, None, None, geo_pad, 1, True, scale, out, den, step > 0, valid
        )
        out.sub_(1).mul_(float(compat)).add_(unary)  # unary - compat * (1 - M)
        if step < iterations - 1:
            _softmax_into(out, q_pad[inner])
        if progress is not None:
            progress(step + 1, iterations)


def _softmax_into(logits: torch.Tensor, q: torch.Tensor) -> None:
    """``q = softmax(logits, dim=1)`` written into ``q`` without volume-sized temporaries."""
    torch.sub(logits, logits.amax(dim=1, keepdim=True), out=q)
    q.exp_()
    q.div_(q.sum(dim=1, keepdim=True))
