"""The refinement's guide: noise estimate, smoothing choice, the guide against an independent
float64 reference, and its use by segment() (tiling, chunks, noise_level)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_pacseg import FeatureSpec, segment, train
from napari_pacseg.engine.plan import prepare
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.model.normalise import volume_intensity_range
from napari_pacseg.refine.guide import (
    RESIDUAL_TARGET,
    SMOOTHING_SIGMAS,
    guide_filter,
    make_guide,
    volume_noise_level,
)


def _smooth_volume(shape=(12, 64, 80), seed=0):
    """Smooth blobs in [0.2, 0.9] plus nothing else: its own noise level is ~0."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.full(shape, 0.2, np.float32)
    for _ in range(6):
        c = rng.uniform([0, 0, 0], shape)
        img += 0.7 * np.exp(
            -(((z - c[0]) / 3) ** 2 + ((y - c[1]) / 8) ** 2 + ((x - c[2]) / 8) ** 2)
        )
    return img


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.15])
def test_noise_level_recovers_white_noise(sigma):
    clean = _smooth_volume()
    noisy = clean + np.random.default_rng(1).normal(0, sigma, clean.shape).astype(np.float32)
    vol = noisy[None] * 1000.0 + 50.0  # any offset and gain: reported in normalised units
    lo, hi = volume_intensity_range(vol)
    expected = sigma * 1000.0 / float(hi - lo)
    got = float(volume_noise_level(vol, lo, hi)[0])
    assert got == pytest.approx(expected, rel=0.1)


def test_noise_level_is_the_same_for_dask_and_numpy():
    da = pytest.importorskip("dask.array")
    vol = (_smooth_volume() + np.random.default_rng(2).normal(0, 0.05, (12, 64, 80)))[None]
    lo, hi = volume_intensity_range(vol)
    a = volume_noise_level(vol, lo, hi)
    b = volume_noise_level(da.from_array(vol, chunks=(1, 5, 17, 23)), lo, hi)
    assert torch.equal(a, b) and a.shape == (1,)


def test_smoothing_is_chosen_from_the_noise():
    spacing = (1.0, 0.4, 0.4)
    clean = guide_filter(torch.tensor([0.02]), 0.1, spacing)
    assert clean.sigmas == (0.0, 0.0, 0.0) and clean.radius == (0, 0, 0)
    assert "not smoothed" in clean.describe()
    for noise in (0.05, 0.1, 0.15):
        f = guide_filter(torch.tensor([noise]), 0.1, spacing)
        assert f.sigmas[1] == f.sigmas[2] > 0 and f.sigmas[0] <= f.sigmas[1] * 0.4 + 1e-9
        assert f.sigmas[1] in SMOOTHING_SIGMAS
        # the noise left in the guide: within the target (white noise through the kernels)
        left = noise * math.sqrt(
            math.prod(
                float((ndimage.gaussian_filter1d(np.eye(1, 41, 20)[0], s, truncate=4.0) ** 2).sum())
                if s
                else 1.0
                for s in f.sigmas
            )
        )
        assert left <= RESIDUAL_TARGET * 0.1 * 1.02
    louder = [guide_filter(torch.tensor([n]), 0.1, spacing).sigmas[1] for n in (0.05, 0.1, 0.3)]
    assert louder == sorted(louder)
    hopeless = guide_filter(torch.tensor([10.0]), 0.1, spacing)
    assert hopeless.sigmas[1] == max(SMOOTHING_SIGMAS)
    # the noisiest channel decides; guide_sigma is the refinement's
    two = guide_filter(torch.tensor([0.0, 0.1]), 0.2, (1.0, 1.0, 1.0))
    assert two.sigmas[0] == two.sigmas[2] > 0 and two.guide_sigma == 0.2


