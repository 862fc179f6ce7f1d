"""Out-of-core segmentation of zarr volumes with dask: ``segment_zarr``.

The volume is cut into chunks; each chunk is segmented by ``segment()`` on the chunk plus a halo
of ``receptive_field`` voxels (clipped at the volume's edges), with the whole volume's intensity
range, and only the chunk's core is kept: the same overlap-and-trim as
``dask.array.map_overlap(depth=receptive_field, boundary="none")``, except that each task reads
its haloed region straight from the zarr store, so no ghost cells travel between workers and a
task needs nothing but the store and the model. The results are written chunk by chunk into zarr
arrays under temporary names (each task writes whole output chunks: an idempotent write, so a
retried task rewrites the same bytes) and renamed into place only when every chunk is done.
Memory is bounded by the chunk size, whatever the volume size.

``segment_files`` runs a list of files, folders or globs (TIFF, NPY, zarr) for the ``pacseg``
command: outputs next to each other in one folder, a JSON record per input written last.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checks import check_spacing
from .classes import DEFAULT_THRESHOLD, check_output_rule
from .engine import extend_box, refine_params
from .model import PacSegModel, volume_intensity_range
from .model_io import config_from_dict, config_to_dict, load_model
from .pipeline import receptive_field, segment
from .volume_io import (
    INSTALL_HINT,
    Layout,
    Volume,
    VolumeError,
    describe_bad_chunk,
    is_zarr_path,
    layout_from_axes,
    move_into_place,
    open_zarr,
    read_region,
    read_volume,
    remove,
    remove_stale_temporaries,
    stem,
    temporary_sibling,
    volume_kind,
    write_json,
    write_npy,
    write_tiff,
)

# Default chunk (z, y, x): ~4 M voxels, so a task (chunk + halo, the features of one tile, the
# logits of the chunk) stays within a few hundred MiB and the halo adds ~2x work at most for the
# demo model's receptive field of (13, 30, 30).
DEFAULT_CHUNKS = (64, 256, 256)
LOCAL_SCHEDULERS = ("synchronous", "sync", "threads", "threading")


def _dask():
    try:
        import dask
        import dask.array
    except ImportError as err:
        raise ImportError(f"segment_zarr needs dask and zarr: {INSTALL_HINT}") from err
    return dask


# --- the model, shipped to workers as plain data ------------------------------------------------


@dataclass(frozen=True)
class ModelPayload:
    """A model as JSON config + float32 arrays: what travels to dask workers. Workers rebuild it
    through the same checked ``config_from_dict`` as ``load_model``; no code is pickled."""

    config: dict
    tensors: dict[str, np.ndarray]
    digest: str

    @classmethod
    def of(cls, model: PacSegModel) -> ModelPayload:
        config = config_to_dict(model.config)
        tensors = {
            k: v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in sorted(model.state_dict().items())
        }
        h = hashlib.sha256(repr(sorted(config.items())).encode())
        for k, v in tensors.items():
            h.update(k.encode())
            h.update(v.tobytes())
        return cls(config, tensors, h.hexdigest())


_MODELS: dict[str, PacSegModel] = {}
_MODELS_LOCK = threading.Lock()


def _model_from(payload: ModelPayload) -> PacSegModel:
    """The payload's model, built once per process."""
    with _MODELS_LOCK:
        model = _MODELS.get(payload.digest)
        if model is None:
            model = PacSegModel(config_from_dict(payload.config))
            model.load_state_dict({k: torch.from_numpy(v) for k, v in payload.tensors.items()})
            model.eval()
            _MODELS.clear()  # one model per process at a time
            _MODELS[payload.digest] = model
        return model


# --- one chunk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkJob:
    """Everything a worker needs for one chunk (all plain, picklable data)."""

    box: tuple[tuple[int, int], ...]  # the chunk's core, (z, y, x) ranges
    ext: tuple[tuple[int, int], ...]  # core + halo, clipped to the volume
    layout: Layout
    model: ModelPayload
    spacing: tuple[float, float, float]
    refine: object
    device: str
    tile_shape: tuple[int, int, int] | None
    threshold: float
    intensity_range: tuple[list[float], list[float]]
    labels_path: str
    matte_path: str | None
    read_here: bool  # source is the zarr array to read ``ext`` from, else the region itself
    source_name: str  # the input, for messages


