"""segment_zarr: chunked zarr segmentation equals in-memory segment(), locally and on a dask
LocalCluster (also when a worker is killed mid-run), with bounded memory; volume_io readers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

pytest.importorskip("dask.array")
pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")

from napari_pacseg import FeatureSpec, receptive_field, save_model, segment, train  # noqa: E402
from napari_pacseg.batch import ModelPayload, segment_zarr  # noqa: E402
from napari_pacseg.engine.plan import extend_box  # noqa: E402
from napari_pacseg.engine.request import SegmentRequest, model_from_payload  # noqa: E402
from napari_pacseg.io.volumes import (  # noqa: E402
    VolumeError,
    layout_from_axes,
    read_volume,
    write_tiff,
)
from napari_pacseg.sample import load_demo_model, load_sample  # noqa: E402
from tests.napari_pacseg.tables import assert_same_table  # noqa: E402

CHUNKS = (12, 40, 40)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def crop():
    return np.ascontiguousarray(load_sample().image[24:48, 80:160, 80:160])  # 5 nuclei


@pytest.fixture(scope="module")
def whole(crop, model):
    return segment(crop, model)


def write_zarr(path, array, chunks=(8, 32, 32)):
    z = zarr.open_array(str(path), mode="w", shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[:] = array
    return path


def read_outputs(tmp_path):
    return (
        zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:],
        zarr.open_array(str(tmp_path / "matte.zarr"), mode="r")[:],
    )


def assert_same(tmp_path, whole):
    labels, matte = read_outputs(tmp_path)
    np.testing.assert_array_equal(labels, whole.labels)
    np.testing.assert_allclose(matte, whole.matte, atol=1e-5)


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: 8787 may be taken
            silence_logs=logging.CRITICAL,
        ) as lc,
        Client(lc, set_as_default=False) as client,
    ):
        yield client


# --- equality with the in-memory result ----------------------------------------------------------


def test_synchronous_equals_in_memory(tmp_path, crop, model, whole):
    seen = []
    res = segment_zarr(
        write_zarr(tmp_path / "in.zarr", crop),
        model,
        tmp_path / "labels.zarr",
        tmp_path / "matte.zarr",
        chunks=CHUNKS,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert_same(tmp_path, whole)
    assert res.n_chunks == 8 and res.chunks == CHUNKS and res.halo == receptive_field(model)
    assert res.n_blocks == 1 and res.blocks == (2, 2, 2)  # the default budget takes it whole
    assert res.task_memory <= res.memory
    # voxels, with the block's tiles reported as they are done: rate and time left can be shown
    voxels = crop.size
    assert seen[0] == (0, voxels) and seen[-1] == (voxels, voxels) and len(seen) >= 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert zarr.open_array(str(tmp_path / "labels.zarr")).chunks == CHUNKS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "labels.zarr", "matte.zarr"]


# --- work blocks: storage chunks grouped within a memory budget ----------------------------------


def _block_budget(model, shape, chunks, per_block, refine=True):
    """The estimated peak of a task whose block holds ``per_block`` chunks per axis (the
    largest such block, its halo clipped to ``shape``): a budget that allows that block."""
    from napari_pacseg.batch.zarr_runs import task_memory
    from napari_pacseg.engine.plan import settle

    settings = settle(model, None, refine)
    halo = settings.receptive_field
    core = [min(n, b * c) for n, b, c in zip(shape, per_block, chunks)]
    ext = [min(n, c + 2 * h) for n, c, h in zip(shape, core, halo)]
    return task_memory(ext, settings, model, 2)


@pytest.mark.parametrize(
    "case", ["one chunk per block", "several chunks, uneven edges", "whole volume"]
)
def test_work_blocks_equal_in_memory(tmp_path, crop, model, case):
    """Blocks of one chunk, of several chunks with clipped chunks at the volume's far edges,
    and of the whole volume, all give the in-memory labels and matte; the outputs keep the
    storage chunks."""
    sample = load_sample().image
    if case == "one chunk per block":  # 24 x 80 x 80 in 3 x 4 x 4 chunks (the last 8 wide)
        image, chunks, refine, memory = crop, (8, 24, 24), False, "1M"
    elif case == "several chunks, uneven edges":  # 32 x 208 x 208 in 2 x 5 x 5 chunks
        image, chunks = np.ascontiguousarray(sample[16:48, :208, :208]), (16, 48, 48)
        refine = True
        memory = _block_budget(model, image.shape, chunks, (2, 2, 2))
    else:
        image, chunks, refine, memory = crop, (8, 24, 24), True, "64G"
    ref = segment(image, model, refine=refine)
    src = write_zarr(tmp_path / "in.zarr", image, chunks=(8, 40, 40))
    args = (src, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr")
    if case == "one chunk per block":
        with pytest.warns(UserWarning, match="one chunk per work block"):
            res = segment_zarr(*args, chunks=chunks, refine=refine, memory=memory)
    else:
        res = segment_zarr(*args, chunks=chunks, refine=refine, memory=memory)
    assert_same(tmp_path, ref)
    assert zarr.open_array(str(tmp_path / "labels.zarr")).chunks == chunks
    if case == "one chunk per block":
        assert res.blocks == (1, 1, 1) and res.n_blocks == res.n_chunks == 48
    elif case == "several chunks, uneven edges":
        assert res.n_chunks == 50 and 1 < res.n_blocks < 50 and max(res.blocks) > 1
        assert any(208 % (b * c) for b, c in zip(res.blocks[1:], chunks[1:]))  # a clipped block
        assert res.task_memory <= res.memory == memory
    else:
        assert res.n_blocks == 1 and res.blocks == (3, 4, 4) and res.memory == 64 << 30


def test_choose_blocks_tiles_the_volume_within_the_budget(model):
    from napari_pacseg.batch.zarr_runs import choose_blocks, task_memory
    from napari_pacseg.engine.plan import settle

    settings = settle(model, None, True)
    halo = settings.receptive_field
    shape, chunks = (100, 300, 260), (16, 64, 64)

    def estimate(ext):
        return task_memory(ext, settings, model, 2)

    one = estimate([min(n, c + 2 * h) for n, c, h in zip(shape, chunks, halo)])
    counts = []
    for budget in (one // 2, one, 2 * one, 8 * one, 1 << 40):
        blocks = choose_blocks(shape, chunks, halo, settings, budget, 1, estimate)
        assert blocks.over == (budget < one)
        covered = np.zeros(shape, np.uint8)
        for box in blocks.boxes:
            for (a, b), c, n in zip(box, chunks, shape):
                assert a % c == 0 and (b % c == 0 or b == n)  # whole chunks
            ext, _ = extend_box(box, halo, shape)
            if not blocks.over:
                assert estimate([b - a for a, b in ext]) <= budget
            covered[tuple(slice(a, b) for a, b in box)] += 1
        assert (covered == 1).all()
        counts.append(len(blocks.boxes))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] == 1
    # two tasks at once: the volume in (at least) two blocks, even where one would fit
    assert len(choose_blocks(shape, chunks, halo, settings, 1 << 40, 2, estimate).boxes) >= 2


def test_memory_sizes():
    from napari_pacseg.batch.zarr_runs import memory_bytes

    assert memory_bytes(None) is None
    assert memory_bytes("4G") == 4 << 30 and memory_bytes("512M") == 512 << 20
    assert memory_bytes("1.5GiB") == 3 << 29 and memory_bytes(" 800 mb ") == 800 << 20
    assert memory_bytes(2_000_000) == 2_000_000 and memory_bytes("3000000") == 3_000_000
    for bad in ("lots", "4X", "0.5M", -1, True, "", [4]):
        with pytest.raises(ValueError, match="memory"):
            memory_bytes(bad)


def test_threads_dask_source_and_channel_axis(tmp_path, crop, model):
    import dask.array as da

    ref = segment(crop, model, refine=False)
    source = da.from_array(crop[:, None], chunks=(10, 1, 50, 50))  # (D, C=1, H, W)
    seen = []
    segment_zarr(source, model, tmp_path / "labels.zarr", tmp_path / "matte.zarr", refine=False,
                 channel_axis=1, chunks=(16, 48, 48), scheduler="threads",
                 progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert_same(tmp_path, ref)
    # reported from the worker threads, one call at a time, never going back
    assert seen[0] == (0, crop.size) and seen[-1] == (crop.size, crop.size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_dask_source_splits_objects_by_shape_when_brightness_is_auto(tmp_path, crop, model):
    """The tasks that split the objects cannot read a dask source: with the brightness weight
    on auto the objects are split by shape alone, with a warning saying so (the ids of
    ``brightness`` 0 in memory); a brightness given is refused before any work."""
    import dask.array as da

    source = da.from_array(crop, chunks=(12, 40, 40))
    auto = {"min_volume": 5.0, "brightness": None}
    ref = segment(crop, model, instances={**auto, "brightness": 0.0})
    with pytest.warns(UserWarning, match="split by shape alone"):
        segment_zarr(source, model, tmp_path / "labels.zarr", chunks=CHUNKS,
                     instances_out=tmp_path / "ids.zarr", instances=auto)  # fmt: skip
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ids.zarr"))[:], ref.instances)
    with pytest.raises(ValueError, match="needs a zarr source"):
        segment_zarr(source, model, tmp_path / "l2.zarr", chunks=CHUNKS,
                     instances_out=tmp_path / "i2.zarr", instances={"brightness": 0.5})  # fmt: skip
    assert not (tmp_path / "l2.zarr").exists()


def test_local_cluster_equals_in_memory(tmp_path, crop, model, whole, cluster):
    segment_zarr(write_zarr(tmp_path / "in.zarr", crop), model, tmp_path / "labels.zarr",
                 tmp_path / "matte.zarr", chunks=CHUNKS, scheduler=cluster)  # fmt: skip
    assert_same(tmp_path, whole)


def test_worker_killed_mid_run(tmp_path, crop, model, whole, cluster):
    """SIGKILL one of the two worker processes once the first chunk is done: its chunks are
    recomputed elsewhere and the output is still exactly the in-memory result."""
    cluster.wait_for_workers(2)
    killed = []

    def kill_a_busy_worker(done, total):
        if done == 0 or killed:  # once the first block is done
            return
        pids = cluster.run(os.getpid)
        busy = [addr for addr, keys in cluster.processing().items() if keys] or list(pids)
        killed.append(pids[busy[0]])
        os.kill(killed[0], signal.SIGKILL)

    segment_zarr(write_zarr(tmp_path / "in.zarr", crop), model, tmp_path / "labels.zarr",
                 tmp_path / "matte.zarr", chunks=(12, 40, 20), scheduler=cluster,
                 progress=kill_a_busy_worker)  # fmt: skip
    assert killed
    assert_same(tmp_path, whole)
    # The nanny restarts it. Until the scheduler sees the old process gone (a missed heartbeat,
    # slower on a loaded machine) it still lists it, so wait_for_workers(2) alone may return
    # early and a call to every listed worker may meet the dead one: poll the answering ones.
    deadline = time.monotonic() + 60
    while True:
        pids = cluster.run(os.getpid, on_error="ignore").values()
        if len(pids) == 2 and killed[0] not in pids:
            break
        assert time.monotonic() < deadline, f"workers {sorted(pids)} a minute after the kill"
        time.sleep(0.5)


# --- safety --------------------------------------------------------------------------------------


def test_refuses_existing_outputs_and_the_input(tmp_path, crop, model):
    src = write_zarr(tmp_path / "in.zarr", crop[:8, :32, :32])
    (tmp_path / "labels.zarr").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        segment_zarr(src, model, tmp_path / "labels.zarr", refine=False)
    with pytest.raises(ValueError, match="overwrite the input"):
        segment_zarr(src, model, src, refine=False, overwrite=True)
    with pytest.raises(ValueError, match="overwrite the input"):
        segment_zarr(src, model, src / "labels", refine=False, overwrite=True)
    res = segment_zarr(src, model, tmp_path / "labels.zarr", refine=False, overwrite=True)
    assert res.matte is None and zarr.open_array(str(res.labels)).shape == (8, 32, 32)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failing_chunk_leaves_no_output(tmp_path, crop, model):
    bad = crop.astype(np.float32)
    bad[20, 70, 70] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segment_zarr(write_zarr(tmp_path / "in.zarr", bad), model, tmp_path / "labels.zarr",
                     tmp_path / "matte.zarr", chunks=CHUNKS, refine=False)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_bad_arguments(tmp_path, crop, model):
    src = write_zarr(tmp_path / "in.zarr", crop[:8, :32, :32])
    out = tmp_path / "labels.zarr"
    with pytest.raises(ValueError, match="chunks"):
        segment_zarr(src, model, out, chunks=(8, 0, 8))
    with pytest.raises(ValueError, match="unknown parameters"):
        segment_zarr(src, model, out, refine={"iterationz": 2})
    with pytest.raises(ValueError, match="not both"):
        segment_zarr(src, model, out, scheduler="threads", workers=2)
    with pytest.raises(ValueError, match="channel"):
        segment_zarr(write_zarr(tmp_path / "c.zarr", np.zeros((2, 8, 8, 8))), model, out,
                     channel_axis=0)  # fmt: skip
    assert not out.exists()


def test_model_payload_round_trip(model):
    payload = ModelPayload.of(model)
    rebuilt = model_from_payload(payload)
    assert rebuilt.config == model.config
    for k, v in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v)
    assert model_from_payload(payload) is rebuilt  # cached per process


# --- memory --------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from napari_pacseg import load_model
    from napari_pacseg.batch import segment_zarr
    from napari_pacseg.model.features import _filter_axis
    model = load_model(sys.argv[1])
    # Code loaded once per process sits in the baseline, as torch's does: numba and the
    # compiled filter loops (~130 MiB resident).
    for axis in (0, 2):
        _filter_axis(torch.ones(1, 1, 3, 3, 3), torch.ones(3) / 3, axis, (0, 3))
    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    res = segment_zarr(sys.argv[2], model, sys.argv[3], chunks=(32, 128, 128), refine=False,
                       memory=sys.argv[4])
    print(json.dumps({"extra": status("VmHWM") - before, "seconds": res.timings["total"],
                      "blocks": res.n_blocks, "task": res.task_memory}))
    """
)


