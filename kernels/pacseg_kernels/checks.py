"""Argument checks and conventions shared by the ops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Why backend="triton" refuses float64 (and "auto" takes the torch path for it).
FLOAT64_UNFUSED = "float64 inputs (the kernel computes in float32); use backend='torch'"
# Most taps a window may have (pac3d, pac_crf3d) and most voxels a max_unpool3d window may
# spread a value over: 32^3 = 32768. Beyond it the per-tap loops run for minutes or the
# geometry is a mistake (kernel_size=2001 is 8e9 taps).
MAX_TAPS = 32768
# Per-voxel axis names of an (N, C, D, H, W) volume, for messages.
VOLUME_AXES = ("N (batch)", "C (channels)", "D", "H", "W")


def check_float(t, what: str, op: str) -> torch.Tensor:
    """``t`` if it is a floating-point tensor, else ``ValueError`` naming ``op``, ``what`` and the dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {what} has dtype {t.dtype}; a floating dtype is required (use .float())"
        )
    return t


def is_int(value) -> bool:
    """True for ints (Python or numpy integers), False for bools and everything else."""
    return isinstance(value, Integral) and not isinstance(value, (bool, torch.Tensor))


def short_repr(value, limit: int = 40) -> str:
    """``value`` for an error message: ASCII (control characters and lone surrogates escaped),
    one line, at most ``limit`` characters; a huge integer is described, not printed."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        text = ascii(value)
    except Exception:  # e.g. an int of over 4300 digits inside a tuple, or a failing repr
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def triple(value, name: str, op: str) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints as a (d, h, w) triple (bools and strings refused)."""
    if is_int(value):
        return (int(value),) * 3
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(is_int(v) for v in value)
    ):
        return tuple(int(v) for v in value)
    raise ValueError(
        f"{op}: {name} must be an int or a tuple of 3 ints (d, h, w), got {short_repr(value)}"
    )


def check_not_empty(t: torch.Tensor, name: str, op: str, axes=VOLUME_AXES, what: str = "") -> None:
    """``ValueError`` when ``t`` has a dimension of size 0, naming it and the shape.

    ``axes`` names the dimensions (default ``(N, C, D, H, W)``); ``what`` says what the channel
    axis holds, for the hint (e.g. "classes").
    """
    for axis, size in enumerate(t.shape):
        if size == 0:
            label = axes[axis] if axis < len(axes) else f"axis {axis}"
            if label.startswith("C") and what:
                hint = f"give at least one {what}"
            elif label.startswith("N"):
                hint = "give at least one volume"
            else:
                hint = "the volume has no voxels; give at least one along every axis"
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)}: {label} is 0 (axis {axis}); {hint}"
            )


def odd_kernel(kernel, op: str) -> tuple[int, int, int]:
    """``kernel`` (an int or a (d, h, w) triple) as a triple of odd sizes with at most
    ``MAX_TAPS`` taps."""
    kernel = triple(kernel, "kernel_size", op)
    if any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(
            f"{op}: kernel sizes must be odd and >= 1 (the window needs a centre), got "
            f"{short_repr(kernel)}"
        )
    check_taps(kernel, op)
    return kernel


def check_taps(kernel, op: str, name: str = "kernel_size") -> None:
    """``ValueError`` when a window of ``kernel`` has more than ``MAX_TAPS`` taps."""
    taps = math.prod(kernel)
    if taps > MAX_TAPS:
        raise ValueError(
            f"{op}: {name} {short_repr(tuple(kernel))} has {short_repr(taps)} taps; at most "
            f"{MAX_TAPS} (32^3) are supported"
        )


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (None entries are skipped)."""
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
