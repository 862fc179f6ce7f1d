"""train() from several images: one model, each image normalised by its own range."""

import numpy as np
import pytest

from napari_pacseg import FeatureSpec, segment, train
from napari_pacseg.sample import load_sample

SETTINGS = dict(features=FeatureSpec(sigmas=(0.5, 1.0, 2.0)), seed=0)


def _dice(pred, truth):
    return 2 * np.count_nonzero(pred & truth) / (pred.sum() + truth.sum())


@pytest.fixture(scope="module")
def halves():
    s = load_sample()
    half = s.image.shape[2] // 2
    left = (s.image[..., :half], s.scribbles[..., :half])
    right = (s.image[..., half:], s.scribbles[..., half:])
    return s, left, right


def test_two_halves_together_equal_or_beat_each_alone(halves):
    s, left, right = halves
    truth = s.truth.astype(bool)

    def score(model):
        return _dice(segment(s.image, model, spacing=s.spacing, refine=False).labels > 0, truth)

    alone = [score(train(img, scr, spacing=s.spacing, **SETTINGS)) for img, scr in (left, right)]
    both = train([left[0], right[0]], [left[1], right[1]], spacing=s.spacing, **SETTINGS)
    assert both.config.provenance["images"] == "2"
    assert int(both.config.provenance["labelled_voxels"]) == np.count_nonzero(s.scribbles)
    together = score(both)
    assert together >= max(alone) - 1e-3, (together, alone)


def test_each_image_gets_its_own_intensity_range(halves):
    """An image given at another gain and offset trains the same model."""
    s, left, right = halves
    a = train([left[0], right[0]], [left[1], right[1]], spacing=s.spacing, **SETTINGS)
    brighter = left[0].astype(np.float32) * 3.0 + 500.0
    b = train([brighter, right[0]], [left[1], right[1]], spacing=s.spacing, **SETTINGS)
    pa = segment(s.image, a, spacing=s.spacing, refine=False).matte
    pb = segment(s.image, b, spacing=s.spacing, refine=False).matte
    np.testing.assert_allclose(pa, pb, atol=2e-3)


def test_one_image_in_a_list_is_the_single_image_model(halves):
    s, left, _ = halves
    one = train(left[0], left[1], spacing=s.spacing, **SETTINGS)
    listed = train([left[0]], [left[1]], spacing=s.spacing, **SETTINGS)
    for p, q in zip(one.parameters(), listed.parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy())


def test_classes_need_only_occur_across_the_images():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 20, 20)), rng.normal(size=(6, 20, 20)) + 3
    sa, sb = np.zeros((6, 20, 20), np.uint8), np.zeros((6, 20, 20), np.uint8)
    sa[3, 2:8, 2:8] = 1  # background only here
    sb[3, 2:8, 2:8] = 2  # the class only here
    model = train([a, b], [sa, sb], spacing=[(1, 1, 1), (1, 1, 1)], steps=20)
    assert model.config.n_classes == 2


@pytest.mark.parametrize(
    "images, scribbles, kwargs, error, message",
    [
        ([], [], {}, ValueError, "the list of images is empty"),
        (np.zeros((4, 5, 6)), None, {}, TypeError, "scribbles must be an integer array"),
        ([np.zeros((4, 5, 6))], np.zeros((4, 5, 6), np.uint8), {}, TypeError, "a list of images"),
        ([np.zeros((4, 5, 6))] * 2, [np.ones((4, 5, 6), np.uint8)], {}, ValueError,
         "2 images but 1 scribbles"),
        ([np.zeros((4, 5, 6))] * 2, [np.ones((4, 5, 6), np.uint8), np.zeros((4, 5, 5), np.uint8)],
         {}, ValueError, "image 1: scribbles have shape"),
        ([np.zeros((4, 5, 6))] * 2, [np.ones((4, 5, 6), np.uint8), np.zeros((4, 5, 6), np.uint8)],
         {}, ValueError, "image 1: the scribbles label no voxel"),
        ([np.zeros((4, 5, 6))] * 2, [np.ones((4, 5, 6), np.uint8)] * 2, {}, ValueError,
         "only one class is painted"),
        ([np.zeros((4, 5, 6))] * 2, [np.ones((4, 5, 6), np.uint8)] * 2,
         {"spacing": [(1, 1, 1)]}, ValueError, "2 images but 1 spacings"),
    ],
)  # fmt: skip
def test_bad_lists(images, scribbles, kwargs, error, message):
    with pytest.raises(error, match=message):
        train(images, scribbles, **kwargs)
