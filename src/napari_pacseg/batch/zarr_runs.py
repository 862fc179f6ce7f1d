"""Out-of-core segmentation of zarr volumes with dask: ``segment_zarr``.

The volume's storage chunks are grouped into work blocks: boxes of whole chunks, as large as a
memory budget allows (``choose_blocks``). Each block is one task: ``segment()`` on the block
plus a halo of ``receptive_field`` voxels (clipped at the volume's edges), with the whole
volume's intensity range, keeping only the block's core: the same overlap-and-trim as
``dask.array.map_overlap(depth=receptive_field, boundary="none")``, except that each task reads
its haloed region straight from the zarr store, so no ghost cells travel between workers and a
task needs nothing but the store and the model. A block pays its halo once for all its chunks,
so large blocks cost about what ``segment()`` in memory costs per voxel, while small storage
chunks stay the writer's choice. The results are written into zarr arrays chunked as asked,
in partials beside the outputs (``batch.partial``; each task writes whole output chunks: an
idempotent write, so a retried task rewrites the same bytes), and renamed into place only when
every chunk is done. Each finished block is logged in the partial, so a run that fails or is
killed is resumed by the next call with the same source, model and parameters: the chunks
already finished are skipped, and the result is the uninterrupted run's, bit for bit. Memory
per task is bounded by the budget, whatever the volume size; the instance passes run chunk by
chunk (``instances.chunked``), after the blocks, and are redone whole by a resumed run.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_pacseg._version import __version__
from napari_pacseg.batch.partial import PartialRun, inspect_partials, partial_path
from napari_pacseg.checks import check_callable, short_repr
from napari_pacseg.engine.plan import (
    REFINE_FULL_DEPTH,
    REFINE_TILE,
    TILE_COST_VOXELS,
    UNARY_TILE,
    Settings,
    check_channels,
    check_overlap,
    extend_box,
    refine_tile,
    seeding_fit,
    settle,
    split_box,
    tiling_work,
    whole,
)
from napari_pacseg.engine.request import SegmentRequest, objects_refine
from napari_pacseg.engine.segment import ImageOptions, as_request, receptive_field, run
from napari_pacseg.instances.cells import boundary_label
from napari_pacseg.instances.chunked import Brightness, IdArrays, Measure, instances_pass
from napari_pacseg.instances.chunked_cells import cells_pass, labels_pass
from napari_pacseg.instances.labels import table_csv
from napari_pacseg.io.atomic import (
    check_replaceable,
    move_into_place,
    remove,
    remove_stale_temporaries,
    temporary_sibling,
    write_bytes,
    write_error,
)
from napari_pacseg.io.model_file import weights_digest
from napari_pacseg.io.provenance import input_digest
from napari_pacseg.io.spacing import resolve_spacing
from napari_pacseg.io.volumes import (
    INSTALL_HINT,
    ImageFile,
    Layout,
    VolumeError,
    check_not_input,
    check_output_folder,
    describe_bad_chunk,
    layout_from_axes,
    open_zarr,
    read_region,
)
from napari_pacseg.model.classes import DEFAULT_THRESHOLD
from napari_pacseg.model.network import PacSegModel
from napari_pacseg.model.normalise import image_normalisation

# Default storage chunk (z, y, x) of the outputs: ~4 M voxels, a few MiB per compressed chunk;
# work blocks group chunks, so the chunk size does not set the halo's cost.
DEFAULT_CHUNKS = (64, 256, 256)
# The default memory budget of a task: this share of the memory available when the run starts
# (psutil, else /proc/meminfo's MemAvailable, and no more than a cgroup's limit leaves), split
# between the tasks that run at once on this machine; on a dask.distributed cluster this share
# of each worker's memory limit per thread. The other half stays for the system, the file
# cache and other programs. FALLBACK_MEMORY per task where neither is known.
DEFAULT_MEMORY_SHARE = 0.5
FALLBACK_MEMORY = 2 << 30
# A task's estimated peak over the arrays it holds (``task_memory``): allocator slack, the
# transient copies of torch's ops that the count leaves out.
TASK_MEMORY_MARGIN = 1.25
# A task's fixed cost (reading its region, dispatch, writing its chunks), in voxels of work.
TASK_COST_VOXELS = 1 << 16
# Block layouts whose makespan is found by placing each block (longest first) on the least
# loaded task slot; beyond this many blocks per slot, total work / slots stands for it.
BALANCE_BLOCKS_PER_SLOT = 8
LOCAL_SCHEDULERS = ("synchronous", "sync", "threads", "threading")


def _dask():
    try:
        import dask
        import dask.array
    except ImportError as err:
        raise ImportError(f"segment_zarr needs dask and zarr: {INSTALL_HINT}") from err
    return dask


# --- one work block ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs for one work block (picklable: the request carries its model
    as the bytes of its model file).

    box : the block's core, ``(z, y, x)`` ranges of whole output chunks. ext : the core plus the
    halo, clipped to the volume. layout : how the source's axes map to ``(C, D, H, W)``.
    request : the blocks' ``SegmentRequest`` (no objects: they have their own pass). norm : the
    whole volume's ``(lo, hi, noise_level)``, one value per channel each. outputs : the labels
    and matte zarr paths (either None: not written; both None for a block an earlier run
    finished, whose seeds alone are needed). seeds : the zarr path of the labels that seed the
    objects (kept with the partials: ``PartialRun.seeds``), written with the local fit
    weighing ``split_fit`` (``engine.plan.seeding_fit``), or None. read_here :
    ``segment_chunk``'s source is the zarr array to read ``ext`` from, else the region itself.
    source_name : the input, for messages. index : the block's number in the run.
    progress_key : the run's key in ``_RELAYS`` (tile progress inside the block, where the task
    runs in the calling process), or None.
    """

    box: tuple[tuple[int, int], ...]
    ext: tuple[tuple[int, int], ...]
    layout: Layout
    request: SegmentRequest
    norm: tuple[list[float], list[float], list[float]]
    outputs: tuple[str | None, str | None]
    read_here: bool
    source_name: str
    index: int = 0
    progress_key: str | None = None
    seeds: str | None = None
    split_fit: float | None = None


# Per run (its token), in the calling process: ``relay(block index, fraction done)``. A task that
# runs in this process (the local schedulers) finds it; a worker process finds nothing.
_RELAYS: dict[str, Callable[[int, float], None]] = {}


