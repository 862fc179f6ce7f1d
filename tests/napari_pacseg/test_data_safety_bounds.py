"""Work and memory bounds (issue 33): a model file refused for its size or layout is refused
after reading its header only, and tile shapes whose tile count or halo overhead would make a
run absurd are refused up front, saying what to do."""

from __future__ import annotations

import json
import math
import struct
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import napari_pacseg.io.model_file as model_io
from napari_pacseg import (
    ClassInfo,
    ContextConfig,
    FeatureSpec,
    HeadConfig,
    ModelConfig,
    ModelFileError,
    PacSegModel,
    load_model,
    save_model,
    segment,
    train,
)
from napari_pacseg.engine.plan import (
    MAX_TILE_WORK,
    TILE_COST_VOXELS,
    UNARY_TILE,
    _check_tiles,
    extend_box,
    prepare,
    settle,
    split_box,
    tiling_work,
    whole,
)
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.io.model_file import model_from_bytes
from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MiB = 1 << 20


# --- model files: a refusal reads the header only ------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small valid model file (with a context net) and its model."""
    torch.manual_seed(33)
    config = ModelConfig(
        in_channels=1,
        classes=(ClassInfo("background", (0, 0, 0, 0)), ClassInfo("cell", (1.0, 0.2, 0.2, 1.0))),
        features=FeatureSpec(sigmas=(1.0, 2.0)),
        head=HeadConfig((8,)),
        context=ContextConfig((2,), kernel_size=1, pool=2),
        spacing=(2.0, 0.5, 0.5),
    )
    model = PacSegModel(config).eval()
    return save_model(model, tmp_path_factory.mktemp("model") / "m.safetensors"), model


class CountingFile:
    """A binary file that counts the bytes read from it."""

    def __init__(self, f, counts: list) -> None:
        self._f, self._counts = f, counts

    def read(self, size=-1):
        data = self._f.read(size)
        self._counts.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def bytes_read(monkeypatch):
    """The sizes of the reads ``load_model`` makes from the files it opens."""
    counts: list[int] = []
    monkeypatch.setattr(
        model_io, "open", lambda *a, **k: CountingFile(open(*a, **k), counts), raising=False
    )
    return counts


