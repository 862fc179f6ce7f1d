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
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_pacseg.checks import check_callable
from napari_pacseg.engine.plan import check_channels, check_overlap, extend_box, split_box, whole
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.engine.segment import ImageOptions, as_request, receptive_field, run
from napari_pacseg.instances.chunked import IdArrays, Measure, instances_pass
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
from napari_pacseg.model.normalise import image_range, volume_noise_level

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


# --- one chunk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs for one chunk (picklable: the request carries its model as
    the bytes of its model file).

    box : the chunk's core, ``(z, y, x)`` ranges. ext : the core plus the halo, clipped to the
    volume. layout : how the source's axes map to ``(C, D, H, W)``. request : the chunk's
    ``SegmentRequest`` (no objects: they have their own pass). norm : the whole volume's
    ``(lo, hi, noise_level)``, one value per channel each. outputs : the labels and matte
    (or None) zarr paths. read_here : ``segment_chunk``'s source is the zarr array to read
    ``ext`` from, else the region itself. source_name : the input, for messages.
    """

    box: tuple[tuple[int, int], ...]
    ext: tuple[tuple[int, int], ...]
    layout: Layout
    request: SegmentRequest
    norm: tuple[list[float], list[float], list[float]]
    outputs: tuple[str, str | None]
    read_here: bool
    source_name: str


def segment_chunk(job: ChunkJob, source) -> dict[str, float]:
    """Segment one chunk and write its core into the output stores. ``source`` is the raw
    zarr array (the region is read here) or the region itself, ``(C, d, h, w)``."""
    import zarr

    region = (
        read_region(source, job.layout, job.ext, job.source_name)
        if job.read_here
        else np.asarray(source)
    )
    lo, hi, noise = job.norm
    seg = run(region, job.request, ImageOptions(intensity_range=(lo, hi), noise_level=noise))
    core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(job.box, job.ext))
    where = tuple(slice(a, b) for a, b in job.box)
    labels_path, matte_path = job.outputs
    zarr.open_array(labels_path, mode="r+")[where] = seg.labels[core]
    if matte_path is not None:
        zarr.open_array(matte_path, mode="r+")[where] = seg.matte[core]
    return seg.timings


# --- the whole volume -----------------------------------------------------------------------------


@dataclass
class ZarrResult:
    """What ``segment_zarr`` wrote.

    labels : path of the ``(D, H, W)`` uint8 zarr array. matte : path of the float32 one, or None.
    shape : ``(C, D, H, W)`` of the input. chunks : ``(z, y, x)`` chunk (= output zarr chunk).
    spacing : ``(z, y, x)`` used; spacing_source : "argument", the file's metadata or "model".
    halo : ``receptive_field`` used. timings : seconds per ``segment`` stage summed over chunks,
    plus ``range`` (the volume's intensity range), ``instances`` (the instance passes) and
    ``total`` (wall time of the call). instances : path of the int32 object ids, or None;
    n_objects : how many objects (0 without ``instances``). objects : the CSV of their
    measurements, or None.
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
    """Segment a volume larger than memory, chunk by chunk, into zarr arrays.

    Results equal ``segment()`` on the whole volume loaded in memory (each chunk is extended by
    ``receptive_field(model, spacing, refine)`` and normalised with the whole volume's
    ``volume_intensity_range``); peak memory per task is bounded by the chunk size.

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
    instances_out : path of a ``(D, H, W)`` int32 zarr array of object ids to write as well
        (the same ids as ``segment(..., instances=...)`` on the whole volume: objects that
        cross chunk borders are found whole; see ``instances.chunked``), or None. Written under
        a temporary name and renamed into place with the others.
    objects_out : with ``instances_out``, the path of a CSV of the objects' measurements
        (``instances.labels.object_table``'s columns, the same rows as in memory), measured
        piece by piece on the workers; needs a zarr source (read there).
    instances : how objects are separated for ``instances_out``: True (the default with
        ``instances_out``: the model's ``InstanceConfig``), an ``InstanceConfig`` or a dict of
        overrides.

    Returns
    -------
    ZarrResult
    """
    dask = _dask()
    import zarr

    start = time.perf_counter()
    check_callable(progress, "segment_zarr: progress", "progress(done_chunks, total_chunks)")
    if instances_out is not None and instances is False and not isinstance(model, SegmentRequest):
        instances = True  # objects asked for by their output path: the model's defaults
    request = as_request(
        model, spacing=spacing, channel_axis=channel_axis, refine=refine, device=device,
        tile_shape=tile_shape, threshold=threshold, instances=instances,
    )  # fmt: skip
    model = request.model
    if model.config.ndim == 2:
        raise ValueError(
            "segment_zarr runs volume models chunk by chunk; this is a 2D model (of 2D images): "
            "load the image (np.asarray) and call segment(), with frame_axis for a stack of frames"
        )
    objects = None
    if instances_out is not None:
        objects = request.instances or request.model.config.instances
    raw, layout, volume, readable = _open_source(source, request.channel_axis)
    if objects_out is not None and (instances_out is None or not readable):
        raise ValueError(
            "objects_out needs instances_out=PATH and a zarr source (path, ImageFile or zarr.Array)"
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
    shape = layout.shape(raw.shape)
    check_channels(shape, model, request.channel_axis)
    spacing, spacing_source = resolve_spacing(request.spacing, volume, model.config.spacing)
    # the chunks' request: regions arrive as (C, D, H, W); objects have a pass of their own
    chunk_request = request.replace(spacing=spacing, channel_axis=0, instances=None)
    chunks = _check_chunks(chunks, shape[1:], model.grid)
    halo = receptive_field(model, spacing, request.refine)
    boxes = split_box(whole(shape[1:]), chunks)
    check_overlap(boxes, halo, shape[1:], "chunks")  # before any work: chunks + halo
    kind, client, owned = open_scheduler(scheduler, workers)
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
                lo, hi = image_range(view, model.config.normalisation)
                noise = volume_noise_level(view, lo, hi).tolist()
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
        kinds = [(np.uint8, "labels")] + [(np.float32, "matte")] * (matte_out is not None)
        kinds += [(np.int32, "instances")] * (instances_out is not None)
        for tmp, (dtype, what) in zip(tmps, kinds):
            arr = zarr.open_array(
                str(tmp), mode="w", shape=shape[1:], chunks=chunks, dtype=dtype, fill_value=0
            )
            arr.attrs.update({"napari_pacseg": {**attrs, "content": what}})
        jobs = []
        paths = (str(tmps[0]), str(tmps[1]) if matte_out is not None else None)
        for box in boxes:
            ext, _ = extend_box(box, halo, shape[1:])
            job = ChunkJob(box, ext, layout, chunk_request, norm, paths, readable,
                           str(getattr(volume, "path", "source")))  # fmt: skip
            region = raw if readable else layout.arrange(_raw_region(dask, raw, layout, ext))
            jobs.append((job, region))
        token = weights_digest(model)[:8] + os.urandom(4).hex()
        tasks = [
            dask.delayed(segment_chunk, pure=False)(job, region, dask_key_name=f"pacseg-chunk-{token}-{i}")
            for i, (job, region) in enumerate(jobs)
        ]  # fmt: skip
        timings: dict[str, float] = {}
        for t in _run(dask, kind, client, tasks, futures, progress):
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
            ids_tmp = tmps[outputs.index(Path(instances_out))]
            arrays = IdArrays(str(tmps[0]), str(ids_tmp), str(scratch))
            n_objects, table = instances_pass(run, arrays, boxes, spacing, objects, token, measure)
            if table is not None:
                write_bytes(tmps[outputs.index(Path(objects_out))], table_csv(table).encode())
            timings["instances"] = time.perf_counter() - t0
        for tmp, out in zip(tmps, outputs):
            move_into_place(tmp, out, overwrite)
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
        matte=Path(matte_out) if matte_out is not None else None,
        shape=tuple(shape),
        chunks=chunks,
        n_chunks=len(jobs),
        spacing=spacing,
        spacing_source=spacing_source,
        halo=halo,
        timings=timings,
        instances=Path(instances_out) if instances_out is not None else None,
        objects=Path(objects_out) if objects_out is not None else None,
        n_objects=n_objects,
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
