"""2D images, RGB and stacks of frames: segment(), train(), the model file and the measurements."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_pacseg import (
    FeatureSpec,
    ModelFileWarning,
    PacSegModel,
    load_model,
    receptive_field,
    save_model,
    segment,
    train,
)
from napari_pacseg.describe import model_lines, model_summary
from napari_pacseg.instances.labels import instance_labels, object_table

SPEC = FeatureSpec(sigmas=(1.0, 2.0))


def _cells(shape=(48, 56), seed=0, shift=0):
    """A 2D image of three bright discs on a noisy background, its truth and scribbles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    centres = [(14 + shift, 14), (32, 36 - shift), (14, 42)]
    truth = np.zeros(shape, bool)
    for cy, cx in centres:
        truth |= (y - cy) ** 2 + (x - cx) ** 2 < 49
    image = (truth * 100.0 + 20 + rng.normal(0, 8, shape)).astype(np.float32)
    scribbles = np.zeros(shape, np.uint8)
    scribbles[1:3, 2:50] = 1
    scribbles[44:46, 4:30] = 1
    scribbles[14, 11:18] = 2
    scribbles[32, 33:40] = 2
    return image, scribbles, truth


@pytest.fixture(scope="module")
def model2d():
    image, scribbles, _ = _cells()
    return train(image, scribbles, spacing=(0.5, 0.5), features=SPEC, steps=120)


