"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any kernel module is imported (pacseg_kernels imports them lazily, on first
use of backend="triton"), which is why it is set here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Import triton (when installed) before any test loads Qt: importing triton's LLVM after Mesa's
# software OpenGL has loaded its own LLVM crashes the process (the napari tests create GL
# contexts; the kernel tests import triton).
try:
    import triton  # noqa: F401
except ImportError:
    pass
