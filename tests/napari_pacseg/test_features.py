"""Feature bank: analytic checks of the Gaussian-derivative filters, in physical units."""

import pytest
import torch

from napari_pacseg import FeatureSpec, compute_features
from napari_pacseg.model.features import symmetric_eigvals3


def _grid(shape, spacing):
    axes = [torch.arange(n, dtype=torch.float32) * s for n, s in zip(shape, spacing)]
    return torch.meshgrid(*axes, indexing="ij")


def _centre(t, margin=8):
    return t[..., margin:-margin, margin:-margin, margin:-margin]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.5, 0.5)])
def test_derivatives_of_known_functions(spacing):
    shape = (24, 40, 40)
    z, y, x = _grid(shape, spacing)
    spec = FeatureSpec(
        kinds=("gaussian", "gradient_magnitude", "laplacian", "hessian_eigenvalues"), sigmas=(1.0,)
    )
    # linear ramp: gradient magnitude is the slope per physical unit
    ramp = (3.0 * z + 4.0 * x)[None, None]
    f = compute_features(ramp, spec, spacing)
    names = spec.names()
    assert f.shape == (1, len(names), *shape)
    torch.testing.assert_close(
        _centre(f[:, names.index("gradient_magnitude@1")]),
        torch.full_like(_centre(ramp[:, 0]), 5.0),
        rtol=1e-3,
        atol=1e-3,
    )
    torch.testing.assert_close(
        _centre(f[:, names.index("gaussian@1")]), _centre(ramp[:, 0]), rtol=1e-4, atol=1e-3
    )
    # quadratic: Laplacian 2(a + b + c), Hessian eigenvalues 2a, 2b, 2c (sorted)
    quad = (0.5 * z**2 - 1.0 * y**2 + 0.25 * x**2)[None, None]
    f = compute_features(quad, spec, spacing)
    torch.testing.assert_close(
        _centre(f[:, names.index("laplacian@1")]),
        torch.full_like(_centre(quad[:, 0]), -0.5),
        rtol=1e-2,
        atol=2e-2,
    )
    for i, value in enumerate([-2.0, 0.5, 1.0]):
        got = _centre(f[:, names.index(f"hessian_eigenvalues_{i}@1")])
        torch.testing.assert_close(got, torch.full_like(got, value), rtol=1e-2, atol=2e-2)


def test_constant_image_and_multichannel_layout():
    spec = FeatureSpec(sigmas=(1.0, 2.0))
    img = torch.full((2, 3, 8, 9, 10), 0.7)
    img[:, 1] = -1.0
    f = compute_features(img, spec)
    per = spec.channels_per_image_channel()
    assert f.shape == (2, 3 * per, 8, 9, 10) and per == len(spec.names())
    torch.testing.assert_close(
        f[:, per + spec.names().index("gaussian@2")], torch.full((2, 8, 9, 10), -1.0)
    )
    torch.testing.assert_close(
        f[:, spec.names().index("laplacian@1")], torch.zeros(2, 8, 9, 10), atol=1e-5, rtol=0
    )


