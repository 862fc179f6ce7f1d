"""Batches of files for the ``pacseg`` command: ``segment_files`` runs files, folders and glob
patterns (TIFF, NPY, zarr) into one output folder, with a JSON record per input that claims its
outputs, so reruns resume and a user's own files are never replaced."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_pacseg.batch.zarr_runs import memory_bytes, open_scheduler, segment_zarr
from napari_pacseg.checks import check_callable, check_int, check_ints, error_line
from napari_pacseg.engine.plan import settle
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.engine.segment import as_request, segment
from napari_pacseg.instances.labels import table_csv
from napari_pacseg.io.atomic import remove, write_bytes, write_json
from napari_pacseg.io.model_file import load_model, weights_digest
from napari_pacseg.io.provenance import input_digest, now, sha256_file, versions
from napari_pacseg.io.spacing import resolve_spacing
from napari_pacseg.io.volumes import (
    NPY_SUFFIXES,
    PICTURE_SUFFIXES,
    TIFF_SUFFIXES,
    InputGuard,
    VolumeError,
    is_zarr_path,
    read_volume,
    resolved,
    stem,
    volume_kind,
    write_npy,
    write_tiff,
)
from napari_pacseg.model.classes import DEFAULT_THRESHOLD
from napari_pacseg.progress import Progress

# --- batches of files -------------------------------------------------------------------------

RECORD_FORMAT = "napari-pacseg-result"
OUTPUT_SUFFIX = {"tiff": ".tif", "npy": ".npy", "zarr": ".zarr", "png": ".tif", "jpeg": ".tif"}
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


def output_name(path, outdir, kind: str) -> Path:
    """``outdir / <stem><kind>.<ext>``: an output of the input ``path`` (``ext`` follows the
    input: .tif, .npy or .zarr; .tif for PNG and JPEG inputs)."""
    ext = OUTPUT_SUFFIX.get(volume_kind(path) or "tiff", ".tif")
    return Path(outdir) / f"{stem(path)}{kind}{ext}"


def output_paths(path, outdir, instances: bool = False) -> dict[str, Path]:
    """``labels``, ``matte`` and ``record`` paths of an input: ``<stem>_labels.<ext>``,
    ``<stem>_matte.<ext>`` and ``<stem>_pacseg.json`` in ``outdir``; with ``instances`` also
    ``instances`` (``<stem>_instances.<ext>``) and ``objects`` (``<stem>_objects.csv``)."""
    paths = {
        "labels": output_name(path, outdir, "_labels"),
        "matte": output_name(path, outdir, "_matte"),
    }
    if instances:
        paths["instances"] = output_name(path, outdir, "_instances")
        paths["objects"] = Path(outdir) / f"{stem(path)}_objects.csv"
    paths["record"] = Path(outdir) / f"{stem(path)}_pacseg.json"
    return paths


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
    outputs = record.get("outputs")
    if not isinstance(record.get("input"), str) or not isinstance(outputs, dict):
        return None
    if not all(isinstance(v, str) for v in outputs.values()):
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


def _identity(path: Path):
    """What tells whether a file or folder at ``path`` was replaced: its inode, size and
    modification time (None when there is nothing there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _exists(path: Path) -> bool:
    """``path.exists()`` that is False for a symlink loop or an unreadable path, not an error."""
    try:
        return path.exists()
    except OSError:
        return False


def _same_content(record: dict, here, digest: str) -> bool:
    """Whether the input a record describes has the content ``digest`` (records without a
    digest, written before it was kept: the same size and modification time)."""
    if isinstance(record.get("input_digest"), str):
        return record["input_digest"] == digest
    return here is not None and [record.get("input_size"), record.get("input_mtime_ns")] == list(
        here[1:]
    )


class Skip(str):
    """An entry's "problem" that is no problem: the reason it is skipped (not an input)."""


def expand_inputs(
    inputs, pictures: bool = True, frames: bool = False, channel_axis: int | None = None
) -> list[tuple[Path, str]]:
    """Files, zarr folders, plain folders (their volumes, not recursive, skipping hidden names)
    and glob patterns -> ``[(path, problem)]`` in order, without repeats; ``problem`` is "", why
    the entry cannot be segmented, or a ``Skip`` saying why it is not an input.

    Found by a folder or a pattern, a pacseg output is not an input: one that a record lists,
    or one named as an output of another volume given (``x_labels.npy`` beside ``x.npy``), so a
    run whose output folder is its input folder resumes cleanly; it is left out. A file named
    explicitly is an input whatever its name looks like, except one that a pacseg record lists
    as its output (a shell-expanded ``*.npy`` of a finished run): that one is reported as
    skipped, and it is never written either (``iter_segment_files`` fails the input that
    would replace it). ``pictures``: the run's model is a 2D model. Files that folders and
    patterns find of the other kind than the model's are skipped, each with a ``Skip`` that
    says why (``_other_kind``): 2D images (PNG, JPEG, 2D TIFF and NPY) and TIFF time-lapses
    in a volume model's run, volumes in a 2D model's (unless ``frames``)."""
    entries: list[tuple[Path, str, bool]] = []  # (path, problem, named explicitly)
    for item in inputs:
        path = Path(item)
        if not _exists(path) and GLOB_CHARS & set(str(item)):
            matches = [Path(m) for m in sorted(glob.glob(str(item)))]
            found = _volumes(matches, pictures, frames, channel_axis)
            entries += found or [(path, "the pattern matches no volume", True)]
        elif path.is_symlink() and not _exists(path):
            entries.append((path, "a broken symbolic link (or a link loop)", True))
        elif _exists(path) and path.is_dir() and not is_zarr_path(path):
            try:
                children = sorted(path.iterdir())
            except OSError as err:
                entries.append((path, f"cannot list the folder ({err.strerror or err})", True))
                continue
            found = _volumes(
                [c for c in children if not c.name.startswith(".")], pictures, frames, channel_axis
            )
            entries += found or [
                (path, "the folder holds no TIFF, NPY, PNG, JPEG or zarr input", True)
            ]
        elif not _exists(path):
            entries.append((path, "no such file or folder", True))
        elif volume_kind(path) is None:
            entries.append(
                (
                    path,
                    "unknown format: use .tif/.tiff, .npy, .png, .jpg, or a zarr/OME-Zarr folder",
                    True,
                )
            )
        elif not (path.is_file() or path.is_dir()):
            entries.append((path, "not a regular file (a pipe or a device?)", True))
        else:
            entries.append((path, "", True))
    seen, unique = set(), []
    for path, problem, _ in _without_outputs(entries):
        try:
            key = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            key, problem = path.absolute(), problem or "a symbolic link loop"
        if key not in seen:
            seen.add(key)
            unique.append((path, problem))
    return unique


def _volumes(
    paths, pictures: bool = True, frames: bool = False, channel_axis: int | None = None
) -> list[tuple[Path, str, bool]]:
    """Entries for the inputs among ``paths`` (a folder's contents, a pattern's matches), those
    of the other kind than the model's (``pictures``: a 2D model) skipped (``_other_kind``);
    broken links with an input's name are entries that say so."""
    found = []
    for p in paths:
        try:
            if p.is_symlink() and not _exists(p):
                if p.suffix.lower() in (*TIFF_SUFFIXES, *NPY_SUFFIXES, *PICTURE_SUFFIXES, ".zarr"):
                    found.append((p, "a broken symbolic link (or a link loop)", False))
            elif _exists(p) and volume_kind(p):
                other = _other_kind(p, pictures, frames, channel_axis)
                found.append((p, Skip(other) if other else "", False))
        except OSError:  # unreadable
            continue
    return found


def _other_kind(path: Path, planar: bool, frames: bool, channel_axis: int | None) -> str:
    """Why a file a folder or a pattern found is not for the run's model ("" when it is): a 2D
    image or a time-lapse for a volume model (``planar`` False), a volume for a 2D model
    (unless ``frames``: then every stack is one of 2D frames). Only headers are read."""
    from napari_pacseg.io.images import is_2d_file, is_time_lapse

    if frames:
        return ""
    flat, movie = is_2d_file(path, channel_axis), is_time_lapse(path, channel_axis)
    if not planar and (flat or movie):
        what = "a 2D image" if flat else "a stack of 2D frames (its TIFF axes say T)"
        return f"{what}, and the model segments volumes; segment it with a 2D model"
    if planar and not (flat or movie):
        return (
            "a volume, and the model segments 2D images; segment it with a volume model, or "
            "pass --frames if it is a stack of 2D frames"
        )
    return ""


def _without_outputs(entries):
    """``entries`` without the pacseg outputs among them (see ``expand_inputs``): found ones
    by their names or a record, explicitly named ones only by a record."""
    owner = {}
    for p, problem, _ in entries:
        if not problem:
            for kind in OUTPUT_KINDS:
                owner.setdefault(output_name(p, p.parent, kind), p)
    for p, problem, explicit in entries:
        src = owner.get(p) if not problem else None
        named_like = src is not None and src != p
        recorded = not problem and _is_output(p)
        if explicit and recorded:
            of = f"of {src.name} " if named_like else ""
            yield p, Skip(f"a pacseg output {of}(its record lists it; not an input)"), explicit
        elif not explicit and (named_like or recorded):
            continue
        else:
            yield p, problem, explicit


def _check_outputs(entries, outdir, instances: bool) -> None:
    """``ValueError`` when two inputs would write the same outputs, or an output is an input."""
    owner: dict[Path, Path] = {}
    inputs = [p for p, problem in entries if not problem]
    guard = InputGuard(inputs)
    for path in inputs:
        for out in output_paths(path, outdir, instances).values():
            key = resolved(out)
            if key in owner:
                raise ValueError(
                    f"{owner[key]} and {path} would both write {out.name}; rename one of them "
                    "or segment them into different output folders"
                )
            owner[key] = path
            guard.check(out)


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
    memory=None,
    scheduler=None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    instances=False,
    frames: bool = False,
    precision: str = "auto",
) -> FileRunIterator:
    """Like ``segment_files``, yielding each input's ``FileResult`` as soon as it is finished
    (in input order). The arguments are checked and the inputs expanded at the call
    (``ValueError`` before any work). The iterator's ``current`` is the input being segmented
    (``(index, path)``, None between inputs) and ``count`` the number of inputs, so a
    ``progress(done, total)`` callback can say which input it counts."""
    check_callable(progress, "progress", "progress(done, total)")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model = load_model(path)  # first: a folder or a bad file is a ModelFileError
        model_info = {"path": str(resolved(path)), "sha256": sha256_file(path)}
    else:
        model_info = {"path": None, "sha256": None}
    if channel_axis is not None:
        channel_axis = check_int(channel_axis, "channel_axis", -8, 7)
    # checked before any work; channel_axis is the raw axis in the files
    request = as_request(
        model, spacing=spacing, channel_axis=channel_axis, refine=refine, device=device,
        tile_shape=tile_shape, threshold=threshold, instances=instances, precision=precision,
    )  # fmt: skip
    model = request.model
    model_info["weights_sha256"] = weights_digest(model)
    model_info["classes"] = request.classes
    if request.spacing is not None:  # the same for every input: check the refinement's work once
        settle(model, request.spacing, request.refine)
    objects = request.instances
    if frames and model.config.ndim != 2:
        raise ValueError(
            "frames: a stack of 2D frames is segmented frame by frame by a 2D model; this model "
            "is a 3D model (of volumes)"
        )
    if chunks is not None:
        chunks = check_ints(chunks, 3, "chunks", 1, 1 << 20)
    memory = memory_bytes(memory)
    # a folder's files of the other kind (thumbnails beside volumes, ...): skipped, each said
    entries = expand_inputs(
        [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs, model.config.ndim == 2,
        bool(frames), channel_axis,
    )  # fmt: skip
    outdir = Path(outdir)
    if outdir.is_symlink() and not _exists(outdir):
        raise ValueError(f"output folder {outdir} is a broken symbolic link; give a folder")
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"output folder {outdir} is a file; give a folder")
    _check_outputs(entries, outdir, objects is not None)
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
    options = RunOptions(request, chunks, scheduler, workers, overwrite, bool(frames), memory)
    # explicitly named files skipped as pacseg outputs: never written, though not inputs
    named_outputs = InputGuard(p for p, problem in entries if isinstance(problem, Skip))
    run = _FileRun(model, model_info, options, progress, named_outputs)
    jobs = [(path, problem, output_paths(path, outdir, objects is not None))
            for path, problem in entries]  # fmt: skip
    return FileRunIterator(run, jobs)


