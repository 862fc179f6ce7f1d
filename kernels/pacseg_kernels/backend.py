"""Choice between the Triton kernels and the plain-torch paths.

``backend="auto"`` picks Triton for CUDA tensors when triton imports, torch otherwise.
``backend="triton"`` also runs on CPU tensors when ``TRITON_INTERPRET=1`` was set before the
kernel modules were imported (Triton's interpreter; ~1000x slower, for tests on small shapes).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the torch path
        return False
    return True


def triton_interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set in the environment."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(
    backend: str, device: torch.device, *, op: str, triton_unsupported: str = ""
) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on tensors living on ``device``.

    Parameters
    ----------
    backend : {"auto", "triton", "torch"}
    device : torch.device
        Device of the op's input tensors.
    op : str
        Name of the op, for error messages.
    triton_unsupported : str
        Non-empty when the Triton kernel cannot handle this call (the reason); ``auto`` then falls
        back to torch and ``triton`` raises ``ValueError`` with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() and not triton_unsupported else "torch"
    if not triton_available():
        raise ValueError(
            f"{op}: backend='triton' but triton is not installed; "
            "install it (pip install 'napari-pacseg[triton]') or use backend='torch'"
        )
    if triton_unsupported:
        raise ValueError(f"{op}: backend='triton' cannot run this call: {triton_unsupported}")
    if not on_cuda and not (device.type == "cpu" and triton_interpreter_requested()):
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got {device.type}); on CPU set "
            "TRITON_INTERPRET=1 before importing pacseg_kernels, or use backend='torch'"
        )
    return "triton"
