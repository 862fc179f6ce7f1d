"""What ``voxel_mlp``'s fused Triton kernel takes: shared by ``mlp`` (which decides whether a
call can run fused) and ``mlp_triton`` (whose code is built for these limits). Importable
without triton."""

from __future__ import annotations

# The kernel's code unrolls exactly FUSED_MAX_LAYERS layers.
FUSED_MAX_LAYERS = 6
# Width 128 at most: a layer of 256 keeps a 256 x 256 float32 weight tile (256 KiB) in shared
# memory, over what a block may have on sm_80 (163 KiB) and sm_90 (227 KiB): compiled ahead of
# time, every width-256 configuration asked for 262-296 KB (benchmarks/results/triton-aot.md).
# Wider MLPs run on the torch path (cuBLAS on CUDA).
FUSED_MAX_WIDTH = 128
# IEEE float32 dots have no tensor-core path and lower to FMA on register tiles: with a hidden
# layer of 128 units ptxas spills 5-8 KB per thread on sm_80 at every block and warp count tried
# (sm_90a holds it in 238 registers), so there such MLPs run on the torch path (cuBLAS).
FUSED_MAX_HIDDEN_IEEE_SM80 = 64


def fused_hidden_limit(precision: str, arch: int) -> int:
    """Widest layer output the fused kernel takes for a ``tl.dot`` precision ("ieee" or
    "tf32") on a GPU of compute capability ``arch`` (major * 10 + minor, e.g. 80, 90)."""
    return FUSED_MAX_HIDDEN_IEEE_SM80 if precision == "ieee" and arch < 90 else FUSED_MAX_WIDTH
