"""The refinement's local intensity fit: against an independent float64 reference, its
behaviour under uneven light, and its place in segment() (off switch, tiling, pieces)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from napari_pacseg import FeatureSpec, RefineConfig, receptive_field, segment, train
from napari_pacseg.engine.plan import prepare, settle
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.model.features import axis_radii
from napari_pacseg.refine.local_fit import CAP, PRESENT, local_fit


def _kernel64(sigma: float) -> np.ndarray:
    r = max(1, math.ceil(4.0 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _gauss64(a: np.ndarray, sigmas) -> np.ndarray:
    """Separable Gaussian of a 3D float64 array, edges replicated (np.pad 'edge')."""
    for axis, s in enumerate(sigmas):
        if not s:
            continue
        k = _kernel64(s)
        r = len(k) // 2
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(a, pad, mode="edge")
        out = np.zeros_like(a)
        for i, w in enumerate(k):
            sl = [slice(None)] * 3
            sl[axis] = slice(i, i + a.shape[axis])
            out += w * p[tuple(sl)]
        a = out
    return a


def _reference(scaled, guide, noise, sigmas):
    """float64 numpy: the formula of ``local_fit``'s docstring, class by class."""
    logits = scaled[0].astype(np.float64)
    q = np.exp(logits - logits.max(0))
    q /= q.sum(0)
    g = guide[0].astype(np.float64)
    k = q.shape[0]
    fits, present = [], []
    for c in range(k):
        w = _gauss64(q[c], sigmas)
        dist = np.zeros_like(w)
        for ch in range(g.shape[0]):
            mean = _gauss64(q[c] * g[ch], sigmas) / np.maximum(w, PRESENT)
            dist += (g[ch] - mean) ** 2 / (2 * max(float(noise[ch]), 1e-3) ** 2)
        fits.append(-np.minimum(dist, CAP))
        present.append(w > PRESENT)
    fits, present = np.array(fits), np.array(present)
    worst = np.where(present, fits, np.inf).min(0)
    worst = np.where(np.isfinite(worst), worst, 0.0)
    fits = np.where(present, fits, worst)
    out = (fits - fits[:1]) * (present.sum(0) >= 2)
    return out[None]


@pytest.mark.parametrize(
    "k, c, shape, sigmas, seed",
    [
        (2, 1, (6, 20, 24), (1.0, 2.5, 2.5), 0),
        (3, 1, (5, 17, 19), (0.0, 1.5, 2.0), 1),
        (2, 2, (1, 30, 26), (0.0, 3.0, 3.0), 2),  # a 2D image: one plane, no z window
        (4, 3, (7, 9, 11), (0.7, 0.7, 1.2), 3),
    ],
)
def test_matches_a_float64_reference(k, c, shape, sigmas, seed):
    rng = np.random.default_rng(seed)
    scaled = rng.normal(0, 2, (1, k, *shape)).astype(np.float32)
    guide = rng.uniform(0, 1, (1, c, *shape)).astype(np.float32)
    noise = rng.uniform(0.02, 0.2, c).astype(np.float32)
    keep = [(0, n) for n in shape]
    got = local_fit(
        torch.from_numpy(scaled), torch.from_numpy(guide), torch.from_numpy(noise), sigmas, keep
    )
    want = _reference(scaled, guide, noise, sigmas)
    assert got.shape == (1, k, *shape) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4)
    # a kept range inside the region: the same values there
    inner = [(a + 1, b - 1) if b - a > 2 else (a, b) for a, b in keep]
    part = local_fit(
        torch.from_numpy(scaled), torch.from_numpy(guide), torch.from_numpy(noise), sigmas, inner
    )
    sl = tuple(slice(a, b) for a, b in inner)
    np.testing.assert_allclose(part.numpy(), want[(slice(None), slice(None), *sl)], atol=2e-4)


def test_one_class_around_gives_no_term():
    scaled = torch.zeros(1, 2, 4, 16, 16)
    scaled[0, 0] = 20.0  # background everywhere: nothing to compare with
    guide = torch.rand(1, 1, 4, 16, 16)
    fit = local_fit(
        scaled, guide, torch.tensor([0.05]), (1.0, 2.0, 2.0), [(0, 4), (0, 16), (0, 16)]
    )
    assert torch.count_nonzero(fit) == 0


def test_a_dim_object_is_judged_against_its_own_surroundings():
    """Uneven light: a head thresholding absolute intensity misses the dim object's rim; the
    fit is positive there (it resembles the object beside it) and not positive just outside
    (0 where the missed rim, counted as background, leaves neither class's mean close)."""
    shape = (5, 48, 96)
    _, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    inside = (y - 24) ** 2 + (x - 72) ** 2 < 64  # the dim object, radius 8
    light = np.linspace(1.0, 0.2, shape[2])[None, None, :]
    guide = (0.1 + 0.6 * inside * light).astype(np.float32)  # object 0.31-0.25 on 0.1
    core = (y - 24) ** 2 + (x - 72) ** 2 < 16  # the head found only its core
    scaled = np.stack([np.where(core, -2.0, 2.0), np.where(core, 2.0, -2.0)])[None]
    fit = local_fit(
        torch.from_numpy(scaled.astype(np.float32)), torch.from_numpy(guide[None, None]),
        torch.tensor([0.02]), (0.0, 5.0, 5.0), [(0, n) for n in shape],
    )[0, 1].numpy()  # fmt: skip
    rim = inside & ~core
    ring = ~inside & ((y - 24) ** 2 + (x - 72) ** 2 < 100)
    assert (fit[rim] > 0).all() and (fit[ring] <= 0).all() and fit[ring].mean() < -0.5