def _segment_chunk(job: _ChunkJob, source) -> dict[str, float]:
    """Segment one chunk and write its core into the output stores. ``source`` is the raw
    zarr array (the region is read here) or the region itself, ``(C, d, h, w)``."""
    import zarr

    region = (
        read_region(source, job.layout, job.ext, job.source_name)
        if job.read_here
        else np.asarray(source)
    )
    seg = segment(
        region,
        _model_from(job.model),
        spacing=job.spacing,
        channel_axis=0,
        refine=job.refine,
        device=job.device,
        tile_shape=job.tile_shape,
        intensity_range=job.intensity_range,
        threshold=job.threshold,
    )
    core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(job.box, job.ext))
    where = tuple(slice(a, b) for a, b in job.box)
    zarr.open_array(job.labels_path, mode="r+")[where] = seg.labels[core]
    if job.matte_path is not None:
        zarr.open_array(job.matte_path, mode="r+")[where] = seg.matte[core]
    return seg.timings


# --- the whole volume -----------------------------------------------------------------------------


@dataclass
class ZarrResult:
    """What ``segment_zarr`` wrote.

    labels : path of the ``(D, H, W)`` uint8 zarr array. matte : path of the float32 one, or None.
    shape : ``(C, D, H, W)`` of the input. chunks : ``(z, y, x)`` chunk (= output zarr chunk).
    spacing : ``(z, y, x)`` used; spacing_source : "argument", the file's metadata or "model".
    halo : ``receptive_field`` used. timings : seconds per ``segment`` stage summed over chunks,
    plus ``range`` (the volume's intensity range) and ``total`` (wall time of the call).
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


def _open_source(source, channel_axis):
    """``(raw, layout, volume-or-None, readable_in_task)`` of a path, Volume, zarr or dask array."""
    if isinstance(source, (str, os.PathLike)):
        source = open_zarr(source, channel_axis)
    if isinstance(source, Volume):
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


def _scheduler(scheduler, workers):
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
            dashboard_address=None,
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


def _resolve_spacing(spacing, volume, model) -> tuple[tuple[float, float, float], str]:
    if spacing is not None:
        return check_spacing(spacing, None), "argument"
    if volume is not None and volume.spacing_problem:
        raise VolumeError(
            f"{volume.path}: {volume.spacing_problem}; give the voxel size (--spacing Z Y X, or "
            "spacing=...)"
        )
    if volume is not None and volume.spacing is not None:
        return volume.spacing, volume.spacing_source
    return check_spacing(None, model.config.spacing), "model"


def source_paths(source) -> list[Path]:
    """The files or folders on this machine that ``source`` reads from: a path, a ``Volume``, a
    ``zarr.Array`` (its store's folder + the array's path), a ``np.memmap``, or a dask array
    (the zarr arrays and memmaps its graph holds). Empty for in-memory data."""
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    if isinstance(source, Volume):
        return [source.path]
    if isinstance(source, np.memmap):
        return [Path(source.filename)] if source.filename else []
    graph = getattr(source, "__dask_graph__", None)
    if callable(graph):
        found: list[Path] = []
        for value in dict(graph()).values():  # from_array / from_zarr keep the array as a value
            value = getattr(value, "value", value)  # dask's DataNode wrapper
            if not callable(getattr(value, "__dask_graph__", None)):
                found += source_paths(value)
        return found
    store = getattr(source, "store", None)
    if store is not None and hasattr(source, "shape"):  # a zarr.Array (v2 or v3)
        root = getattr(store, "root", None) or getattr(store, "path", None)
        if not isinstance(root, (str, os.PathLike)) or "://" in str(root):
            return []  # in memory, or a remote store
        return [Path(root) / str(getattr(source, "path", "") or "")]
    return []


def check_not_input(output, inputs) -> None:
    """``ValueError`` when ``output`` is, contains or lies inside one of ``inputs``."""
    out = Path(output).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp or inp in out.parents or out in inp.parents:
            raise ValueError(
                f"output {output} would overwrite the input {inp}; choose another output"
            )


def segment_zarr(
    source,
    model: PacSegModel,
    labels_out,
    matte_out=None,
    *,
    spacing=None,
    channel_axis: int | None = None,
    refine=True,
    chunks=None,
    device="auto",
    tile_shape=None,
    scheduler=None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> ZarrResult:
    """Segment a volume larger than memory, chunk by chunk, into zarr arrays.

    Results equal ``segment()`` on the whole volume loaded in memory (each chunk is extended by
    ``receptive_field(model, spacing, refine)`` and normalised with the whole volume's
    ``volume_intensity_range``); peak memory per task is bounded by the chunk size.

    Parameters
    ----------
    source : path of a zarr array or OME-Zarr image (level 0, spacing from its metadata), a
        ``Volume`` from ``volume_io``, a ``zarr.Array`` or a ``dask.array.Array``; 3D
        ``(D, H, W)`` or 4D with ``channel_axis``, any numeric dtype.
    model : PacSegModel (sent to workers as config + weights, rebuilt there with the checks
        of ``load_model``).
    labels_out : path of the ``(D, H, W)`` uint8 zarr array to write (0 background, class
        index + 1 otherwise). matte_out : path of the ``(D, H, W)`` float32 matte array
        (1 - P(background)), or None to skip it. Both are written under temporary names in
        their folders and renamed into place when every chunk is done; neither may be or
        contain the input.
    spacing : ``(z, y, x)`` voxel size in the model's units; default: the OME-Zarr metadata,
        else the model's training spacing.
    refine : True (model defaults), False, or a dict of ``RefineConfig`` overrides.
    chunks : ``(z, y, x)`` chunk of work and of the outputs (default ``DEFAULT_CHUNKS``,
        clipped to the volume); multiples of ``model.grid``.
    device, tile_shape : as in ``segment``, for each chunk (on the workers).
    scheduler : None or "synchronous" (default: one chunk at a time in this process, torch
        using its threads), "threads" (dask's thread pool), the address of a dask.distributed
        scheduler ("tcp://host:8786"), or a ``distributed.Client``.
    workers : start a ``LocalCluster`` of this many single-threaded worker processes for the
        call (scripts that use it need an ``if __name__ == "__main__":`` guard).
    overwrite : replace existing outputs (else ``FileExistsError`` before any work).
    progress : called as ``progress(done_chunks, total_chunks)`` in this process.
    threshold : the label rule's matte threshold (``classes.labels_from_probabilities``).

    Returns
    -------
    ZarrResult
    """
    dask = _dask()
    import zarr

    start = time.perf_counter()
    raw, layout, volume, readable = _open_source(source, channel_axis)
    outputs = [Path(p) for p in (labels_out, matte_out) if p is not None]
    inputs = source_paths(volume if volume is not None else raw)
    for out in outputs:  # also with overwrite=True: an input is never replaced
        check_not_input(out, inputs)
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError("labels_out and matte_out must be different paths")
    for out in outputs:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    shape = layout.shape(raw.shape)
    if shape[0] != model.config.in_channels:
        raise ValueError(
            f"the volume has {shape[0]} channel(s) (shape {shape}) but the model expects "
            f"{model.config.in_channels}; pass channel_axis for a multichannel volume"
        )
    spacing, spacing_source = _resolve_spacing(spacing, volume, model)
    refine_params(model, refine)  # checks the overrides before any work
    threshold, _ = check_output_rule(threshold, 0, model.config.n_classes)
    chunks = _check_chunks(chunks, shape[1:], model.grid)
    halo = receptive_field(model, spacing, refine)
    kind, client, owned = _scheduler(scheduler, workers)
    for out in outputs:
        remove_stale_temporaries(out)
    tmps = [temporary_sibling(p) for p in outputs]
    futures = []
    try:
        t0 = time.perf_counter()
        view = (
            dask.array.from_array(raw, chunks=raw.chunks) if readable else dask.array.asarray(raw)
        )
        view = layout.arrange(view[layout.selection([(0, n) for n in shape[1:]])])
        try:
            with dask.config.set(scheduler=client):
                lo, hi = volume_intensity_range(view)
        except (MemoryError, KeyboardInterrupt, ValueError):  # ValueError: values out of range
            raise
        except Exception as err:  # a damaged chunk: name it and the file
            where = str(getattr(volume, "path", "the source"))
            raise VolumeError(
                f"{where}: {describe_bad_chunk(raw, (slice(None),) * raw.ndim, err)}"
            ) from err
        rng = (lo.flatten().tolist(), hi.flatten().tolist())
        t_range = time.perf_counter() - t0
        attrs = {"spacing": list(spacing), "source": str(getattr(volume, "path", "array"))}
        for tmp, (dtype, what) in zip(tmps, [(np.uint8, "labels"), (np.float32, "matte")]):
            arr = zarr.open_array(
                str(tmp), mode="w", shape=shape[1:], chunks=chunks, dtype=dtype, fill_value=0
            )
            arr.attrs.update({"napari_pacseg": {**attrs, "content": what}})
        payload = ModelPayload.of(model)
        jobs = []
        grid = [range(0, n, c) for n, c in zip(shape[1:], chunks)]
        for origin in itertools.product(*grid):
            box = tuple((a, min(a + c, n)) for a, c, n in zip(origin, chunks, shape[1:]))
            ext, _ = extend_box(box, halo, shape[1:])
            job = _ChunkJob(box, ext, layout, payload, spacing, refine, str(device),
                            None if tile_shape is None else tuple(tile_shape), threshold, rng,
                            str(tmps[0]), str(tmps[1]) if len(tmps) > 1 else None,
                            readable, str(getattr(volume, "path", "source")))  # fmt: skip
            region = raw if readable else layout.arrange(_raw_region(dask, raw, layout, ext))
            jobs.append((job, region))
        token = payload.digest[:8] + os.urandom(4).hex()
        tasks = [
            dask.delayed(_segment_chunk, pure=False)(job, region, dask_key_name=f"pacseg-chunk-{token}-{i}")
            for i, (job, region) in enumerate(jobs)
        ]  # fmt: skip
        timings: dict[str, float] = {}
        for t in _run(dask, kind, client, tasks, futures, progress):
            for k, v in t.items():
                timings[k] = timings.get(k, 0.0) + v
        timings["segment_total"] = timings.pop("total", 0.0)
        for tmp, out in zip(tmps, outputs):
            move_into_place(tmp, out, overwrite)
    finally:
        if futures:
            client.cancel(futures)
        if owned:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
        for tmp in tmps:
            remove(tmp)
    timings["range"] = t_range
    timings["total"] = time.perf_counter() - start
    return ZarrResult(
        labels=outputs[0],
        matte=outputs[1] if len(outputs) > 1 else None,
        shape=tuple(shape),
        chunks=chunks,
        n_chunks=len(jobs),
        spacing=spacing,
        spacing_source=spacing_source,
        halo=halo,
        timings=timings,
    )


def _raw_region(dask, raw, layout: Layout, ext):
    """Lazy raw-order region of a non-zarr source (a dask or numpy array) for one task."""
    sel = layout.selection(ext)
    if isinstance(raw, np.ndarray):
        return raw[sel]
    return dask.array.asarray(raw)[sel]


def _run(dask, kind, client, tasks, futures, progress):
    """Run the chunk tasks; yield each one's timings as it finishes (progress in this process)."""
    total = len(tasks)
    if progress is not None:
        progress(0, total)
    if kind == "distributed":
        from distributed import as_completed

        futures.extend(client.compute(tasks))
        for done, fut in enumerate(as_completed(futures, loop=client.loop), 1):
            yield fut.result()
            if progress is not None:
                progress(done, total)
        return
    from dask.callbacks import Callback

    count = [0]

    def posttask(key, result, dsk, state, worker_id):
        if isinstance(key, str) and key.startswith("pacseg-chunk-"):
            count[0] += 1
            if progress is not None:
                progress(count[0], total)

    with Callback(posttask=posttask):
        results = dask.compute(*tasks, scheduler=client)
    yield from results


# --- batches of files -------------------------------------------------------------------------

RECORD_FORMAT = "napari-pacseg-result"
OUTPUT_SUFFIX = {"tiff": ".tif", "npy": ".npy", "zarr": ".zarr"}
GLOB_CHARS = set("*?[")


@dataclass
class FileResult:
    """The outcome for one input of ``segment_files``.

    status : "done", "skipped" (a complete output exists: its record is there) or "failed".
    message : one line: the reason for a failure or a skip, else a summary.
    outputs : the labels and matte paths written. record : the JSON record's path.
    seconds : wall time spent on this input.
    """

    input: Path
    status: str
    message: str = ""
    outputs: tuple[Path, ...] = ()
    record: Path | None = None
    seconds: float = 0.0


def output_paths(path, outdir) -> dict[str, Path]:
    """``labels``, ``matte`` and ``record`` paths of an input: ``<stem>_labels.<ext>``,
    ``<stem>_matte.<ext>`` (``ext`` follows the input: .tif, .npy or .zarr) and
    ``<stem>_pacseg.json`` in ``outdir``."""
    outdir, name = Path(outdir), stem(path)
    ext = OUTPUT_SUFFIX.get(volume_kind(path) or "tiff", ".tif")
    return {
        "labels": outdir / f"{name}_labels{ext}",
        "matte": outdir / f"{name}_matte{ext}",
        "record": outdir / f"{name}_pacseg.json",
    }


OUTPUT_KINDS = ("_labels", "_matte", "_instances")


def read_record(path) -> dict | None:
    """A ``<stem>_pacseg.json`` record of ours as a dict, or None when ``path`` is missing, not
    JSON, or not a record written by pacseg."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if not isinstance(record.get("input"), str) or not isinstance(record.get("outputs"), dict):
        return None
    return record


def _is_output(path: Path) -> bool:
    """A ``*_labels.*`` / ``*_matte.*`` / ``*_instances.*`` name that the ``*_pacseg.json``
    record beside it lists as an output (complete or not)."""
    name = stem(path)
    for suffix in OUTPUT_KINDS:
        if name.endswith(suffix):
            record = read_record(path.parent / f"{name[: -len(suffix)]}_pacseg.json")
            return record is not None and path.name in record["outputs"].values()
    return False


def _exists(path: Path) -> bool:
    """``path.exists()`` that is False for a symlink loop or an unreadable path, not an error."""
    try:
        return path.exists()
    except OSError:
        return False


def expand_inputs(inputs) -> list[tuple[Path, str]]:
    """Files, zarr folders, plain folders (their volumes, not recursive, skipping hidden names
    and this tool's outputs) and glob patterns -> ``[(path, problem)]`` in order, without
    repeats; ``problem`` is "" or why the entry cannot be segmented.

    What a folder or a pattern finds is not taken as an input when it is a pacseg output: one
    that a record lists, or one named as an output of another volume found (``x_labels.npy``
    beside ``x.npy``), so a run whose output folder is its input folder resumes cleanly."""
    entries: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if not _exists(path) and GLOB_CHARS & set(str(item)):
            matches = [Path(m) for m in sorted(glob.glob(str(item)))]
            found = _volumes(matches)
            entries += [(m, "") for m in found] or [(path, "the pattern matches no volume")]
        elif path.is_symlink() and not _exists(path):
            entries.append((path, "a broken symbolic link (or a link loop)"))
        elif _exists(path) and path.is_dir() and not is_zarr_path(path):
            try:
                children = sorted(path.iterdir())
            except OSError as err:
                entries.append((path, f"cannot list the folder ({err.strerror or err})"))
                continue
            found = _volumes([c for c in children if not c.name.startswith(".")])
            entries += [(c, "") for c in found] or [
                (path, "the folder holds no TIFF, NPY or zarr volume")
            ]
        elif not _exists(path):
            entries.append((path, "no such file or folder"))
        elif volume_kind(path) is None:
            entries.append(
                (path, "unknown format: use .tif/.tiff, .npy, or a zarr/OME-Zarr folder")
            )
        else:
            entries.append((path, ""))
    seen, unique = set(), []
    for path, problem in entries:
        try:
            key = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            key, problem = path.absolute(), problem or "a symbolic link loop"
        if key not in seen:
            seen.add(key)
            unique.append((path, problem))
    return unique


def _volumes(paths) -> list[Path]:
    """The volumes among ``paths`` that are not outputs of pacseg or of one another."""
    found = []
    for p in paths:
        try:
            if _exists(p) and volume_kind(p) and not _is_output(p):
                found.append(p)
        except OSError:  # unreadable, or a link loop inside the folder
            continue
    names = {
        (p.parent, f"{stem(p)}{kind}{OUTPUT_SUFFIX.get(volume_kind(p) or 'tiff', '.tif')}")
        for p in found
        for kind in OUTPUT_KINDS
    }
    return [p for p in found if (p.parent, p.name) not in names]


def _check_outputs(entries, outdir) -> None:
    """``ValueError`` when two inputs would write the same outputs, or an output is an input."""
    owner: dict[Path, Path] = {}
    inputs = [p for p, problem in entries if not problem]
    for path in inputs:
        for out in output_paths(path, outdir).values():
            key = out.resolve()
            if key in owner:
                raise ValueError(
                    f"{owner[key]} and {path} would both write {out.name}; rename one of them "
                    "or segment them into different output folders"
                )
            owner[key] = path
            check_not_input(out, inputs)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of what computed a result: napari-pacseg, torch, numpy, python (+ io libs)."""
    import platform
    import sys

    from . import __version__

    out = {"napari-pacseg": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}  # fmt: skip
    for name in ("dask", "distributed", "zarr", "tifffile"):
        if name in sys.modules:
            out[name] = getattr(sys.modules[name], "__version__", "unknown")
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError):
        text = "out of memory; convert the volume to zarr and segment it in chunks"
    elif not isinstance(err, (ValueError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text[:500]


def iter_segment_files(
    inputs,
    model,
    outdir,
    *,
    spacing=None,
    channel_axis: int | None = None,
    refine=True,
    device="auto",
    tile_shape=None,
    chunks=None,
    scheduler=None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, Path, int, int], None] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
):
    """Like ``segment_files``, yielding each input's ``FileResult`` as soon as it is finished."""
    if isinstance(model, (str, os.PathLike)):
        model_info = {"path": str(Path(model).resolve()), "sha256": sha256_file(model)}
        model = load_model(model)
    else:
        model_info = {"path": None, "sha256": None}
    model_info["weights_sha256"] = ModelPayload.of(model).digest
    model_info["classes"] = [c.name for c in model.config.classes]
    params = refine_params(model, refine)  # checks overrides before any work
    threshold, _ = check_output_rule(threshold, 0, model.config.n_classes)
    entries = expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"output folder {outdir} is a file; give a folder")
    _check_outputs(entries, outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the output folder {outdir} ({err.strerror or err}); give a folder "
            "you can write to"
        ) from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise ValueError(
            f"the output folder {outdir} is not writable; give a folder you can write to"
        )
    common = {
        "refine": False if params is None else dataclasses.asdict(params),
        "channel_axis": channel_axis,
        "device": str(device),
        "tile_shape": None if tile_shape is None else list(tile_shape),
        "threshold": threshold,
    }
    run = _FileRun(model, model_info, common, spacing, refine, device, tile_shape, chunks,
                   scheduler, workers, overwrite, progress, len(entries))  # fmt: skip
    try:
        for index, (path, problem) in enumerate(entries):
            yield run.one(index, path, problem, output_paths(path, outdir))
    finally:
        run.close()


