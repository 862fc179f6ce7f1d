"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any kernel module is imported (pacseg_kernels imports them lazily, on first
use of backend="triton"), which is why it is set here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
