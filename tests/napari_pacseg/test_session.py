"""The widget's headless session, driven without Qt: training from the sample's scribbles, a
full run, a live box and cancel give what ``train``, ``segment`` and the one label rule give;
and the model description shared by the widget and ``pacseg info``."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_pacseg import (
    PacSegModel,
    SegmentationCancelled,
    labels_from_probabilities,
    segment,
    train,
)
from napari_pacseg._napari.session import (
    RunParams,
    Session,
    TrainParams,
    image_input,
    parse_class_names,
    parse_scales,
)
from napari_pacseg.describe import describe_model, model_lines, model_summary
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.sample import DEMO_MODEL_FILE, load_demo_model, load_sample

CROP = (slice(24, 40), slice(0, 64), slice(0, 64))  # 16 planes of the sample
TRAIN_CROP = (slice(24, 40), slice(160, 256), slice(0, 96))  # holds scribbles of both classes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layer(data, spacing, name="crop"):
    """What the session reads of a napari image layer."""
    lead = (1.0,) * (data.ndim - 3)
    return SimpleNamespace(
        name=name, ndim=data.ndim, data=data, scale=(*lead, *spacing), translate=(0.0,) * data.ndim
    )


def assert_same_labels(got, want, matte, threshold=0.5):
    """Labels equal, except where the matte is within float rounding of the threshold (a box
    refined on its own sums the CRF's taps in another order than the whole volume)."""
    differ = got != want
    assert not np.any(differ & (np.abs(matte - threshold) > 1e-4)), int(differ.sum())


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture
def session(sample):
    s = Session()
    s.use_image(layer(sample.image[CROP], sample.spacing))
    s.load(DEMO_MODEL_FILE)
    return s


def test_full_run_is_segment(session, sample):
    params = RunParams(refine={"compat": 0.0}, threshold=0.3, device="cpu")
    seen = []
    seg = session.full_run(params)(progress=lambda done, total: seen.append((done, total)))
    want = segment(
        sample.image[CROP], load_demo_model(), spacing=sample.spacing, refine={"compat": 0.0},
        threshold=0.3, device="cpu",
    )  # fmt: skip
    np.testing.assert_array_equal(seg.labels, want.labels)
    np.testing.assert_array_equal(seg.matte, want.matte)
    assert seen and seen[-1][0] == seen[-1][1]


def test_live_box_is_the_label_rule_on_segment(session, sample):
    params = RunParams(threshold=0.4, device="cpu")
    box = ((7, 10), (0, 64), (0, 64))
    job = session.live_job(box, params)
    result = session.compute_live(job)
    assert result.labels.shape == result.matte.shape == (3, 64, 64)
    assert result.new_planes > 0 and session.segmenter is not None
    full = segment(
        sample.image[CROP], load_demo_model(), spacing=sample.spacing, return_probabilities=True
    )
    want, want_matte = labels_from_probabilities(full.probabilities[:, 7:10], 0.4, 0)
    assert_same_labels(result.labels, want, want_matte, 0.4)
    np.testing.assert_allclose(result.matte, want_matte, rtol=0, atol=1e-5)
    assert job.description == "live preview of z 7-9, y 0-63, x 0-63"

    # the same request once delivered is not recomputed, unless asked (its layers are gone)
    session.live_delivered(job)
    assert session.live_job(box, params) is None
    assert session.live_job(box, params, redo=True) is not None

    # a refinement-only change reuses the cached logits
    segmenter = session.segmenter
    other = session.live_job(box, RunParams(refine={"compat": 0.0}, threshold=0.4, device="cpu"))
    again = session.compute_live(other)
    assert session.segmenter is segmenter
    assert again.new_planes == 0 and again.work == "refinement only"
    changed = segment(
        sample.image[CROP], load_demo_model(), spacing=sample.spacing, refine={"compat": 0.0},
        threshold=0.4,
    )  # fmt: skip
    assert_same_labels(again.labels, changed.labels[7:10], changed.matte[7:10], 0.4)

    # cancelled between tiles; a full run written makes the last live request new again
    with pytest.raises(SegmentationCancelled):
        session.compute_live(session.live_job(((0, 3), (0, 64), (0, 64)), params), lambda: True)
    session.full_run_written()
    assert session.live_job(box, params) is not None

    # another model: another region segmenter
    session.set_model(load_demo_model(), "a copy")
    session.compute_live(session.live_job(box, params))
    assert session.segmenter is not segmenter


def test_training_is_train(sample, tmp_path):
    image, marks = sample.image[TRAIN_CROP], sample.scribbles[TRAIN_CROP].copy()
    s = Session()
    s.use_image(layer(image, sample.spacing, "cells"))
    params = TrainParams(classes="background, nucleus", scales="0.5, 1", steps=30, device="cpu")
    job = s.training(params, marks, "cells scribbles")
    marks[:] = 0  # painting goes on while training: the job has its own copy
    steps = []
    model = job(progress=lambda done, total: steps.append(done))
    assert steps[-1] == 30 and job.source == "trained from 'cells scribbles' on 'cells'"
    want = train(
        image, sample.scribbles[TRAIN_CROP], spacing=sample.spacing, steps=30, device="cpu",
        features=FeatureSpec(sigmas=(0.5, 1.0)), class_names=["background", "nucleus"],
    )  # fmt: skip
    got, expected = model.state_dict(), want.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert model.config.classes == want.config.classes and model.config.spacing == sample.spacing

    s.set_model(model, job.source)
    assert "source       trained from 'cells scribbles' on 'cells'" in s.describe()
    seg = s.full_run(RunParams(device="cpu"))()
    np.testing.assert_array_equal(seg.labels, segment(image, want, spacing=sample.spacing).labels)

    saved = s.save(tmp_path / "mine")
    assert saved.name == "mine.safetensors"
    other = Session()
    assert other.load(saved).config.classes == model.config.classes
    assert other.model_source == "file mine.safetensors"


def test_training_with_context(sample, monkeypatch):
    monkeypatch.setattr("napari_pacseg.training.fit.CONTEXT_STEPS", 5)
    s = Session()
    s.use_image(layer(sample.image[TRAIN_CROP], sample.spacing, "cells"))
    params = TrainParams(scales="1", steps=10, device="cpu", context=True)
    job = s.training(params, sample.scribbles[TRAIN_CROP], "cells scribbles")
    assert job.kwargs["context"] is True
    assert job().context is not None
    assert TrainParams().context is False  # opt-in


def test_training_inputs(sample):
    s = Session()
    s.use_image(layer(sample.image[TRAIN_CROP], sample.spacing))
    params = TrainParams(classes="background, nucleus", steps=10, device="cpu")
    with pytest.raises(ValueError, match="no scribbles layer"):
        s.training(params, None)
    with pytest.raises(ValueError, match="has shape"):
        s.training(params, np.zeros((2, 3, 4), np.uint8), "small")
    marks = sample.scribbles[TRAIN_CROP].copy()
    with pytest.raises(ValueError, match="Feature scales"):
        s.training(TrainParams(scales="1, x"), marks)
    marks[0, :2, :2] = 3  # a third class painted: named after its value
    assert s.training(params, marks).kwargs["class_names"] == ["background", "nucleus", "class 3"]
    job = s.training(params, marks, classes=["fond", "noyau", "autre"])  # the layer's names
    assert job.kwargs["class_names"] == ["fond", "noyau", "autre"]
    with pytest.raises(SegmentationCancelled):
        job(should_cancel=lambda: True)


def test_cancel_and_one_task_at_a_time(session):
    task = session.begin("segmentation")
    assert session.running
    with pytest.raises(ValueError, match="the segmentation is still running"):
        session.begin("training")
    assert session.cancel() is task and task.should_cancel()
    with pytest.raises(SegmentationCancelled):
        session.full_run(RunParams(device="cpu"))(should_cancel=task.should_cancel)
    session.end(task)
    assert not session.running and session.cancel() is None
    assert session.begin("training").ident == task.ident + 1


def test_inputs_and_messages(sample):
    s = Session()
    with pytest.raises(ValueError, match="no image"):
        s.full_run(RunParams())
    with pytest.raises(ValueError, match="no image"):
        s.use_image(None)
    two = np.stack([sample.image[CROP]] * 2)  # (2, D, H, W)
    inp = s.use_image(layer(two, sample.spacing, "two"), channel_axis=0)
    assert inp.channel_axis == 0 and inp.shape == (16, 64, 64) and inp.scale == sample.spacing
    with pytest.raises(ValueError, match="must be its first axis"):
        image_input(layer(two, sample.spacing), channel_axis=3)
    with pytest.raises(ValueError, match="no model"):
        s.full_run(RunParams())
    assert s.describe().startswith("none")
    s.load(DEMO_MODEL_FILE)
    assert s.spacing_text() == "volume: 1, 0.4, 0.4 (z, y, x; layer scale)"
    s.use_image(layer(sample.image[CROP], (2.0, 0.4, 0.4)))
    assert "the model was trained at 1, 0.4, 0.4" in s.spacing_text()

    names, colors = s.scribble_classes("background, nucleus")
    assert names == ["background", "nucleus"]
    assert colors == [c.color for c in s.model.config.classes]
    assert s.scribble_classes("background, cell") == (["background", "cell"], None)
    with pytest.raises(ValueError, match="at least two"):
        parse_class_names("background")
    assert parse_scales("1; 2.5") == (1.0, 2.5)
    for bad in ("a, 2", "0", ""):
        with pytest.raises(ValueError, match="Feature scales"):
            parse_scales(bad)


def test_description_is_what_pacseg_info_prints():
    model = load_demo_model()
    text = describe_model(model, "file nuclei_demo.safetensors")
    lines = text.splitlines()
    assert lines[0] == "source       file nuclei_demo.safetensors"
    assert "classes      0=background, 2=nucleus   (label values)" in lines
    assert any(line.startswith("halo         (") for line in lines)
    assert "provenance" in lines and not any(line.startswith("sha256") for line in lines)
    info = model_summary(model, DEMO_MODEL_FILE)
    assert list(info)[:2] == ["path", "sha256"] and "path" not in model_summary(model)
    with_file = model_lines(model, info)
    assert with_file[0] == f"model        {DEMO_MODEL_FILE}"
    assert with_file[1] == f"sha256       {info['sha256']}"
    refine = next(line for line in lines if line.startswith("refine"))
    own = f"fit_weight={model.config.refine.fit_weight}"
    assert own in refine and "cells" not in refine  # blobs: the fit as it runs
    cells = dataclasses.replace(model.config.instances, boundary="background")
    volume = PacSegModel(dataclasses.replace(model.config, instances=cells))
    refine = next(line for line in describe_model(volume).splitlines() if line.startswith("refine"))
    assert own in refine and refine.endswith(f"   (cells, --instances: fit_weight={cells.split_fit})")
    assert with_file[2:] == lines[1:]


def test_a_costly_preview_is_bounded_and_says_so(session, sample, monkeypatch):
    from napari_pacseg.engine import plan as engine

    # A budget that the default refinement of 3 planes of 64 x 64 fits and a wide one not.
    box = ((7, 10), (0, 64), (0, 64))
    seg_plan = engine.prepare(
        sample.image[CROP], SegmentRequest.build(load_demo_model(), spacing=sample.spacing)
    )
    default_work = seg_plan.refine_work(box)
    monkeypatch.setattr(engine, "PREVIEW_WORK_CPU", 2 * default_work)
    exact = session.compute_live(session.live_job(box, RunParams(device="cpu")))
    assert exact.note == "" and exact.box == box

    costly = RunParams(refine={"kernel_size": 9, "iterations": 10}, device="cpu")
    steps = []
    result = session.compute_live(
        session.live_job(box, costly), progress=lambda *a: steps.append(a)
    )
    plan = seg_plan.with_refine(costly.refine)
    bounded = engine.bound_preview(plan, box, 2 * default_work)
    assert not bounded.exact and bounded.plan.refine_work(bounded.box) <= 2 * default_work
    assert bounded.plan.settings.reach[0] < plan.settings.reach[0]
    assert result.box == bounded.box and "approximate preview" in result.note
    assert "Run on full image is exact" in result.note
    assert steps[-1][0] == steps[-1][1]  # one count over the logit tiles and the CRF's units
    assert [d for d, _ in steps] == sorted(d for d, _ in steps)
    # what it computes is the region segmenter's result with the cut reach
    p = session.segmenter.probabilities(
        bounded.box, costly.refine, reach=bounded.plan.settings.reach
    )
    labels, _ = labels_from_probabilities(p, 0.5, 0)
    np.testing.assert_array_equal(result.labels, labels)


def test_preview_budget_follows_the_load(monkeypatch):
    from napari_pacseg.engine import plan as engine

    monkeypatch.setattr(engine, "usable_cores", lambda: 2)
    full = engine.PREVIEW_WORK_CPU
    assert engine.preview_budget("cpu", 0.0) == full  # quiet
    assert engine.preview_budget("cpu", 1.0) == full  # a core is free: one thread runs alone
    assert engine.preview_budget("cpu", 2.0) == pytest.approx(full * 2 / 3)  # 3 share 2 cores
    assert engine.preview_budget("cpu", 40.0) == full / 4  # never below a quarter
    assert engine.preview_budget("cpu", None) == full  # unmeasurable: one core's budget
    monkeypatch.setattr(engine, "current_load", lambda: 2.0)  # measured when not given
    assert engine.preview_budget("cpu") == pytest.approx(full * 2 / 3)
    assert engine.preview_budget("cuda", 2.0) == engine.PREVIEW_WORK_GPU


def test_preview_budget_follows_the_measured_rate(monkeypatch):
    """At most ``PREVIEW_REFINE_S`` seconds at the rate recent refinements ran: a slower
    machine gets less work, a faster one never more than one core's budget; the GPU's budget
    stays."""
    from napari_pacseg.engine import plan as engine

    monkeypatch.setattr(engine, "usable_cores", lambda: 2)
    full = engine.PREVIEW_WORK_CPU
    slow = 0.25 * full / engine.PREVIEW_REFINE_S  # a quarter of the calibrated rate
    assert engine.preview_budget("cpu", 0.0, slow) == pytest.approx(full / 4)
    # never below the floor, which a preview's refinement counts towards the rate from
    assert engine.preview_budget("cpu", 0.0, slow / 10) == engine.PREVIEW_RATE_FLOOR
    assert engine.preview_budget("cpu", 0.0, 100 * slow) == full
    assert engine.preview_budget("cpu", 0.0, None) == full
    assert engine.preview_budget("cpu", 2.0, 2 * slow) == pytest.approx(full / 2)
    assert engine.preview_budget("cpu", 40.0, 2 * slow) == full / 4  # the load's is less
    assert engine.preview_budget("cuda", 0.0, slow) == engine.PREVIEW_WORK_GPU


def test_a_preview_s_work_follows_the_rate_its_refinements_ran(session, monkeypatch):
    """The segmenter counts each refinement (work over time) in its rate; with a rate that
    slow the next preview is bounded, with none it is exact."""
    from napari_pacseg.engine import plan as engine
    from napari_pacseg.engine import preview

    monkeypatch.setattr(preview, "RATE_MIN_WORK", 0)
    box = ((7, 10), (0, 64), (0, 64))
    assert session.compute_live(session.live_job(box, RunParams(device="cpu"))).note == ""
    seg = session.segmenter
    first = seg.rate
    assert first is not None and first > 0
    seg._measured(1000, 1.0)  # a later refinement at 1000 tap visits per second
    assert seg.rate == 1000.0  # the slowest recent one
    seg._measured(10**9, 0.0)  # no time measured: not counted
    assert seg.rate == 1000.0
    for _ in range(preview.RATE_KEPT - 1):  # faster ones: the slow one is still recent
        seg._measured(10**6, 1.0)
        assert seg.rate == 1000.0
    seg._measured(10**6, 1.0)  # ... and now it is not: the machine is fast again
    assert seg.rate == 10**6
    # settings whose work lies between the least budget and one core's
    full = engine.PREVIEW_WORK_CPU
    refine = next({"kernel_size": 9, "iterations": n} for n in range(1, 51)
                  if seg.plan.with_refine({"kernel_size": 9, "iterations": n}).refine_work(box)
                  > 2 * engine.PREVIEW_RATE_FLOOR)  # fmt: skip
    assert seg.plan.with_refine(refine).refine_work(box) < full
    seg.rate = 1000.0  # slow: the least budget (``PREVIEW_RATE_FLOOR``)
    result = session.compute_live(session.live_job(box, RunParams(refine=refine, device="cpu")))
    assert result.note and "budget" in result.note  # bounded at that rate
    seg.rate = None
    result = session.compute_live(session.live_job(box, RunParams(refine=refine, device="cpu")))
    assert result.note == ""


def test_refine_work_counts_the_steps_the_z_wavefront_runs():
    """Where the CRF runs its z wavefront, step k of n runs on the planes within n - k steps'
    z reach of the box, clipped to the volume; with no z reach every step runs on the box's
    planes; the seeding mean field adds its own steps."""
    from napari_pacseg.engine import plan as engine

    model = load_demo_model()
    vol = np.zeros((40, 300, 300), np.uint16)
    plan = engine.prepare(
        vol, SegmentRequest.build(model, spacing=(1.0, 0.4, 0.4)), intensity_range=(0, 1)
    )
    s = plan.settings
    n, step_z = s.refine.iterations, (s.kernel[0] // 2) * s.refine.dilation
    assert n > 1 and step_z > 0
    taps = int(np.prod(s.kernel)) - 1
    for box in (((19, 22), (100, 200), (100, 200)), ((0, 3), (100, 200), (100, 200))):
        ext, _ = engine.extend_box(box, s.reach, plan.shape)
        plane = (ext[1][1] - ext[1][0]) * (ext[2][1] - ext[2][0])
        (z0, z1) = box[0]
        planes = sum(min(40, z1 + (n - k) * step_z) - max(0, z0 - (n - k) * step_z)
                     for k in range(1, n + 1))  # fmt: skip
        assert plan.refine_work(box) == planes * plane * taps
        flat = plan.with_reach((0, *s.reach[1:]))
        assert flat.refine_work(box) == (z1 - z0) * plane * n * taps
        seeds = min(engine.SEED_ITERATIONS, n)
        more = sum(min(40, z1 + (seeds - k) * step_z) - max(0, z0 - (seeds - k) * step_z)
                   for k in range(1, seeds + 1))  # fmt: skip
        assert plan.refine_work(box, True) == (planes + more) * plane * taps
        assert plan._z_wavefront(ext)
    # where the CRF runs no z wavefront (its weights do not fit along z), every step runs on
    # every plane
    wide = plan.with_refine({"kernel_size": 9, "iterations": 4})
    w = wide.settings
    box = ((19, 22), (0, 300), (0, 300))
    ext, _ = engine.extend_box(box, w.reach, plan.shape)
    assert not wide._z_wavefront(ext)
    voxels = int(np.prod([b - a for a, b in ext]))
    assert wide.refine_work(box) == voxels * w.refine.iterations * (int(np.prod(w.kernel)) - 1)


def test_bound_preview_rule():
    from napari_pacseg.engine import plan as engine

    model = load_demo_model()
    vol = np.zeros((40, 300, 300), np.uint16)
    plan = engine.prepare(
        vol, SegmentRequest.build(model, spacing=(1.0, 0.4, 0.4)), intensity_range=(0, 1)
    )
    box = ((19, 22), (0, 300), (0, 300))
    work = plan.refine_work(box)
    assert engine.bound_preview(plan, box, work).exact
    # a little less: the z reach is cut, the box stays
    b = engine.bound_preview(plan, box, work - 1)
    assert b.box == box and b.plan.settings.reach[0] < plan.settings.reach[0]
    assert b.plan.settings.reach[1:] == plan.settings.reach[1:]
    # far less: no z reach, and an in-plane window around the centre, full in-plane reach
    zero_z = plan.with_reach((0, *plan.settings.reach[1:]))
    b = engine.bound_preview(plan, box, zero_z.refine_work(box) / 4)
    assert b.plan.settings.reach == (0, *plan.settings.reach[1:])
    (_, _), (y0, y1), (x0, x1) = b.box
    assert y1 - y0 < 300 and abs((y0 + y1) / 2 - 150) <= 1 and (y1 - y0) == (x1 - x0)
    assert b.plan.refine_work(b.box) <= zero_z.refine_work(box) / 4
    assert "in-plane window" in b.describe()
    # nothing fits: the smallest window with no reach at all
    b = engine.bound_preview(plan, box, 1)
    assert [hi - lo for lo, hi in b.box[1:]] == [engine.MIN_PREVIEW_WINDOW] * 2
    assert b.plan.settings.reach == (0, 0, 0)


def test_live_preview_cancels_during_the_refinement(session):
    box = ((7, 10), (0, 64), (0, 64))
    session.compute_live(session.live_job(box, RunParams(device="cpu")))  # logits cached
    calls = []

    def cancel_in_crf():
        calls.append(1)
        return len(calls) > 2  # past the cached logits, inside pac_crf3d

    job = session.live_job(box, RunParams(refine={"compat": 3.0}, device="cpu"))
    with pytest.raises(SegmentationCancelled):
        session.compute_live(job, cancel_in_crf)
    assert len(calls) == 3
    assert session.compute_live(job).labels.shape == (3, 64, 64)  # nothing stale was cached


def test_training_set_is_train_on_every_pair(sample):
    """Pairs added to the training set, plus the current pair, train one model: train() on
    the list; a pair in the set is not counted twice; removing one leaves the others."""
    left, right = TRAIN_CROP, (slice(32, 48), slice(96, 192), slice(96, 192))
    s = Session()
    params = TrainParams(classes="background, nucleus", scales="0.5, 1", steps=20, device="cpu")
    a = s.use_image(layer(sample.image[left], sample.spacing, "left"))
    marks_a = sample.scribbles[left].copy()
    pair = s.add_to_training_set(marks_a, "left scribbles", ["fond", "noyau"])
    assert pair.label == "'left scribbles' on 'left'" and s.training_set == [pair]
    with pytest.raises(ValueError, match="in the training set already"):
        s.add_to_training_set(marks_a, "left scribbles")
    b = s.use_image(layer(sample.image[right], sample.spacing, "right"))
    marks_b = sample.scribbles[right].copy()
    job = s.training(params, marks_b, "right scribbles")
    assert [i.name for i in job.images] == ["left", "right"] and job.image is a
    assert job.kwargs["class_names"] == ["fond", "noyau"]  # stored by the set's layer
    assert job.source.startswith("trained from 2 images: 'left scribbles' on 'left'")
    marks_a[:] = 0  # painting goes on: the job has its copies
    model = job()
    want = train([sample.image[left], sample.image[right]],
                 [sample.scribbles[left], sample.scribbles[right]],
                 spacing=[sample.spacing] * 2, steps=20, device="cpu",
                 features=FeatureSpec(sigmas=(0.5, 1.0)), class_names=["fond", "noyau"])  # fmt: skip
    got, expected = model.state_dict(), want.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    # the set alone (no scribbles layer chosen), and after removing: the current pair alone
    s.add_to_training_set(marks_b, "right scribbles")
    assert len(s.training(params, None).images) == 2
    assert len(s.training(params, marks_b, "right scribbles").images) == 2  # not twice
    s.remove_from_training_set(0)
    assert [p.image for p in s.training_set] == [b]
    with pytest.raises(ValueError, match="has no entry 5"):
        s.remove_from_training_set(5)
    s.training_set.clear()
    with pytest.raises(ValueError, match="no scribbles layer"):
        s.training(params, None)


def _pair_session(tmp_path):
    """The dim-gap pair (``tests.napari_pacseg.dim_gap.fused_pair``), a model trained on it and
    saved: ``(image, model, fresh)``, ``fresh()`` a session on them with no logits cached."""
    from napari_pacseg import save_model
    from tests.napari_pacseg.dim_gap import fused_pair

    image, strokes = fused_pair()
    model = train(image, strokes, seed=0)
    save_model(model, tmp_path / "pair.safetensors")

    def fresh() -> Session:
        s = Session()
        s.use_image(layer(image, (1.0, 1.0), name="pair"))
        s.load(tmp_path / "pair.safetensors")
        return s

    return image, model, fresh


def test_a_live_preview_seeds_objects_as_segment(tmp_path):
    """The preview's objects come from the same seeding refinement as segment()'s
    (``InstanceConfig.split_fit``): a dim gap the labels fuse splits in the preview too
    (brightness 0: the seeds alone split it)."""
    image, model, fresh = _pair_session(tmp_path)
    s = fresh()
    box = ((0, image.shape[0]), (0, image.shape[1]))
    shape = {"radius": 4.0, "brightness": 0}
    for instances, count in ((shape, 2), ({**shape, "split_fit": 0}, 1)):
        params = RunParams(device="cpu", instances=instances)
        result = s.compute_live(s.live_job(box, params))
        want = segment(image, model, instances=instances, device="cpu")
        assert result.instances.max() == want.instances.max() == count
        assert_same_labels(result.labels, want.labels, want.matte)


def test_a_live_preview_with_seeds_counts_and_cancels_their_steps(tmp_path):
    """The seeding mean field reports its units after the refinement's (the count never goes
    back, and ends above the count without seeds) and stops when the preview is cancelled
    during them."""
    image, _, fresh = _pair_session(tmp_path)
    box = ((0, image.shape[0]), (0, image.shape[1]))
    totals = {}
    for split_fit in (0.0, 1.0):
        seen: list = []
        params = RunParams(device="cpu", instances={"radius": 4.0, "split_fit": split_fit})
        s = fresh()
        s.compute_live(s.live_job(box, params), progress=lambda d, t, seen=seen: seen.append((d, t)))
        done = [d for d, _ in seen]
        assert done == sorted(done) and seen[-1][0] == seen[-1][1]
        totals[split_fit] = seen[-1][1]
    assert totals[1.0] > totals[0.0]
    reports = []

    def in_the_seeding() -> bool:  # past the refinement's units
        return bool(reports) and reports[-1][0] > totals[0.0]

    other = RunParams(device="cpu", instances={"radius": 4.0})
    s = fresh()
    with pytest.raises(SegmentationCancelled):
        s.compute_live(s.live_job(box, other), in_the_seeding,
                       lambda d, t: reports.append((d, t)))  # fmt: skip
    assert reports[-1][0] > totals[0.0]


def test_a_live_preview_draws_the_cells_boundary_where_they_meet(tmp_path):
    """In cells mode the preview's labels draw the boundary class where the cells meet, and
    its cells read the image's brightness, as segment() does: previewing the whole image
    gives segment()'s labels and cells (unrefined: exact)."""
    from scipy import ndimage as ndi

    from napari_pacseg import save_model
    from tests.napari_pacseg.test_cells import honeycomb, membrane_strokes

    shape, radius = (12, 40, 40), 6.0
    truth, membrane = honeycomb(shape, (1.0, 1.0, 1.0), radius, seed=4)
    rng = np.random.default_rng(4)
    image = ndi.gaussian_filter(membrane.astype(np.float32), 0.8) + 0.2
    image = np.clip((image + rng.normal(0, 0.05, shape)) * 1000, 0, None).astype(np.uint16)
    model = train(image, membrane_strokes(truth, membrane, (3, 6, 9), seed=4), seed=0,
                  class_names=["membrane", "cell"], steps=100)  # fmt: skip
    save_model(model, tmp_path / "cells.safetensors")
    s = Session()
    s.use_image(layer(image, (1.0, 1.0, 1.0), name="tissue"))
    s.load(tmp_path / "cells.safetensors")
    instances = {"radius": radius, "boundary": "membrane"}
    params = RunParams(refine={"iterations": 0}, device="cpu", instances=instances)
    result = s.compute_live(s.live_job(tuple((0, n) for n in shape), params))
    want = segment(image, model, refine={"iterations": 0}, instances=instances, device="cpu")
    plain = segment(image, model, refine={"iterations": 0}, device="cpu")
    assert (want.labels != plain.labels).sum() > 100  # the boundary was drawn on the cells
    np.testing.assert_array_equal(result.labels, want.labels)
    np.testing.assert_array_equal(result.instances, want.instances)
    # refined: the preview refines with the fit cells mode gives (objects_refine), as segment()
    # does, also beside a full run's objects (without_objects)
    from napari_pacseg._napari.session import without_objects

    alone = without_objects(model, RunParams(instances=instances))
    assert alone.instances is None
    assert alone.refine["fit_weight"] == model.config.instances.split_fit
    blobs = RunParams(refine={"iterations": 3}, instances={"radius": radius})
    assert without_objects(model, blobs) == RunParams(refine={"iterations": 3})
    params = RunParams(device="cpu", instances=instances)
    result = s.compute_live(s.live_job(tuple((0, n) for n in shape), params))
    want = segment(image, model, instances=instances, device="cpu")
    own = segment(image, model, device="cpu")  # the model's own fit weight
    assert (want.matte != own.matte).any()
    np.testing.assert_allclose(result.matte, want.matte, atol=1e-5)
    np.testing.assert_array_equal(result.instances, want.instances)


def test_a_live_preview_weighs_brightness_in_its_objects_as_segment(tmp_path):
    """Blobs with a brightness weight: the preview's objects read the image's brightness as
    segment()'s do (a preview of the whole image, unrefined: the same ids)."""
    image, model, fresh = _pair_session(tmp_path)
    s = fresh()
    box = ((0, image.shape[0]), (0, image.shape[1]))
    for weight in (0.0, 2.0):
        instances = {"radius": 4.0, "brightness": weight, "split_fit": 0}
        params = RunParams(refine={"iterations": 0}, device="cpu", instances=instances)
        result = s.compute_live(s.live_job(box, params))
        want = segment(image, model, refine={"iterations": 0}, instances=instances, device="cpu")
        np.testing.assert_array_equal(result.instances, want.instances)
