"""pacseg_kernels: fused per-voxel MLP, 3D pixel-adaptive convolution and 3D max-unpooling.

Tensor ops only (torch, and triton for CUDA tensors); this package never imports napari or Qt.
"""

from .backend import triton_available
from .mlp import ACTIVATIONS, voxel_mlp
from .modules import VoxelMLP

__all__ = ["ACTIVATIONS", "VoxelMLP", "triton_available", "voxel_mlp"]
