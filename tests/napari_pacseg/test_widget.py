"""The napari plugin: manifest, sample data, dock widget (full runs, live preview, training,
cancel, errors) in a real viewer under Xvfb."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from qtpy.QtCore import QTimer  # noqa: E402

from napari_pacseg import segment  # noqa: E402
from napari_pacseg.engine.preview import RegionSegmenter  # noqa: E402
from napari_pacseg.model.classes import labels_from_probabilities  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_demo_model, load_sample  # noqa: E402

CROP = (slice(32, 48), slice(64, 128), slice(64, 128))  # 16 planes of the sample, 3 nuclei
TRAIN_CROP = (slice(24, 40), slice(160, 256), slice(0, 96))  # holds scribbles of both classes
WAIT_MS = 60_000


def assert_same_labels(got, want, matte, threshold=0.5):
    """Labels equal, except where the matte is within float rounding of the threshold (a box
    refined on its own sums the CRF's taps in another order than the whole volume)."""
    differ = got != want
    assert not np.any(differ & (np.abs(matte - threshold) > 1e-4)), int(differ.sum())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture
def docked(make_napari_viewer, sample, qtbot):
    """A viewer with the sample crop, the widget docked through the plugin (live off)."""
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(sample.image[CROP], name="crop", scale=sample.spacing)
    _, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    widget.image.value = image
    yield viewer, widget
    widget.live_runner.stop()
    qtbot.waitUntil(
        lambda: not widget.running and widget.live_runner._worker is None, timeout=WAIT_MS
    )


def test_manifest_and_sample_data(make_napari_viewer):
    import npe2

    viewer = make_napari_viewer()
    manifest = npe2.PluginManager.instance().get_manifest("napari-pacseg")
    assert [w.display_name for w in manifest.contributions.widgets] == ["PAC Segmentation"]
    assert [s.display_name for s in manifest.contributions.sample_data] == [
        "PAC-Seg nuclei (3D)",
        "PAC-Seg nuclei (2D)",
    ]
    viewer.open_sample("napari-pacseg", "nuclei")
    image, truth, scribbles = (
        viewer.layers[n] for n in ("nuclei", "nuclei ground truth", "nuclei scribbles")
    )
    assert image.data.shape == truth.data.shape == scribbles.data.shape == (64, 256, 256)
    assert tuple(image.scale) == tuple(scribbles.scale) == (1.0, 0.4, 0.4)
    assert isinstance(truth, napari.layers.Labels) and isinstance(scribbles, napari.layers.Labels)
    assert set(np.unique(scribbles.data)) == {0, 1, 2}
    assert list(scribbles.features["class"]) == ["unlabelled", "background", "nucleus"]
    instances = viewer.layers["nuclei instance truth"]
    assert isinstance(instances, napari.layers.Labels) and instances.data.max() == 45


def test_full_run_outputs_layers_in_place_and_keeps_the_event_loop_turning(
    docked, qtbot, errors, sample
):
    viewer, widget = docked
    assert widget.load_model_file(DEMO_MODEL_FILE)
    assert "3D model" in widget.model_info.value and "nucleus" in widget.model_info.value
    assert "gaussian" not in widget.model_info.value  # compact until asked for the details
    widget.model_details.value = True
    assert "nucleus" in widget.model_info.value and "gaussian" in widget.model_info.value
    widget.model_details.value = False
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    widget.run_button.native.click()
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    timer.stop()
    assert len(ticks) >= 3, "the event loop stalled while the run was in flight"
    assert errors == []
    assert widget.status.value.startswith("full image done in"), widget.status.value
    labels, matte = viewer.layers["crop labels"], viewer.layers["crop matte"]
    assert isinstance(labels, napari.layers.Labels) and isinstance(matte, napari.layers.Image)
    assert labels.data.shape == matte.data.shape == (16, 64, 64)
    assert labels.data.dtype == np.uint8 and matte.data.dtype == np.float32
    assert tuple(labels.scale) == tuple(matte.scale) == sample.spacing
    assert labels.metadata["pacseg"]["complete"]
    assert list(labels.features["class"]) == ["background", "nucleus"]
    assert list(labels.features["index"]) == [0, 2]
    assert np.allclose(labels.colormap.map([2])[0], (1.0, 0.2, 0.2, 1.0))
    assert tuple(matte.contrast_limits) == (0.0, 1.0) and matte.blending == "additive"
    model = load_demo_model()
    expected = segment(sample.image[CROP], model, spacing=sample.spacing)
    # the run's worker thread sums with torch's default thread count, this thread with one
    assert_same_labels(labels.data, expected.labels, expected.matte)
    assert np.allclose(matte.data, expected.matte, atol=1e-5)
    assert 0.01 < (labels.data > 0).mean() < 0.9  # neither empty nor everything

    # a second run with other refinement writes into the same layers
    n_layers = len(viewer.layers)
    widget.iterations.value = 0
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["crop labels"] is labels
    unrefined = segment(sample.image[CROP], model, spacing=sample.spacing, refine=False)
    assert_same_labels(labels.data, unrefined.labels, unrefined.matte)


def test_live_mode_updates_only_the_visible_slab(docked, qtbot, errors, sample):
    viewer, widget = docked
    viewer.dims.set_current_step(0, 8)
    widget.live.value = True
    statuses, say = [], widget._say
    widget._say = lambda text: (statuses.append(text), say(text))
    widget.load_model_file(DEMO_MODEL_FILE)  # a model change requests a live update
    runner = widget.live_runner
    qtbot.waitUntil(lambda: runner.delivered == 1 and not runner.busy, timeout=WAIT_MS)
    assert "previewing z 7-9…" in statuses  # while it ran
    assert any(re.match(r"previewing z 7-9: \d+%", s) for s in statuses)  # its progress
    assert widget.status.value.startswith("live preview of z 7-9")
    labels, matte = viewer.layers["crop labels"], viewer.layers["crop matte"]
    assert labels.data.shape == (16, 64, 64)
    assert not labels.metadata["pacseg"]["complete"]
    outside = np.ones(16, bool)
    outside[7:10] = False
    assert not labels.data[outside].any() and not matte.data[outside].any()
    assert labels.data[7:10].any()
    model = load_demo_model()
    full = segment(sample.image[CROP], model, spacing=sample.spacing)
    assert_same_labels(labels.data[7:10], full.labels[7:10], full.matte[7:10])

    # a refinement-only change re-runs the CRF only, on the same slab
    planes = widget.session.segmenter.stats["logit_planes"]
    widget.compat.value = 0.0
    qtbot.waitUntil(lambda: runner.delivered == 2 and not runner.busy, timeout=WAIT_MS)
    assert widget.session.segmenter.stats["logit_planes"] == planes
    assert "refinement only" in widget.status.value
    changed = segment(sample.image[CROP], model, spacing=sample.spacing, refine={"compat": 0.0})
    assert_same_labels(labels.data[7:10], changed.labels[7:10], changed.matte[7:10])
    assert not labels.data[outside].any()

    # a newer request makes the one in flight stale: its result is dropped
    viewer.dims.set_current_step(0, 3)
    qtbot.waitUntil(lambda: runner._worker is not None, timeout=WAIT_MS)
    widget.threshold.value = 0.3
    qtbot.waitUntil(lambda: runner.delivered == 3 and not runner.busy, timeout=WAIT_MS)
    assert runner.dropped >= 1
    probs = segment(
        sample.image[CROP], model, spacing=sample.spacing, refine={"compat": 0.0},
        return_probabilities=True,
    ).probabilities  # fmt: skip
    want, want_matte = labels_from_probabilities(probs, 0.3, 0)
    assert_same_labels(labels.data[2:5], want[2:5], want_matte[2:5], 0.3)
    assert_same_labels(labels.data[7:10], changed.labels[7:10], changed.matte[7:10])  # kept
    assert not labels.data[10:].any()
    assert labels.metadata["pacseg"]["exact"]

    # a newer change aborts a costly preview in flight (between the CRF's units of work)
    crf_runs = widget.session.segmenter.stats["crf_runs"]
    gate, compute = threading.Event(), runner.compute

    def held(job, should_cancel, progress):  # the first refinement step waits for the gate
        def step(done, total):  # the logits are cached: every unit is the CRF's
            progress(done, total)
            if done > 0:
                gate.wait(WAIT_MS / 1000)

        return compute(job, should_cancel, step)

    runner.compute = held
    widget.iterations.value = 50
    qtbot.waitUntil(
        lambda: re.match(r"previewing z 2-4: \d+%", widget.status.value), timeout=WAIT_MS
    )
    widget.compat.value = 5.0
    gate.set()  # the held preview goes on: its next check sees the newer request and stops
    qtbot.waitUntil(lambda: runner.delivered == 4 and not runner.busy, timeout=WAIT_MS)
    assert widget.session.segmenter.stats["crf_runs"] == crf_runs + 1  # the newer one only
    assert widget.status.value.startswith("live preview of z 2-4")

    # stopping live during a preview leaves no "previewing" status behind
    gate.clear()
    widget.compat.value = 6.0
    qtbot.waitUntil(
        lambda: re.match(r"previewing z 2-4: \d+%", widget.status.value), timeout=WAIT_MS
    )
    widget.live.value = False
    gate.set()
    qtbot.waitUntil(lambda: not runner.busy and runner._worker is None, timeout=WAIT_MS)
    assert widget.status.value == "live preview off"
    assert errors == []


def test_visible_box_in_3d_view_is_bounded(docked):
    from napari_pacseg._napari.layers import visible_box

    viewer, _ = docked
    layer = viewer.layers["crop"]
    viewer.dims.set_current_step(0, 5)
    assert visible_box(viewer, layer, None, (16, 64, 64)) == ((4, 7), (0, 64), (0, 64))
    assert visible_box(viewer, layer, None, (16, 64, 64), max_plane=20)[0] == (4, 7)
    viewer.dims.ndisplay = 3
    box = visible_box(viewer, layer, None, (16, 64, 64), box_3d=(4, 16, 16))
    assert [b - a for a, b in box] == [4, 16, 16]


def test_train_from_scribbles_end_to_end(docked, qtbot, errors, sample, tmp_path, monkeypatch):
    viewer, widget = docked
    widget.image.value = viewer.add_image(
        sample.image[TRAIN_CROP], name="cells", scale=sample.spacing
    )
    widget.class_names.value = "background, nucleus"
    scribbles = widget.new_scribbles_layer()
    assert scribbles.name == "cells scribbles" and scribbles.data.dtype == np.uint8
    assert scribbles.data.shape == (16, 96, 96) and tuple(scribbles.scale) == sample.spacing
    assert list(scribbles.features["class"]) == ["unlabelled", "background", "nucleus"]
    assert widget.scribbles.value.name == "cells scribbles"  # (the widget sees a proxy)

    widget.train_button.native.click()  # nothing painted yet: a clear error, no crash
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert len(errors) == 1 and "label no voxel" in errors[0]

    scribbles.data = sample.scribbles[TRAIN_CROP].copy()
    widget.train_steps.value = 60
    widget.feature_scales.value = "0.5, 1"
    widget.train_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.model is not None, widget.status.value
    cfg = widget.model.config
    assert [c.name for c in cfg.classes] == ["background", "nucleus"]
    assert cfg.features.sigmas == (0.5, 1.0) and cfg.spacing == sample.spacing
    assert "trained from 'cells scribbles'" in widget.model_info.value

    qtbot.wait(300)  # progress still queued from the training must not overwrite the result
    assert widget.status.value.startswith("trained ("), widget.status.value

    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    labels = viewer.layers["cells labels"].data
    truth = sample.truth[TRAIN_CROP]
    dice = 2 * np.count_nonzero((labels > 0) & truth) / ((labels > 0).sum() + truth.sum())
    assert dice > 0.6, dice  # 57 scribbled voxels, 60 steps: a mechanics check, not a benchmark

    saved = widget.save_model_file(tmp_path / "mine")
    assert saved.name == "mine.safetensors" and saved.is_file()
    assert widget.load_model_file(saved)
    assert widget.model.config.classes == cfg.classes
    assert len(errors) == 1
    # "theirs" (no suffix) must not replace an existing theirs.safetensors unasked (declined)
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"a file of someone else")
    monkeypatch.setattr("napari_pacseg._napari.widget.confirm_replace", lambda *_: False)
    assert widget.save_model_file(tmp_path / "theirs") is None
    assert theirs.read_bytes() == b"a file of someone else"
    assert len(errors) == 1 and "not saved: theirs.safetensors exists" in widget.status.value
    assert widget.save_model_file(theirs) == theirs  # the dialog's own name: replaced
    assert widget.load_model_file(theirs)


