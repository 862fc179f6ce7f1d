"""``pac_crf3d``: mean-field refinement of class logits with pixel-adaptive messages."""

from __future__ import annotations

import math
from numbers import Real

import torch

from . import crf_torch
from .backend import resolve_backend
from .checks import FLOAT64_UNFUSED, compute_dtype, triple
from .pac import check_volume_pair, pac_apply
from .pac_torch import PacGeometry


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
        else:
            weights.append(
                math.exp(-0.5 * sum((o / s) ** 2 for o, s in zip(offsets, spatial_sigma)))
            )
    return weights


def _sigma_triple(spatial_sigma, op: str):
    if spatial_sigma is None:
        return None
    if isinstance(spatial_sigma, Real) and not isinstance(spatial_sigma, bool):
        sigma = (float(spatial_sigma),) * 3
    elif isinstance(spatial_sigma, (tuple, list)) and len(spatial_sigma) == 3:
        sigma = tuple(float(s) for s in spatial_sigma)
    else:
        raise ValueError(
            f"{op}: spatial_sigma must be None, a number or 3 numbers (d, h, w), got {spatial_sigma!r}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sigma):
        raise ValueError(f"{op}: spatial_sigma must be positive and finite, got {spatial_sigma!r}")
    return sigma


def pac_crf3d(
    unary: torch.Tensor,
    guide: torch.Tensor,
    iterations: int = 5,
    kernel_size=5,
    dilation=1,
    compat: float = 1.0,
    spatial_sigma=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean-field CRF refinement with Potts compatibility and pixel-adaptive messages.

    ``Q0 = softmax(unary)`` over channels; each step computes the normalised message
    ``M_c(i) = sum_t w(i,t) Q_c(i + off(t)) / sum_t w(i,t)`` over the non-centre in-bounds taps,
    ``w(i,t) = w_s(t) * exp(-1/2 ||g_i - g_{i+off(t)}||^2)``, then ``P_c = compat * (1 - M_c)``
    and ``Q = softmax(unary - P)``. Where every weight of a voxel is 0 its message is 0 for
    every class, so its probabilities stay those of the unary (no NaN, no division by zero).

    Parameters
    ----------
    unary : Tensor ``(N, K, D, H, W)``: class logits (K >= 1), float.
    guide : Tensor ``(N, F, D, H, W)``: features that decide affinity (scale them by 1/sigma).
    iterations : int >= 0
    kernel_size : odd int or (d, h, w) triple; dilation : int >= 1 or triple.
    compat : float: Potts compatibility strength.
    spatial_sigma : None, float or (d, h, w): Gaussian spatial falloff in voxels (dilation
        included in the offsets); None weighs all taps of the window equally.
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    Tensor ``(N, K, D, H, W)``: the refined logits ``unary - P`` of the last step (``unary``
    itself when ``iterations == 0``), float32 (float64 for float64 inputs). Differentiable in
    ``unary`` and ``guide``.
    """
    op = "pac_crf3d"
    check_volume_pair(unary, guide, op, x_name="unary")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"{op}: iterations must be an int >= 0, got {iterations!r}")
    if not isinstance(compat, Real) or not math.isfinite(compat):
        raise ValueError(f"{op}: compat must be a finite number, got {compat!r}")
    kernel = triple(kernel_size, "kernel_size", op)
    dil = triple(dilation, "dilation", op)
    if any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"{op}: kernel sizes must be odd and >= 1, got {kernel}")
    if any(d < 1 for d in dil):
        raise ValueError(f"{op}: dilation must be >= 1, got {dil}")
    sigma = _sigma_triple(spatial_sigma, op)
    dtype = compute_dtype(unary, guide)
    unary = unary.to(dtype)
    if iterations == 0:
        return unary
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
        return logits
    reason = FLOAT64_UNFUSED if dtype == torch.float64 else ""
    chosen = resolve_backend(backend, unary.device, op=op, triton_unsupported=reason)
    logits = torch.empty(unary.shape, dtype=dtype, device=unary.device)
    if chosen == "triton":
        from . import pac_triton

        q = torch.softmax(unary, dim=1).contiguous()
        # One fused kernel per step: message, compatibility and softmax.
        q_next = torch.empty_like(q)
        for _ in range(iterations):
            pac_triton.crf_step(q, guide, unary, geo, scale, float(compat), logits, q_next)
            q, q_next = q_next, q
        return logits
    crf_torch.mean_field(unary, guide, iterations, kernel, dil, float(compat), scale, logits)
    return logits
