"""The Triton kernels of pac3d and pac_crf3d against the same float64 references.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before the kernel module is imported:
the kernels run in Triton's interpreter on CPU tensors, so the shapes stay small.
"""

import pytest
import torch

from pacseg_kernels import pac3d, pac_crf3d
from tests.kernels.reference import crf_reference, pac_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# N, C_in, F, spatial, C_out (None: weight=None), kernel, stride, padding, dilation, groups
CASES = [
    (1, 2, 1, (3, 4, 5), 3, (1, 3, 3), 1, (0, 1, 1), 1, 1),
    (2, 4, 3, (4, 5, 4), 4, (3, 3, 1), (1, 2, 1), 1, 1, 2),
    (1, 3, 2, (4, 4, 5), None, 3, 1, 1, (1, 1, 2), 1),
    (1, 1, 1, (3, 3, 3), 2, 3, 1, 2, 1, 1),  # centres in the padding
    (1, 16, 2, (2, 3, 4), 16, (1, 3, 3), 1, (0, 1, 1), 1, 1),  # tl.dot path
    (2, 2, 4, (1, 5, 6), None, (1, 5, 3), 1, (0, 2, 1), 1, 1),  # depth 1
]


def _tensors(case, gen):
    n, c_in, f, spatial, c_out, kernel, stride, padding, dilation, groups = case
    x = torch.randn(n, c_in, *spatial, generator=gen)
    guide = 0.7 * torch.randn(n, f, *spatial, generator=gen)
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    weight = bias = None
    if c_out is not None:
        weight = torch.randn(c_out, c_in // groups, *kernel, generator=gen)
        bias = torch.randn(c_out, generator=gen)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if weight is None:
        kwargs["kernel_size"] = kernel
    move = [t if t is None else t.to(DEVICE) for t in (x, guide, weight, bias)]
    return *move, kwargs


def test_kernel_module_runs_interpreted_without_cuda():
    from triton.runtime.interpreter import InterpretedFunction

    from pacseg_kernels import pac_triton

    if DEVICE == "cpu":
        assert isinstance(pac_triton._pac_kernel, InterpretedFunction)


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("normalize", [False, True])
def test_pac3d_triton_matches_reference(case, normalize):
    gen = torch.Generator().manual_seed(sum(case[3]) + 7 * normalize)
    x, guide, weight, bias, kwargs = _tensors(case, gen)
    out = pac3d(x, guide, weight, bias, normalize=normalize, backend="triton", **kwargs)
    ref = pac_reference(x, guide, weight, bias, normalize=normalize, **kwargs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_pac3d_triton_non_contiguous_and_torch_agree():
    gen = torch.Generator().manual_seed(3)
    x = (
        torch.randn(1, 5, 4, 3, 6, generator=gen).permute(0, 4, 2, 3, 1)[:, :3].to(DEVICE)
    )  # (1, 3, 4, 3, 5)
    guide = (
        torch.randn(1, 4, 3, 5, 2, generator=gen).permute(0, 4, 1, 2, 3).to(DEVICE)
    )  # (1, 2, 4, 3, 5)
    weight = torch.randn(2, 3, 3, 3, 3, generator=gen).to(DEVICE)
    outs = {
        b: pac3d(x, guide, weight, padding=1, normalize=True, backend=b)
        for b in ("triton", "torch")
    }
    ref = pac_reference(x, guide, weight, padding=1, normalize=True)
    for out in outs.values():
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_pac3d_triton_gradients_flow_through_torch_backward():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 3, 4, 4, generator=gen).to(DEVICE).requires_grad_()
    guide = torch.randn(1, 1, 3, 4, 4, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(2, 2, 3, 3, 3, generator=gen).to(DEVICE).requires_grad_()
    grads = {}
    for backend in ("triton", "torch"):
        out = pac3d(x, guide, weight, padding=1, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), [x, guide, weight])
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "kernel", "dilation", "sigma", "compat", "iterations"),
    [
        ((1, 2, 1, (4, 5, 6)), 3, 1, None, 1.0, 2),
        ((2, 3, 2, (3, 4, 5)), (1, 3, 5), (1, 2, 1), 1.2, 2.5, 3),
        ((1, 1, 1, (3, 3, 3)), 3, 1, None, 1.0, 1),
    ],
)
def test_crf_fused_step_matches_reference(shape, kernel, dilation, sigma, compat, iterations):
    n, k, f, spatial = shape
    gen = torch.Generator().manual_seed(k * 10 + f)
    unary = (2 * torch.randn(n, k, *spatial, generator=gen)).to(DEVICE)
    guide = (0.8 * torch.randn(n, f, *spatial, generator=gen)).to(DEVICE)
    out = pac_crf3d(unary, guide, iterations, kernel, dilation, compat, sigma, backend="triton")
    ref = crf_reference(unary, guide, iterations, kernel, dilation, compat, sigma)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_crf_triton_isolated_voxel_keeps_unary_and_grad_path():
    unary = torch.randn(1, 2, 3, 3, 3).to(DEVICE)
    guide = torch.zeros(1, 1, 3, 3, 3)
    guide[0, 0, 1, 1, 1] = 1e4
    out = pac_crf3d(unary, guide.to(DEVICE), iterations=2, kernel_size=3, backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 1, 1, 1].softmax(0), unary[0, :, 1, 1, 1].softmax(0))
    u = unary.clone().requires_grad_()
    pac_crf3d(u, guide.to(DEVICE), iterations=2, kernel_size=3, backend="triton").sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_crf_triton_reports_progress_per_step():
    gen = torch.Generator().manual_seed(5)
    unary = torch.randn(1, 2, 3, 4, 5, generator=gen).to(DEVICE)
    guide = torch.randn(1, 1, 3, 4, 5, generator=gen).to(DEVICE)
    calls = []
    pac_crf3d(unary, guide, 3, 3, backend="triton", progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]
