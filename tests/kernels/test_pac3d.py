"""pac3d and PacConv3d (torch path) against the float64 unfold reference."""

import pytest
import torch
import torch.nn.functional as F

import pacseg_kernels.pac_torch as pac_torch
from pacseg_kernels import PacConv3d, pac3d
from tests.kernels.reference import pac_reference

# N, C_in, F (guide channels), spatial, C_out (None: weight=None), kernel, stride, padding, dilation, groups
CASES = [
    (1, 2, 1, (5, 6, 7), 3, (1, 3, 5), 1, (0, 1, 2), 1, 1),
    (2, 4, 3, (7, 7, 6), 4, (3, 5, 5), 1, (1, 2, 2), 1, 2),
    (2, 3, 8, (6, 9, 8), None, 3, 2, 1, 1, 1),
    (1, 4, 2, (9, 8, 7), 6, 3, (1, 2, 1), (2, 1, 0), (2, 1, 3), 2),
    (3, 1, 1, (4, 5, 6), 2, 3, 1, 3, 1, 1),  # padding beyond 'same': centres in the padding
    (1, 6, 4, (5, 5, 5), 6, (3, 3, 1), 1, (1, 1, 0), 1, 6),  # depthwise with a weight
    (2, 2, 5, (1, 7, 9), None, (1, 5, 3), (1, 2, 1), (0, 2, 1), (1, 1, 2), 1),  # depth 1
    (1, 3, 2, (2, 5, 6), None, (7, 3, 3), 1, (3, 1, 1), 1, 1),  # taps wholly in the padding
    (1, 2, 2, (2, 5, 6), 3, (5, 3, 3), (1, 2, 1), (2, 1, 1), 1, 1),  # the same, with a weight
]


