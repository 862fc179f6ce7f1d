"""``pac_crf3d``: mean-field refinement of class logits with pixel-adaptive messages."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch

from . import crf_numba, crf_torch
from .backend import resolve_backend
from .checks import FLOAT64_UNFUSED, check_taps, compute_dtype, is_int, short_repr, triple
from .pac import bad_guide_mask, check_volume_pair, pac_apply, window_any
from .pac_torch import PacGeometry

# Most mean-field steps pac_crf3d runs (it converges in a handful; 10^9 would never finish).
MAX_ITERATIONS = 1000
# Largest |compat|: beyond it the unary no longer matters and logits lose float32 precision.
MAX_COMPAT = 1e6


def spatial_tap_weights(geo: PacGeometry, spatial_sigma) -> list[float]:
    """``w_s(t)`` for every tap in ``geo.taps()`` order, 0 for the centre tap (no self-message).

    ``w_s(t) = exp(-1/2 * sum_axis (offset_axis(t) / sigma_axis)^2)`` with offsets in voxels,
    dilation included; all ones (centre aside) when ``spatial_sigma`` is None.
    """
    weights = []
    for tap in geo.taps():
        offsets = [(t - c) * d for t, c, d in zip(tap, geo.centre, geo.dilation)]
        if not any(offsets):
            weights.append(0.0)
        elif spatial_sigma is None:
            weights.append(1.0)
        else:  # (o / s) * (o / s), not ** 2: a tiny sigma gives inf (weight 0), no OverflowError
            weights.append(
                math.exp(-0.5 * sum((o / s) * (o / s) for o, s in zip(offsets, spatial_sigma)))
            )
    return weights


def useful_kernel(kernel, dilation, shape) -> tuple[int, int, int]:
    """``kernel`` clipped per axis to the largest window whose taps can land in a volume of
    ``shape``: ``2 * ((n - 1) // dilation) + 1``. Every window centre lies inside the volume, so
    a tap further than ``n - 1`` voxels from it is out of bounds for every voxel, weighs exactly
    0 and changes nothing: the mean field is the same with or without it."""
    return tuple(min(k, 2 * ((n - 1) // d) + 1) for k, d, n in zip(kernel, dilation, shape))


def _sigma_triple(spatial_sigma, op: str):
    if spatial_sigma is None:
        return None
    if _is_number(spatial_sigma):
        sigma = (float(spatial_sigma),) * 3
    elif (
        isinstance(spatial_sigma, (tuple, list))
        and len(spatial_sigma) == 3
        and all(_is_number(s) for s in spatial_sigma)
    ):
        sigma = tuple(float(s) for s in spatial_sigma)
    else:
        raise ValueError(
            f"{op}: spatial_sigma must be None, a number or 3 numbers (d, h, w), got "
            f"{short_repr(spatial_sigma)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sigma):
        raise ValueError(
            f"{op}: spatial_sigma must be positive and finite, got {short_repr(spatial_sigma)}"
        )
    return sigma


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, torch.Tensor))


def pac_crf3d(
    unary: torch.Tensor,
    guide: torch.Tensor,
    iterations: int = 5,
    kernel_size=5,
    dilation=1,
    compat: float = 1.0,
    spatial_sigma=None,
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    keep=None,
) -> torch.Tensor:
    """Mean-field CRF refinement with Potts compatibility and pixel-adaptive messages.

    ``Q0 = softmax(unary)`` over channels; each step computes the normalised message
    ``M_c(i) = sum_t w(i,t) Q_c(i + off(t)) / sum_t w(i,t)`` over the non-centre in-bounds taps,
    ``w(i,t) = w_s(t) * exp(-1/2 ||g_i - g_{i+off(t)}||^2)``, then ``P_c = compat * (1 - M_c)``
    and ``Q = softmax(unary - P)``. Where every weight of a voxel is 0 its message is 0 for
    every class, so its probabilities stay those of the unary (no NaN, no division by zero).

    Parameters
    ----------
    unary : Tensor ``(N, K, D, H, W)``: class logits (K >= 1), float; no dimension of size 0.
    guide : Tensor ``(N, F, D, H, W)``: features that decide affinity (scale them by 1/sigma);
        F >= 1 (a constant guide weighs every tap equally).
    iterations : int in [0, 1000]
    kernel_size : odd int or (d, h, w) triple; dilation : int >= 1 or triple. A window larger
        than the volume is clipped to ``2 * ((n - 1) // dilation) + 1`` per axis (``n`` the
        volume's size): the taps beyond can never land in the volume, so the result is the
        same. The clipped window may have at most 32768 (32^3) taps.
    compat : float: Potts compatibility strength, finite, ``|compat| <= 1e6``.
    spatial_sigma : None, float or (d, h, w): Gaussian spatial falloff in voxels (dilation
        included in the offsets); None weighs all taps of the window equally.
    backend : {"auto", "triton", "torch"}: "auto" runs Triton on CUDA and, on the CPU, the
        mean-field steps as numba loops when numba imports (``crf_numba``); "torch" plain
        torch ops.
    progress : None, or ``progress(done, total)``, called after each unit of work (a step, or
        on the CPU a position of the wavefront over slabs). An exception it raises propagates
        and abandons the call: a caller's way to cancel a long refinement.
    keep : None, or 3 ``(start, stop)`` ranges of the volume: return that sub-box only, the
        same values as cropping the whole result. The CPU mean field then runs step ``s`` only
        on the planes (along its wavefront axis) within ``iterations - s`` windows of the
        kept range (the live preview's 3 planes of a 13-plane region: 0.13 s, whole 0.19 s;
        benchmarks/bench_preview.py).

    Returns
    -------
    Tensor ``(N, K, D, H, W)`` (the ``keep`` box's sizes with ``keep``): the refined logits
    ``unary - P`` of the last step (``unary`` itself when ``iterations == 0``), float32
    (float64 for float64 inputs). Differentiable in ``unary`` and ``guide``.

    Non-finite values are never turned into finite logits silently: a NaN or +inf logit in
    ``unary`` makes its voxel's probabilities NaN, and each step spreads NaN one window
    further (a -inf logit is a probability of 0 and stays -inf). A guide value that is NaN or
    +-inf makes NaN every voxel within ``iterations`` windows of it (all classes).

    Raises
    ------
    ValueError
        Wrong dims or dtypes, mismatched shapes or devices, a dimension of size 0 (batch,
        classes, guide features, spatial), even kernel sizes, more than 32768 taps, iterations
        outside [0, 1000], a non-finite or too large compat, bad spatial_sigma, bools or strings
        where numbers are meant, a ``keep`` that is not 3 non-empty ranges inside the volume.
    """
    op = "pac_crf3d"
    check_volume_pair(unary, guide, op, x_name="unary", what="class (K >= 1 logits per voxel)")
    iterations, kernel, dil, compat, sigma = check_crf_params(
        iterations, kernel_size, dilation, compat, spatial_sigma, op
    )
    if progress is not None and not callable(progress):
        raise ValueError(f"{op}: progress must be None or a callable(done, total)")
    if keep is not None:
        keep = _check_keep(keep, tuple(unary.shape[2:]), op)
        crop = (slice(None), slice(None), *(slice(a, b) for a, b in keep))
    kernel = useful_kernel(kernel, dil, unary.shape[2:])
    check_taps(kernel, op, "kernel_size (clipped to the volume)")
    dtype = compute_dtype(unary, guide)
    unary = unary.to(dtype)
    if iterations == 0:
        return unary if keep is None else unary[crop]
    logits = _mean_field(
        unary, guide, iterations, kernel, dil, compat, sigma, dtype, backend, op, progress, keep
    )
    bad = bad_guide_mask(guide)
    if bad is not None:  # the kernels give such taps weight 0; make what they reach NaN instead
        pad = tuple((k - 1) // 2 * d for k, d in zip(kernel, dil))
        for _ in range(iterations):  # each step spreads the NaN by one window
            bad = window_any(bad, kernel, (1, 1, 1), pad, dil).to(torch.float32)
            if bool(bad.all()):
                break
        logits = logits.masked_fill(bad > 0, float("nan"))
    return logits if keep is None else logits[crop]


def _check_keep(keep, shape, op: str) -> tuple[tuple[int, int], ...]:
    """``keep`` as 3 ``(start, stop)`` int pairs with ``0 <= start < stop <= size``, or
    ``ValueError``."""
    try:
        pairs = tuple((a, b) for a, b in keep)
    except (TypeError, ValueError):
        pairs = ()
    if (
        len(pairs) != 3
        or not all(is_int(v) for pair in pairs for v in pair)
        or not all(0 <= a < b <= n for (a, b), n in zip(pairs, shape))
    ):
        raise ValueError(
            f"{op}: keep must be None or 3 (start, stop) int ranges with 0 <= start < stop <= "
            f"size inside the volume {shape}, got {short_repr(keep)}"
        )
    return tuple((int(a), int(b)) for a, b in pairs)


def check_crf_params(iterations, kernel_size, dilation, compat, spatial_sigma, op: str):
    """Validated ``(iterations, kernel, dilation, compat, sigma)`` of ``pac_crf3d``; kernel and
    dilation as triples, sigma as a triple or None. ``ValueError`` naming ``op`` otherwise."""
    if not is_int(iterations) or iterations < 0:
        raise ValueError(f"{op}: iterations must be an int >= 0, got {short_repr(iterations)}")
    if iterations > MAX_ITERATIONS:
        raise ValueError(
            f"{op}: iterations must be at most {MAX_ITERATIONS} (mean field settles in a few "
            f"steps), got {short_repr(iterations)}"
        )
    if not _is_number(compat) or not math.isfinite(compat) or abs(compat) > MAX_COMPAT:
        raise ValueError(
            f"{op}: compat must be a finite number in [-{MAX_COMPAT:g}, {MAX_COMPAT:g}], got "
            f"{short_repr(compat)}"
        )
    kernel = triple(kernel_size, "kernel_size", op)
    dil = triple(dilation, "dilation", op)
    if any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"{op}: kernel sizes must be odd and >= 1, got {short_repr(kernel)}")
    if any(d < 1 for d in dil):
        raise ValueError(f"{op}: dilation must be >= 1, got {short_repr(dil)}")
    sigma = _sigma_triple(spatial_sigma, op)
    return int(iterations), kernel, dil, float(compat), sigma


def _mean_field(
    unary, guide, iterations, kernel, dil, compat, sigma, dtype, backend, op, progress=None,
    keep=None,
):  # fmt: skip
    """The refined logits of ``pac_crf3d`` (validated arguments, ``iterations >= 1``), whole;
    only ``keep`` (None: all) is sure to be computed."""
    pad = tuple((k - 1) // 2 * d for k, d in zip(kernel, dil))
    geo = PacGeometry(tuple(unary.shape[2:]), kernel, (1, 1, 1), pad, dil)
    scale = spatial_tap_weights(geo, sigma)
    grad = torch.is_grad_enabled() and (unary.requires_grad or guide.requires_grad)
    if grad:  # differentiable composition; autograd keeps each step's tensors
        q = torch.softmax(unary, dim=1)
        for step in range(iterations):
            message = pac_apply(q, guide, None, None, geo, 1, True, scale, backend, op)
            logits = unary - compat * (1 - message)
            if step < iterations - 1:
                q = torch.softmax(logits, dim=1)
            if progress is not None:
                progress(step + 1, iterations)
        return logits
    reason = FLOAT64_UNFUSED if dtype == torch.float64 else ""
    chosen = resolve_backend(backend, unary.device, op=op, triton_unsupported=reason)
    logits = torch.empty(unary.shape, dtype=dtype, device=unary.device)
    if chosen == "triton":
        from . import pac_triton

        q = torch.softmax(unary, dim=1).contiguous()
        # One fused kernel per step: message, compatibility and softmax.
        q_next = torch.empty_like(q)
        for step in range(iterations):
            pac_triton.crf_step(q, guide, unary, geo, scale, float(compat), logits, q_next)
            q, q_next = q_next, q
            if progress is not None:
                progress(step + 1, iterations)
        return logits
    fused = backend == "auto" and unary.device.type == "cpu" and crf_numba.available()
    if fused:  # its loops address unary and the logits with one set of strides
        unary = unary.contiguous()
    crf_torch.mean_field(
        unary, guide, iterations, kernel, dil, float(compat), scale, logits, progress, keep,
        fused,
    )  # fmt: skip
    return logits