def _peak_extra(model_file, src, out, memory) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(model_file), str(src), str(out), str(memory)],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_is_bounded_by_the_budget(tmp_path):
    """A 128 x 512 x 512 zarr volume in 64 chunks of 32 x 128 x 128, with a budget of 64 MiB
    per task: the chunks are grouped into fewer blocks, and the peak memory the run adds stays
    far below what segment() in memory needs (> 13 bytes per voxel: the float32 image, logits
    and matte, and the labels). What it adds is per block (within the budget) plus the
    whole-volume intensity range, whose sample (every 2nd voxel here) is already at its cap of
    ~4 M voxels: a larger volume adds only more blocks, done one at a time."""
    sample = load_sample()
    box = (slice(16, 48), slice(128, 256), slice(0, 256))  # holds both classes' scribbles
    fast = train(sample.image[box], sample.scribbles[box], spacing=sample.spacing,
                 features=FeatureSpec(kinds=("gaussian",), sigmas=(1.0,)), hidden=(8,),
                 steps=20)  # fmt: skip
    model_file = save_model(fast, tmp_path / "fast.safetensors")
    shape = (128, 512, 512)
    src = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=shape, chunks=(32, 128, 128),
                          dtype=np.uint16)  # fmt: skip
    for z, y, x in np.ndindex(2, 2, 2):
        src[64 * z : 64 * (z + 1), 256 * y : 256 * (y + 1), 256 * x : 256 * (x + 1)] = sample.image
    run = _peak_extra(model_file, tmp_path / "v.zarr", tmp_path / "l.zarr", "64M")
    peak = run["extra"]
    assert 1 < run["blocks"] < 64 and run["task"] <= 64 << 20
    labels = zarr.open_array(str(tmp_path / "l.zarr"), mode="r")
    assert labels.shape == shape and labels[-32:, 256:, 256:].any()
    in_memory = 13 * np.prod(shape)
    print(f"peak extra {peak / 2**20:.0f} MiB; in memory > {in_memory / 2**20:.0f} MiB")
    assert peak < in_memory / 2


