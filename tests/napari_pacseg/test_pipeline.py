"""segment() and train(): tiling invariance, cancellation, progress, input checks."""

import os

import numpy as np
import pytest
import torch

import napari_pacseg.engine.plan as engine
import napari_pacseg.engine.segment as pipeline
from napari_pacseg import (
    ClassInfo,
    ContextConfig,
    FeatureSpec,
    ModelConfig,
    PacSegModel,
    RefineConfig,
    SegmentationCancelled,
    receptive_field,
    segment,
    train,
)
from napari_pacseg.engine.request import SegmentRequest


def _blobs(shape=(16, 40, 40), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    truth = ((z - 8) ** 2 / 4 + (y - 14) ** 2 + (x - 14) ** 2 < 49) | (
        (z - 8) ** 2 / 4 + (y - 28) ** 2 + (x - 27) ** 2 < 36
    )
    image = truth * 100.0 + 20 + rng.normal(0, 10, shape)
    scribbles = np.zeros(shape, np.uint8)
    scribbles[8, 1:4, 2:38] = 1
    scribbles[8, 36:39, 2:20] = 1
    scribbles[8, 14, 10:18] = 2
    scribbles[8, 28, 24:30] = 2
    return image.astype(np.float32), scribbles, truth


TRAIN_SETTINGS = dict(spacing=(2.0, 1.0, 1.0), features=FeatureSpec(sigmas=(1.0, 2.0)), steps=150)


@pytest.fixture(scope="module")
def trained():
    image, scribbles, truth = _blobs()
    return image, scribbles, truth, train(image, scribbles, **TRAIN_SETTINGS)


def test_segment_finds_the_objects(trained):
    image, _, truth, model = trained
    result = segment(image, model)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 2}  # background written as 0, class 2 keeps 2
    assert result.matte.dtype == np.float32 and 0 <= result.matte.min() and result.matte.max() <= 1
    pred = result.labels == 2
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.65  # from four strokes on one slice; quality is measured by the benchmarks
    assert result.matte[truth].mean() > result.matte[~truth].mean() + 0.5


@pytest.mark.parametrize("refine", [True, False, {"iterations": 2, "kernel_size": 3}])
def test_tiling_does_not_change_the_result(trained, refine):
    image, _, _, model = trained
    whole = segment(image, model, refine=refine, return_probabilities=True)
    tiled = segment(image, model, refine=refine, tile_shape=(5, 13, 17), return_probabilities=True)
    assert np.array_equal(whole.labels, tiled.labels)
    np.testing.assert_allclose(whole.probabilities, tiled.probabilities, atol=1e-5)


def test_tiling_with_a_context_net():
    torch.manual_seed(0)
    config = ModelConfig(
        in_channels=1,
        classes=(ClassInfo("bg", (0, 0, 0, 0)), ClassInfo("fg", (1, 0, 0, 1))),
        features=FeatureSpec(sigmas=(1.0,)),
        context=ContextConfig((3, 4)),
    )
    model = PacSegModel(config)
    image = _blobs((12, 30, 26))[0]
    a = segment(image, model, refine=False, return_probabilities=True)
    b = segment(image, model, refine=False, tile_shape=(4, 12, 8), return_probabilities=True)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_progress_and_cancel(trained):
    image, _, _, model = trained
    calls = []
    segment(image, model, tile_shape=(8, 20, 20), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 16) for i in range(1, 17)]  # 8 tiles, two passes
    polled = []

    def cancel_after_two():
        polled.append(1)
        return len(polled) > 2

    with pytest.raises(SegmentationCancelled):
        segment(image, model, tile_shape=(8, 20, 20), should_cancel=cancel_after_two)
    assert len(polled) == 3


def test_gpu_out_of_memory_retries_smaller(trained, monkeypatch):
    image, _, _, model = trained
    real = engine.logits
    failed = []

    def flaky(plan, box, *args):
        if not failed:
            failed.append(box)
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(plan, box, *args)

    monkeypatch.setattr(engine, "logits", flaky)
    with pytest.warns(UserWarning, match="retrying with smaller tiles"):
        result = segment(image, model)
    monkeypatch.setattr(engine, "logits", real)
    assert np.array_equal(result.labels, segment(image, model).labels)