@pytest.fixture(scope="module")
def uneven():
    """Blobs under a light ramp to 40%, with noise; scribbles on the bright side only."""
    rng = np.random.default_rng(5)
    shape = (12, 64, 96)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    truth = np.zeros(shape, bool)
    for cy, cx in [(16, 16), (48, 24), (16, 56), (48, 60), (20, 84), (46, 88)]:
        truth |= (z - 6) ** 2 / 4 + (y - cy) ** 2 / 36 + (x - cx) ** 2 / 36 < 1
    light = np.linspace(1.0, 0.4, shape[2])[None, None, :]
    image = (20 + 100 * truth * light + rng.normal(0, 6, shape)).astype(np.float32)
    scribbles = np.zeros(shape, np.uint8)
    scribbles[6, 2:5, 2:40] = 1
    scribbles[6, 30:34, 2:40] = 1
    scribbles[6, 14:18, 13:19] = 2
    scribbles[6, 46:50, 21:27] = 2
    model = train(image, scribbles, spacing=(2.0, 1.0, 1.0), features=FeatureSpec(sigmas=(1.0, 2.0)), steps=150)  # fmt: skip
    return image, truth, model


def _dice(pred, truth):
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


def test_the_fit_helps_under_uneven_light(uneven):
    image, truth, model = uneven
    with_fit = segment(image, model).labels > 0
    without = segment(image, model, refine={"fit_weight": 0.0}).labels > 0
    unrefined = segment(image, model, refine=False).labels > 0
    assert _dice(with_fit, truth) > max(_dice(without, truth), _dice(unrefined, truth))


def test_fit_weight_zero_is_the_crf_alone(uneven):
    image, _, model = uneven
    plan = prepare(image, SegmentRequest.build(model, refine={"fit_weight": 0.0}))
    assert plan.settings.fit_sigma is None and plan.settings.fit_reach == (0, 0, 0)
    assert plan.settings.read_reach == plan.settings.reach
    assert receptive_field(model, refine={"fit_weight": 0.0}) < receptive_field(model)


def test_the_fit_window_follows_the_spacing():
    cfg = RefineConfig(fit_sigma=5.0)
    assert cfg.fit_window((1.0, 0.4, 0.4)) == (2.0, 5.0, 5.0)
    assert cfg.fit_window((0.4, 0.4, 0.4), ndim=2) == (0.0, 5.0, 5.0)  # a one-plane volume
    assert cfg.fit_window((20.0, 0.4, 0.4)) == (0.0, 5.0, 5.0)  # 0.1 voxels: unsmoothed
    assert RefineConfig(fit_weight=0.0).fit_window((1.0, 1.0, 1.0)) is None
    for bad in (
        {"fit_weight": -0.1},
        {"fit_weight": 11.0},
        {"fit_sigma": 0.1},
        {"fit_sigma": 40.0},
    ):
        with pytest.raises(ValueError, match="fit_"):
            RefineConfig(**bad)


def test_tiles_and_pieces_equal_the_whole(uneven):
    image, _, model = uneven
    whole = segment(image, model, return_probabilities=True)
    tiled = segment(image, model, tile_shape=(5, 21, 30), return_probabilities=True)
    np.testing.assert_allclose(whole.probabilities, tiled.probabilities, atol=1e-5)
    plan = prepare(image, SegmentRequest.build(model))
    halo = receptive_field(model)
    assert halo[2] > plan.settings.reach[2] + axis_radii(settle(model).fit_sigma)[2] - 1
    lo, hi = (t.flatten().tolist() for t in (plan.lo, plan.hi))
    box = ((0, 12), (10, 40), (30, 50))  # the pieces see less than the whole along y and x
    ext = [(max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(box, halo, image.shape)]
    assert any(e != (0, n) for e, n in zip(ext, image.shape))
    piece = segment(
        image[tuple(slice(s, e) for s, e in ext)], model, return_probabilities=True,
        intensity_range=(lo, hi), noise_level=plan.noise.tolist(),
    )  # fmt: skip
    core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(box, ext))
    np.testing.assert_allclose(
        piece.probabilities[(slice(None), *core)],
        whole.probabilities[(slice(None), *(slice(a, b) for a, b in box))],
        atol=1e-5,
    )


def test_volume_models_fit_and_2d_models_fit_less(tmp_path):
    from napari_pacseg import load_model, save_model
    from napari_pacseg.io.model_file import config_from_dict, config_to_dict
    from napari_pacseg.training.defaults import FIT_WEIGHT_2D, default_refine

    assert default_refine(3) == RefineConfig() and RefineConfig().fit_weight == 0.75
    assert default_refine(2) == RefineConfig(fit_weight=FIT_WEIGHT_2D)
    assert 0 < FIT_WEIGHT_2D < RefineConfig().fit_weight
    rng = np.random.default_rng(0)
    plane = rng.normal(10, 1, (24, 24)).astype(np.float32)
    plane[6:14, 6:14] += 20
    marks = np.zeros((24, 24), np.uint8)
    marks[1, 1:20], marks[9, 8:12] = 1, 2
    model = train(plane, marks, spacing=(1.0, 1.0), steps=5)
    assert model.config.ndim == 2 and model.config.refine.fit_weight == FIT_WEIGHT_2D
    save_model(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").config.refine == default_refine(2)
    # files written before the fit existed: 2D models stay without it (they were made without
    # it), volumes take it up
    for config, expected in ((model.config, 0.0), (dataclasses.replace(model.config, ndim=3), 0.75)):
        data = config_to_dict(config)
        del data["refine"]["fit_weight"], data["refine"]["fit_sigma"]
        assert config_from_dict(data).refine.fit_weight == expected
    data = config_to_dict(model.config)
    data["refine"]["fit_weight"] = 0.7  # a 2D model whose file asks for the fit keeps it
    assert config_from_dict(data).refine.fit_weight == 0.7