def segment_files(inputs, model, outdir, **kwargs) -> list[FileResult]:
    """Segment files, folders or glob patterns of volumes into ``outdir``, one by one.

    Per input: ``<stem>_labels.<ext>`` (uint8 classes), ``<stem>_matte.<ext>`` (float32
    1 - P(background)) and, written last, ``<stem>_pacseg.json`` (input, outputs, model path and
    sha256, parameters, spacing and its source, versions, timings). The record marks a complete
    output: an input whose record exists is skipped unless ``overwrite`` (so rerunning after a
    crash or Ctrl-C resumes); without a record, leftover outputs are incomplete and redone.
    TIFF inputs give ImageJ TIFFs (with the spacing), NPY inputs NPY files, both via ``segment``
    in memory; zarr and OME-Zarr inputs give zarr arrays via ``segment_zarr``.

    Parameters
    ----------
    inputs : a path or pattern, or a list of them: files (.tif, .tiff, .npy), zarr/OME-Zarr
        folders, plain folders (their volumes, not recursive) or glob patterns.
    model : PacSegModel, or the path of a model file (loaded with ``load_model``; its sha256
        goes into the records).
    outdir : output folder (created). An output that would be one of the inputs is refused
        (``ValueError`` before any work), as are two inputs with the same output names.
    spacing, channel_axis, refine, device, tile_shape : as in ``segment`` (``spacing`` default:
        the file's metadata, else the model's). channel_axis is the raw axis in the file.
    chunks, scheduler, workers : as in ``segment_zarr``, for zarr inputs only; a cluster from
        ``workers`` is started once, at the first zarr input, for all of them.
    overwrite : redo inputs whose complete output exists.
    threshold : the label rule's matte threshold (``classes.labels_from_probabilities``).
    progress : ``progress(index, n_inputs, path, done, total)``, over tiles (in-memory inputs)
        or chunks (zarr inputs); ``done == 0`` when an input starts.

    Returns
    -------
    list of FileResult, in input order. Failures (unreadable file, wrong channels, ...) are
    recorded there and do not stop the other inputs; KeyboardInterrupt does (outputs being
    written are removed, finished ones kept).
    """
    return list(iter_segment_files(inputs, model, outdir, **kwargs))