def test_cancel_full_run(make_napari_viewer, qtbot, errors, sample):
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="nuclei", scale=sample.spacing)
    _, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    widget.load_model_file(DEMO_MODEL_FILE)
    widget.run_full()
    assert widget.cancel_button.enabled and not widget.run_button.enabled
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    qtbot.wait(300)  # progress still queued from the run must not overwrite the outcome
    assert errors == []
    assert widget.status.value == "segmentation cancelled; the layers were not changed"
    assert "nuclei labels" not in viewer.layers, "a cancelled run must not leave a partial result"
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_bad_model_file_gives_a_notification(docked, errors, tmp_path):
    _, widget = docked
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert not widget.load_model_file(bad)
    assert len(errors) == 1 and "could not load the model" in errors[0]
    assert widget.model is None and widget.status.value.startswith("error")
    assert widget.load_model_file(DEMO_MODEL_FILE)  # the widget stays usable
    assert "nucleus" in widget.model_info.value and len(errors) == 1


def test_screenshot_shows_the_result(docked, qtbot, errors, tmp_path):
    viewer, widget = docked
    widget.load_model_file(DEMO_MODEL_FILE)
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    viewer.dims.set_current_step(0, 8)
    labels = viewer.layers["crop labels"]
    with_labels = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = False
    viewer.layers["crop matte"].visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    changed = np.any(with_labels[..., :3] != without[..., :3], axis=-1)
    assert 0.01 < changed.mean() < 0.95, "the result layers do not show on the canvas"
    colours = np.unique(with_labels[changed][:, :3], axis=0)
    assert len(colours) > 10
    napari.utils.io.imsave(str(tmp_path / "screenshot.png"), with_labels)