def _case_tensors(case, gen, dtype=torch.float32):
    n, c_in, f, spatial, c_out, kernel, stride, padding, dilation, groups = case
    x = torch.randn(n, c_in, *spatial, generator=gen, dtype=dtype)
    guide = 0.7 * torch.randn(n, f, *spatial, generator=gen, dtype=dtype)
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    weight = bias = None
    if c_out is not None:
        weight = torch.randn(c_out, c_in // groups, *kernel, generator=gen, dtype=dtype)
        bias = torch.randn(c_out, generator=gen, dtype=dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if weight is None:
        kwargs["kernel_size"] = kernel
    return x, guide, weight, bias, kwargs


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("tile", [None, 37])
def test_matches_reference(case, normalize, tile, monkeypatch):
    if tile is not None:  # many tiles, ragged at the edges
        monkeypatch.setattr(pac_torch, "TILE_VOXELS", tile)
    gen = torch.Generator().manual_seed(hash((case[1], case[3], normalize)) % 2**31)
    x, guide, weight, bias, kwargs = _case_tensors(case, gen)
    out = pac3d(x, guide, weight, bias, normalize=normalize, backend="torch", **kwargs)
    ref = pac_reference(x, guide, weight, bias, normalize=normalize, **kwargs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 9, 8, 7, 5, generator=gen)
    x = base.permute(0, 4, 2, 3, 1)[:, :3, :, ::2]  # (2, 3, 8, 4, 9)
    guide = torch.randn(2, 9, 4, 8, 2, generator=gen).permute(0, 4, 3, 1, 2)[
        ..., ::1
    ]  # (2, 2, 8, 9, 4)
    guide = guide.transpose(3, 4)  # (2, 2, 8, 4, 9)
    weight = torch.randn(5, 6, 3, 3, 3, generator=gen).transpose(0, 1)[
        :, :3
    ]  # (6, 3, 3, 3, 3) strided
    out = pac3d(x, guide, weight, padding=1, normalize=True)
    torch.testing.assert_close(
        out.double(),
        pac_reference(x, guide, weight, padding=1, normalize=True),
        rtol=1e-4,
        atol=1e-4,
    )


def test_constant_guide_equals_conv3d():
    gen = torch.Generator().manual_seed(3)
    for kwargs in [
        dict(),
        dict(stride=(1, 2, 3), padding=(1, 2, 1), dilation=(2, 1, 1)),
        dict(groups=2, padding=1),
    ]:
        groups = kwargs.get("groups", 1)
        x = torch.randn(2, 4, 9, 10, 11, generator=gen)
        weight = torch.randn(6, 4 // groups, 3, 5, 3, generator=gen)
        bias = torch.randn(6, generator=gen)
        # padding never exceeds 'same' here, so no window centre falls in the zero padding
        guide = torch.full((1, 3, 1, 1, 1), 0.25).expand(2, 3, 9, 10, 11)
        out = pac3d(x, guide, weight, bias, **kwargs)
        # float64 reference: a float32 conv3d's own rounding (its summation order changes
        # with the thread count) reached 1.4e-5 on these sums of 180 products
        ref = F.conv3d(x.double(), weight.double(), bias.double(), **kwargs)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


def test_constant_guide_normalized_is_avg_pool():
    x = torch.randn(2, 3, 7, 8, 9)
    guide = torch.full((2, 2, 7, 8, 9), -1.5)  # 'same' padding: no centre ever in the padding
    for k in (3, 5):
        out = pac3d(x, guide, kernel_size=k, padding=k // 2, normalize=True)
        ref = F.avg_pool3d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_far_guide_gives_identity_when_normalized():
    """Guide values far apart: only the centre tap keeps weight, so the average is the voxel."""
    x = torch.randn(1, 2, 4, 5, 6)
    guide = torch.arange(4 * 5 * 6, dtype=torch.float32).view(1, 1, 4, 5, 6) * 100
    out = pac3d(x, guide, kernel_size=3, padding=1, normalize=True)
    torch.testing.assert_close(out, x)
    assert torch.isfinite(out).all()


def test_float64_and_half():
    gen = torch.Generator().manual_seed(4)
    x, guide, weight, bias, kwargs = _case_tensors(CASES[1], gen, torch.float64)
    out = pac3d(x, guide, weight, bias, **kwargs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, pac_reference(x, guide, weight, bias, **kwargs), rtol=1e-10, atol=1e-10
    )
    out16 = pac3d(x.half(), guide.half(), weight.float(), bias.float(), **kwargs)
    assert out16.dtype == torch.float32
    ref16 = pac_reference(x.half(), guide.half(), weight.float(), bias.float(), **kwargs)
    torch.testing.assert_close(out16.double(), ref16, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_weight", [False, True])
def test_gradcheck(normalize, with_weight, monkeypatch):
    monkeypatch.setattr(pac_torch, "BACKWARD_TILE_VOXELS", 7)  # gradients meet across tiles
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    guide = (0.6 * torch.randn(2, 2, 3, 4, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    if with_weight:
        weight = torch.randn(4, 1, 3, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)

        def f(x, guide, weight, bias):
            return pac3d(
                x,
                guide,
                weight,
                bias,
                padding=(1, 0, 2),
                stride=(1, 2, 1),
                groups=2,
                normalize=normalize,
            )

        assert torch.autograd.gradcheck(f, (x, guide, weight, bias))
    else:

        def f(x, guide):
            return pac3d(
                x, guide, kernel_size=3, padding=1, dilation=(1, 2, 1), normalize=normalize
            )

        assert torch.autograd.gradcheck(f, (x, guide))


def test_pac_conv3d_module_trains():
    torch.manual_seed(0)
    layer = PacConv3d(3, 4, kernel_size=(1, 3, 3), padding=(0, 1, 1), normalize=True)
    x, guide = torch.randn(2, 3, 4, 6, 6), torch.randn(2, 2, 4, 6, 6)
    out = layer(x, guide)
    assert out.shape == (2, 4, 4, 6, 6)
    out.square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None
    ref = pac_reference(x, guide, layer.weight, layer.bias, padding=(0, 1, 1), normalize=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert "kernel_size=(1, 3, 3)" in repr(layer)


# --- bad input ------------------------------------------------------------------------------


def _good():
    return torch.randn(1, 4, 5, 5, 5), torch.randn(1, 2, 5, 5, 5), torch.randn(6, 2, 3, 3, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda x, g, w: pac3d(x, g, w[:, :, :2], groups=2),
            r"kernel sizes must be odd.*\(2, 3, 3\)",
        ),
        (
            lambda x, g, w: pac3d(x, g[..., :4], w, groups=2),
            r"guide has shape \(1, 2, 5, 5, 4\) but input",
        ),
        (
            lambda x, g, w: pac3d(x, g, w, groups=3),
            r"groups=3 must divide both input channels \(4\)",
        ),
        (lambda x, g, w: pac3d(x, g, w), r"weight.shape\[1\] must be 4"),
        (
            lambda x, g, w: pac3d(x[0], g[0], w, groups=2),
            r"input must be \(N, C, D, H, W\), got shape \(4, 5, 5, 5\)",
        ),
        (lambda x, g, w: pac3d(x.long(), g, w, groups=2), r"input has dtype torch.int64"),
        (lambda x, g, w: pac3d(x, g.int(), w, groups=2), r"guide has dtype torch.int32"),
        (
            lambda x, g, w: pac3d(x, g, w, groups=2, padding=-1),
            r"padding must be >= 0, got \(-1, -1, -1\)",
        ),
        (lambda x, g, w: pac3d(x, g), r"weight=None .* needs kernel_size"),
        (lambda x, g, w: pac3d(x, g, kernel_size=4), r"odd.*\(4, 4, 4\)"),
        (
            lambda x, g, w: pac3d(x, g, w, groups=2, kernel_size=5),
            r"kernel_size=5 disagrees with weight",
        ),
        (
            lambda x, g, w: pac3d(x, g, w, groups=2, stride=(1, 2)),
            r"stride must be an int or a tuple of 3",
        ),
        (lambda x, g, w: pac3d(x, g, w, groups=2, dilation=3), r"too small for kernel"),
        (
            lambda x, g, w: pac3d(x, g, w, torch.zeros(5), groups=2),
            r"bias has shape \(5,\), expected \(6,\)",
        ),
        (lambda x, g, w: pac3d(x, g, w, groups=2, backend="gpu"), r"backend must be one of"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(*_good())
