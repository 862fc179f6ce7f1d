"""``max_unpool3d``: the inverse of 3D max pooling, deterministic, with its pooling companion."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import unpool_torch
from .backend import resolve_backend
from .checks import check_not_empty, check_taps, is_int, short_repr, triple

_OP = "max_unpool3d"


def max_pool3d_with_indices(input: torch.Tensor, kernel_size, stride=None, padding=0):
    """3D max pooling that also returns the indices ``max_unpool3d`` takes.

    Wraps ``torch.nn.functional.max_pool3d(..., return_indices=True)``: indices are int64 and
    flattened per ``(N, C)`` plane of the input, as ``torch.nn.functional.max_unpool3d`` expects.

    Returns
    -------
    values : Tensor ``(N, C, D', H', W')``; indices : int64 Tensor of the same shape.
    """
    return F.max_pool3d(input, kernel_size, stride=stride, padding=padding, return_indices=True)


def unpool_output_size(in_shape, kernel, stride, padding, output_size) -> tuple[int, int, int]:
    """Output spatial size, validated as ``torch.nn.functional.max_unpool3d`` does."""
    default = tuple(
        (i - 1) * s - 2 * p + k for i, k, s, p in zip(in_shape, kernel, stride, padding)
    )
    if output_size is None:
        size = default
    else:
        if (
            isinstance(output_size, (str, bytes))
            or not isinstance(output_size, Sequence)
            or not all(is_int(v) for v in output_size)
            or len(output_size) not in (3, 5)
        ):
            raise ValueError(
                f"{_OP}: output_size must hold 3 ints (D, H, W) or 5 (N, C, D, H, W), got "
                f"{short_repr(output_size)}"
            )
        size = tuple(int(v) for v in output_size)
        if len(size) == 5:
            size = size[2:]
        for axis, (got, low, s) in enumerate(zip(size, default, stride)):
            if not low - s < got < low + s:
                raise ValueError(
                    f"{_OP}: output_size {short_repr(size)} is not reachable from input size "
                    f"{tuple(in_shape)}: axis {axis} must lie in ({low - s}, {low + s})"
                )
    if any(s < 1 for s in size):
        raise ValueError(
            f"{_OP}: the output size {short_repr(size)} is empty; check kernel_size, stride and "
            "padding"
        )
    return size


class _UnpoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, out_size, kernel, gather_form, backend):
        n, c = values.shape[:2]
        out = torch.empty((n, c, *out_size), dtype=values.dtype, device=values.device)
        if out.numel():
            if backend == "triton":
                from . import unpool_triton

                unpool_triton.unpool(values, indices, out, gather_form, kernel)
            else:
                unpool_torch.unpool(values, indices, out)
        ctx.save_for_backward(indices)
        ctx.meta = (out_size, gather_form)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        out_size, gather_form = ctx.meta
        grad = unpool_torch.unpool_backward(grad_out, indices, out_size, gather_form)
        return grad, None, None, None, None, None


def max_unpool3d(
    values: torch.Tensor,
    indices: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    output_size=None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Undo 3D max pooling: put each pooled value back where its maximum came from, zeros elsewhere.

    Same results as ``torch.nn.functional.max_unpool3d`` for every valid input, but deterministic:
    where several values share an index, the last in input order wins (as torch does on CPU).

    Parameters
    ----------
    values : Tensor ``(N, C, D, H, W)`` (or ``(C, D, H, W)``), float.
    indices : integer Tensor, the shape of ``values``: positions flattened per ``(N, C)`` plane of
        the output, as returned by ``max_pool3d_with_indices``.
    kernel_size, stride, padding : int or (d, h, w); ``stride`` defaults to ``kernel_size``.
    output_size : (D, H, W) or (N, C, D, H, W), optional; defaults to
        ``(in - 1) * stride - 2 * padding + kernel`` per axis.
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    Tensor ``(N, C, D_out, H_out, W_out)`` of ``values.dtype``, differentiable in ``values``.

    On CUDA (Triton), when every index lies in its own pooling window and windows do not overlap
    (``stride == kernel_size``, no padding: what ``max_pool3d`` produces), each output voxel is
    computed by one gather from its window, in one pass with no separate zero fill.

    Raises
    ------
    ValueError
        Indices out of range, negative, of a float dtype, or shaped unlike ``values``; bad sizes:
        a dimension of size 0, a kernel or stride of more than 32768 (32^3) voxels, an
        unreachable or empty output size, bools or strings where ints are meant.
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise ValueError(
            f"{_OP}: values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}"
        )
    if (
        not isinstance(indices, torch.Tensor)
        or indices.is_floating_point()
        or indices.is_complex()
        or indices.dtype == torch.bool
    ):
        raise ValueError(
            f"{_OP}: indices must be an integer tensor (as returned by max_pool3d_with_indices), "
            f"got {getattr(indices, 'dtype', type(indices))}"
        )
    if indices.shape != values.shape:
        raise ValueError(
            f"{_OP}: indices have shape {tuple(indices.shape)} but values {tuple(values.shape)}; they must match"
        )
    if indices.device != values.device:
        raise ValueError(f"{_OP}: indices are on {indices.device} but values on {values.device}")
    unbatched = values.ndim == 4
    if unbatched:
        values, indices = values[None], indices[None]
    if values.ndim != 5:
        raise ValueError(
            f"{_OP}: values must be (N, C, D, H, W) or (C, D, H, W), got shape {tuple(values.shape)}"
        )
    check_not_empty(values, "values", _OP)
    kernel = triple(kernel_size, "kernel_size", _OP)
    stride_t = kernel if stride is None else triple(stride, "stride", _OP)
    pad = triple(padding, "padding", _OP)
    if any(k < 1 for k in kernel) or any(s < 1 for s in stride_t) or any(p < 0 for p in pad):
        raise ValueError(
            f"{_OP}: need kernel_size >= 1, stride >= 1, padding >= 0; got "
            f"{short_repr(kernel)}, {short_repr(stride_t)}, {short_repr(pad)}"
        )
    # Each pooled value stands for a window of prod(kernel) voxels, and the windows step by
    # stride: beyond MAX_TAPS the output is that many times the input (kernel_size=1000 on one
    # voxel would be a 4 GB output).
    check_taps(kernel, _OP)
    check_taps(stride_t, _OP, "stride")
    out_size = unpool_output_size(values.shape[2:], kernel, stride_t, pad, output_size)
    plane = math.prod(out_size)
    if indices.numel():
        lo, hi = (int(v) for v in torch.aminmax(indices))
        if lo < 0 or hi >= plane:
            raise ValueError(
                f"{_OP}: indices must lie in [0, {plane}) (one output plane of size {out_size}), "
                f"found values in [{lo}, {hi}]; were they made for another output_size?"
            )
    chosen = resolve_backend(backend, values.device, op=_OP)
    # Indices inside their own non-overlapping windows (what max pooling makes) are distinct, and
    # the Triton kernel then gathers each output voxel from its window. The check is skipped
    # where nothing uses it (torch path without autograd).
    gather_form = (
        stride_t == kernel
        and pad == (0, 0, 0)
        and all(o >= i * k for o, i, k in zip(out_size, values.shape[2:], kernel))
        and (chosen == "triton" or (values.requires_grad and torch.is_grad_enabled()))
        and unpool_torch.indices_in_windows(indices, kernel, out_size)
    )
    out = _UnpoolFunction.apply(values, indices, out_size, kernel, gather_form, chosen)
    return out[0] if unbatched else out
