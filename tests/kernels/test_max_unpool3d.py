"""max_unpool3d (torch and Triton paths) against torch.nn.functional.max_unpool3d."""

import pytest
import torch
import torch.nn.functional as F

import pacseg_kernels.unpool_torch as unpool_torch
from pacseg_kernels import MaxUnpool3d, max_pool3d_with_indices, max_unpool3d

TRITON = [
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            __import__("importlib").util.find_spec("triton") is None, reason="no triton"
        ),
    )
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# input spatial, kernel, stride, padding, output_size (None: default)
CASES = [
    ((6, 8, 10), 2, None, 0, None),
    (
        (7, 9, 5),
        2,
        None,
        0,
        (7, 9, 5),
    ),  # odd sizes: pooling drops the last row; output_size restores it
    ((8, 8, 8), 4, None, 0, None),
    ((5, 7, 6), (1, 2, 3), None, 0, (5, 7, 6)),  # anisotropic
    ((7, 7, 7), 3, 2, 1, None),  # overlapping windows with padding: general form
    ((6, 6, 6), 2, 1, 0, None),  # stride 1: heavy overlap, duplicate indices
]


def _pooled(case, gen, n=2, c=3):
    spatial, kernel, stride, padding, output_size = case
    x = torch.randn(n, c, *spatial, generator=gen)
    vals, idx = max_pool3d_with_indices(x, kernel, stride, padding)
    return vals, idx, output_size


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("backend", ["torch", *TRITON])
def test_matches_torch(case, backend):
    gen = torch.Generator().manual_seed(sum(case[0]))
    vals, idx, output_size = _pooled(case, gen)
    _, kernel, stride, padding, _ = case
    ref = F.max_unpool3d(vals, idx, kernel, stride, padding, output_size=output_size)
    out = max_unpool3d(
        vals.to(DEVICE), idx.to(DEVICE), kernel, stride, padding, output_size, backend=backend
    )
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", *TRITON])
def test_duplicates_last_in_input_order_wins(backend):
    vals = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)
    idx = torch.tensor([5, 5, 0, 5, 7, 0, 1, 2]).view(1, 1, 2, 2, 2)
    out = max_unpool3d(vals.to(DEVICE), idx.to(DEVICE), 2, backend=backend).cpu().flatten()
    expected = torch.zeros(64)
    expected[5], expected[0], expected[7], expected[1], expected[2] = 4.0, 6.0, 5.0, 7.0, 8.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    again = max_unpool3d(vals.to(DEVICE), idx.to(DEVICE), 2, backend=backend).cpu().flatten()
    assert torch.equal(out, again)


@pytest.mark.parametrize("backend", ["torch", *TRITON])
def test_non_contiguous_and_unbatched(backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 6, 10, generator=gen)
    vals, idx = max_pool3d_with_indices(x, 2)
    v_nc, i_nc = vals.transpose(0, 1), idx.transpose(0, 1)  # (4, 3, ...) non-contiguous
    ref = F.max_unpool3d(v_nc.contiguous(), i_nc.contiguous(), 2)
    out = max_unpool3d(v_nc.to(DEVICE), i_nc.to(DEVICE), 2, backend=backend)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)
    single = max_unpool3d(vals[0].to(DEVICE), idx[0].to(DEVICE), 2, backend=backend)
    torch.testing.assert_close(
        single.cpu(), F.max_unpool3d(vals[:1], idx[:1], 2)[0], rtol=0, atol=0
    )


def test_stray_indices_use_the_general_form_and_still_match():
    """Indices outside their own window (not from pooling) are still placed as torch places them."""
    gen = torch.Generator().manual_seed(2)
    vals = torch.randn(1, 2, 3, 3, 3, generator=gen)
    idx = torch.randint(0, 6 * 6 * 6, (1, 2, 3, 3, 3), generator=gen)
    assert not unpool_torch.indices_in_windows(idx, (2, 2, 2), (6, 6, 6))
    ref = torch.zeros(1, 2, 216)
    for c in range(2):  # the CPU rule, written out: in input order, the last write wins
        for i, j in enumerate(idx[0, c].flatten().tolist()):
            ref[0, c, j] = vals[0, c].flatten()[i]
    out = max_unpool3d(vals, idx, 2)
    torch.testing.assert_close(out.flatten(2), ref, rtol=0, atol=0)