def test_region_segmenter_equals_segment_on_any_box(sample):
    model = load_demo_model()
    image = sample.image[CROP]
    full = segment(image, model, spacing=sample.spacing, return_probabilities=True)
    seg = RegionSegmenter(image, model, spacing=sample.spacing, device="cpu")
    box = ((0, 5), (10, 40), (3, 64))
    p = seg.probabilities(box)
    # equal up to float rounding (the CRF sums its taps in another order on another extent)
    np.testing.assert_allclose(p, full.probabilities[:, 0:5, 10:40, 3:64], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="inside the volume"):
        seg.probabilities(((0, 17), (0, 64), (0, 64)))


def test_a_smaller_window_is_cut_from_cached_whole_planes(sample):
    """A bounded preview's in-plane window after previews of whole planes: its logits come
    from the cached planes (none computed) and equal a fresh segmenter's."""
    model = load_demo_model()
    image = sample.image[CROP]
    seg = RegionSegmenter(image, model, spacing=sample.spacing, device="cpu")
    h, w = image.shape[1:]
    seg.probabilities(((2, 5), (0, h), (0, w)), refine=False)
    planes = seg.stats["logit_planes"]
    window = ((3, 4), (10, 40), (3, 50))
    p = seg.probabilities(window, refine=False)
    assert seg.stats["logit_planes"] == planes
    fresh = RegionSegmenter(image, model, spacing=sample.spacing, device="cpu")
    np.testing.assert_allclose(p, fresh.probabilities(window, refine=False), rtol=0, atol=1e-6)
    assert fresh.stats["logit_planes"] == 1