# --- volume_io -----------------------------------------------------------------------------------


def test_layouts():
    assert layout_from_axes("", (4, 5, 6)).spatial == (0, 1, 2)
    lay = layout_from_axes("", (4, 2, 5, 6), channel_axis=1)
    assert (lay.spatial, lay.channel) == ((0, 2, 3), 1)
    lay = layout_from_axes("tczyx", (1, 2, 4, 5, 6))
    assert (lay.spatial, lay.channel, lay.fixed) == ((2, 3, 4), 1, (0,))
    raw = np.arange(2 * 4 * 5 * 6).reshape(1, 2, 4, 5, 6)
    np.testing.assert_array_equal(lay.region(raw, ((1, 3), (0, 5), (2, 4))), raw[0, :, 1:3, :, 2:4])
    lay = layout_from_axes("zcyx", (4, 2, 5, 6))
    np.testing.assert_array_equal(lay.full(np.ones((4, 2, 5, 6))).shape, (2, 4, 5, 6))
    assert layout_from_axes("?yx", (4, 5, 6)).spatial == (0, 1, 2)
    with pytest.raises(VolumeError, match="channel axis"):
        layout_from_axes("", (4, 2, 5, 6))
    with pytest.raises(VolumeError, match="time axis of length 3"):
        layout_from_axes("tzyx", (3, 4, 5, 6))
    with pytest.raises(VolumeError, match="out of range"):
        layout_from_axes("", (4, 5, 6), channel_axis=3)