def test_chunking_over_planes(monkeypatch):
    monkeypatch.setattr(unpool_torch, "CHUNK_VOXELS", 50)
    gen = torch.Generator().manual_seed(3)
    for kernel, stride in [(2, None), (3, 1)]:
        x = torch.randn(2, 5, 6, 8, 6, generator=gen)
        vals, idx = max_pool3d_with_indices(x, kernel, stride)
        ref = F.max_unpool3d(vals, idx, kernel, stride, output_size=x.shape[2:])
        torch.testing.assert_close(
            max_unpool3d(vals, idx, kernel, stride, output_size=x.shape), ref
        )


@pytest.mark.parametrize("kernel_stride", [(2, None), (3, 2)])
def test_gradient_matches_torch(kernel_stride):
    kernel, stride = kernel_stride
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 6, 7, 6, generator=gen, dtype=torch.float64)
    vals, idx = max_pool3d_with_indices(x, kernel, stride)
    size = x.shape[2:]
    v1 = vals.clone().requires_grad_()
    v2 = vals.clone().requires_grad_()
    w = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (max_unpool3d(v1, idx, kernel, stride, output_size=size) * w).sum().backward()
    (F.max_unpool3d(v2, idx, kernel, stride, output_size=size) * w).sum().backward()
    if stride is None:  # no duplicate indices: the same gradient as torch's
        torch.testing.assert_close(v1.grad, v2.grad)
    # With overlapping windows one maximum can be stored twice; only the copy that lands in the
    # output (the last) gets a gradient, which is the true gradient of the forward (torch's
    # backward gives it to every copy). gradcheck below confirms ours.
    v = vals.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: max_unpool3d(v, idx, kernel, stride, output_size=size), (v,)
    )


def test_gradient_of_duplicates_goes_to_the_winner():
    vals = (
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view(1, 1, 2, 2, 2).requires_grad_()
    )
    idx = torch.tensor([5, 5, 0, 5, 7, 0, 1, 2]).view(1, 1, 2, 2, 2)
    max_unpool3d(vals, idx, 2).sum().backward()
    assert vals.grad.flatten().tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_module():
    layer = MaxUnpool3d(2)
    x = torch.randn(1, 2, 4, 6, 8)
    vals, idx = max_pool3d_with_indices(x, 2)
    torch.testing.assert_close(layer(vals, idx), torch.nn.MaxUnpool3d(2)(vals, idx))
    assert "kernel_size=2" in repr(layer)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v, i: max_unpool3d(v, i.float(), 2), r"indices must be an integer tensor"),
        (
            lambda v, i: max_unpool3d(v, i[..., :1], 2),
            r"indices have shape \(1, 2, 2, 2, 1\) but values \(1, 2, 2, 2, 2\)",
        ),
        (
            lambda v, i: max_unpool3d(v, i * 0 - 1, 2),
            r"indices must lie in \[0, 64\).*found values in \[-1,",
        ),
        (lambda v, i: max_unpool3d(v, i + 64, 2), r"indices must lie in \[0, 64\)"),
        (lambda v, i: max_unpool3d(v.long(), i, 2), r"values must be a floating-point tensor"),
        (
            lambda v, i: max_unpool3d(v, i, 2, output_size=(9, 4, 4)),
            r"output_size \(9, 4, 4\) is not reachable",
        ),
        (lambda v, i: max_unpool3d(v[0, 0, 0], i[0, 0, 0], 2), r"values must be \(N, C, D, H, W\)"),
        (lambda v, i: max_unpool3d(v, i, 0), r"need kernel_size >= 1"),
    ],
)
def test_bad_input(call, message):
    x = torch.randn(1, 2, 4, 4, 4)
    vals, idx = max_pool3d_with_indices(x, 2)
    with pytest.raises(ValueError, match=message):
        call(vals, idx)