class FileRunIterator:
    """The ``FileResult`` of each input of an ``iter_segment_files`` call, in input order, each
    as soon as it is finished.

    ``count``: the number of inputs; ``current``: ``(index, path)`` of the input being
    segmented, None between inputs. ``close()`` ends the run early (a cluster it started is
    closed, as when the last result is taken)."""

    def __init__(self, run: _FileRun, jobs: list) -> None:
        self.count = len(jobs)
        self.current: tuple[int, Path] | None = None
        self._results = self._each(run, jobs)

    def _each(self, run: _FileRun, jobs: list):
        try:
            for index, (path, problem, paths) in enumerate(jobs):
                self.current = (index, path)
                result = run.one(path, problem, paths)
                self.current = None
                yield result
        finally:
            self.current = None
            run.close()

    def __iter__(self):
        return self

    def __next__(self) -> FileResult:
        return next(self._results)

    def close(self) -> None:
        self._results.close()


def segment_files(inputs, model, outdir, **kwargs) -> list[FileResult]:
    """Segment files, folders or glob patterns of volumes into ``outdir``, one by one.

    Per input: ``<stem>_labels.<ext>`` (uint8 classes), ``<stem>_matte.<ext>`` (float32
    1 - P(background)) and ``<stem>_pacseg.json``, the record: written first with ``"status":
    "incomplete"`` (it claims the outputs as pacseg's), then ``"complete"`` with the input,
    outputs, model path and sha256, parameters, spacing and its source, versions, timings. An
    input whose record says complete is skipped unless ``overwrite``; one whose record says
    incomplete is redone (so rerunning after a crash or Ctrl-C resumes). A file at an output
    path that no record of this input claims is never replaced without ``overwrite``: that
    input fails and nothing is touched; a run that fails restores the record it found.
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
    chunks, memory, scheduler, workers : as in ``segment_zarr``, for zarr inputs only; a
        cluster from ``workers`` is started once, at the first zarr input, for all of them.
    overwrite : redo inputs whose complete output exists.
    instances : also ``<stem>_instances.<ext>`` (object ids, uint16, or uint32 past 65535
        objects) and ``<stem>_objects.csv`` (``instances.object_table``; the record gives the
        object count): True, an ``InstanceConfig`` or a dict, as in ``segment``; zarr inputs
        chunk by chunk (``segment_zarr(instances=..., objects_out=...)``).
    threshold : the label rule's matte threshold (``classes.labels_from_probabilities``).
    precision : the head's precision, as in ``segment``.
    frames : with a 2D model, each input is a stack of 2D frames (a time-lapse; TIFF or NPY),
        segmented frame by frame (``segment(frame_axis=...)``). A 2D model reads 2D images:
        PNG, JPEG (outputs as TIFF), 2D TIFF and NPY (``image_io.read_picture``); zarr inputs
        need a volume model.
    progress : ``progress(done, total)``, over tiles (in-memory inputs) or voxels (zarr
        inputs) of the running input; ``done == 0`` when an input starts (which one:
        ``iter_segment_files(...).current``).

    Returns
    -------
    list of FileResult, in input order. Failures (unreadable file, wrong channels, ...) are
    recorded there and do not stop the other inputs; KeyboardInterrupt does (outputs being
    written are removed, finished ones kept).
    """
    return list(iter_segment_files(inputs, model, outdir, **kwargs))


