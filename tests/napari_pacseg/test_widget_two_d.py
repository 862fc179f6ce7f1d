"""The dock widget on 2D layers, RGB layers and time-lapses, in a real viewer under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_pacseg import segment  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample, load_sample_2d  # noqa: E402

from .test_widget import WAIT_MS, assert_same_labels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PLANES = [20, 32, 44]  # planes of the sample with scribbles
WINDOW = (slice(96, 224), slice(0, 128))  # holds scribbles of both classes in each plane


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    yield viewer, widget
    widget.live_runner.stop()
    qtbot.waitUntil(
        lambda: not widget.running and widget.live_runner._worker is None, timeout=WAIT_MS
    )


def _train(widget, qtbot):
    widget.train_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.model is not None, widget.status.value
    return widget.model


def test_the_2d_sample_trains_a_2d_model_runs_and_previews(viewer_widget, qtbot, errors):
    viewer, widget = viewer_widget
    viewer.open_sample("napari-pacseg", "nuclei_2d")
    widget.image.value = viewer.layers["nuclei 2D"]
    assert widget.scribbles.value.name == "nuclei 2D scribbles"
    assert not widget.axis0.visible
    assert widget.spacing_info.value.startswith("2D image: 0.4, 0.4 (y, x")
    assert widget.train_steps.value == 100  # a 2D model's default steps
    model = _train(widget, qtbot)
    assert model.config.ndim == 2 and [c.name for c in model.config.classes] == [
        "background",
        "nucleus",
    ]
    assert "2D model" in widget.model_info.value
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    sample = load_sample_2d()
    labels = viewer.layers["nuclei 2D labels"]
    assert labels.data.shape == (256, 256) and tuple(labels.scale) == (0.4, 0.4)
    full = segment(sample.image, model, spacing=sample.spacing)
    np.testing.assert_array_equal(labels.data, full.labels)
    truth = sample.truth
    dice = 2 * ((labels.data > 0) & truth).sum() / ((labels.data > 0).sum() + truth.sum())
    assert dice > 0.85

    labels.data = np.zeros_like(labels.data)
    widget.live.value = True
    runner = widget.live_runner
    qtbot.waitUntil(lambda: runner.delivered >= 1 and not runner.busy, timeout=WAIT_MS)
    assert widget.status.value.startswith("live preview of y 0-255, x 0-255"), widget.status.value
    assert_same_labels(viewer.layers["nuclei 2D labels"].data, full.labels, full.matte)
    assert not errors


def test_a_time_lapse_layer_is_segmented_frame_by_frame(viewer_widget, qtbot, errors):
    viewer, widget = viewer_widget
    sample = load_sample()
    frames = np.ascontiguousarray(sample.image[PLANES][(slice(None), *WINDOW)])
    layer = viewer.add_image(frames, name="movie", scale=(1.0, 0.4, 0.4), axis_labels=("t", "y", "x"))  # fmt: skip
    widget.image.value = layer
    assert widget.axis0.visible and widget.axis0.value == "frames"
    assert widget.spacing_info.value.startswith("time-lapse of 2D frames: 0.4, 0.4 (y, x")
    scribbles = widget.new_scribbles_layer()
    assert scribbles.data.shape == frames.shape
    painted = np.zeros_like(scribbles.data)
    painted[1] = sample.scribbles[PLANES[1]][WINDOW]  # one frame painted
    scribbles.data = painted
    model = _train(widget, qtbot)
    assert model.config.ndim == 2
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    labels = viewer.layers["movie labels"].data
    assert labels.shape == frames.shape
    for t in range(3):
        np.testing.assert_array_equal(
            labels[t], segment(frames[t], model, spacing=(0.4, 0.4)).labels
        )

    # the live preview shows the current frame, alone
    viewer.layers["movie labels"].data = np.zeros_like(labels)
    viewer.dims.set_current_step(0, 2)
    widget.live.value = True
    runner = widget.live_runner
    qtbot.waitUntil(lambda: runner.delivered >= 1 and not runner.busy, timeout=WAIT_MS)
    assert widget.status.value.startswith("live preview of frame 2, y 0-127"), widget.status.value
    shown = viewer.layers["movie labels"].data
    assert not shown[:2].any()
    alone = segment(frames[2], model, spacing=(0.4, 0.4))
    assert_same_labels(shown[2], alone.labels, alone.matte)

    # the same layer as a volume: a 2D model is the wrong kind, said before any work
    widget.axis0.value = "z"
    assert "needs a volume model" in widget.spacing_info.value
    widget.live.value = False
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors and "2D model" in errors[-1]


def test_the_steps_follow_the_kind_unless_the_user_set_them(viewer_widget):
    viewer, widget = viewer_widget
    flat = viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    volume = viewer.add_image(np.zeros((4, 32, 32), np.float32), name="vol")
    widget.image.value = flat
    assert widget.train_steps.value == 100
    widget.image.value = volume
    assert widget.train_steps.value == 400
    widget.train_steps.value = 100  # the user's own choice for a volume
    widget.image.value = flat
    widget.image.value = volume
    assert widget.train_steps.value == 100


def test_an_rgb_layer(viewer_widget, qtbot, errors):
    viewer, widget = viewer_widget
    sample = load_sample_2d()
    grey = (sample.image[WINDOW] // 4).clip(0, 255).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    layer = viewer.add_image(rgb, name="colour", rgb=True, scale=(0.4, 0.4))
    widget.image.value = layer
    assert widget.spacing_info.value.startswith("2D image")
    scribbles = widget.new_scribbles_layer()
    assert scribbles.data.shape == grey.shape
    scribbles.data = sample.scribbles[WINDOW].copy()
    model = _train(widget, qtbot)
    assert model.config.in_channels == 3 and model.config.ndim == 2
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    out = viewer.layers["colour labels"].data
    np.testing.assert_array_equal(
        out, segment(rgb, model, channel_axis=-1, spacing=(0.4, 0.4)).labels
    )
    assert not errors


def test_a_volume_model_on_a_2d_layer_says_so(viewer_widget, qtbot, errors):
    viewer, widget = viewer_widget
    viewer.open_sample("napari-pacseg", "nuclei_2d")
    widget.image.value = viewer.layers["nuclei 2D"]
    assert widget.load_model_file(DEMO_MODEL_FILE)
    assert "the model is a 3D model: this 2D image needs a 2D model" in widget.spacing_info.value
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors and "3D model" in errors[-1]