def test_four_d_image_with_a_leading_channel_axis(docked, qtbot, errors, sample):
    viewer, widget = docked
    crop = sample.image[TRAIN_CROP].astype(np.float32)
    two = np.stack([crop, crop.max() - crop])  # (2, D, H, W): channel axis first
    image = viewer.add_image(two, name="two", scale=(1.0, *sample.spacing))
    widget.image.value = image
    assert widget.channel_axis.visible and widget.channel_axis.value == 0
    widget.class_names.value = "background, nucleus"
    scribbles = widget.new_scribbles_layer()
    assert scribbles.data.shape == crop.shape and tuple(scribbles.scale) == sample.spacing
    scribbles.data = sample.scribbles[TRAIN_CROP].copy()
    widget.train_steps.value = 60
    widget.train_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.model is not None and widget.model.config.in_channels == 2, widget.status.value
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    labels = viewer.layers["two labels"]
    assert labels.data.shape == crop.shape and tuple(labels.scale) == sample.spacing
    assert np.count_nonzero(labels.data) > 0
    assert errors == []

    widget.channel_axis.value = 3  # napari could not overlay the result: refused, clearly
    assert "must be its first axis" in widget.spacing_info.value
    widget.run_full()
    assert len(errors) == 1 and "must be its first axis" in errors[0]


