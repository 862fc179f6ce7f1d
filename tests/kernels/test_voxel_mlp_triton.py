"""The fused Triton kernel against the same float64 reference.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before the kernel module is
imported, so the kernel runs in Triton's interpreter on CPU tensors (small shapes only).
"""

import itertools

import pytest
import torch

from pacseg_kernels import ACTIVATIONS, voxel_mlp
from tests.kernels.reference import mlp_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mlp(widths, gen):
    weights = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in itertools.pairwise(widths)]
    biases = [torch.randn(o, generator=gen) * 0.1 for o in widths[1:]]
    return [w.to(DEVICE) for w in weights], [b.to(DEVICE) for b in biases]


def test_kernel_module_runs_interpreted_without_cuda():
    from triton.runtime.interpreter import InterpretedFunction

    from pacseg_kernels import mlp_triton

    if DEVICE == "cpu":
        assert isinstance(mlp_triton._voxel_mlp_kernel, InterpretedFunction)


@pytest.mark.parametrize(
    ("n", "spatial", "widths"),
    [
        (1, (3, 5, 7), [3, 2]),
        (2, (5, 3, 3), [16, 64, 64, 4]),
        (1, (2, 3, 5), [1, 1, 1]),
        (1, (3, 3, 3), [64, 128, 3]),  # the widest the kernel fuses
        (2, (4, 1, 9), [5, 33, 17, 9, 7, 6, 2]),  # six layers, the most the kernel fuses
    ],
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_matches_reference(n, spatial, widths, activation):
    gen = torch.Generator().manual_seed(len(widths) * 100 + widths[0])
    weights, biases = _mlp(widths, gen)
    x = torch.randn(n, widths[0], *spatial, generator=gen).to(DEVICE)
    out = voxel_mlp(x, weights, biases, activation, backend="triton")
    ref = mlp_reference(x, weights, biases, activation)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_triton_layouts_and_strides():
    gen = torch.Generator().manual_seed(4)
    weights, biases = _mlp([6, 20, 3], gen)
    base = torch.randn(2, 5, 7, 6, 9, generator=gen).to(DEVICE)
    x = base.permute(0, 4, 2, 3, 1)[:, 1:7, ::2]  # (2, 6, 4, 6, 5), no unit stride anywhere
    ref = mlp_reference(x, weights, biases, "relu")
    out = voxel_mlp(x, weights, biases, backend="triton")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    xl = x.movedim(1, -1)  # channels-last view, 4 leading dims
    out_l = voxel_mlp(xl, weights, biases, channels_last=True, backend="triton")
    assert out_l.shape == (2, 4, 6, 5, 3)
    torch.testing.assert_close(out_l.double(), ref.movedim(1, -1), rtol=1e-4, atol=1e-4)
    out_2d = voxel_mlp(xl[0, 0], weights, biases, channels_last=True, backend="triton")
    torch.testing.assert_close(out_2d.double(), ref[0, :, 0].movedim(0, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(8)
    weights, biases = _mlp([8, 32, 2], gen)
    x = torch.randn(1, 8, 3, 4, 5, generator=gen).to(DEVICE, dtype)
    out = voxel_mlp(x, weights, biases, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), mlp_reference(x, weights, biases, "relu"), rtol=1e-4, atol=1e-4
    )


def test_triton_and_torch_paths_agree_with_gradients():
    gen = torch.Generator().manual_seed(12)
    weights, biases = _mlp([4, 16, 3], gen)
    params = [p.clone().requires_grad_(True) for p in weights + biases]
    x = torch.randn(2, 4, 3, 3, 3, generator=gen).to(DEVICE).requires_grad_(True)
    grads = {}
    for backend in ("triton", "torch"):
        out = voxel_mlp(x, params[:2], params[2:], "gelu", backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), [x, *params])
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_refuses_what_it_cannot_fuse():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 2, 2, generator=gen).to(DEVICE)
    wide = _mlp([4, 300, 2], gen)
    with pytest.raises(ValueError, match="width 300"):
        voxel_mlp(x, *wide, backend="triton")
    deep = _mlp([4] * 8 + [2], gen)
    with pytest.raises(ValueError, match="8 layers"):
        voxel_mlp(x, *deep, backend="triton")
    # auto falls back to the torch path for both
    assert voxel_mlp(x, *wide).shape == (1, 2, 2, 2, 2)


def test_wider_than_the_fused_kernel_takes():
    gen = torch.Generator().manual_seed(9)
    weights, biases = _mlp([8, 129, 2], gen)
    x = torch.randn(1, 8, 2, 2, 2, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="width 129; the fused kernel takes widths up to 128"):
        voxel_mlp(x, weights, biases, backend="triton")
    out = voxel_mlp(x, weights, biases)  # auto: the torch path
    torch.testing.assert_close(
        out.double(), mlp_reference(x, weights, biases, "relu"), rtol=1e-4, atol=1e-4
    )
