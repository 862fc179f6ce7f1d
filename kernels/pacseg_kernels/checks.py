"""Argument checks and conventions shared by the ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Why backend="triton" refuses float64 (and "auto" takes the torch path for it).
FLOAT64_UNFUSED = "float64 inputs (the kernel computes in float32); use backend='torch'"


def check_float(t, what: str, op: str) -> torch.Tensor:
    """``t`` if it is a floating-point tensor, else ``ValueError`` naming ``op``, ``what`` and the dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {what} has dtype {t.dtype}; a floating dtype is required (use .float())"
        )
    return t


def triple(value, name: str, op: str) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints as a (d, h, w) triple."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f"{op}: {name} must be an int or a tuple of 3 ints (d, h, w), got {value!r}")


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (None entries are skipped)."""
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