def test_train_with_context(docked, qtbot, errors, sample, monkeypatch):
    monkeypatch.setattr("napari_pacseg.training.fit.CONTEXT_STEPS", 5)
    viewer, widget = docked
    widget.image.value = viewer.add_image(sample.image[TRAIN_CROP], name="c", scale=sample.spacing)
    widget.new_scribbles_layer().data = sample.scribbles[TRAIN_CROP].copy()
    assert widget.train_context.value is False
    assert "Context" in widget.train_context.text
    widget.train_context.value = True
    widget.train_steps.value = 10
    widget.feature_scales.value = "1"
    widget.train_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.model is not None and widget.model.context is not None, widget.status.value
    assert "context net" in widget.model_info.value and not errors


def test_training_set_of_two_images(docked, qtbot, errors, sample):
    """Add to training set lists the pair; Train trains on the set plus the chosen pair;
    Remove selected takes an entry out."""
    viewer, widget = docked
    other = (slice(32, 48), slice(96, 192), slice(96, 192))
    widget.class_names.value = "background, nucleus"
    widget.train_steps.value = 20
    widget.feature_scales.value = "0.5, 1"
    for name, crop in (("left", TRAIN_CROP), ("right", other)):
        widget.image.value = viewer.add_image(sample.image[crop], name=name, scale=sample.spacing)
        layer = widget.new_scribbles_layer()
        layer.data = sample.scribbles[crop].copy()
        if name == "left":
            assert not widget.training_set.visible
            widget.add_to_training_set()
            assert widget.training_set.visible and widget.remove_pair_button.visible
    shown = widget.training_set.native
    assert [shown.item(i).text() for i in range(shown.count())] == ["'left scribbles' on 'left'"]
    assert "[1]" in widget.train_button.text
    widget.add_to_training_set()
    assert len(widget.session.training_set) == 2
    widget.add_to_training_set()  # the same pair again: a clear error
    assert len(errors) == 1 and "already" in errors[0]
    widget.train_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.model is not None, widget.status.value
    assert "trained from 2 images" in widget.model_info.value
    assert widget.model.config.provenance["images"] == "2"
    widget.training_set.value = [0]
    widget.remove_from_training_set()
    assert [p.image.name for p in widget.session.training_set] == ["right"]
    assert len(errors) == 1