def test_tiff_spacing_round_trip(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_tiff(tmp_path / "a.tif", data, spacing=(2.0, 0.5, 0.25))
    vol = read_volume(tmp_path / "a.tif")
    assert vol.kind == "tiff" and vol.spacing_source == "ImageJ metadata"
    np.testing.assert_allclose(vol.spacing, (2.0, 0.5, 0.25), rtol=1e-6)
    np.testing.assert_array_equal(vol.load()[0], data)
    tifffile.imwrite(tmp_path / "o.ome.tif", data, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 300, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5})  # fmt: skip
    vol = read_volume(tmp_path / "o.ome.tif")
    np.testing.assert_allclose(vol.spacing, (1.5, 0.3, 0.3))
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack")
    vol = read_volume(tmp_path / "plain.tif")
    assert vol.spacing is None and vol.shape == (1, 4, 5, 6)


def test_ome_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    level0 = zarr.open_array(str(tmp_path / "img.ome.zarr" / "0"), mode="w", shape=(1, 2, 4, 5, 6),
                             chunks=(1, 1, 2, 5, 6), dtype="u2")  # fmt: skip
    level0[:] = np.arange(240, dtype="u2").reshape(1, 2, 4, 5, 6)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    root.attrs["multiscales"] = [{
        "version": "0.4", "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 2.0, 0.5, 0.5]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0, 2.0, 2.0]}],
    }]  # fmt: skip
    vol = read_volume(tmp_path / "img.ome.zarr")
    assert vol.kind == "ome-zarr" and vol.shape == (2, 4, 5, 6)
    assert vol.spacing == (2.0, 1.0, 1.0) and vol.spacing_source == "OME-Zarr metadata"
    np.testing.assert_array_equal(vol.load(), level0[0])
    root.attrs["multiscales"] = []
    with pytest.raises(VolumeError, match="give the path of one of its arrays"):
        read_volume(tmp_path / "img.ome.zarr")
    assert read_volume(tmp_path / "img.ome.zarr" / "0", channel_axis=1).shape == (2, 4, 5, 6)


