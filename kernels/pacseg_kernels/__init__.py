"""pacseg_kernels: fused per-voxel MLP, 3D pixel-adaptive convolution and 3D max-unpooling.

Tensor ops only (torch, and triton for CUDA tensors); this package never imports napari or Qt.
"""

from .backend import triton_available
from .crf import pac_crf3d
from .mlp import ACTIVATIONS, voxel_mlp
from .modules import PacConv3d, PacCRF3d, VoxelMLP
from .pac import pac3d

__all__ = [
    "ACTIVATIONS",
    "PacCRF3d",
    "PacConv3d",
    "VoxelMLP",
    "pac3d",
    "pac_crf3d",
    "triton_available",
    "voxel_mlp",
]