def test_multichannel_and_spacing(trained):
    image, scribbles, _, _ = trained
    two = np.stack([image, image[::-1]], axis=-1)
    model = train(two, scribbles, channel_axis=-1, features=FeatureSpec(sigmas=(1.0,)), steps=20)
    assert model.config.in_channels == 2
    assert segment(two, model, channel_axis=-1).labels.shape == image.shape
    with pytest.raises(ValueError, match="has 1 channel"):
        segment(image, model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(image=np.zeros((4, 4))), r"is 2D \(shape \(4, 4\)\) but the model is a 3D model"),
        (dict(image=np.zeros((2, 4, 4, 4))), r"must be 2D \(H, W\) or 3D \(D, H, W\)"),
        (dict(image=np.zeros((4, 4, 4)), frame_axis=0), "is 2D .* but the model is a 3D model"),
        (dict(image=np.zeros((0, 4, 4))), "empty"),
        (dict(image=np.full((4, 4, 4), np.nan)), "64 NaN or infinite"),
        (dict(spacing=(1.0, 0.0, 1.0)), "spacing must be 3 positive"),
        (dict(spacing=(1.0, 1.0)), "spacing must be 3 positive"),
        (dict(refine={"iteration": 3}), r"unknown parameters \['iteration'\]"),
        (dict(tile_shape=(4, 4)), "tile_shape must be 3"),
    ],
)
def test_segment_bad_input(trained, kwargs, message):
    image, _, _, model = trained
    kwargs.setdefault("image", image[:8, :8, :8])
    with pytest.raises(ValueError, match=message):
        segment(kwargs.pop("image"), model, **kwargs)


def test_train_is_deterministic(trained):
    image, scribbles, _, _ = trained
    a = train(image, scribbles, features=FeatureSpec(sigmas=(1.0,)), steps=30, seed=3)
    b = train(image, scribbles, features=FeatureSpec(sigmas=(1.0,)), steps=30, seed=3)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    assert a.config.provenance["method"] == "train() from scribbles"


@pytest.mark.parametrize(
    ("scribbles", "message"),
    [
        (np.zeros((16, 40, 40), np.uint8), "label no voxel"),
        (np.ones((16, 40, 40), np.uint8), "only one class"),
        (np.zeros((16, 40, 41), np.uint8), "scribbles have shape"),
        (np.full((16, 40, 40), 0.5), "integer"),
    ],
)
def test_train_refuses(trained, scribbles, message):
    image = trained[0]
    with pytest.raises(ValueError, match=message):
        train(image, scribbles)


def test_train_refuses_gaps(trained):
    image, scribbles, _, _ = trained
    gap = scribbles.copy()
    gap[gap == 2] = 3
    with pytest.raises(ValueError, match=r"missing 2$"):
        train(image, gap)