# --- instances, chunk by chunk ---------------------------------------------------------------------


def _touching_balls(shape=(40, 60, 60), seed=0) -> np.ndarray:
    """Labels of two classes: balls and touching pairs of balls, many across chunk borders."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    labels = np.zeros(shape, np.uint8)
    for _ in range(14):
        centre = rng.uniform([4, 4, 4], np.array(shape) - 4)
        r = rng.uniform(3.0, 6.0)
        value = int(rng.integers(2, 4))
        labels[((grid - centre[:, None, None, None]) ** 2).sum(0) < r * r] = value
        if rng.random() < 0.6:  # a touching partner
            direction = rng.normal(size=3)
            other = centre + 0.85 * 2 * r * direction / np.linalg.norm(direction)
            labels[((grid - other[:, None, None, None]) ** 2).sum(0) < r * r] = value
    return labels


@pytest.mark.parametrize("seed, auto", [(0, False), (1, False), (0, True)])
def test_chunked_instances_equal_in_memory(tmp_path, seed, auto):
    import dask

    from napari_pacseg import InstanceConfig, instance_labels
    from napari_pacseg.engine.plan import split_box
    from napari_pacseg.engine.plan import whole as whole_box
    from napari_pacseg.instances.chunked import IdArrays, instances_pass

    labels = _touching_balls(seed=seed)
    spacing = (1.5, 1.0, 1.0)
    # auto: objects the volume's border cuts are kept from an eighth of the whole size up
    config = InstanceConfig(radius=5.0) if auto else InstanceConfig(min_volume=20.0)
    if auto:  # small blobs (27 spacing units, under the whole 65) on the border, across chunks
        labels[7:9, 15:18, 0:3] = 2
        labels[38:40, 30:33, 31:34] = 3
        labels[20:22, 45:48, 15:18] = 2  # and one inside: dropped
    expected = instance_labels(labels, spacing, config)
    assert expected.max() >= 12
    if auto:  # the two on the border are objects, the one inside is not
        assert expected[8, 16, 1] and expected[39, 31, 32] and not expected[21, 46, 16]
    chunks = (8, 16, 16)
    boxes = split_box(whole_box(labels.shape), chunks)
    crossing = [i for i in range(1, expected.max() + 1)
                if len({tuple(c // np.array(chunks)) for c in np.argwhere(expected == i)}) > 1]  # fmt: skip
    assert len(crossing) >= 5  # objects on chunk borders, the case that matters
    write_zarr(tmp_path / "labels.zarr", labels, chunks)
    for name, dtype in (("ids.zarr", np.int32), ("cc.zarr", np.int64)):
        zarr.open_array(str(tmp_path / name), mode="w", shape=labels.shape, chunks=chunks,
                        dtype=dtype, fill_value=0)  # fmt: skip
    arrays = IdArrays(
        str(tmp_path / "labels.zarr"), str(tmp_path / "ids.zarr"), str(tmp_path / "cc.zarr")
    )
    n, table = instances_pass(
        lambda tasks: list(dask.compute(*tasks, scheduler="synchronous")),
        arrays, boxes, spacing, config, "test",
    )  # fmt: skip
    assert n == expected.max() and table is None
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ids.zarr"))[:], expected)


def test_chunked_instances_with_seeds_equal_in_memory(tmp_path):
    """Seeds (``instance_labels``' ``seeds``: here the labels worn down by a voxel, so necks
    deepen) split the pieces chunk by chunk as in memory."""
    import dask

    from napari_pacseg import InstanceConfig, instance_labels
    from napari_pacseg.engine.plan import split_box
    from napari_pacseg.engine.plan import whole as whole_box
    from napari_pacseg.instances.chunked import IdArrays, instances_pass

    labels = _touching_balls(seed=2)
    spacing = (1.5, 1.0, 1.0)
    config = InstanceConfig(radius=3.0, min_volume=10.0)
    seeds = np.where(ndi.binary_erosion(labels > 0, iterations=2), labels, 0).astype(np.uint8)
    expected = instance_labels(labels, spacing, config, seeds=seeds)
    assert not np.array_equal(expected, instance_labels(labels, spacing, config))
    chunks = (8, 16, 16)
    write_zarr(tmp_path / "labels.zarr", labels, chunks)
    write_zarr(tmp_path / "seeds.zarr", seeds, chunks)
    for name, dtype in (("ids.zarr", np.int32), ("cc.zarr", np.int64)):
        zarr.open_array(str(tmp_path / name), mode="w", shape=labels.shape, chunks=chunks,
                        dtype=dtype, fill_value=0)  # fmt: skip
    arrays = IdArrays(*(str(tmp_path / f"{n}.zarr") for n in ("labels", "ids", "cc", "seeds")))
    n, _ = instances_pass(
        lambda tasks: list(dask.compute(*tasks, scheduler="synchronous")),
        arrays, split_box(whole_box(labels.shape), chunks), spacing, config, "test",
    )  # fmt: skip
    assert n == expected.max()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ids.zarr"))[:], expected)


def test_segment_zarr_seeds_the_objects_as_in_memory(tmp_path, crop, model, monkeypatch):
    """The blocks write the seeding refinement's labels (``Segmentation.seeds``) for the
    instance passes, also those of blocks an earlier run finished; the scratch is removed."""
    from napari_pacseg.batch import zarr_runs

    ref = segment(crop, model, instances={"min_volume": 5.0})
    assert ref.seeds is not None
    seen = []
    real = zarr_runs.instances_pass

    def spy(run, arrays, *args, **kwargs):
        seeds = arrays.seeds
        seen.append(None if seeds is None else np.asarray(zarr.open_array(seeds, mode="r")[:]))
        return real(run, arrays, *args, **kwargs)

    monkeypatch.setattr(zarr_runs, "instances_pass", spy)
    res = segment_zarr(write_zarr(tmp_path / "in.zarr", crop), model, tmp_path / "labels.zarr",
                       chunks=CHUNKS, instances_out=tmp_path / "ids.zarr",
                       instances={"min_volume": 5.0})  # fmt: skip
    np.testing.assert_array_equal(seen[0], ref.seeds)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ids.zarr"))[:], ref.instances)
    assert res.timings["seeds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.zarr", "in.zarr", "labels.zarr"]
    # with split_fit 0 no seeds are made
    segment_zarr(tmp_path / "in.zarr", model, tmp_path / "l2.zarr", chunks=CHUNKS,
                 instances_out=tmp_path / "i2.zarr", instances={"split_fit": 0})  # fmt: skip
    assert len(seen) == 2 and seen[1] is None


def test_segment_zarr_instances_on_a_cluster_equal_in_memory(tmp_path, crop, model, cluster):
    ref = segment(crop, model, instances={"min_volume": 5.0})
    res = segment_zarr(write_zarr(tmp_path / "in.zarr", crop), model, tmp_path / "labels.zarr",
                       chunks=CHUNKS, scheduler=cluster, instances_out=tmp_path / "ids.zarr",
                       instances={"min_volume": 5.0},
                       objects_out=tmp_path / "objects.csv")  # fmt: skip
    import pandas as pd

    table = pd.read_csv(tmp_path / "objects.csv")
    assert_same_table(table, ref.objects)
    assert res.objects == tmp_path / "objects.csv"
    ids = zarr.open_array(str(tmp_path / "ids.zarr"), mode="r")
    assert ids.dtype == np.int32 and ids.chunks == CHUNKS
    np.testing.assert_array_equal(ids[:], ref.instances)
    assert res.n_objects == ref.instances.max() >= 1 and res.instances == tmp_path / "ids.zarr"
    assert "instances" in res.timings
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ids.zarr",
        "in.zarr",
        "labels.zarr",
        "objects.csv",
    ]
    # the same synchronously, and bad parameters before any work
    segment_zarr(tmp_path / "in.zarr", model, tmp_path / "l2.zarr", chunks=CHUNKS,
                 instances_out=tmp_path / "ids2.zarr", instances={"min_volume": 5.0})  # fmt: skip
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ids2.zarr"))[:], ref.instances)
    with pytest.raises(ValueError, match="unknown parameters"):
        segment_zarr(tmp_path / "in.zarr", model, tmp_path / "l3.zarr",
                     instances_out=tmp_path / "i3.zarr", instances={"size": 1})  # fmt: skip
    assert not (tmp_path / "l3.zarr").exists()
    with pytest.raises(ValueError, match="objects_out needs instances"):
        segment_zarr(tmp_path / "in.zarr", model, tmp_path / "l3.zarr",
                     objects_out=tmp_path / "o.csv")  # fmt: skip
    for instances in (True, {"radius": 2.0}, {"boundary": "background"}):
        with pytest.raises(ValueError, match="pass instances_out=PATH"):
            segment_zarr(tmp_path / "in.zarr", model, tmp_path / "l3.zarr", instances=instances)
    request = SegmentRequest.build(model, instances=True)
    with pytest.raises(ValueError, match="the request's instances asks for objects"):
        segment_zarr(tmp_path / "in.zarr", request, tmp_path / "l3.zarr")
    assert not (tmp_path / "l3.zarr").exists()
