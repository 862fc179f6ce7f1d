"""pacseg_kernels: fused per-voxel MLP, 3D pixel-adaptive convolution and 3D max-unpooling.

Tensor ops only (torch, and triton for CUDA tensors); this package never imports napari or Qt.
"""

from .backend import triton_available
from .crf import pac_crf3d
from .mlp import ACTIVATIONS, voxel_mlp
from .modules import MaxUnpool3d, PacConv3d, PacCRF3d, VoxelMLP
from .pac import pac3d
from .unpool import max_pool3d_with_indices, max_unpool3d

__all__ = [
    "ACTIVATIONS",
    "MaxUnpool3d",
    "PacCRF3d",
    "PacConv3d",
    "VoxelMLP",
    "max_pool3d_with_indices",
    "max_unpool3d",
    "pac3d",
    "pac_crf3d",
    "triton_available",
    "voxel_mlp",
]
