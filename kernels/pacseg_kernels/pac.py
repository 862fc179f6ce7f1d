"""``pac3d``: 3D pixel-adaptive convolution (Su et al., CVPR 2019), derived from its definition.

``out[n,o,i] = bias[o] + sum_{c,t} W[o,c,t] * K[n,i,t] * x[n, c, i*s - p + t*d]`` with
``K[n,i,t] = exp(-1/2 * sum_f (g[n,f,centre(i)] - g[n,f,i*s - p + t*d])^2)``, the window centre
``centre(i) = i*s - p + (k-1)/2*d``; taps outside the input contribute nothing and the guide is
zero-padded.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import pac_torch
from .backend import resolve_backend
from .checks import (
    FLOAT64_UNFUSED,
    check_float,
    check_not_empty,
    compute_dtype,
    is_int,
    odd_kernel,
    short_repr,
    triple,
)
from .pac_torch import PacGeometry

# pac3d refuses padding whose padded input, prod(n + 2 p), exceeds this many times the input's
# voxels (or MAX_PADDED_VOXELS, whichever is larger): the padded slabs and the output grow with
# it (kernel_size=2001, padding=1000 on a 2x2x2 input would be 8e9 voxels).
MAX_PADDED_FACTOR = 64
MAX_PADDED_VOXELS = 1 << 24


def check_volume_pair(x, guide, op: str, x_name: str = "input", what: str = "channel") -> None:
    """Both ``(N, C, D, H, W)`` float tensors on one device with the same N, D, H, W, no size 0.

    ``what`` names what the channels of ``x`` hold, for the message when there are none.
    """
    check_float(x, x_name, op)
    check_float(guide, "guide", op)
    for t, name in ((x, x_name), (guide, "guide")):
        if t.ndim != 5:
            raise ValueError(f"{op}: {name} must be (N, C, D, H, W), got shape {tuple(t.shape)}")
    if guide.shape[0] != x.shape[0] or guide.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"{op}: guide has shape {tuple(guide.shape)} but {x_name} {tuple(x.shape)}; the batch "
            "and spatial sizes (N, D, H, W) must match"
        )
    if guide.device != x.device:
        raise ValueError(f"{op}: guide is on {guide.device} but {x_name} on {x.device}")
    check_not_empty(x, x_name, op, what=what)
    if guide.shape[1] == 0:
        raise ValueError(
            f"{op}: guide has shape {tuple(guide.shape)}: C (channels) is 0 (axis 1); give at "
            "least one guide feature (a constant one, torch.zeros(N, 1, D, H, W), weighs every "
            "tap equally)"
        )


def bad_guide_mask(guide: torch.Tensor) -> torch.Tensor | None:
    """``(N, 1, D, H, W)`` float mask of voxels whose guide features are not all finite, or
    None when every guide value is finite.

    The test is one sum over the guide (a finite sum means finite values; measured 0.15 ms vs
    6 ms for ``isfinite().all()`` on 3M floats, which allocates); only a non-finite sum, NaN or
    inf or an overflow, computes the mask.
    """
    if math.isfinite(float(guide.detach().sum(dtype=torch.float32))):
        return None
    bad = (~torch.isfinite(guide.detach())).any(1, keepdim=True)
    return bad.to(torch.float32) if bool(bad.any()) else None


def window_any(mask: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Bool ``(N, 1, *out)``: whether any voxel of each output's window (``conv3d`` geometry,
    zero padding) is set in the float ``(N, 1, D, H, W)`` ``mask``. Separable: one max pool
    per axis, so the cost is ``sum(kernel)`` per voxel, not ``prod(kernel)``."""
    m = torch.nn.functional.pad(
        mask, (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0])
    )
    for axis in range(3):
        k, s, d = ([1, 1, 1] for _ in range(3))
        k[axis], s[axis], d[axis] = kernel[axis], stride[axis], dilation[axis]
        m = torch.nn.functional.max_pool3d(m, tuple(k), tuple(s), 0, tuple(d))
    return m > 0