def test_timings_per_stage(trained):
    image, _, _, model = trained
    timings = segment(image, model).timings
    assert set(timings) == {"features", "context", "head", "refine", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["context"] == 0  # this model has no context net
    assert timings["features"] + timings["head"] + timings["refine"] <= timings["total"]
    assert segment(image, model, refine=False).timings["refine"] == 0


def test_train_works_under_no_grad(trained):
    image, scribbles, _, model = trained
    with torch.no_grad():
        again = train(image, scribbles, **TRAIN_SETTINGS)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_the_callers_model_stays_where_it_is(trained):
    image, _, _, model = trained
    runner = engine.TileRunner(engine.prepare(image, SegmentRequest.build(model, device="cpu")))
    assert runner.model_on(torch.device("cpu")) is model
    moved = runner.model_on(torch.device("meta"))
    assert moved is not model and next(moved.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("refine", [True, False])
def test_pieces_with_the_receptive_field_equal_the_whole(trained, refine):
    image, _, _, model = trained
    whole = segment(image, model, refine=refine, return_probabilities=True)
    rng_lo, rng_hi = (t.flatten().tolist() for t in pipeline.volume_intensity_range(image[None]))
    halo = receptive_field(model, refine=refine)
    assert all(h > 0 for h in halo)
    for box in [((0, 7), (10, 25), (0, 40)), ((9, 16), (0, 40), (13, 21))]:
        ext = [(max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(box, halo, image.shape)]
        piece = segment(
            image[tuple(slice(s, e) for s, e in ext)],
            model,
            refine=refine,
            return_probabilities=True,
            intensity_range=(rng_lo, rng_hi),
        )
        core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(box, ext))
        inside = tuple(slice(a, b) for a, b in box)
        np.testing.assert_allclose(
            piece.probabilities[(slice(None), *core)],
            whole.probabilities[(slice(None), *inside)],
            atol=1e-5,
        )


def test_intensity_range_is_checked(trained):
    image, _, _, model = trained
    with pytest.raises(ValueError, match="1 channel"):
        segment(image, model, intensity_range=([0, 1], [1, 2]))
    with pytest.raises(ValueError, match="finite"):
        segment(image, model, intensity_range=([0], [float("nan")]))


@pytest.mark.parametrize("spacing", [(1.0, 0.4, 0.4), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("shape", [(256, 256, 256), (64, 256, 256)])
def test_default_refinement_tiles_keep_their_weights(shape, spacing):
    """The mean field of a default refinement tile (anisotropic sample spacing: 3x5x5 windows,
    isotropic: 5x5x5) runs as a wavefront that computes its weights once, not as the path that
    recomputes them every step."""
    from napari_pacseg.sample import load_demo_model
    from pacseg_kernels import crf_torch

    refine = RefineConfig()
    settings = engine.settle(load_demo_model(), spacing, refine)
    kernel, reach = settings.kernel, settings.reach
    assert kernel == refine.window(spacing)[0]
    tile = engine.refine_tile(shape)
    ext = [min(n, t + 2 * r) for n, t, r in zip(shape, tile, reach)]
    unary, guide = torch.empty(1, 2, *ext), torch.empty(1, 1, *ext)
    plan = crf_torch.wavefront_plan(unary, guide, refine.iterations, kernel, (1, 1, 1))
    assert plan is not None


def test_segment_follows_a_load_that_changes_during_the_run(trained, monkeypatch):
    """Between tiles, segment() sets torch's thread count again for the load now."""
    from pacseg_kernels import threads

    image, _, _, model = trained
    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("torch runs one thread here: there is no count to lower")
    loads = iter([0.0] + [float(os.cpu_count() or 1)] * 1000)  # busy from the second reading
    monkeypatch.setattr(threads, "current_load", lambda: next(loads))
    monkeypatch.setattr(threads, "_enabled", True)
    seen = []
    segment(image, model, tile_shape=(8, 20, 20), progress=lambda d, t: seen.append(torch.get_num_threads()))  # fmt: skip
    assert seen[-1] == 1
    assert torch.get_num_threads() == before


def test_precision_auto_uses_bfloat16_only_where_the_cpu_has_matrix_units(trained, monkeypatch):
    import napari_pacseg.engine.request as request_module

    image, _, _, model = trained
    for amx in (True, False):
        monkeypatch.setattr(request_module, "cpu_has_amx", lambda amx=amx: amx)
        auto = SegmentRequest.build(model, device="cpu")
        assert auto.precision == "auto" and auto.head_dtype == (torch.bfloat16 if amx else None)
        assert SegmentRequest.build(model, device="cpu", precision="float32").head_dtype is None
    monkeypatch.setattr(request_module, "cpu_has_amx", lambda: True)
    fast = segment(image, model, precision="auto", return_probabilities=True)
    exact = segment(image, model, precision="float32", return_probabilities=True)
    tiled = segment(image, model, tile_shape=(5, 13, 17), return_probabilities=True)
    # bfloat16 products move the probabilities a little and the labels of a few voxels at most
    assert np.abs(fast.probabilities - exact.probabilities).max() < 0.05
    assert np.count_nonzero(fast.labels != exact.labels) <= 0.001 * image.size
    assert not np.array_equal(fast.probabilities, exact.probabilities)  # it did run in bf16
    np.testing.assert_allclose(fast.probabilities, tiled.probabilities, atol=1e-5)
    with pytest.raises(ValueError, match="precision must be one of 'auto', 'float32'"):
        segment(image, model, precision="bfloat16")
