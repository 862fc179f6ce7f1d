"""Normalisation that cannot invent objects (issue 33): empty fields stay background, one hot
pixel changes labels only around itself, other exposures of the same kind segment alike, and
model files from before it keep their behaviour with a note."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_pacseg import (
    ModelFileWarning,
    Normalisation,
    image_range,
    load_model,
    save_model,
    segment,
    train,
)
from napari_pacseg.model.normalise import CONTRAST_FRACTION, apply_range, contrast
from napari_pacseg.sample import load_demo_model, load_sample, load_sample_2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"iterations": 2}


@pytest.fixture(scope="module")
def sample_2d():
    return load_sample_2d()


@pytest.fixture(scope="module")
def model_2d(sample_2d):
    s = sample_2d
    return train(s.image, s.scribbles, spacing=s.spacing, seed=0)


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def _dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _background_crops(truth, shape, n, seed=0):
    """``n`` boxes of ``shape`` at least 3 voxels away from every object of ``truth``."""
    far = ndi.binary_dilation(truth, iterations=3)
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(20000):
        lo = [int(rng.integers(0, s - c + 1)) for s, c in zip(truth.shape, shape)]
        box = tuple(slice(a, a + c) for a, c in zip(lo, shape))
        if not far[box].any():
            boxes.append(box)
            if len(boxes) == n:
                return boxes
    raise AssertionError("no background-only crops found")


def test_training_stores_the_contrast(model_2d, sample_2d, demo):
    norm = model_2d.config.normalisation
    assert isinstance(norm, Normalisation) and len(norm.min_contrast) == 1
    whole = float(contrast(sample_2d.image[None, None])[0])
    assert norm.min_contrast[0] == pytest.approx(CONTRAST_FRACTION * whole, rel=1e-3)
    assert demo.config.normalisation is not None  # the bundled model carries one


@pytest.mark.parametrize("size", [64, 96])
def test_background_only_crops_stay_background_2d(model_2d, sample_2d, size):
    s = sample_2d
    whole = segment(s.image, model_2d, spacing=s.spacing)
    unfloored = _without_normalisation(model_2d)
    invented = []
    for box in _background_crops(s.truth, (size, size), 4):
        assert np.count_nonzero(whole.labels[box]) == 0
        crop = segment(s.image[box], model_2d, spacing=s.spacing)
        assert np.count_nonzero(crop.labels) / crop.labels.size < 0.01
        # scaled by its own range (the noise), the same crop comes out largely foreground
        own = segment(s.image[box], unfloored, spacing=s.spacing).labels
        invented.append(np.count_nonzero(own) / own.size)
    assert max(invented) > 0.3


def test_background_only_crops_stay_background_3d(demo):
    s = load_sample()
    for box in _background_crops(s.truth, (12, 48, 48), 2, seed=1):
        crop = segment(s.image[box], demo, refine=FAST)
        assert np.count_nonzero(crop.labels) / crop.labels.size < 0.01


def test_an_image_of_the_same_kind_at_other_exposures(model_2d, sample_2d):
    """Exposure halved or doubled, or an offset added: within 0.01 Dice of the original."""
    s = sample_2d
    image = s.image.astype(np.float32)
    base = _dice(segment(image, model_2d, spacing=s.spacing).labels > 0, s.truth)
    offset = 0.3 * float(np.percentile(image, 99.8))
    for variant in (image * 0.5, image * 2.0, image + offset):
        dice = _dice(segment(variant, model_2d, spacing=s.spacing).labels > 0, s.truth)
        assert abs(dice - base) <= 0.01


def test_exposure_on_the_3d_sample(demo):
    s = load_sample()
    box = (slice(16, 48), slice(0, 128), slice(0, 128))
    image, truth = s.image[box].astype(np.float32), s.truth[box]
    base = _dice(segment(image, demo, refine=FAST).labels > 0, truth)
    assert base > 0.85
    for variant in (image * 0.5, image * 2.0, image + 200.0):
        dice = _dice(segment(variant, demo, refine=FAST).labels > 0, truth)
        assert abs(dice - base) <= 0.01


@pytest.mark.parametrize("value", [1e8, 1e10, 1e15])
def test_one_hot_pixel_changes_labels_only_around_it(demo, value):
    s = load_sample()
    image = s.image[24:40, 100:140, 100:140].astype(np.float64)
    image = (image - image.min()) / (image.max() - image.min()) * 250  # range 0-250
    base = segment(image, demo, refine=FAST).labels
    hot = image.copy()
    hot[8, 20, 20] = value
    changed = np.argwhere(segment(hot, demo, refine=FAST).labels != base)
    if len(changed):
        reach = np.abs(changed - [8, 20, 20]).max(axis=0)
        assert (reach <= [2, 4, 4]).all(), reach  # a few voxels (of 1 x 0.4 x 0.4 um) around it
    # unclipped, the outlier's smoothing features move labels far from it
    old = _without_normalisation(demo)
    far = segment(hot, old, refine=FAST).labels != segment(image, old, refine=FAST).labels
    assert np.abs(np.argwhere(far) - [8, 20, 20]).max() > 4


def test_clip_bounds_outliers():
    image = torch.tensor([0.0, 1.0, 1e10, -1e10]).view(1, 1, 1, 1, 4)
    out = apply_range(image, torch.zeros(1, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1), (-1.0, 3.0))
    assert out.flatten().tolist() == [0.0, 1.0, 3.0, -1.0]


@pytest.mark.parametrize("bad", [(5, 5), (200, 0)])
def test_empty_or_inverted_intensity_range_is_refused(demo, bad):
    image = load_sample().image[24:32, :40, :40]
    with pytest.raises(ValueError, match="empty or inverted") as info:
        segment(image, demo, intensity_range=bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"clip": (0.5, 2.0)}, {"clip": (-1.0, 0.5)}, {"clip": (float("nan"), 2.0)},
     {"min_contrast": (-1.0,)}, {"min_contrast": (float("inf"),)}, {"min_contrast": ()}],
)  # fmt: skip
def test_bad_normalisation_is_refused(kwargs):
    with pytest.raises(ValueError, match="Normalisation"):
        Normalisation(**kwargs)


def _without_normalisation(model):
    """``model`` as if from a file written before the normalisation (own range, unclipped)."""
    old = type(model)(dataclasses.replace(model.config, normalisation=None))
    old.load_state_dict(model.state_dict())
    return old.eval()


def _legacy_file(model, path):
    """``model`` saved as a file from before the normalisation: no "normalisation" key,
    format version 2 (volumes) or 3 (2D images), the checksum recomputed."""
    from napari_pacseg.io.model_file import model_bytes

    data = model_bytes(_without_normalisation(model))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["napari_pacseg"])
    assert "normalisation" not in meta["config"] and meta["version"] in (2, 3)
    path.write_bytes(data)
    return path


def test_an_older_model_file_keeps_its_behaviour_with_a_note(tmp_path, demo):
    path = _legacy_file(demo, tmp_path / "old.safetensors")
    with pytest.warns(ModelFileWarning, match="retrain it"):
        old = load_model(path)
    assert old.config.normalisation is None and old.clip is None
    image = load_sample().image[24:32, :64, :64].astype(np.float32)
    image[4, 30, 30] = 1e6  # an outlier: unclipped in the old model, as before
    lo, hi = image_range(image[None], None)
    expected = old(torch.from_numpy(image)[None, None], intensity_range=(lo, hi))
    manual = old.crop_logits(apply_range(torch.from_numpy(image)[None, None], lo, hi))
    torch.testing.assert_close(expected, manual)
    # re-saved, it stays a file of the old kind (older releases read it)
    with pytest.warns(ModelFileWarning):
        save_model(old, tmp_path / "again.safetensors")
        again = load_model(tmp_path / "again.safetensors")
    assert again.config.normalisation is None


def test_the_noise_level_is_measured_once_per_image(demo, monkeypatch):
    """prepare() takes the range and the refinement's noise level from one measurement."""
    import napari_pacseg.engine.plan as plan
    import napari_pacseg.model.normalise as normalise
    from napari_pacseg import SegmentRequest

    calls = []
    real = normalise.volume_noise_level

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(normalise, "volume_noise_level", counted)
    monkeypatch.setattr(plan, "volume_noise_level", counted)
    image = load_sample().image[16:48, :128, :128]
    made = plan.prepare(image, SegmentRequest.build(demo))
    assert len(calls) == 1 and made.noise is not None
    _, hi, noise = normalise.image_normalisation(image[None], demo.config.normalisation)
    assert torch.equal(made.hi, hi) and torch.equal(made.noise, noise)