def test_guide_matches_a_float64_reference():
    rng = np.random.default_rng(3)
    norm = rng.normal(0.5, 0.1, (2, 9, 30, 31))
    filt = guide_filter(torch.tensor([0.1, 0.05]), 0.1, (1.0, 0.5, 0.5))
    keep = [(0, 9), (5, 22), (0, 31)]  # reaches the volume's edges in z and x, not in y
    out = make_guide(torch.from_numpy(norm[None]).float(), filt, keep)[0].double().numpy()
    ref = (
        np.stack(
            [
                ndimage.gaussian_filter(
                    ch, filt.sigmas, mode="nearest", truncate=4.0, radius=list(filt.radius)
                )
                for ch in norm
            ]
        )[:, :, 5:22, :]
        / 0.1
    )
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_unsmoothed_guide_is_the_normalised_image():
    norm = torch.rand(1, 1, 4, 5, 6)
    filt = guide_filter(torch.tensor([0.0]), 0.25, (1.0, 1.0, 1.0))
    out = make_guide(norm, filt, [(1, 3), (0, 5), (2, 6)])
    torch.testing.assert_close(out, norm[:, :, 1:3, :, 2:6] / 0.25)


def _noisy_blobs(shape=(16, 40, 40)):
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    truth = (z - 8) ** 2 / 4 + (y - 14) ** 2 + (x - 14) ** 2 < 49
    image = truth * 100.0 + 20 + rng.normal(0, 25, shape)
    scribbles = np.zeros(shape, np.uint8)
    scribbles[8, 1:4, 2:38] = 1
    scribbles[8, 14, 10:18] = 2
    return image.astype(np.float32), scribbles


@pytest.fixture(scope="module")
def noisy():
    image, scribbles = _noisy_blobs()
    model = train(image, scribbles, spacing=(2.0, 1.0, 1.0), features=FeatureSpec(sigmas=(1.0,)),
                  steps=60)  # fmt: skip
    return image, model


def test_segment_smooths_the_guide_of_a_noisy_image(noisy):
    image, model = noisy
    plan = prepare(image, SegmentRequest.build(model))
    assert float(plan.noise[0]) > RESIDUAL_TARGET * model.config.refine.guide_sigma
    assert any(plan.guide().sigmas)
    # no smoothing when told the image is clean: a different refinement
    a = segment(image, model, return_probabilities=True).probabilities
    b = segment(image, model, noise_level=0.0, return_probabilities=True).probabilities
    assert not np.allclose(a, b, atol=1e-4)
    assert prepare(image, SegmentRequest.build(model, refine=False)).noise is None
    assert (
        prepare(image, SegmentRequest.build(model, refine=False)).with_refine(True).noise
        is not None
    )


def test_tiles_get_the_same_smoothed_guide(noisy):
    image, model = noisy
    whole = segment(image, model, return_probabilities=True)
    tiled = segment(image, model, tile_shape=(5, 13, 17), return_probabilities=True)
    assert np.array_equal(whole.labels, tiled.labels)
    np.testing.assert_allclose(whole.probabilities, tiled.probabilities, atol=1e-5)


def test_a_piece_with_the_whole_volume_noise_level_equals_the_whole(noisy):
    image, model = noisy
    lo, hi = volume_intensity_range(image[None])
    noise = volume_noise_level(image[None], lo, hi)
    rng = (lo.flatten().tolist(), hi.flatten().tolist())
    whole = segment(image, model, return_probabilities=True).probabilities
    piece = segment(image[:, :, 4:], model, intensity_range=rng, noise_level=noise.tolist(),
                    return_probabilities=True).probabilities  # fmt: skip
    # away from the cut (the receptive field), the piece's result is the whole's
    np.testing.assert_allclose(piece[..., 20:], whole[..., 24:], atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("loud", "noise_level must be one number per channel"),
        ([0.1, 0.2], "the image has 1 channel"),
        (-0.1, "finite and >= 0"),
        (float("nan"), "finite and >= 0"),
    ],
)
def test_bad_noise_level(noisy, bad, message):
    image, model = noisy
    with pytest.raises(ValueError, match=message):
        segment(image, model, noise_level=bad)


def test_noise_level_of_a_read_only_memory_map(tmp_path):
    vol = (_smooth_volume() + np.random.default_rng(4).normal(0, 0.05, (12, 64, 80)))[None]
    np.save(tmp_path / "v.npy", vol.astype(np.float32))
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    lo, hi = volume_intensity_range(mapped)
    assert torch.equal(volume_noise_level(mapped, lo, hi), volume_noise_level(vol, lo, hi))