class _FileRun:
    """The state of one ``segment_files`` call: the model, options and a lazily started client."""

    def __init__(self, model, model_info, common, spacing, refine, device, tile_shape, chunks,
                 scheduler, workers, overwrite, progress, n) -> None:  # fmt: skip
        self.model, self.model_info, self.common = model, model_info, common
        self.spacing, self.refine, self.device, self.tile_shape = (
            spacing,
            refine,
            device,
            tile_shape,
        )
        self.chunks, self.overwrite, self.progress, self.n = chunks, overwrite, progress, n
        self.scheduler_args = (scheduler, workers)
        self.client, self.owned = None, False

    def scheduler(self):
        if self.client is None:
            _, self.client, self.owned = _scheduler(*self.scheduler_args)
        return self.client

    def close(self) -> None:
        if self.owned:
            cluster = getattr(self.client, "cluster", None)
            self.client.close()
            if cluster is not None:
                cluster.close()
        self.client, self.owned = None, False

    def one(self, index: int, path: Path, problem: str, paths: dict[str, Path]) -> FileResult:
        start = time.perf_counter()
        if problem:
            return FileResult(path, "failed", problem)
        record = paths["record"]
        old = read_record(record) if _exists(record) else None
        ours = old is not None and old["input"] == str(path.resolve())
        if ours and old.get("status", "complete") == "complete" and not self.overwrite:
            return FileResult(path, "skipped", self._skip_reason(record), record=record)
        clash = self._foreign_output(paths, old if ours else None)
        if clash:
            return FileResult(path, "failed", clash)

        def tiles(done, total):
            if self.progress is not None:
                self.progress(index, self.n, path, done, total)

        tiles(0, 0)
        started = _now()
        head = {"format": RECORD_FORMAT, "version": 2, "input": str(path.resolve()),
                "outputs": {k: paths[k].name for k in ("labels", "matte")}}  # fmt: skip
        complete = False
        try:
            # First a record that claims the outputs as ours but incomplete: a run killed while
            # writing them leaves it, so the rerun knows it may replace them.
            write_json(record, {**head, "status": "incomplete", "started": started})
            details = self._segment(path, paths, tiles)
            write_json(record, {
                **head, "status": "complete", "model": self.model_info,
                "parameters": {**self.common, **details.pop("parameters")},
                **details, "versions": versions(), "started": started, "finished": _now(),
            })  # fmt: skip
            complete = True
        except Exception as err:
            message = _one_line(err).removeprefix(f"{path}: ")
            return FileResult(path, "failed", message, seconds=time.perf_counter() - start)
        finally:
            if not complete and not any(_exists(paths[k]) for k in ("labels", "matte")):
                remove(record)  # nothing of ours to claim: leave the folder as it was
        seconds = time.perf_counter() - start
        return FileResult(path, "done", f"done in {seconds:.1f} s",
                          (paths["labels"], paths["matte"]), record, seconds)  # fmt: skip

    def _foreign_output(self, paths: dict[str, Path], record: dict | None) -> str:
        """Why an existing file at one of the output paths may not be replaced ("" if none):
        only pacseg's own earlier output of this input (its record lists it) is, or anything
        with ``overwrite``."""
        if self.overwrite:
            return ""
        owned = set(record["outputs"].values()) if record is not None else set()
        for what in ("record", "labels", "matte"):
            out = paths[what]
            if not (_exists(out) or out.is_symlink()):
                continue
            if what == "record" and record is None:
                return (
                    f"{out} exists but is not pacseg's record of this input; it is left as it is: "
                    "move it away, pass --overwrite to replace it, or choose another output folder"
                )
            if what != "record" and out.name not in owned:
                return (
                    f"the {what} output {out} exists and was not written by pacseg for this "
                    "input; it is left as it is: move it away, pass --overwrite to replace it, "
                    "or choose another output folder"
                )
        return ""

    def _skip_reason(self, record: Path) -> str:
        try:
            old = json.loads(record.read_text())
            same = old["model"]["weights_sha256"] == self.model_info["weights_sha256"] and all(
                old["parameters"].get(k) == v for k, v in self.common.items() if k != "device"
            )
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        return (
            f"already done ({record.name})"
            if same
            else f"already done with another model or parameters ({record.name}); pass --overwrite to redo it"
        )

    def _segment(self, path: Path, paths: dict[str, Path], tiles) -> dict:
        volume = read_volume(path, self.common["channel_axis"])
        if volume.kind in ("zarr", "ome-zarr"):
            res = segment_zarr(
                volume, self.model, paths["labels"], paths["matte"], spacing=self.spacing,
                channel_axis=self.common["channel_axis"], refine=self.refine, chunks=self.chunks,
                threshold=self.common["threshold"],
                device=self.device, tile_shape=self.tile_shape, scheduler=self.scheduler(),
                overwrite=True, progress=tiles,
            )  # fmt: skip
            parameters = {"spacing": list(res.spacing), "spacing_source": res.spacing_source,
                          "chunks": list(res.chunks), "halo": list(res.halo)}  # fmt: skip
            return {"shape": list(res.shape), "dtype": str(volume.data.dtype),
                    "parameters": parameters, "timings": res.timings}  # fmt: skip
        spacing, source = _resolve_spacing(self.spacing, volume, self.model)
        image = volume.load()
        seg = segment(image, self.model, spacing=spacing, channel_axis=0, refine=self.refine,
                      device=self.device, tile_shape=self.tile_shape, progress=tiles,
                      threshold=self.common["threshold"])  # fmt: skip
        if volume.kind == "npy":
            write_npy(paths["labels"], seg.labels, overwrite=True)
            write_npy(paths["matte"], seg.matte, overwrite=True)
        else:
            write_tiff(paths["labels"], seg.labels, spacing, overwrite=True)
            write_tiff(paths["matte"], seg.matte, spacing, overwrite=True)
        return {"shape": list(image.shape), "dtype": str(image.dtype),
                "parameters": {"spacing": list(spacing), "spacing_source": source},
                "timings": seg.timings}  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