def segment_chunk(job: ChunkJob, source) -> dict[str, float]:
    """Segment one work block and write its core (whole chunks) into the output stores.
    ``source`` is the raw zarr array (the region is read here) or the region itself, ``(C, d,
    h, w)``."""
    import zarr

    region = (
        read_region(source, job.layout, job.ext, job.source_name)
        if job.read_here
        else np.asarray(source)
    )
    lo, hi, noise = job.norm
    relay = _RELAYS.get(job.progress_key) if job.progress_key is not None else None
    tiles = None
    if relay is not None:

        def tiles(done, total):
            relay(job.index, done / total if total else 0.0)

    options = ImageOptions(intensity_range=(lo, hi), noise_level=noise, split_fit=job.split_fit)
    seg = run(region, job.request, options, tiles)
    del region
    core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(job.box, job.ext))
    where = tuple(slice(a, b) for a, b in job.box)
    labels_path, matte_path = job.outputs
    if labels_path is not None:
        zarr.open_array(labels_path, mode="r+")[where] = seg.labels[core]
    if matte_path is not None:
        zarr.open_array(matte_path, mode="r+")[where] = seg.matte[core]
    if job.seeds is not None:
        zarr.open_array(job.seeds, mode="r+")[where] = seg.seeds[core]
    return seg.timings


# --- work blocks ----------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


def memory_bytes(memory) -> int | None:
    """``memory`` as bytes: None stays None; an int is bytes; a string is a number with an
    optional unit K, M, G or T (powers of 1024; "4G", "512M", "1.5GiB", "800MB"), bytes
    without one. ``ValueError`` for anything else or a size under 1 MiB."""
    if memory is None:
        return None
    if isinstance(memory, bool):
        raise ValueError(f"memory must be a size such as 4G or 512M, got {short_repr(memory)}")
    if isinstance(memory, (int, np.integer, float, np.floating)):
        value = float(memory)
    elif isinstance(memory, str) and (m := _SIZE.fullmatch(memory)):
        value = float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " ")
    else:
        raise ValueError(
            f"memory must be a size such as 4G, 512M or a number of bytes, got {short_repr(memory)}"
        )
    if not math.isfinite(value) or value < 1 << 20:
        raise ValueError(f"memory must be at least 1M (1 MiB), got {short_repr(memory)}")
    return int(value)