def _meta(path):
    """The napari_pacseg metadata of a model file (safetensors: 8-byte length, JSON header)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["napari_pacseg"])


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_a_2d_image_trains_a_2d_model_and_gets_2d_results(model2d):
    image, _, truth = _cells(seed=1)
    assert model2d.config.ndim == 2
    assert model2d.config.in_plane_spacing == (0.5, 0.5)
    seg = segment(image, model2d, return_probabilities=True)
    assert seg.labels.shape == image.shape and seg.matte.shape == image.shape
    assert seg.probabilities.shape == (2, *image.shape)
    assert _dice(seg.labels == 2, truth) > 0.85
    assert len(receptive_field(model2d)) == 2


def test_2d_equals_the_same_model_on_a_one_plane_volume(model2d):
    """The 2D path (one-plane windows, no z reach) gives what the 3D engine gives on a depth-1
    volume with the same weights: taps beyond the one plane carry nothing."""
    image, _, _ = _cells(seed=2)
    as3d = PacSegModel(dataclasses.replace(model2d.config, ndim=3))
    as3d.load_state_dict(model2d.state_dict())
    flat = segment(image, model2d, return_probabilities=True)
    vol = segment(image[None], as3d, spacing=model2d.config.spacing, return_probabilities=True)
    np.testing.assert_array_equal(flat.labels, vol.labels[0])
    np.testing.assert_allclose(flat.probabilities, vol.probabilities[:, 0], atol=1e-5)
    # and a one-plane volume given to the 2D model is the 2D image, its objects 2D objects
    same = segment(image[None], model2d, spacing=(9.0, 0.5, 0.5), instances=True)
    np.testing.assert_array_equal(same.labels[0], flat.labels)
    objects2d = segment(image, model2d, instances=True)
    np.testing.assert_array_equal(same.instances[0], objects2d.instances)
    assert "area" in same.objects and "volume" not in same.objects


def test_2d_tiling_does_not_change_the_result(model2d):
    image, _, _ = _cells(seed=3)
    whole = segment(image, model2d)
    tiled = segment(image, model2d, tile_shape=(16, 20))
    np.testing.assert_array_equal(whole.labels, tiled.labels)
    np.testing.assert_allclose(whole.matte, tiled.matte, atol=1e-5)


def test_rgb_images_with_a_channel_axis():
    image, scribbles, truth = _cells(seed=4)
    rgb = np.stack([image, image * 0.5 + 3, np.full_like(image, 7.0)], axis=-1)
    model = train(rgb, scribbles, channel_axis=-1, features=SPEC, steps=80)
    assert model.config.in_channels == 3 and model.config.ndim == 2
    last = segment(rgb, model, channel_axis=-1)
    first = segment(np.moveaxis(rgb, -1, 0), model, channel_axis=0)
    assert last.labels.shape == image.shape
    np.testing.assert_array_equal(last.labels, first.labels)
    assert _dice(last.labels == 2, truth) > 0.6  # a toy: the plumbing is what is tested
    with pytest.raises(ValueError, match="has 1 channel"):
        segment(image, model)


def test_frames_are_each_segmented_alone(model2d):
    frames = [_cells(seed=s, shift=s)[0] * (1 + 0.2 * s) for s in range(3)]
    stack = np.stack(frames)
    seen = []
    seg = segment(stack, model2d, frame_axis=0, return_probabilities=True, instances=True,
                  progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert seg.labels.shape == stack.shape and seg.probabilities.shape == (2, *stack.shape)
    offset = 0
    for t, frame in enumerate(frames):
        alone = segment(frame, model2d, return_probabilities=True, instances=True)
        np.testing.assert_array_equal(seg.labels[t], alone.labels)
        np.testing.assert_array_equal(seg.matte[t], alone.matte)
        np.testing.assert_array_equal(seg.probabilities[:, t], alone.probabilities)
        ids = alone.instances.copy()
        ids[ids > 0] += offset
        np.testing.assert_array_equal(seg.instances[t], ids)
        rows = seg.objects[seg.objects["frame"] == t]
        np.testing.assert_array_equal(
            rows["id"].to_numpy(), alone.objects["id"].to_numpy() + offset
        )
        np.testing.assert_allclose(rows["area"].to_numpy(), alone.objects["area"].to_numpy())
        offset += int(alone.instances.max())
    assert list(seg.objects.columns[:2]) == ["id", "frame"]
    assert seen[-1][0] == seen[-1][1] and all(b == seen[0][1] for _, b in seen)
    # the frame axis stays where it was; with channels
    last = segment(np.moveaxis(stack, 0, -1), model2d, frame_axis=-1)
    np.testing.assert_array_equal(last.labels, np.moveaxis(seg.labels, 0, -1))


def test_frames_with_channels(model2d):
    image, scribbles, _ = _cells(seed=5)
    two = np.stack([image, image * 0.5], axis=1)  # (H, C, W)... as a stack: (T, H, W, C) below
    stack = np.stack([np.moveaxis(two, 1, -1)] * 2)  # (T, H, W, C)
    model = train(stack[0], scribbles, channel_axis=-1, features=SPEC, steps=40)
    seg = segment(stack, model, frame_axis=0, channel_axis=-1)
    alone = segment(stack[1], model, channel_axis=-1)
    assert seg.labels.shape == (2, *image.shape)
    np.testing.assert_array_equal(seg.labels[1], alone.labels)
    chan_first = segment(np.moveaxis(stack, -1, 0), model, frame_axis=1, channel_axis=0)
    np.testing.assert_array_equal(chan_first.labels, seg.labels)
    with pytest.raises(ValueError, match="frame_axis and channel_axis are the same axis"):
        segment(stack, model, frame_axis=3, channel_axis=-1)


def test_training_on_frames_uses_the_painted_frames():
    a, sa, _ = _cells(seed=6)
    b, sb, _ = _cells(seed=7, shift=2)
    c, _, _ = _cells(seed=8)
    stack = np.stack([a, c, b])
    marks = np.stack([sa, np.zeros_like(sa), sb])
    from_frames = train(stack, marks, frame_axis=0, features=SPEC, steps=30, seed=1)
    from_list = train([a, b], [sa, sb], features=SPEC, steps=30, seed=1)
    assert from_frames.config.ndim == 2
    for (name, p), (_, q) in zip(from_frames.state_dict().items(), from_list.state_dict().items()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="label no pixel in any frame"):
        train(stack, np.zeros_like(marks), frame_axis=0)
    with pytest.raises(ValueError, match="3 frames along frame_axis but the scribbles 2"):
        train(stack, marks[:2], frame_axis=0)


def test_2d_and_3d_models_are_told_apart(model2d, tmp_path):
    image, _, _ = _cells()
    volume = np.stack([image] * 4)
    with pytest.raises(ValueError, match=r"is 3D .* but the model is a 2D model .* frame_axis=0"):
        segment(volume, model2d)
    model3d = train(volume, np.stack([_cells()[1]] * 4), features=SPEC, steps=20)
    assert model3d.config.ndim == 3
    with pytest.raises(ValueError, match=r"is 2D .* but the model is a 3D model .* image\[None\]"):
        segment(image, model3d)
    with pytest.raises(ValueError, match="image 1: is 3D but image 0 is 2D"):
        train([image, volume], [_cells()[1], np.stack([_cells()[1]] * 4)])
    with pytest.raises(ValueError, match=r"spacing must be 2 positive numbers \(y, x\)"):
        segment(image, model2d, spacing=(1.0, 0.5, 0.5))
    # the file says which kind it is; trained models (brightness on auto) are version 6,
    # models with a brightness given and a normalisation version 4 (an older release refuses
    # them as "upgrade"), and without one keep the versions it reads
    p2, p3 = (
        save_model(model2d, tmp_path / "a.safetensors"),
        save_model(model3d, tmp_path / "b.safetensors"),
    )
    meta2, meta3 = _meta(p2), _meta(p3)
    assert meta2["version"] == 6 and meta2["config"]["ndim"] == 2
    assert meta3["version"] == 6 and "ndim" not in meta3["config"]

    def given(model, **changes):
        inst = dataclasses.replace(model.config.instances, brightness=0.0)
        out = type(model)(dataclasses.replace(model.config, instances=inst, **changes))
        out.load_state_dict(model.state_dict())
        return out

    for i, model in enumerate((model2d, model3d)):
        assert _meta(save_model(given(model), tmp_path / f"given{i}.safetensors"))["version"] == 4
    for model, version in ((model2d, 3), (model3d, 2)):
        old = given(model, normalisation=None)
        with pytest.warns(ModelFileWarning, match="retrain it"):
            assert _meta(save_model(old, tmp_path / "old.safetensors"))["version"] == version
            assert load_model(tmp_path / "old.safetensors").config.normalisation is None
    back = load_model(p2)
    assert back.config == model2d.config
    np.testing.assert_array_equal(segment(image, back).labels, segment(image, model2d).labels)
    text = "\n".join(model_lines(back, model_summary(back, p2)))
    assert "kind         2D: segments 2D images" in text
    assert "(0.5, 0.5) (y, x): the pixel size" in text
    assert "3D: segments volumes" in "\n".join(model_lines(model3d))
    assert model_summary(back)["ndim"] == 2


def test_a_2d_context_model_trains_and_tiles():
    image, scribbles, truth = _cells(seed=9)
    model = train(image, scribbles, features=SPEC, steps=40, context=True)
    assert model.config.ndim == 2
    conv = model.context.enc[0]
    assert conv.kernel_size == (1, 3, 3)
    whole = segment(image, model)
    tiled = segment(image, model, tile_shape=(16, 16))
    np.testing.assert_array_equal(whole.labels, tiled.labels)
    assert _dice(whole.labels == 2, truth) > 0.5  # 40 steps on a toy: it runs, and sees


def test_2d_measurements():
    y, x = np.mgrid[:64, :80]
    disc = ((y - 30) ** 2 + (x - 30) ** 2 < 15**2).astype(np.uint8) * 2
    square = np.zeros_like(disc)
    square[10:30, 50:70] = 2
    labels = disc + square
    ids = instance_labels(labels, (0.5, 0.5), None)
    assert ids.shape == labels.shape and ids.max() == 2
    table = object_table(ids, labels, labels.astype(np.float32), (0.5, 0.5))
    assert "volume" not in table and "centroid_z" not in table
    areas = dict(zip(table["id"], table["area"]))
    assert areas[ids[30, 30]] == pytest.approx(np.count_nonzero(disc) * 0.25)
    assert areas[ids[20, 60]] == pytest.approx(100.0)  # 20 x 20 pixels of 0.5 x 0.5
    circ = dict(zip(table["id"], table["circularity"]))
    assert 0.85 < circ[ids[30, 30]] <= 1.0  # a digitised disc's contour is a little longer
    assert circ[ids[20, 60]] == pytest.approx(np.pi / 4, abs=0.08)
    per = dict(zip(table["id"], table["perimeter"]))
    assert per[ids[20, 60]] == pytest.approx(40.0, rel=0.05)  # 4 x 10 units, corners cut
    assert table["centroid_y"][table["id"] == ids[30, 30]][0] == pytest.approx(15.0, abs=0.05)


def test_frames_can_be_cancelled_between_tiles(model2d):
    from napari_pacseg import SegmentationCancelled

    stack = np.stack([_cells(seed=s)[0] for s in range(4)])
    seen = []

    def cancel():
        return len(seen) >= 3  # after the third tile: in the second frame

    with pytest.raises(SegmentationCancelled):
        segment(stack, model2d, frame_axis=0, progress=lambda d, t: seen.append(d),
                should_cancel=cancel)  # fmt: skip
    assert len(seen) == 3