def geometry(x, weight, kernel_size, stride, padding, dilation, op: str) -> PacGeometry:
    if weight is not None:
        kernel = tuple(weight.shape[2:])
        if kernel_size is not None and triple(kernel_size, "kernel_size", op) != kernel:
            raise ValueError(
                f"{op}: kernel_size={kernel_size!r} disagrees with weight of shape "
                f"{tuple(weight.shape)}; drop kernel_size or make them agree"
            )
    elif kernel_size is None:
        raise ValueError(f"{op}: weight=None (adaptive filtering) needs kernel_size")
    else:
        kernel = triple(kernel_size, "kernel_size", op)
    stride = triple(stride, "stride", op)
    padding = triple(padding, "padding", op)
    dilation = triple(dilation, "dilation", op)
    kernel = odd_kernel(kernel, op)
    if any(s < 1 for s in stride):
        raise ValueError(f"{op}: stride must be >= 1, got {short_repr(stride)}")
    if any(p < 0 for p in padding):
        raise ValueError(f"{op}: padding must be >= 0, got {short_repr(padding)}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"{op}: dilation must be >= 1, got {short_repr(dilation)}")
    shape = tuple(x.shape[2:])
    geo = PacGeometry(shape, kernel, stride, padding, dilation)
    if any(o < 1 for o in geo.out_shape):
        raise ValueError(
            f"{op}: input of spatial size {shape} is too small for kernel {kernel} "
            f"with dilation {short_repr(dilation)} and padding {short_repr(padding)} (output "
            f"size {short_repr(geo.out_shape)})"
        )
    padded = math.prod(n + 2 * p for n, p in zip(shape, padding))
    limit = max(MAX_PADDED_FACTOR * math.prod(shape), MAX_PADDED_VOXELS)
    if padded > limit:
        raise ValueError(
            f"{op}: padding {short_repr(padding)} on an input of spatial size {shape} makes a "
            f"padded input of {short_repr(padded)} voxels; at most {limit} ("
            f"{MAX_PADDED_FACTOR} times the input or {MAX_PADDED_VOXELS}) are supported: use "
            "less padding"
        )
    return geo


class _PacFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, guide, weight, bias, geo, groups, normalize, tap_scale, backend):
        dtype = compute_dtype(x, guide, weight, bias)
        c_out = x.shape[1] if weight is None else weight.shape[0]
        out = torch.empty((x.shape[0], c_out, *geo.out_shape), dtype=dtype, device=x.device)
        w = None if weight is None else weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        if out.numel():
            if backend == "triton":
                from . import pac_triton

                pac_triton.pac_forward(x, guide, w, b, geo, groups, normalize, tap_scale, out)
            else:
                pac_torch.pac_forward(x, guide, w, b, geo, groups, normalize, tap_scale, out)
        ctx.save_for_backward(x, guide, weight)
        ctx.meta = (geo, groups, normalize, tap_scale, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, guide, weight = ctx.saved_tensors
        geo, groups, normalize, tap_scale, has_bias = ctx.meta
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            weight is not None and ctx.needs_input_grad[2],
            has_bias and ctx.needs_input_grad[3],
        )
        gx, gg, gw, gb = pac_torch.pac_backward(
            x, guide, weight, geo, groups, normalize, tap_scale, grad_out, needs
        )
        cast = [(gx, x), (gg, guide), (gw, weight)]
        gx, gg, gw = (None if g is None else g.to(t.dtype) for g, t in cast)
        return gx, gg, gw, gb, None, None, None, None, None


def pac_apply(x, guide, weight, bias, geo, groups, normalize, tap_scale, backend, op):
    """Dispatch to a backend and run with autograd (validated arguments)."""
    dtype = compute_dtype(x, guide, weight, bias)
    reason = FLOAT64_UNFUSED if dtype == torch.float64 else ""
    chosen = resolve_backend(backend, x.device, op=op, triton_unsupported=reason)
    return _PacFunction.apply(x, guide, weight, bias, geo, groups, normalize, tap_scale, chosen)


