"""The one label rule (classes.labels_from_probabilities), through every face: the API, the
command, zarr runs (the widget's full and live runs are checked in test_widget.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pacseg import labels_from_probabilities, segment
from napari_pacseg.model.classes import label_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rule_background_choice_and_threshold():
    # three voxels (columns) of three classes (rows)
    p = np.array([[0.6, 0.3, 0.1], [0.3, 0.6, 0.2], [0.1, 0.1, 0.7]], np.float32)
    labels, matte = labels_from_probabilities(p)
    assert labels.tolist() == [0, 2, 3] and np.allclose(matte, [0.4, 0.7, 0.9])
    labels, matte = labels_from_probabilities(p, background=1)
    assert labels.tolist() == [1, 0, 3] and np.allclose(matte, [0.7, 0.4, 0.8])
    assert label_values(3, 1) == [1, 0, 3]
    assert labels_from_probabilities(p, threshold=0.8)[0].tolist() == [0, 0, 3]
    with pytest.raises(ValueError, match="background"):
        labels_from_probabilities(p, background=3)
    with pytest.raises(ValueError, match="threshold"):
        labels_from_probabilities(p, threshold=1.5)


def test_the_issue_example_is_foreground():
    # p = (0.40, 0.35, 0.25): matte 0.6 >= 0.5, so the best non-background class (label 2)
    labels, matte = labels_from_probabilities(np.array([[0.40], [0.35], [0.25]], np.float32))
    assert labels.tolist() == [2] and matte[0] == pytest.approx(0.6)


def test_two_classes_at_one_half_is_the_argmax():
    rng = np.random.default_rng(0)
    p1 = rng.random(1000).astype(np.float32)
    p = np.stack([1 - p1, p1])
    labels, _ = labels_from_probabilities(p)
    argmax = p.argmax(0)
    assert np.array_equal(labels, np.where(argmax == 0, 0, 2))


def banded(k: int):
    """An image of ``k`` noisy intensity bands along x, scribbled once per band, and a model
    trained on it (a few steps: the labels are mixed, several classes compete)."""
    from napari_pacseg import FeatureSpec, train

    rng = np.random.default_rng(k)
    band = np.arange(24 * k) // 24
    image = (band * 50.0 + rng.normal(0, 25, (6, 24, 24 * k))).astype(np.float32)
    marks = np.zeros(image.shape, np.uint8)
    for c in range(k):
        marks[3, 10:14, 24 * c + 8 : 24 * c + 16] = c + 1
    model = train(image, marks, features=FeatureSpec(sigmas=(1.0,)), hidden=(8,), steps=30)
    return image, model


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_face_gives_the_same_labels(tmp_path, k):
    """API, CLI (NPY), segment_zarr and the widget's session (its full run and a live box) give
    identical labels by the one rule."""
    pytest.importorskip("zarr")
    import zarr

    from napari_pacseg import save_model
    from napari_pacseg.batch import segment_zarr
    from napari_pacseg.cli import main

    image, model = banded(k)
    refine = {"iterations": 2, "kernel_size": 3}
    api = segment(image, model, refine=refine, return_probabilities=True)
    want, want_matte = labels_from_probabilities(api.probabilities)
    assert np.array_equal(api.labels, want) and np.array_equal(api.matte, want_matte)
    assert len(np.unique(api.labels)) == k  # every class really occurs
    save_model(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", image)
    assert main(["segment", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "out"), "-q", "--iterations", "2", "--kernel-size", "3"]) == 0  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "out" / "x_labels.npy"), api.labels)
    source = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=image.shape,
                             chunks=(3, 12, 24), dtype="f4")  # fmt: skip
    source[:] = image
    segment_zarr(tmp_path / "x.zarr", model, tmp_path / "l.zarr", refine=refine, chunks=(3, 12, 24))
    assert np.array_equal(zarr.open_array(str(tmp_path / "l.zarr"), mode="r")[:], api.labels)
    # another threshold: the same everywhere
    low = segment(image, model, refine=refine, threshold=0.3).labels
    assert np.array_equal(low, labels_from_probabilities(api.probabilities, 0.3)[0])
    assert main(["segment", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "out3"), "-q", "--iterations", "2", "--kernel-size", "3",
                 "--threshold", "0.3"]) == 0  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "out3" / "x_labels.npy"), low)
    segment_zarr(tmp_path / "x.zarr", model, tmp_path / "l3.zarr", refine=refine,
                 chunks=(3, 12, 24), threshold=0.3)  # fmt: skip
    assert np.array_equal(zarr.open_array(str(tmp_path / "l3.zarr"), mode="r")[:], low)
    # the widget's face: its headless session, a full run and a live box (whole planes)
    from types import SimpleNamespace

    from napari_pacseg._napari.session import RunParams, Session

    session = Session()
    session.use_image(
        SimpleNamespace(name="x", ndim=3, data=image, scale=tuple(model.config.spacing),
                        translate=(0.0, 0.0, 0.0))
    )  # fmt: skip
    session.set_model(model, "trained")
    params = RunParams(refine=refine, threshold=0.5, device="cpu")
    assert np.array_equal(session.full_run(params)().labels, api.labels)
    live = session.compute_live(session.live_job(((0, 6), (0, 24), (0, 24 * k)), params))
    assert np.array_equal(live.labels, api.labels)