@dataclass(frozen=True)
class RunOptions:
    """The options of one ``segment_files`` call, checked once: the ``SegmentRequest`` every
    input shares (its ``channel_axis`` is the raw axis in the files, its ``spacing`` the one
    given, else each file's own), the zarr runs' chunks and scheduler, ``overwrite``,
    whether the inputs are stacks of 2D frames (a 2D model), and the zarr runs' memory budget
    per task (bytes, None for ``segment_zarr``'s default)."""

    request: SegmentRequest
    chunks: tuple | None = None
    scheduler: object = None
    workers: int | None = None
    overwrite: bool = False
    frames: bool = False
    memory: int | None = None

    def recorded(self) -> dict:
        """The parameters every record of this run lists (and a resume compares)."""
        r = self.request
        ndim = r.model.config.ndim
        return {
            "refine": False if r.refine is None else dataclasses.asdict(r.refine),
            "channel_axis": r.channel_axis,
            "device": str(r.device),
            "tile_shape": None if r.tile_shape is None else list(r.tile_shape[3 - ndim :]),
            "threshold": r.threshold,
            "instances": None if r.instances is None else dataclasses.asdict(r.instances),
            "frames": self.frames,
            "precision": r.precision,
        }


class _FileRun:
    """The state of one ``segment_files`` call: the model, options and a lazily started client."""

    def __init__(self, model, model_info: dict, options: RunOptions, progress,
                 named: InputGuard) -> None:  # fmt: skip
        self.model, self.model_info, self.options = model, model_info, options
        self.named = named
        self.common = options.recorded()
        self.overwrite, self.progress = options.overwrite, progress
        self.client, self.owned = None, False

    def scheduler(self):
        if self.client is None:
            opts = self.options
            _, self.client, self.owned = open_scheduler(opts.scheduler, opts.workers)
        return self.client

    def close(self) -> None:
        if self.owned:
            cluster = getattr(self.client, "cluster", None)
            self.client.close()
            if cluster is not None:
                cluster.close()
        self.client, self.owned = None, False

    def one(self, path: Path, problem: str, paths: dict[str, Path]) -> FileResult:
        start = time.perf_counter()
        if isinstance(problem, Skip):
            return FileResult(path, "skipped", str(problem))
        if problem:
            return FileResult(path, "failed", problem)
        record = paths["record"]
        old = read_record(record) if _exists(record) else None
        here = _identity(path)
        try:
            content = input_digest(path)
        except OSError as err:
            return FileResult(path, "failed", f"cannot read it ({err.strerror or err})")
        ours = old is not None and old["input"] == str(path.resolve())
        same = old is not None and _same_content(old, here, content)
        # ``moved``: the same content in a moved or renamed project folder
        moved = old is not None and Path(old["input"]).name == path.name and same
        done = old is not None and old.get("status", "complete") == "complete"
        # An input whose content changed since its record is redone (its outputs are ours).
        if done and ((ours and same) or moved) and not self.overwrite:
            return FileResult(path, "skipped", self._skip_reason(old, record), record=record)
        clash = self._named_output(paths) or self._foreign_output(paths, old if ours else None)
        if clash:
            return FileResult(path, "failed", clash)

        def tiles(done, total):
            if self.progress is not None:
                self.progress(done, total)

        tiles(0, 0)
        outputs = [k for k in paths if k != "record"]
        started = now()
        head = {"format": RECORD_FORMAT, "version": 3, "input": str(path.resolve()),
                "input_size": here[1] if here else None,
                "input_mtime_ns": here[2] if here else None,
                "input_digest": content,
                "outputs": {k: paths[k].name for k in outputs}}  # fmt: skip
        before = {k: _identity(paths[k]) for k in paths}
        previous = record.read_bytes() if before["record"] is not None else None
        complete = False
        try:
            # First a record that claims the outputs as ours but incomplete: a run killed while
            # writing them leaves it, so the rerun knows it may replace them.
            write_json(record, {**head, "status": "incomplete", "started": started})
            details = self._segment(path, paths, tiles)
            write_json(record, {
                **head, "status": "complete", "model": self.model_info,
                "parameters": {**self.common, **details.pop("parameters")},
                **details, "versions": versions(), "started": started, "finished": now(),
            })  # fmt: skip
            complete = True
        except Exception as err:
            message = error_line(err).removeprefix(f"{path}: ")
            return FileResult(path, "failed", message, seconds=time.perf_counter() - start)
        finally:
            if not complete and all(_identity(paths[k]) == before[k] for k in outputs):
                # No output was replaced: the record goes back to what it was (or away), so it
                # never claims files this run did not write.
                if previous is None:
                    remove(record)
                else:
                    write_bytes(record, previous)
        seconds = time.perf_counter() - start
        return FileResult(path, "done", f"done in {seconds:.1f} s",
                          tuple(paths[k] for k in outputs), record, seconds)  # fmt: skip

    def _named_output(self, paths: dict[str, Path]) -> str:
        """Why an output path may not be written because it is (or holds) a file named on the
        command line ("" if none): a named file is never written, even with ``overwrite``."""
        for what, out in paths.items():
            try:
                self.named.check(out)
            except ValueError:
                return (
                    f"its {what} output {out} was named as an input, and a file named as an "
                    "input is never replaced (not even with --overwrite); leave it out of the "
                    "inputs (quote a pattern, 'dir/*.npy', so pacseg skips its own outputs) or "
                    "choose another output folder"
                )
        return ""

    def _foreign_output(self, paths: dict[str, Path], record: dict | None) -> str:
        """Why an existing file at one of the output paths may not be replaced ("" if none):
        only pacseg's own earlier output of this input (its record lists it) is, or anything
        with ``overwrite``."""
        if self.overwrite:
            return ""
        owned = set(record["outputs"].values()) if record is not None else set()
        for what in ["record", *(k for k in paths if k != "record")]:  # the record's reason first
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

    def _skip_reason(self, old: dict, record: Path) -> str:
        try:
            defaults = {"threshold": DEFAULT_THRESHOLD, "frames": False,
                        "precision": "auto"}  # older records  # fmt: skip
            same = old["model"]["weights_sha256"] == self.model_info["weights_sha256"] and all(
                old["parameters"].get(k, defaults.get(k)) == v
                for k, v in self.common.items()
                if k != "device"
            )
        except (KeyError, TypeError, AttributeError):
            same = False
        return (
            f"already done ({record.name})"
            if same
            else f"already done with another model or parameters ({record.name}); pass --overwrite to redo it"
        )

    def _segment(self, path: Path, paths: dict[str, Path], tiles) -> dict:
        opts, request = self.options, self.options.request
        if self.model.config.ndim == 2:
            return self._segment_2d(path, paths, tiles)
        volume = read_volume(path, request.channel_axis)
        if volume.kind in ("zarr", "ome-zarr"):
            res = segment_zarr(
                volume, request, paths["labels"], paths["matte"], chunks=opts.chunks,
                memory=opts.memory, scheduler=self.scheduler(), overwrite=True, progress=tiles,
                instances_out=paths.get("instances"), objects_out=paths.get("objects"),
            )  # fmt: skip
            parameters = {"spacing": list(res.spacing), "spacing_source": res.spacing_source,
                          "chunks": list(res.chunks), "halo": list(res.halo),
                          "blocks": list(res.blocks), "memory": res.memory}  # fmt: skip
            details = {"shape": list(res.shape), "dtype": str(volume.data.dtype),
                       "parameters": parameters, "timings": res.timings}  # fmt: skip
            if res.instances is not None:
                details["objects"] = res.n_objects
            return details
        spacing, source = resolve_spacing(request.spacing, volume, self.model.config.spacing)
        image = volume.load()
        seg = segment(image, request.replace(spacing=spacing, channel_axis=0), progress=tiles)
        return _write_in_memory(paths, seg, image, volume.kind == "npy", spacing, source, None)

    def _segment_2d(self, path: Path, paths: dict[str, Path], tiles) -> dict:
        """A 2D image (or, with ``frames``, a stack of 2D frames) by a 2D model, in memory."""
        from napari_pacseg.io.images import is_time_lapse, read_picture

        opts, request = self.options, self.options.request
        if volume_kind(path) == "zarr":
            raise VolumeError(
                f"{path}: a zarr input is read as a volume, and this is a 2D model; segment zarr "
                "volumes with a volume model, or save the 2D images as TIFF, PNG or NPY"
            )
        # a TIFF whose axes say T (and no Z) is a stack of frames without --frames
        frames = opts.frames or is_time_lapse(path, request.channel_axis)
        picture = read_picture(path, request.channel_axis, frames)
        spacing, source = resolve_spacing(
            request.spacing, picture, self.model.config.in_plane_spacing, 2
        )
        axes = {"frame_axis": 0, "channel_axis": 1} if frames else {"channel_axis": 0}
        data = picture.picture()
        seg = segment(data, request.replace(spacing=spacing, **axes), progress=tiles)
        return _write_in_memory(paths, seg, data, picture.kind == "npy", spacing, source,
                                "TYX" if frames else "YX")  # fmt: skip


def _write_in_memory(paths, seg, image, npy: bool, spacing, source, axes) -> dict:
    """Write an in-memory run's outputs (labels, matte, object ids as uint16 or uint32, the
    objects CSV): NPY for NPY inputs, else ImageJ TIFF with ``spacing`` (``axes``: None for
    a volume's ZYX); the record's details of the run."""
    arrays = {"labels": seg.labels, "matte": seg.matte}
    if seg.instances is not None:
        n = int(seg.instances.max())
        arrays["instances"] = seg.instances.astype(np.uint16 if n <= 65535 else np.uint32)
    for kind, array in arrays.items():
        if npy:
            write_npy(paths[kind], array, overwrite=True)
        else:
            write_tiff(paths[kind], array, spacing, overwrite=True, axes=axes)
    details = {"shape": list(image.shape), "dtype": str(image.dtype),
               "parameters": {"spacing": list(spacing), "spacing_source": source},
               "timings": seg.timings}  # fmt: skip
    if seg.instances is not None:
        write_bytes(paths["objects"], table_csv(seg.objects).encode("utf-8"))
        details["objects"] = int(seg.instances.max())
    return details