def pac3d(
    input: torch.Tensor,
    guide: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    kernel_size=None,
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """3D pixel-adaptive convolution: ``conv3d`` whose filter is modulated per voxel by the guide.

    Parameters
    ----------
    input : Tensor ``(N, C_in, D, H, W)``, any strides, float.
    guide : Tensor ``(N, F, D, H, W)``: the adapting features (for example the image, scaled by
        ``1 / sigma``); zero-padded where the window leaves the volume.
    weight : Tensor ``(C_out, C_in // groups, kd, kh, kw)`` or None
        As in ``conv3d``. None means depthwise all-ones (pure adaptive filtering; ``C_out ==
        C_in``, ``kernel_size`` required).
    bias : Tensor ``(C_out,)`` or None.
    stride, padding, dilation : int or (d, h, w)
        ``conv3d`` semantics and output size; padding >= 0; kernel sizes odd.
    groups : int
        ``conv3d`` groups (with a weight).
    kernel_size : int or (d, h, w), optional
        Required when ``weight`` is None; must agree with the weight otherwise.
    normalize : bool
        Replace ``K`` by ``K / sum_t K`` over the in-bounds taps of each window.
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    Tensor ``(N, C_out, D_out, H_out, W_out)``, float32 (float64 if any input is float64).
    Differentiable in ``input``, ``guide``, ``weight`` and ``bias``. With a constant guide and
    ``normalize=False`` it equals ``conv3d`` exactly. Memory ``O(N * (C_in + F + C_out))`` voxels:
    no unfold, the adapting kernel is recomputed tap by tap and never stored whole.

    Non-finite values: NaN or inf in ``input``, ``weight`` or ``bias`` propagate as in IEEE
    arithmetic (an input NaN reaches every output whose window holds it in bounds, even where
    its weight ``K`` is 0). A guide value that is NaN or +-inf makes every output whose window
    holds it (centre or in-bounds tap) NaN, in all channels.

    Raises
    ------
    ValueError
        Wrong dims or dtypes, a dimension of size 0 (batch, channels, guide features,
        spatial), even kernel sizes, windows of more than ``MAX_TAPS`` (32768) taps, padding
        whose padded input exceeds ``max(64 * input voxels, 2**24)`` voxels, an input too small
        for the window, mismatched shapes or devices, bools or strings where ints are meant.
    """
    op = "pac3d"
    check_volume_pair(input, guide, op)
    if weight is not None:
        check_float(weight, "weight", op)
        if weight.ndim != 5:
            raise ValueError(
                f"{op}: weight must be (C_out, C_in/groups, kd, kh, kw), got shape {tuple(weight.shape)}"
            )
    if not is_int(groups) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {short_repr(groups)}")
    groups = int(groups)
    if normalize not in (True, False):
        raise ValueError(f"{op}: normalize must be True or False, got {short_repr(normalize)}")
    c_in = input.shape[1]
    if weight is None:
        if groups != 1:
            raise ValueError(
                f"{op}: groups={groups} needs a weight; weight=None is already depthwise"
            )
        c_out = c_in
    else:
        c_out = weight.shape[0]
        if c_out == 0:
            raise ValueError(
                f"{op}: weight has shape {tuple(weight.shape)}: C_out is 0 (axis 0); give at "
                "least one output channel"
            )
        if c_in % groups or c_out % groups:
            raise ValueError(
                f"{op}: groups={groups} must divide both input channels ({c_in}) and output "
                f"channels ({c_out})"
            )
        if weight.shape[1] != c_in // groups:
            raise ValueError(
                f"{op}: weight has shape {tuple(weight.shape)} but input has {c_in} channels and "
                f"groups={groups}; weight.shape[1] must be {c_in // groups}"
            )
        if weight.device != input.device:
            raise ValueError(f"{op}: weight is on {weight.device} but input on {input.device}")
    if bias is not None:
        check_float(bias, "bias", op)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({c_out},)")
        if bias.device != input.device:
            raise ValueError(f"{op}: bias is on {bias.device} but input on {input.device}")
    geo = geometry(input, weight, kernel_size, stride, padding, dilation, op)
    out = pac_apply(input, guide, weight, bias, geo, groups, bool(normalize), None, backend, op)
    bad = bad_guide_mask(guide)
    if bad is not None:  # the kernels give such taps weight 0; make their outputs NaN instead
        hit = window_any(bad, geo.kernel, geo.stride, geo.padding, geo.dilation)
        out = out.masked_fill(hit, float("nan"))
    return out