def _parts(raw: bytes) -> tuple[int, dict, bytes]:
    """A model file's header length, its JSON header and its data."""
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _assemble(header: dict, data: bytes) -> bytes:
    """A model file of ``header`` (padded to 8 bytes, as ``save_model`` writes) and ``data``."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _shifted(raw: bytes, first: int, last: int) -> bytes:
    """The file with each tensor's offsets moved by ``first`` (the first in data order) or
    ``last`` (every other one): a gap or an overlap in the data."""
    _, header, data = _parts(raw)
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    for i, name in enumerate(names):
        shift = first if i == 0 else last
        header[name]["data_offsets"] = [o + shift for o in header[name]["data_offsets"]]
    return _assemble(header, data + b"\0" * max(first, last, 0))


def test_a_model_padded_with_zeros_is_refused_after_its_header(model_file, tmp_path, bytes_read):
    path, _ = model_file
    raw = path.read_bytes()
    n = _parts(raw)[0]
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(raw)
    with open(padded, "r+b") as f:  # 64 MiB of zeros after the model, sparse on disk
        f.truncate(len(raw) + 64 * MiB)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=rf"padded\.safetensors: {64 * MiB} trailing bytes"):
        load_model(padded)
    assert time.perf_counter() - start < 2
    assert sum(bytes_read) == 8 + n < MiB  # the length and the header, no weight


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda raw: raw[: -len(_parts(raw)[2]) // 2],
            "the tensors need .* bytes but the file holds .*: truncated",
        ),
        (lambda raw: raw + b"\0" * 12, "12 trailing bytes after the last tensor"),
        (lambda raw: _shifted(raw, 4, 4), "4 unused bytes before tensor"),
        (lambda raw: _shifted(raw, 0, -4), "overlaps the tensor before it"),
    ],
    ids=["data section longer than the file", "trailing", "gap", "overlap"],
)
def test_layout_errors_are_found_before_the_weights_are_read(
    model_file, tmp_path, bytes_read, damage, message
):
    path, _ = model_file
    raw = damage(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw)
    with pytest.raises(ModelFileError, match=f"bad.safetensors: .*{message}"):
        load_model(bad)
    assert sum(bytes_read) == 8 + _parts(raw)[0] < len(raw)
    # the same bytes in memory: the same message
    with pytest.raises(ModelFileError, match=f"bad.safetensors: .*{message}") as info:
        model_from_bytes(raw, "bad.safetensors")
    assert "\n" not in str(info.value)


def test_a_valid_model_reads_its_file_once(model_file, bytes_read):
    path, model = model_file
    loaded = load_model(path)
    assert sum(bytes_read) == path.stat().st_size  # header, then the weights, nothing twice
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    from_bytes = model_from_bytes(path.read_bytes(), "m.safetensors")
    assert all(torch.equal(from_bytes.state_dict()[k], v) for k, v in model.state_dict().items())


def test_padding_refused_in_memory_too(model_file):
    raw = model_file[0].read_bytes()
    with pytest.raises(ModelFileError, match=r"^x: 1048576 trailing bytes after the last tensor"):
        model_from_bytes(raw + bytes(MiB), "x")


# --- tile shapes: the work of the tiles is bounded -----------------------------------------------


@pytest.fixture(scope="module")
def demo():
    with warnings.catch_warnings():  # the demo file may lack the newest metadata: a note only
        warnings.simplefilter("ignore", model_io.ModelFileWarning)
        model = load_model(DEMO_MODEL_FILE)
    image = np.ascontiguousarray(load_sample().image[24:40, :40, :40])  # 16 x 40 x 40
    return model, image


def test_single_voxel_tiles_are_refused_at_once(demo):
    model, image = demo
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^tile_shape \(1, 1, 1\): 25600 tiles") as info:
        segment(image, model, tile_shape=(1, 1, 1))
    assert time.perf_counter() - start < 1
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert f"(limit {MAX_TILE_WORK:g}x)" in message and "leave tile_shape unset" in message
    # the larger tiles it names are accepted
    better = tuple(int(v) for v in message.split("e.g. (")[1].split(")")[0].split(", "))
    prepare(image, SegmentRequest.build(model, tile_shape=better))


@pytest.mark.parametrize("refine", [True, False])
def test_tiny_tiles_are_refused_with_or_without_refinement(demo, refine):
    model, image = demo
    with pytest.raises(ValueError, match=r"tile_shape \(2, 5, 5\): 512 tiles.* the work of"):
        segment(image, model, refine=refine, tile_shape=(2, 5, 5))


def test_reasonable_tiles_give_the_default_labels(demo):
    model, image = demo
    default = segment(image, model)
    for tile in [(8, 20, 20), (16, 40, 40), UNARY_TILE, (1000, 1000, 1000)]:
        tiled = segment(image, model, tile_shape=tile)
        assert np.array_equal(tiled.labels, default.labels), tile


def test_the_bound_is_checked_before_the_image_is_read(demo):
    """A huge volume is refused from its shape alone, in no time for any tile count."""
    model, _ = demo
    settings = settle(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"8589934592 tiles"):
        _check_tiles((512, 4096, 4096), (1, 1, 1), settings)
    _check_tiles((512, 4096, 4096), UNARY_TILE, settings)  # the default tile is fine
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("seed", range(40))
def test_tiling_work_is_what_the_passes_read(seed):
    """``tiling_work`` equals the voxels of the boxes the passes run on (grown as they are),
    plus the fixed cost of each."""
    rng = np.random.default_rng(seed)
    model_grid = int(rng.choice([1, 2, 4]))
    shape = tuple(int(v) for v in rng.integers(1, 30, 3))
    tile = tuple(int(v) for v in rng.integers(1, 34, 3))
    halo = tuple(int(v) for v in rng.integers(0, 12, 3))
    reach = tuple(int(v) for v in rng.integers(0, 20, 3))
    refine = bool(rng.integers(2))
    settings = SimpleNamespace(  # the fields of Settings that tiling_work reads
        halo=halo, grid=model_grid, read_reach=reach, refine=object() if refine else None
    )
    expected = count = 0
    passes = [(halo, model_grid)] + ([(reach, 1)] if refine else [])
    for grow, grid in passes:
        boxes = split_box(whole(shape), tile, grid)
        for box in boxes:
            ext = extend_box(box, grow, shape, grid)[0]
            expected += math.prod(b - a for a, b in ext) + TILE_COST_VOXELS
        count = count or len(boxes)
    assert tiling_work(shape, tile, settings) == (expected, count)


def test_2d_tiles_are_named_as_given():
    rng = np.random.default_rng(0)
    image = rng.normal(20, 5, (48, 56)) + 80 * (np.hypot(*np.mgrid[-24:24, -28:28]) < 9)
    marks = np.zeros(image.shape, np.uint8)
    marks[1:3, 2:50], marks[22:26, 26:30] = 1, 2
    model = train(image.astype(np.float32), marks, features=FeatureSpec(sigmas=(1.0,)), steps=5)
    named = r"^tile_shape \(1, 1\): 2688 tiles, each grown by up to \(\d+, \d+\) voxels"
    with pytest.raises(ValueError, match=named):
        segment(image, model, tile_shape=(1, 1))
    assert segment(image, model, tile_shape=(16, 20)).labels.shape == image.shape