def test_sigma_is_physical():
    """The same object sampled at two spacings gives the same smoothed profile."""
    x = torch.arange(81, dtype=torch.float32)
    fine = torch.exp(-0.5 * ((x - 40) / 6) ** 2).view(1, 1, 1, 1, 81)  # a blob, sampled every unit
    coarse = fine[..., ::2].clone()  # ... and every 2 units
    spec = FeatureSpec(kinds=("gaussian",), sigmas=(4.0,), include_raw=False)
    a = compute_features(fine, spec, (1.0, 1.0, 1.0))[0, 0, 0, 0, ::2]
    b = compute_features(coarse, spec, (1.0, 1.0, 2.0))[0, 0, 0, 0]
    torch.testing.assert_close(a, b, rtol=0, atol=5e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kinds=("edges",)), "unknown feature kinds"),
        (dict(sigmas=(0.0,)), "sigmas must be positive"),
        (dict(kinds=(), include_raw=False), "no features"),
        (dict(kinds=("gaussian", "gaussian")), "repeat"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureSpec(**kwargs)


def test_sigma_too_large_for_spacing():
    with pytest.raises(ValueError, match="voxels with spacing"):
        compute_features(torch.zeros(1, 1, 4, 4, 4), FeatureSpec(sigmas=(100.0,)), (0.1, 1.0, 1.0))


@pytest.mark.parametrize("kind", ["random", "repeated", "diagonal", "zero"])
def test_closed_form_eigenvalues_match_eigvalsh(kind):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(5000, 3, 3, generator=gen, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    if kind == "repeated":  # eigenvalues (l, l, m): rank-one update of a multiple of I
        v = torch.randn(5000, 3, 1, generator=gen, dtype=torch.float64)
        a = 2.5 * torch.eye(3, dtype=torch.float64) + v @ v.transpose(1, 2)
    elif kind == "diagonal":
        a = torch.diag_embed(torch.randn(5000, 3, generator=gen, dtype=torch.float64))
    elif kind == "zero":
        a = torch.zeros(10, 3, 3, dtype=torch.float64)
    want = torch.linalg.eigvalsh(a)
    entries = [a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]]
    got = torch.stack(symmetric_eigvals3(*[e.float() for e in entries]), -1).double()
    scale = a.flatten(1).abs().amax(1, keepdim=True).clamp_min(1)
    tol = 2e-3 if kind == "repeated" else 2e-4  # acos loses digits near close eigenvalues
    assert ((got - want).abs() / scale).max() < tol


@pytest.mark.parametrize(
    ("shape", "spacing", "crop"),
    [
        ((9, 20, 17), (1.0, 1.0, 1.0), (slice(2, 7), slice(5, 15), slice(0, 17))),
        ((12, 31, 26), (2.0, 0.5, 0.5), (slice(0, 4), slice(9, 31), slice(3, 4))),
        ((6, 14, 40), (0.7, 0.3, 0.9), (slice(1, 6), slice(0, 14), slice(20, 33))),
    ],
)
def test_crop_equals_cropping_the_whole(shape, spacing, crop):
    gen = torch.Generator().manual_seed(sum(shape))
    image = torch.rand(2, 1, *shape, generator=gen)
    spec = FeatureSpec(sigmas=(0.6, 1.5))
    whole = compute_features(image, spec, spacing)
    part = compute_features(image, spec, spacing, crop=crop)
    torch.testing.assert_close(part, whole[(slice(None), slice(None), *crop)], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 1, 7, 9, 11), (2, 1, 1, 20, 30), (5, 1, 12, 1, 50),
                                   (2, 1, 9, 13, 1), (1, 1, 6, 700, 3)])  # fmt: skip
def test_the_compiled_filter_equals_the_loop_of_taps(shape, dtype, monkeypatch):
    """``_filter_axis``'s numba loop (rows in blocks, lines) against its torch loop of taps, on
    every axis, for ranges inside, at and past the edges; float64 to 1e-12."""
    from napari_pacseg.model import features

    if features._filter_loops() is None:
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(shape, generator=gen, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for axis in range(3):
        n = shape[2 + axis]
        for keep in [(0, n), (1, max(2, n - 1)), (-3, n + 2), (n - 1, n + 4)]:
            kernel = torch.rand(2 * (1 + axis) + 1, generator=gen, dtype=dtype)
            compiled = features._filter_axis(t, kernel, axis, keep)
            with monkeypatch.context() as m:
                m.setattr(features, "_filter_loops", lambda: None)
                loop = features._filter_axis(t, kernel, axis, keep)
            assert compiled.shape == loop.shape and compiled.dtype == dtype
            torch.testing.assert_close(compiled, loop, rtol=tol, atol=tol)