def describe_bytes(n: float) -> str:
    """``n`` bytes as "1.5 GiB", "300 MiB"."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def available_memory() -> int | None:
    """Bytes of memory available to new allocations on this machine: psutil's ``available``,
    else ``MemAvailable`` of ``/proc/meminfo``; no more than a cgroup's limit leaves (a
    container's limit is below the host's free memory). None when nothing says."""
    found = None
    try:
        import psutil

        found = int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no /proc
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    left = _cgroup_left()
    if left is not None:
        found = left if found is None else min(found, left)
    return found


def _cgroup_left() -> int | None:
    """Bytes a cgroup's memory limit still leaves this process's group (v2, then v1), or None."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):  # fmt: skip
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit
                return None
            return max(0, int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def task_memory(ext_shape, settings: Settings, model, itemsize: int, tile_shape=None,
                seeding: bool = False) -> int:  # fmt: skip
    """Estimated peak bytes one task adds above its process's baseline (libraries, model):
    ``segment()`` of a ``(D, H, W)`` region ``ext_shape`` (a block and its halo).

    Per voxel of the region: the image as read (``itemsize`` per channel), the logit
    differences (``K - 1`` float32), labels (uint8) and matte (float32), and with ``seeding``
    (the objects' seeds, ``engine.plan.seeding_fit``) the seeds (uint8). Per task, the larger
    pass's working set: a logits tile (``UNARY_TILE`` + the features' halo) holds its float32
    image, features and context channels; a refinement tile (``refine_tile`` + the
    refinement's read reach) its logits, guide and local fit (with ``seeding``: the seeds'
    logits too), and the mean field's weights for a few planes of window taps. All times
    ``TASK_MEMORY_MARGIN``."""
    config = model.config
    c, k = config.in_channels, config.n_classes
    held = math.prod(ext_shape) * (c * itemsize + 4 * (k - 1) + 1 + 4 + int(seeding))
    tile = tile_shape or UNARY_TILE
    unary = [min(n, t + 2 * h) for n, t, h in zip(ext_shape, tile, settings.halo)]
    context = sum(config.context.channels) if config.context else 0
    work = math.prod(unary) * 4 * (c + config.n_features + context + 2)
    if settings.refine is not None:
        tile = tile_shape or refine_tile(ext_shape)
        reach = settings.read_reach
        fine = [min(n, t + 2 * r) for n, t, r in zip(ext_shape, tile, reach)]
        weights = (settings.kernel[0] + 1) * fine[1] * fine[2] * math.prod(settings.kernel) * 4
        logits = (4 if seeding else 3) * k
        work = max(work, math.prod(fine) * 4 * (logits + 2 * c + 4) + weights)
    return int(TASK_MEMORY_MARGIN * (held + work))


@dataclass(frozen=True)
class Blocks:
    """How ``choose_blocks`` groups the chunks: ``size`` chunks per block along ``(z, y, x)``
    (the last block of an axis may hold fewer), the blocks' core boxes in raster order,
    ``task_bytes`` the estimated peak of the largest block's task (``task_memory``), ``budget``
    the bytes per task it was chosen for, and ``over`` True when even one chunk is estimated
    above the budget (blocks are then single chunks)."""

    size: tuple[int, int, int]
    boxes: list
    task_bytes: int
    budget: int
    over: bool = False


class _Axis:
    """Along one axis of ``n`` voxels in chunks of ``c``, blocks of ``b`` chunks: each block's
    extent length (the block grown by ``halo`` and clipped), and the voxels and tiles each pass
    of ``segment()`` reads along the axis per block (``tiling_work`` of the extent alone)."""

    def __init__(self, n: int, c: int, b: int, halo: int, reads) -> None:
        starts = range(0, n, b * c)
        self.ext = np.array([min(n, s + b * c + halo) - max(0, s - halo) for s in starts])
        per = [reads(int(e)) for e in self.ext]  # [(reads, tiles) per pass] per block
        self.reads = [np.array([p[i][0] for p in per], float) for i in range(len(per[0]))]
        self.tiles = [np.array([p[i][1] for p in per], float) for i in range(len(per[0]))]


def choose_blocks(shape, chunks, halo, settings: Settings, budget: int, slots: int, estimate,
                  tile_shape=None) -> Blocks:  # fmt: skip
    """The work blocks of a ``(D, H, W)`` volume stored in ``chunks``: boxes of whole chunks,
    all of the same size in chunks per axis (the last of an axis clipped), each grown by
    ``halo``, such that ``estimate(ext_shape)`` (bytes) of the largest is within
    ``budget``, and the run takes the least work.

    The work of a block is what ``segment()`` reads on its extent: both passes, tile by tile,
    each tile grown by its own halo (``tiling_work``), plus ``TASK_COST_VOXELS``; a layout's
    cost is its makespan on ``slots`` tasks at once (blocks placed longest first on the least
    loaded slot; total / slots beyond ``BALANCE_BLOCKS_PER_SLOT`` blocks per slot). Fewer
    blocks win ties. Sizes tried per axis: ``ceil(n_chunks / m)`` for m = 1 .. n_chunks (the
    sizes that give m blocks, balanced); a budget below one chunk's estimate gives single
    chunks (``Blocks.over``)."""
    grid = [-(-n // c) for n, c in zip(shape, chunks)]
    unary = dataclasses.replace(settings, refine=None)
    fine = dataclasses.replace(settings, refine=None, halo=settings.read_reach, grid=1)
    cache: dict = {}

    def reads(axis: int, length: int):
        key = (axis, length)
        if key not in cache:
            one = [1, 1, 1]
            one[axis] = length
            passes = [(unary, tile_shape or UNARY_TILE)]
            if settings.refine is not None:
                depth = length if length <= REFINE_FULL_DEPTH else REFINE_TILE[0]
                passes.append((fine, tile_shape or (depth, *REFINE_TILE[1:])))
            out = []
            for s, tile in passes:
                work, tiles = tiling_work(one, tile, s)
                out.append((work - TILE_COST_VOXELS * tiles, tiles))
            cache[key] = out
        return cache[key]

    axes: dict = {}

    def axis(a: int, b: int) -> _Axis:
        if (a, b) not in axes:
            axes[a, b] = _Axis(shape[a], chunks[a], b, halo[a], lambda e: reads(a, e))
        return axes[a, b]

    def peak(sizes) -> int:
        lines = [axis(a, b) for a, b in enumerate(sizes)]
        ext = tuple(int(x.ext.max()) for x in lines)
        return estimate(ext)

    def cost(sizes) -> tuple[float, int]:
        z, y, x = (axis(a, b) for a, b in enumerate(sizes))
        count = len(z.ext) * len(y.ext) * len(x.ext)
        total = count * TASK_COST_VOXELS
        for p in range(len(z.reads)):
            total += z.reads[p].sum() * y.reads[p].sum() * x.reads[p].sum()
            total += TILE_COST_VOXELS * z.tiles[p].sum() * y.tiles[p].sum() * x.tiles[p].sum()
        if slots <= 1:
            return total, count
        if count > BALANCE_BLOCKS_PER_SLOT * slots:
            return total / slots, count
        each = np.full((len(z.ext), len(y.ext), len(x.ext)), float(TASK_COST_VOXELS))
        for p in range(len(z.reads)):
            each += np.einsum("i,j,k->ijk", z.reads[p], y.reads[p], x.reads[p])
            each += TILE_COST_VOXELS * np.einsum("i,j,k->ijk", z.tiles[p], y.tiles[p], x.tiles[p])
        load = [0.0] * slots
        for w in sorted(each.ravel().tolist(), reverse=True):
            heapq.heapreplace(load, load[0] + w)
        return max(load), count

    options = [sorted({-(-n // m) for m in range(1, n + 1)}) for n in grid]
    best, best_key = (1, 1, 1), None
    for bz in options[0]:
        if peak((bz, 1, 1)) > budget:
            break
        for by in options[1]:
            if peak((bz, by, 1)) > budget:
                break
            for bx in options[2]:
                if peak((bz, by, bx)) > budget:
                    break
                key = cost((bz, by, bx))
                if best_key is None or key < best_key:
                    best, best_key = (bz, by, bx), key
    task_bytes = peak(best)
    size = tuple(b * c for b, c in zip(best, chunks))
    boxes = split_box(whole(shape), size)
    return Blocks(best, boxes, task_bytes, budget, over=best_key is None)


def default_memory(kind: str, client, slots: int) -> int:
    """The default budget of a task (see ``DEFAULT_MEMORY_SHARE``): locally the share of this
    machine's available memory over ``slots``; on a dask.distributed cluster the share of the
    smallest worker memory limit per thread (this machine's rule when no worker has a limit)."""
    if kind == "distributed":
        limits = []
        for info in _workers(client):
            limit, threads = info.get("memory_limit") or 0, info.get("nthreads") or 1
            if limit > 0:
                limits.append(limit / threads)
        if limits:
            return int(DEFAULT_MEMORY_SHARE * min(limits))
    free = available_memory()
    if free is None:
        return FALLBACK_MEMORY
    return int(DEFAULT_MEMORY_SHARE * free / max(1, slots))


def task_slots(kind: str, client) -> int:
    """How many tasks run at once: 1 synchronously, dask's thread count with "threads", the
    cluster's threads on dask.distributed (1 while it has no worker)."""
    if kind == "distributed":
        return max(1, sum(info.get("nthreads") or 1 for info in _workers(client)))
    if client == "threads":
        import dask
        from dask.system import CPU_COUNT

        return int(dask.config.get("num_workers", None) or CPU_COUNT)
    return 1


def _workers(client) -> list[dict]:
    try:
        return list(client.scheduler_info().get("workers", {}).values())
    except Exception:  # a scheduler that does not say
        return []


class _VoxelProgress:
    """``progress(done_voxels, total_voxels)`` over the blocks of a run: finished blocks count
    their core voxels, blocks in flight the fraction of their tiles done (where they run in
    this process). Thread-safe (the "threads" scheduler's tasks report from their threads);
    never goes back."""

    def __init__(self, callback, sizes: list[int]) -> None:
        self.callback, self.sizes = callback, sizes
        self.total = int(sum(sizes))
        self.done, self.partial, self.finished = 0, {}, set()
        self.shown = -1
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            self._show()

    def skip(self, indices) -> None:
        """Count the blocks ``indices`` (finished by an earlier run) as done, silently: the first
        report (``start``) includes them."""
        with self.lock:
            for index in indices:
                if index not in self.finished:
                    self.finished.add(index)
                    self.done += self.sizes[index]

    def part(self, index: int, fraction: float) -> None:
        with self.lock:
            if index not in self.finished:
                self.partial[index] = min(1.0, max(fraction, self.partial.get(index, 0.0)))
                self._show()

    def finish(self, index: int) -> None:
        with self.lock:
            if index not in self.finished:
                self.finished.add(index)
                self.partial.pop(index, None)
                self.done += self.sizes[index]
                self._show()

    def _show(self) -> None:
        value = self.done + int(sum(f * self.sizes[i] for i, f in self.partial.items()))
        value = min(self.total, max(value, self.shown))
        if value > self.shown:
            self.shown = value
            if self.callback is not None:
                self.callback(value, self.total)


# --- the whole volume -----------------------------------------------------------------------------


@dataclass
class ZarrResult:
    """What ``segment_zarr`` wrote.

    labels : path of the ``(D, H, W)`` uint8 zarr array. matte : path of the float32 one, or None.
    shape : ``(C, D, H, W)`` of the input. chunks : ``(z, y, x)`` output zarr chunk; n_chunks :
    how many. blocks : chunks per work block along ``(z, y, x)``; n_blocks : how many blocks
    (tasks). memory : the budget per task in bytes; task_memory : the estimated peak of the
    largest block's task (``task_memory``). spacing : ``(z, y, x)`` used; spacing_source :
    "argument", the file's metadata or "model". halo : ``receptive_field`` used (each block's
    halo). timings : seconds per ``segment`` stage summed over the blocks computed,
    plus ``range`` (the volume's intensity range), ``instances`` (the instance passes),
    ``seeds`` (with objects seeded by ``InstanceConfig.split_fit``: the seeding refinement,
    summed over the blocks) and ``total`` (wall time of the call). instances : path of the
    int32 object ids, or None; n_objects : how many objects (0 without ``instances``).
    objects : the CSV of their measurements, or None. resumed_blocks : how many of the
    ``n_blocks`` an earlier, failed or killed run of the same outputs had finished (not written
    again here; with objects seeded by ``InstanceConfig.split_fit``, those it finished without
    their seeds are segmented again for them; 0 for a fresh run).
    """

    labels: Path
    matte: Path | None
    shape: tuple[int, ...]
    chunks: tuple[int, int, int]
    n_chunks: int
    spacing: tuple[float, float, float]
    spacing_source: str
    halo: tuple[int, int, int]
    timings: dict[str, float] = field(default_factory=dict)
    instances: Path | None = None
    n_objects: int = 0
    objects: Path | None = None
    blocks: tuple[int, int, int] = (1, 1, 1)
    n_blocks: int = 0
    memory: int = 0
    task_memory: int = 0
    resumed_blocks: int = 0


def _open_source(source, channel_axis):
    """``(raw, layout, volume-or-None, readable_in_task)`` of a path, ImageFile, zarr or dask array."""
    if isinstance(source, (str, os.PathLike)):
        source = open_zarr(source, channel_axis)
    if isinstance(source, ImageFile):
        return source.data, source.layout, source, source.kind in ("zarr", "ome-zarr")
    if not hasattr(source, "shape") or not hasattr(source, "dtype"):
        raise TypeError(
            f"segment_zarr: source must be a zarr path, a zarr or dask array, got {type(source).__name__}"
        )
    layout = layout_from_axes("", source.shape, channel_axis, "source")
    try:
        import zarr

        readable = isinstance(source, zarr.Array)
    except ImportError:
        readable = False
    return source, layout, None, readable


def _check_chunks(chunks, shape, grid) -> tuple[int, int, int]:
    if chunks is None:
        chunks = [max(grid, c - c % grid) for c in DEFAULT_CHUNKS]
        return tuple(min(c, n) for c, n in zip(chunks, shape))
    chunks = tuple(chunks)
    if len(chunks) != 3 or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in chunks):
        raise ValueError(f"chunks must be 3 positive ints (z, y, x), got {chunks!r}")
    if any(c % grid for c in chunks):
        raise ValueError(
            f"chunks {chunks} must be multiples of {grid} (the model's context-net pooling grid)"
        )
    return tuple(min(int(c), n) for c, n in zip(chunks, shape))


def open_scheduler(scheduler, workers):
    """``(kind, client, owned)``: "local" with a dask scheduler name, or "distributed"."""
    if workers is not None and scheduler is not None:
        raise ValueError("give either scheduler (an address or Client) or workers, not both")
    if workers is not None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: 8787 may be taken
            silence_logs=logging.ERROR,
        )
        return "distributed", Client(cluster, set_as_default=False), True
    if scheduler is None or scheduler in LOCAL_SCHEDULERS:
        name = "threads" if scheduler in ("threads", "threading") else "sync"
        return "local", name, False
    if isinstance(scheduler, str):
        from distributed import Client

        try:
            return "distributed", Client(scheduler, set_as_default=False, timeout="20s"), True
        except OSError as err:
            raise ConnectionError(
                f"cannot reach the dask scheduler at {scheduler!r} ({err}); start one with "
                "`dask scheduler` (and `dask worker ADDRESS` on each machine) or use workers=N"
            ) from err
    if type(scheduler).__name__ == "Client":
        return "distributed", scheduler, False
    raise ValueError(
        f"scheduler must be None, 'synchronous', 'threads', an address or a distributed.Client, got {scheduler!r}"
    )


def source_paths(source) -> list[Path]:
    """The files or folders on this machine that ``source`` reads from: a path, an ``ImageFile``, a
    ``zarr.Array`` (its store's folder + the array's path), a ``np.memmap``, or a dask array
    (the zarr arrays and memmaps anywhere in its graph: graph values, or task arguments with
    ``inline_array=True``). Empty for in-memory data."""
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    if isinstance(source, ImageFile):
        return [source.path]
    found: list[Path] = []
    graph = getattr(source, "__dask_graph__", None)
    for value in dict(graph()).values() if callable(graph) else [source]:
        _backing(value, found, 0)
    return list(dict.fromkeys(found))


def _backing(value, found: list[Path], depth: int) -> None:
    """Collect the on-disk arrays in ``value`` (a graph value, task, argument...) into ``found``."""
    if depth > 8 or value is None or isinstance(value, (str, bytes, int, float, slice)):
        return
    if isinstance(value, np.memmap):
        if value.filename:
            found.append(Path(value.filename))
        return
    store = getattr(value, "store", None)
    if store is not None and hasattr(value, "shape") and not hasattr(value, "__dask_graph__"):
        root = getattr(store, "root", None) or getattr(store, "path", None)  # zarr v3 / v2
        if isinstance(root, (str, os.PathLike)) and "://" not in str(root):
            found.append(Path(root) / str(getattr(value, "path", "") or ""))
        return
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:  # dask's Task (args, kwargs) and DataNode (value) wrappers
        items = [getattr(value, "value", None), *getattr(value, "args", ())]
        items += list((getattr(value, "kwargs", None) or {}).values())
    for item in items:
        _backing(item, found, depth + 1)


def segment_zarr(
    source,
    model: PacSegModel | SegmentRequest,
    labels_out,
    matte_out=None,
    *,
    instances_out=None,
    objects_out=None,
    chunks=None,
    memory=None,
    scheduler=None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    spacing=None,
    channel_axis: int | None = None,
    refine=True,
    device="auto",
    tile_shape=None,
    threshold: float = DEFAULT_THRESHOLD,
    instances=False,
) -> ZarrResult:
    """Segment a volume larger than memory, block by block, into zarr arrays.

    Results equal ``segment()`` on the whole volume loaded in memory (each work block is
    extended by ``receptive_field(model, spacing, refine)`` and normalised with the whole
    volume's ``volume_intensity_range``). Work blocks are boxes of whole storage chunks, as
    large as ``memory`` allows (``choose_blocks``: the layout that reads the fewest voxels,
    halos and tiles counted, spread over the tasks that run at once), so a block's halo is
    paid once for all its chunks; peak memory per task stays within ``memory``.

    Parameters
    ----------
    source : path of a zarr array or OME-Zarr image (level 0, spacing from its metadata), a
        ``ImageFile`` from ``io.volumes``, a ``zarr.Array`` or a ``dask.array.Array``; 3D
        ``(D, H, W)`` or 4D with ``channel_axis``, any numeric dtype.
    model : PacSegModel, the path of a model file, or a ``SegmentRequest`` (then its keywords,
        ``spacing`` to ``instances`` below, are left out). The model is sent to workers as the
        bytes of its model file and rebuilt there with every check of ``load_model``.
    labels_out : path of the ``(D, H, W)`` uint8 zarr array to write (0 background, class
        index + 1 otherwise). matte_out : path of the ``(D, H, W)`` float32 matte array
        (1 - P(background)), or None to skip it. Both are written into partials in their
        folders (``.<name>.pacseg-partial.tmp``, ``batch.partial``) and renamed into place
        when every chunk is done; neither may be or contain the input. A call that fails
        (an error, Ctrl-C) after a block is finished keeps the partials when the source is a
        zarr on disk, as does a process killed outright; the next call with the same
        outputs, source content (``input_digest``), model, parameters, chunks and
        normalisation resumes them, skipping the finished chunks, with the uninterrupted
        run's result bit for bit; any other call removes them and starts afresh. A folder
        at a partial's name that pacseg did not make, or one a live run is writing, is
        refused (``FileExistsError``) and left as it is.
    spacing : ``(z, y, x)`` voxel size in the model's units; default: the OME-Zarr metadata,
        else the model's training spacing.
    refine : True (model defaults), False, or a dict of ``RefineConfig`` overrides.
    chunks : ``(z, y, x)`` storage chunk of the outputs (default ``DEFAULT_CHUNKS``, clipped
        to the volume); multiples of ``model.grid``. The unit that work blocks group.
    memory : the memory one task (one work block) may add, in bytes or as "4G", "512M"
        (``memory_bytes``). Default: ``DEFAULT_MEMORY_SHARE`` (half) of the memory available
        when the call starts (psutil, else ``/proc/meminfo``, within a cgroup's limit), split
        between the tasks that run at once here (1 synchronously, the thread count with
        "threads"); on a dask.distributed cluster (``workers=N`` included) half of the
        smallest worker memory limit per thread (this machine's rule where workers have no
        limit); 2 GiB where nothing says. A task's peak is estimated by ``task_memory``; a
        budget below one chunk's estimate runs one chunk per block, with a warning when the
        budget was given.
    device, tile_shape : as in ``segment``, for each block (on the workers).
    scheduler : None or "synchronous" (default: one block at a time in this process, torch
        using its threads), "threads" (dask's thread pool), the address of a dask.distributed
        scheduler ("tcp://host:8786"), or a ``distributed.Client``.
    workers : start a ``LocalCluster`` of this many single-threaded worker processes for the
        call (scripts that use it need an ``if __name__ == "__main__":`` guard).
    overwrite : replace existing outputs (else ``FileExistsError`` before any work). Resuming
        needs no ``overwrite``: the partials are not the outputs.
    progress : called as ``progress(done_voxels, total_voxels)`` in this process, so a caller
        can show voxels per second and the time left: blocks count their core voxels when
        done and, where they run in this process (the synchronous and "threads" schedulers),
        the share of their tiles done meanwhile (from the worker threads with "threads", one
        call at a time); ``done == 0`` first (a resumed run: the voxels of the blocks already
        finished), never decreasing.
    threshold : the label rule's matte threshold (``classes.labels_from_probabilities``).
    instances_out : path of a ``(D, H, W)`` int32 zarr array of object ids to write as well
        (the same ids as ``segment(..., instances=...)`` on the whole volume: objects that
        cross chunk borders are found whole; see ``instances.chunked``), or None. Written under
        a temporary name (removed on a failure: a resumed run redoes the instance passes) and
        renamed into place with the others.
    objects_out : with ``instances_out``, the path of a CSV of the objects' measurements
        (``instances.labels.object_table``'s columns, the same rows as in memory), measured
        piece by piece on the workers; needs a zarr source (read there).
    instances : how objects are separated for ``instances_out``: True (the default with
        ``instances_out``: the model's ``InstanceConfig``), an ``InstanceConfig`` or a dict of
        overrides; without ``instances_out`` a ValueError (the objects would go nowhere).

    Returns
    -------
    ZarrResult
    """
    dask = _dask()
    import zarr

    start = time.perf_counter()
    check_callable(progress, "segment_zarr: progress", "progress(done_voxels, total_voxels)")
    budget = memory_bytes(memory)
    if instances_out is not None and instances is False and not isinstance(model, SegmentRequest):
        instances = True  # objects asked for by their output path: the model's defaults
    request = as_request(
        model, spacing=spacing, channel_axis=channel_axis, refine=refine, device=device,
        tile_shape=tile_shape, threshold=threshold, instances=instances,
    )  # fmt: skip
    if instances_out is None and request.instances is not None:
        asked = ("the request's instances" if isinstance(model, SegmentRequest)
                 else f"instances={short_repr(instances)}")  # fmt: skip
        raise ValueError(
            f"segment_zarr: {asked} asks for objects, which a zarr run writes to an array of "
            "their own: pass instances_out=PATH (and objects_out=PATH for the measurements), "
            "or leave instances out"
        )
    model = request.model
    if model.config.ndim == 2:
        raise ValueError(
            "segment_zarr runs volume models chunk by chunk; this is a 2D model (of 2D images): "
            "load the image (np.asarray) and call segment(), with frame_axis for a stack of frames"
        )
    objects = boundary = None
    if instances_out is not None:
        objects = request.instances or request.model.config.instances
        boundary = boundary_label(objects, model.config.classes, request.background)
        # the refinement these objects run (a request built without them: its own)
        request = request.replace(refine=objects_refine(request.refine, objects))
    raw, layout, volume, readable = _open_source(source, request.channel_axis)
    if objects_out is not None and (instances_out is None or not readable):
        raise ValueError(
            "objects_out needs instances_out=PATH and a zarr source (path, ImageFile or zarr.Array)"
        )
    if objects is not None and objects.brightness is None and boundary is None and not readable:
        warnings.warn(
            "instances_out: the brightness weight is on auto, and a source other than zarr "
            "cannot be read by the tasks that split the objects: they are split by shape alone "
            "(pass a zarr source, or instances={'brightness': 0} to say so)",
            stacklevel=2,
        )
        objects = dataclasses.replace(objects, brightness=0.0)
    if objects is not None and objects.brightness_weight != 0 and not readable:
        raise ValueError(
            "instances_out: splitting objects by the image's brightness reads the image, which "
            "needs a zarr source (path, ImageFile or zarr.Array); pass "
            "instances={'brightness': 0} to split by shape alone"
        )
    if boundary is not None and not readable:
        raise ValueError(
            "instances_out: cells from a boundary class read the image (the boundary's contrast), "
            "which needs a zarr source (path, ImageFile or zarr.Array)"
        )
    outputs = [Path(p) for p in (labels_out, matte_out, instances_out, objects_out) if p is not None]
    inputs = source_paths(volume if volume is not None else raw)
    for out in outputs:  # also with overwrite=True: an input is never replaced
        check_not_input(out, inputs)
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError(
            "labels_out, matte_out, instances_out and objects_out must be different paths"
        )
    for out in outputs:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        is_table = objects_out is not None and out == Path(objects_out)
        check_replaceable(out, folder=not is_table)  # the zarr arrays are folders
        if out.parent.exists():  # zarr creates a missing one
            check_output_folder(out.parent)
    # the outputs the blocks write live in partials (``batch.partial``) until every block is done
    staged = {"labels": outputs[0]} | ({"matte": outputs[1]} if matte_out is not None else {})
    for out in staged.values():
        check_not_input(partial_path(out), inputs)
    found = inspect_partials(staged)  # refuses a folder not ours, or one a live run writes
    shape = layout.shape(raw.shape)
    check_channels(shape, model, request.channel_axis)
    spacing, spacing_source = resolve_spacing(request.spacing, volume, model.config.spacing)
    # the chunks' request: regions arrive as (C, D, H, W); objects have a pass of their own
    chunk_request = request.replace(spacing=spacing, channel_axis=0, instances=None)
    chunks = _check_chunks(chunks, shape[1:], model.grid)
    halo = receptive_field(model, spacing, request.refine)
    settings = settle(model, spacing, request.refine)
    boxes = split_box(whole(shape[1:]), chunks)
    kind, client, owned = open_scheduler(scheduler, workers)
    for out in outputs:
        remove_stale_temporaries(out)
    # the partials, then temporaries for the instance outputs (their pass is redone on resume)
    tmps = [partial_path(p) for p in staged.values()]
    tmps += [temporary_sibling(p) for p in outputs[len(staged) :]]
    partials: PartialRun | None = None
    succeeded = False
    futures = []
    token = weights_digest(model)[:8] + os.urandom(4).hex()
    try:
        # the labels of a stronger local fit that seed the objects (engine.plan.seeding_fit)
        split_fit = None if objects is None else seeding_fit(objects, settings)
        seeding = split_fit is not None
        blocks = _blocks(shape, chunks, halo, settings, request, raw.dtype.itemsize, budget,
                         kind, client, seeding)  # fmt: skip
        t0 = time.perf_counter()
        view = (
            dask.array.from_array(raw, chunks=raw.chunks) if readable else dask.array.asarray(raw)
        )
        view = layout.arrange(view[layout.selection([(0, n) for n in shape[1:]])])
        try:
            with dask.config.set(scheduler=client):
                lo, hi, noise = image_normalisation(view, model.config.normalisation)
                noise = noise.tolist()
        except (MemoryError, KeyboardInterrupt, ValueError):  # ValueError: values out of range
            raise
        except Exception as err:  # a damaged chunk: name it and the file
            where = str(getattr(volume, "path", "the source"))
            raise VolumeError(
                f"{where}: {describe_bad_chunk(raw, (slice(None),) * raw.ndim, err)}"
            ) from err
        norm = (lo.flatten().tolist(), hi.flatten().tolist(), noise)
        t_range = time.perf_counter() - t0
        attrs = {"spacing": list(spacing), "source": str(getattr(volume, "path", "array"))}
        dtypes = {"labels": np.uint8, "matte": np.float32, "instances": np.int32}

        def create(what: str, folder) -> None:
            arr = zarr.open_array(str(folder), mode="w", shape=shape[1:], chunks=chunks,
                                  dtype=dtypes[what], fill_value=0)  # fmt: skip
            arr.attrs.update({"napari_pacseg": {**attrs, "content": what}})

        key = _run_key(inputs, readable, raw, layout, chunk_request, shape, chunks, halo, norm,
                       list(staged))  # fmt: skip
        resumable = key["source"]["digest"] is not None
        partials = PartialRun(staged, key, resumable, found, create)
        if partials.resumed and partials.blocks is not None:  # the blocks it stopped in
            blocks = _resumed_blocks(partials.blocks, blocks, shape, chunks, halo, settings,
                                     request, raw.dtype.itemsize, seeding)  # fmt: skip
        partials.set_blocks(blocks.size)
        finished = _finished_blocks(blocks.boxes, partials.done, chunks, shape[1:])
        if instances_out is not None:
            create("instances", tmps[outputs.index(Path(instances_out))])
        # the seeds, kept with the partials: every block writes its own; a block an earlier run
        # finished without them (a run without objects, or one stopped before) is segmented
        # again for them alone
        seeds, unseeded = None, set()
        if seeding:

            def create_seeds(folder) -> None:
                zarr.open_array(str(folder), mode="w", shape=shape[1:], chunks=chunks,
                                dtype=np.uint8, fill_value=0)  # fmt: skip

            seeds, seeded = partials.seeds(split_fit, create_seeds)
            unseeded = finished - _finished_blocks(blocks.boxes, seeded, chunks, shape[1:])
        jobs = []
        paths = (str(tmps[0]), str(tmps[1]) if matte_out is not None else None)
        for i, box in enumerate(blocks.boxes):
            if i in finished and i not in unseeded:
                continue
            ext, _ = extend_box(box, halo, shape[1:])
            job = ChunkJob(box, ext, layout, chunk_request, norm,
                           (None, None) if i in finished else paths, readable,
                           str(getattr(volume, "path", "source")), i, token,
                           None if seeds is None else str(seeds), split_fit)  # fmt: skip
            region = raw if readable else layout.arrange(_raw_region(dask, raw, layout, ext))
            jobs.append((job, region))
        tasks = [
            dask.delayed(segment_chunk, pure=False)(
                job, region,
                dask_key_name=f"pacseg-{'seeds' if job.outputs[0] is None else 'chunk'}-{token}-{job.index}",
            )
            for job, region in jobs
        ]  # fmt: skip
        sizes = [math.prod(b - a for a, b in box) for box in blocks.boxes]
        voxels = _VoxelProgress(progress, sizes)
        voxels.skip(finished - unseeded)  # an earlier run's blocks count as done from the start
        _RELAYS[token] = voxels.part

        def block_done(index: int, seeds_only: bool = False) -> None:
            if not seeds_only:  # a finished block is in the record already
                partials.mark(blocks.boxes[index])  # before the progress, which may interrupt
            if seeds is not None:
                partials.mark_seeds(blocks.boxes[index])
            voxels.finish(index)

        voxels.start()
        timings: dict[str, float] = {}
        for t in _run(dask, kind, client, tasks, futures, block_done) if tasks else ():
            for k, v in t.items():
                timings[k] = timings.get(k, 0.0) + v
        timings["segment_total"] = timings.pop("total", 0.0)
        n_objects = 0
        if objects is not None:
            t0 = time.perf_counter()
            scratch = temporary_sibling(instances_out)
            tmps.append(scratch)  # removed in the finally below
            zarr.open_array(str(scratch), mode="w", shape=shape[1:], chunks=chunks,
                            dtype=np.int64, fill_value=0)  # fmt: skip

            def run(tasks):
                mine: list = []  # _run waits on every future of its list: only this pass's
                try:
                    return list(_run(dask, kind, client, tasks, mine, None))
                finally:
                    futures.extend(mine)  # cancelled below if the call fails

            measure = None
            if objects_out is not None:
                names = tuple(c.name for c in model.config.classes)
                measure = Measure(raw, layout, str(getattr(volume, "path", "source")),
                                  str(tmps[0]), names, shape[0])  # fmt: skip
            bright = None
            if objects.brightness_weight != 0 or boundary is not None:
                bright = Brightness(raw, layout, str(getattr(volume, "path", "source")),
                                    tuple(norm[0]), tuple(norm[1]))  # fmt: skip
            ids_tmp = tmps[outputs.index(Path(instances_out))]
            arrays = IdArrays(str(tmps[0]), str(ids_tmp), str(scratch),
                              None if seeds is None else str(seeds))  # fmt: skip
            if boundary is None:
                n_objects, table = instances_pass(run, arrays, boxes, spacing, objects, token,
                                                  measure, bright)  # fmt: skip
            else:  # cells from a boundary class
                n_objects, table, sums = cells_pass(run, arrays, boxes, spacing, objects,
                                                    token, boundary, measure, bright)  # fmt: skip
                # the labels' boundary class where the cells meet, as segment() draws it
                labels_pass(run, arrays, boxes, spacing, objects, token, boundary,
                            len(model.config.classes), n_objects, bright, sums,
                            partials.rewriting)  # fmt: skip
            if table is not None:
                write_bytes(tmps[outputs.index(Path(objects_out))], table_csv(table).encode())
            timings["instances"] = time.perf_counter() - t0
        partials.publish(overwrite)  # each partial renamed into place, then its record removed
        for tmp, out in zip(tmps[len(staged) :], outputs[len(staged) :]):
            move_into_place(tmp, out, overwrite)
        succeeded = True
    except OSError as err:  # a full disk, the file-size limit: one line naming the output
        written = Path(err.filename or "")
        out = next((o for t, o in zip(tmps, outputs) if t == written or t in written.parents),
                   None)  # fmt: skip
        names = None if out is not None else " or ".join(o.name for o in outputs)
        described = write_error(err, out or outputs[0], names)
        if described is None:
            raise
        raise described from err
    finally:
        _RELAYS.pop(token, None)
        if futures:
            client.cancel(futures)
        if owned:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
        if partials is not None and not succeeded:
            # kept for a rerun to resume when it can (a source on disk, a block finished)
            partials.release(keep=partials.resumable and bool(partials.done))
        for tmp in tmps[len(staged) :]:  # the instance outputs and their scratch
            remove(tmp)
    timings["range"] = t_range
    timings["total"] = time.perf_counter() - start
    return ZarrResult(
        labels=outputs[0],
        matte=Path(matte_out) if matte_out is not None else None,
        shape=tuple(shape),
        chunks=chunks,
        n_chunks=len(boxes),
        spacing=spacing,
        spacing_source=spacing_source,
        halo=halo,
        timings=timings,
        instances=Path(instances_out) if instances_out is not None else None,
        objects=Path(objects_out) if objects_out is not None else None,
        n_objects=n_objects,
        blocks=blocks.size,
        n_blocks=len(blocks.boxes),
        memory=blocks.budget,
        task_memory=blocks.task_bytes,
        resumed_blocks=len(finished),
    )


def _blocks(shape, chunks, halo, settings, request, itemsize, budget, kind, client,
            seeding: bool = False) -> Blocks:  # fmt: skip
    """``choose_blocks`` for a run: the budget given, else ``default_memory``; ``ValueError``
    (before any work) when the blocks and their halos would read the volume over
    ``MAX_REFINE_OVERLAP`` times; a warning when a given budget is below one chunk's
    estimate."""
    slots = task_slots(kind, client)
    given = budget is not None
    budget = budget if given else default_memory(kind, client, slots)

    def estimate(ext_shape):
        return task_memory(ext_shape, settings, request.model, itemsize, request.tile_shape,
                           seeding)  # fmt: skip

    blocks = choose_blocks(shape[1:], chunks, halo, settings, budget, slots, estimate,
                           request.tile_shape)  # fmt: skip
    try:
        check_overlap(blocks.boxes, halo, shape[1:], "work blocks")
    except ValueError as err:
        raise ValueError(
            f"{err} (a larger memory budget makes larger blocks: memory=, --memory)"
        ) from None
    if blocks.over and given:
        warnings.warn(
            f"memory {describe_bytes(budget)}: one chunk {tuple(chunks)} with its halo {halo} "
            f"needs about {describe_bytes(blocks.task_bytes)}; running one chunk per work block "
            "(smaller chunks stay within the budget)",
            stacklevel=3,
        )
    return blocks


def _resumed_blocks(size, blocks: Blocks, shape, chunks, halo, settings, request,
                    itemsize, seeding: bool = False) -> Blocks:  # fmt: skip
    """The blocks of ``size`` chunks per axis (those a resumed run's partial was written in),
    in place of the ``blocks`` chosen now, when their largest task stays within the same budget
    and their halos pass ``check_overlap``; else ``blocks``."""
    try:
        size = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        return blocks
    if size == tuple(blocks.size) or len(size) != 3 or min(size) < 1:
        return blocks
    boxes = split_box(whole(shape[1:]), tuple(b * c for b, c in zip(size, chunks)))
    exts = [extend_box(box, halo, shape[1:])[0] for box in boxes]
    largest = [max(e[a][1] - e[a][0] for e in exts) for a in range(3)]
    task_bytes = task_memory(largest, settings, request.model, itemsize, request.tile_shape,
                             seeding)  # fmt: skip
    if task_bytes > max(blocks.budget, blocks.task_bytes):  # beyond what the run allows now
        return blocks
    try:
        check_overlap(boxes, halo, shape[1:], "work blocks")
    except ValueError:
        return blocks
    return Blocks(size, boxes, task_bytes, blocks.budget, blocks.over)


def _finished_blocks(boxes, done, chunks, shape) -> set[int]:
    """The indices of ``boxes`` (work blocks, ``(z, y, x)`` ranges) whose every storage chunk
    lies in one of the ``done`` boxes (the finished blocks of a partial, in any block
    layout)."""
    if not done:
        return set()

    def chunk_ranges(box):  # the chunks a box covers whole (the volume's last chunk: to the end)
        return [range(-(-a // c), b // c if b < n else -(-n // c))
                for (a, b), c, n in zip(box, chunks, shape)]  # fmt: skip

    have = set()
    for box in done:
        have.update(itertools.product(*chunk_ranges(box)))
    return {i for i, box in enumerate(boxes)
            if all(c in have for c in itertools.product(*chunk_ranges(box)))}  # fmt: skip


def _run_key(inputs, readable, raw, layout: Layout, request: SegmentRequest, shape, chunks,
             halo, norm, roles) -> dict:  # fmt: skip
    """What a partial's record must hold for a run to resume it (JSON data): the source's
    content digest (``input_digest`` of each zarr folder it reads; None for a source not on
    disk, which never resumes), dtype, raw shape and layout; the model's weights digest; the
    blocks' ``request`` (every field: refinement, label rule, tile shape, spacing, device,
    precision, and the head's dtype that precision gives here); the ``(C, D, H,
    W)`` shape, storage chunks, halo, the whole volume's normalisation ``(lo, hi, noise)``, the
    outputs the blocks write (``roles``) and the versions that compute them."""
    digest = None
    paths = [Path(p) for p in inputs]
    if readable and paths and all(p.is_dir() for p in paths):
        try:
            digest = [input_digest(p) for p in paths]
        except OSError:
            digest = None
    # every field of the request but the model (its digest) and the objects (redone on resume)
    params = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)
              if f.name not in ("model", "instances")}  # fmt: skip
    for name, value in params.items():
        params[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    params["head_dtype"] = str(request.head_dtype)  # "auto" precision as this machine takes it
    return {
        "source": {"digest": digest, "dtype": str(raw.dtype), "raw_shape": list(raw.shape),
                   "layout": dataclasses.asdict(layout)},
        "model": weights_digest(request.model),
        "request": params,
        "shape": list(shape),
        "chunks": list(chunks),
        "halo": list(halo),
        "normalisation": {"lo": norm[0], "hi": norm[1], "noise": norm[2]},
        "outputs": list(roles),
        "versions": {"napari-pacseg": __version__, "torch": torch.__version__},
    }  # fmt: skip


def _raw_region(dask, raw, layout: Layout, ext):
    """Lazy raw-order region of a non-zarr source (a dask or numpy array) for one task."""
    sel = layout.selection(ext)
    if isinstance(raw, np.ndarray):
        return raw[sel]
    return dask.array.asarray(raw)[sel]


def _run(dask, kind, client, tasks, futures, on_done=None):
    """Run the tasks; yield each one's result as it finishes. ``on_done(index)`` in this
    process as each block task (key ``pacseg-chunk-<token>-<index>``) finishes, and
    ``on_done(index, True)`` as a block's seeds-only task (``pacseg-seeds-...``) does."""

    def done(key) -> None:
        if on_done is None or not isinstance(key, str):
            return
        if key.startswith("pacseg-chunk-"):
            on_done(int(key.rsplit("-", 1)[1]))
        elif key.startswith("pacseg-seeds-"):  # a finished block segmented for its seeds alone
            on_done(int(key.rsplit("-", 1)[1]), True)

    if kind == "distributed":
        from distributed import as_completed

        futures.extend(client.compute(tasks))
        for fut in as_completed(futures, loop=client.loop):
            result = fut.result()
            done(fut.key)
            yield result
        return
    from dask.callbacks import Callback

    def posttask(key, result, dsk, state, worker_id):
        done(key)

    with Callback(posttask=posttask):
        results = dask.compute(*tasks, scheduler=client)
    yield from results
