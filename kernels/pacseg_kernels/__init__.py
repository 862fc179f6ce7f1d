"""pacseg_kernels: fused per-voxel MLP, 3D pixel-adaptive convolution and 3D max-unpooling.

Tensor ops only (torch, and triton for CUDA tensors); this package never imports napari or Qt.
The ops never change torch's thread count; ``adaptive_threads()`` is an opt-in context manager
that lowers it while other processes hold cores (see ``pacseg_kernels.threads``).
"""

from .backend import triton_available
from .crf import pac_crf3d
from .mlp import ACTIVATIONS, voxel_mlp
from .modules import MaxUnpool3d, PacConv3d, PacCRF3d, VoxelMLP
from .pac import pac3d
from .threads import adaptive_threads, readapt
from .unpool import max_pool3d_with_indices, max_unpool3d

__all__ = [
    "ACTIVATIONS",
    "MaxUnpool3d",
    "PacCRF3d",
    "PacConv3d",
    "VoxelMLP",
    "adaptive_threads",
    "max_pool3d_with_indices",
    "max_unpool3d",
    "pac3d",
    "pac_crf3d",
    "readapt",
    "triton_available",
    "voxel_mlp",
]