def test_instances_full_run_live_and_measurements(
    docked, qtbot, errors, sample, tmp_path, monkeypatch
):
    viewer, widget = docked
    assert widget.load_model_file(DEMO_MODEL_FILE)
    model = load_demo_model()
    assert widget.instance_radius.value == model.config.instances.radius
    assert widget.instance_sensitivity.value == model.config.instances.sensitivity
    assert not widget.save_objects_button.enabled
    assert widget.save_objects_file(tmp_path / "none.csv") is None
    assert "no measurements yet" in errors.pop()
    widget.instances.value = True
    widget.instance_min_volume.value = 5.0
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors == [] and widget.status.value.endswith("objects"), widget.status.value
    labels, inst = viewer.layers["crop labels"], viewer.layers["crop instances"]
    assert isinstance(inst, napari.layers.Labels) and inst.data.dtype == np.int32
    assert inst.data.shape == (16, 64, 64) and tuple(inst.scale) == sample.spacing
    n = int(inst.data.max())
    assert n >= 1 and not inst.data[labels.data == 0].any()
    expected = segment(
        sample.image[CROP], model, spacing=sample.spacing, instances={"min_volume": 5.0}
    )
    assert n == int(expected.instances.max())
    assert list(inst.features["index"]) == list(range(1, n + 1))
    assert {"volume", "centroid_z", "sphericity", "class_name"} <= set(inst.features.columns)
    assert widget.save_objects_button.enabled
    written = widget.save_objects_file(tmp_path / "objects")
    assert written.name == "objects.csv"
    rows = written.read_text().splitlines()
    assert len(rows) == n + 1 and rows[0].startswith("id,class,class_name,volume")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # "objects" again: objects.csv is not what was chosen, so it is not replaced unasked
    written.write_text("mine\n")
    monkeypatch.setattr("napari_pacseg._napari.widget.confirm_replace", lambda *_: False)
    assert widget.save_objects_file(tmp_path / "objects") is None
    assert "not saved" in widget.status.value and written.read_text() == "mine\n"
    assert widget.save_objects_file(written) == written and written.read_text() != "mine\n"

    # live after a full run: the full run's objects and measurements stay as they are
    full_ids, full_table = inst.data.copy(), inst.features.copy()
    viewer.dims.set_current_step(0, 14)
    widget.live.value = True
    qtbot.waitUntil(
        lambda: widget.status.value.startswith("live preview of z 13-15"), timeout=WAIT_MS
    )
    qtbot.waitUntil(lambda: widget.live_runner._worker is None, timeout=WAIT_MS)
    assert "objects: the last full run's" in widget.status.value
    assert viewer.layers["crop instances"] is inst
    np.testing.assert_array_equal(inst.data, full_ids)
    assert inst.features.equals(full_table)
    written = widget.save_objects_file(tmp_path / "again.csv")
    assert written.read_text().splitlines()[1:] == rows[1:]  # the table matches the layer

    # live before any full run: the visible slab's objects go into the layer, in place
    viewer.layers.remove(inst)
    widget.live.value = False
    viewer.dims.set_current_step(0, 13)
    widget.live.value = True
    qtbot.waitUntil(lambda: "instances" in [l.name.split()[-1] for l in viewer.layers], timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.live_runner._worker is None, timeout=WAIT_MS)
    inst = viewer.layers["crop instances"]
    qtbot.waitUntil(lambda: inst.data[12:15].any(), timeout=WAIT_MS)
    assert not inst.data[:12].any()
    assert not inst.data[12:15][labels.data[12:15] == 0].any()
    assert len(inst.features) == 0
    assert errors == []


def test_sample_scribbles_and_classes_are_picked(make_napari_viewer, errors):
    """Docked before the sample opens, the widget picks "<image> scribbles" and its classes;
    a loaded model's classes then replace them."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    viewer.open_sample("napari-pacseg", "nuclei")
    widget.image.value = viewer.layers["nuclei"]
    assert widget.scribbles.value is viewer.layers["nuclei scribbles"]
    assert widget.class_names.value == "background, nucleus"
    viewer.layers.remove("nuclei scribbles")
    assert widget.scribbles.value is None
    widget.new_scribbles_button.clicked()
    assert widget.scribbles.value is viewer.layers["nuclei scribbles"]
    widget.class_names.value = "bg, fg"
    assert widget.load_model_file(DEMO_MODEL_FILE)
    assert widget.class_names.value == "background, nucleus"
    assert errors == []


def test_widget_fits_a_laptop_screen(make_napari_viewer, qtbot):
    """With a model loaded the dock needs at most 700 px of height (the controls scroll) and
    stays narrow; Run, Cancel and Status are outside the scroll area, always in sight."""
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    assert widget.load_model_file(DEMO_MODEL_FILE)
    qtbot.wait(10)
    hint = dock.minimumSizeHint()
    assert hint.height() <= 700 and hint.width() <= 450, hint
    scroll = widget.controls.root_native_widget
    for w in (widget.run_button, widget.cancel_button, widget.status, widget.live):
        assert not scroll.isAncestorOf(w.native)
    assert scroll.isAncestorOf(widget.load_button.native)


def test_border_only_scribbles_warn_after_training(docked, qtbot, errors, monkeypatch):
    viewer, widget = docked
    warned: list[str] = []
    monkeypatch.setattr("napari_pacseg._napari.widget.show_warning", warned.append)
    marks = np.zeros((16, 64, 64), np.uint8)
    marks[8, 1, 5:60] = 1
    marks[8, 28:32, 30:34] = 2  # 16 voxels: enough to learn from (no sparsity warning)
    layer = viewer.add_labels(marks, name="crop scribbles", scale=viewer.layers["crop"].scale)
    widget.scribbles.value = layer
    widget.train_steps.value = 20
    widget.start_training()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors == []
    assert "warning: the background scribbles are all on the image border" in widget.status.value
    assert len(warned) == 1 and "between objects" in warned[0]


def test_output_layers_change_only_what_differs(make_napari_viewer):
    """Reused output layers keep their scale, translate and colours untouched when they
    already match (each assignment redraws the layer) and follow the image when it changes."""
    from napari_pacseg._napari import layers as _layers
    from napari_pacseg._napari.session import ImageInput

    viewer = make_napari_viewer()
    model = load_demo_model()
    shape = (4, 8, 8)

    def image(scale, translate=(0.0, 0.0, 0.0)):
        return ImageInput(None, "im", np.zeros(shape, np.float32), None, shape, scale, translate)

    labels, matte = _layers.output_layers(viewer, image((1.0, 0.4, 0.4)), model, 0)
    seen = []
    for layer in (labels, matte):
        for name in ("scale", "translate"):
            getattr(layer.events, name).connect(lambda e, n=name: seen.append(n))
    labels.events.colormap.connect(lambda e: seen.append("colormap"))
    assert _layers.output_layers(viewer, image((1.0, 0.4, 0.4)), model, 0) == (labels, matte)
    assert seen == []
    _layers.output_layers(viewer, image((2.0, 0.5, 0.5), (1.0, 0.0, 0.0)), model, 0)
    for layer in (labels, matte):
        np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))
        np.testing.assert_allclose(layer.translate, (1.0, 0.0, 0.0))
    assert "colormap" not in seen
    _layers.output_layers(viewer, image((2.0, 0.5, 0.5), (1.0, 0.0, 0.0)), model, 1)
    assert "colormap" in seen  # another background class: other colours
    assert _layers._same_colormap(labels.colormap, _layers.result_styling(model, 1)["colormap"])


def test_optional_controls_have_a_value_for_none(qtbot):
    """An optional parameter's control shows None one step below its range, as the first
    words of what None means ("auto", "off"), and reads it back as None; the range's own low
    end stays a value (brightness 0: the shape alone, not auto)."""
    from napari_pacseg._napari import controls as c
    from napari_pacseg.model.network import InstanceConfig, instance_params_schema

    schema = instance_params_schema()
    controls = c.param_controls(schema, InstanceConfig())
    bright = controls["brightness"]
    assert bright.native.text() == "auto" and c.param_values(controls, schema)["brightness"] is None
    bright.value = 0.0
    assert bright.native.text() != "auto" and c.param_values(controls, schema)["brightness"] == 0.0
    c.set_param_controls(controls, schema, InstanceConfig(brightness=None, min_volume=None))
    values = c.param_values(controls, schema)
    assert values["brightness"] is None and values["min_volume"] is None
    c.set_param_controls(controls, schema, InstanceConfig(brightness=0.0, min_volume=0.0))
    values = c.param_values(controls, schema)
    assert values["brightness"] == 0.0 and values["min_volume"] == 0.0
    refine = c.refine_controls()
    refine["spatial_sigma"].value = refine["spatial_sigma"].min
    assert refine["spatial_sigma"].native.text() == "off"
    assert c.refine_values(refine)["spatial_sigma"] is None


def test_settings_restore_none_as_none(docked):
    """A saved session's None (auto, off) comes back as None, and a 0 as 0."""
    from napari_pacseg._napari.controls import instance_values, refine_values

    _, widget = docked
    skipped = widget.apply_settings({
        "instance_controls": {"brightness": None, "min_volume": 0.0, "boundary": None},
        "refine": {"spatial_sigma": None},
    })  # fmt: skip
    assert skipped == [] and instance_values(widget.instance_controls)["boundary"] is None
    values = instance_values(widget.instance_controls)
    assert values["brightness"] is None and values["min_volume"] == 0.0
    assert refine_values(widget.refine_controls)["spatial_sigma"] is None
    widget.apply_settings({"instance_controls": {"brightness": 0.0, "min_volume": None}})
    values = instance_values(widget.instance_controls)
    assert values["brightness"] == 0.0 and values["min_volume"] is None
