"""Partial outputs of a zarr run, kept across a failure so that a rerun resumes block by block.

Each zarr output that the work blocks write (labels, matte) is written into a partial: a hidden
folder beside it, ``.<name>.pacseg-partial.tmp`` (``partial_path``), that holds the zarr array
being written and, in ``.pacseg-partial/``, the run's record (``record.json``: what run the
partial belongs to, who writes it) and the log of finished blocks (``done``: one line per
block, its box in voxels, appended as each block's task finishes). A partial comes into being
complete with its record (it is built under a temporary name and renamed), so a folder at a
partial's name without a record is never ours: it is refused, never deleted.

A run whose record matches a partial's in every respect (``key``: the source's content digest,
the model, the parameters, shape, chunks, normalisation) skips the chunks that the log says are
finished; any other partial of ours at that name is removed and the run starts afresh. On
success each partial is renamed into place and its record removed; on a failure it is kept
when it can be resumed (a source on disk, at least one block finished), else removed. Once a
run rewrites its partials after the blocks (cells mode's labels drawn on the cells:
``PartialRun.rewriting``) they cannot be resumed: a failure removes them, and the record a
kill leaves is marked (``REWRITTEN``), so the next run starts afresh.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from napari_pacseg.io.atomic import (
    move_into_place,
    process_alive,
    remove,
    temporary_sibling,
    write_json,
)

PARTIAL_SUFFIX = ".pacseg-partial.tmp"
RECORD_DIR = ".pacseg-partial"
RECORD_FORMAT = "napari-pacseg partial output"
RECORD_VERSION = 1
REWRITTEN = "rewritten"  # in a record: the partials were rewritten after their blocks

# Partials being written by runs of this process (resolved paths): a second run of the same
# outputs in this process (another thread) is refused.
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


def partial_path(out) -> Path:
    """The partial of the output ``out``: ``.<name>.pacseg-partial.tmp`` in its folder (same
    file system, so the final rename is atomic). Its name is not a ``temporary_sibling``'s, so
    ``remove_stale_temporaries`` leaves it."""
    out = Path(out)
    return out.with_name(f".{out.name}{PARTIAL_SUFFIX}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _writer() -> dict:
    return {"pid": os.getpid(), "host": _host()}


def _running(writer) -> bool:
    """Whether the process of a record's ``writer`` runs on this host now (another host's, or
    this process's own earlier run, counts as gone)."""
    try:
        pid, host = int(writer["pid"]), str(writer["host"])
    except (KeyError, TypeError, ValueError):
        return False
    return host == _host() and pid != os.getpid() and process_alive(pid)


def read_record(partial: Path) -> dict | None:
    """The record of the partial folder ``partial``, or None when it has no readable one."""
    try:
        record = json.loads((partial / RECORD_DIR / "record.json").read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    return record


def inspect_partials(outputs: dict[str, Path]) -> dict[str, dict | None]:
    """The records of the partials of ``outputs`` (role -> output path), None where there is
    no partial. ``FileExistsError`` (before any work) when something at a partial's name is
    not ours (no record: a file, a link, a folder the user made), and when a run still in
    progress writes one (a live process of this host, or another run in this process)."""
    found: dict[str, dict | None] = {}
    for role, out in outputs.items():
        partial = partial_path(out)
        if not (partial.exists() or partial.is_symlink()):
            found[role] = None
            continue
        record = None
        if partial.is_dir() and not partial.is_symlink():
            record = read_record(partial)
        if record is None:
            raise FileExistsError(
                f"{partial} exists and is not a partial output of pacseg (it has no "
                f"{RECORD_DIR}/record.json); it is left as it is: move it away or choose "
                f"another name for {out.name}"
            )
        with _ACTIVE_LOCK:
            active = _resolved(partial) in _ACTIVE
        writer = record.get("writer") or {}
        if active or _running(writer):
            who = "another run in this process" if active else f"process {writer['pid']}"
            raise FileExistsError(
                f"{out} is being written by {who} ({partial}); wait for it to finish or stop it "
                "(if no pacseg run writes it, delete that folder)"
            )
        found[role] = record
    return found


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _normal(obj):
    """``obj`` as it reads back from JSON (tuples as lists, ...), for comparing records."""
    return json.loads(json.dumps(obj, default=str))


def discard(partial: Path) -> None:
    """Delete one of our partials: renamed to a temporary name first, so a run killed while
    deleting leaves a temporary (removed later) rather than a partial without its record."""
    if not partial.exists():
        return
    aside = temporary_sibling(partial)
    try:
        os.replace(partial, aside)
    except OSError:
        aside = partial
    remove(aside)


class PartialRun:
    """The partial outputs of one run.

    paths : role ("labels", "matte") -> partial folder, in the order given (the first holds
    the log of finished blocks). resumed : the partials were found matching and are being
    resumed. resumable : a failure keeps them (the source has a content digest). done : the
    boxes ``((z0, z1), (y0, y1), (x0, x1))`` logged finished, earlier runs' and this one's.
    blocks : the block size (chunks per axis) the record names, or None.
    """

    def __init__(self, outputs: dict[str, Path], key: dict, resumable: bool,
                 found: dict[str, dict | None], create: Callable[[str, Path], None]) -> None:  # fmt: skip
        """Open the partials of ``outputs`` (role -> output path) for a run identified by
        ``key`` (JSON data), given ``found`` (``inspect_partials``'s records): resumed where every
        partial is there and its record has this ``key`` and the same run id, else each of
        ours removed and new ones made, ``create(role, folder)`` writing each one's empty zarr
        array into a temporary folder before its record is added and it is renamed into
        place."""
        self.outputs = dict(outputs)
        self.paths = {role: partial_path(out) for role, out in outputs.items()}
        self.key, self.resumable = _normal(key), resumable
        self.done: list = []
        self.blocks = None
        self.resumed = False
        self._lock = threading.Lock()
        self._created: list[Path] = []
        held = [_resolved(p) for p in self.paths.values()]
        with _ACTIVE_LOCK:
            if _ACTIVE.intersection(held):
                raise FileExistsError(
                    f"{next(iter(outputs.values()))} is being written by another run in this "
                    "process; wait for it to finish"
                )
            _ACTIVE.update(held)
        self._held = held
        try:
            self._open(found, create)
        except BaseException:
            for partial in self._created:  # a resumable partial found here stays
                discard(partial)
            self.release(keep=True)
            raise

    def _open(self, found, create) -> None:
        records = [found.get(role) for role in self.paths]
        ids = {r.get("run") for r in records if r is not None}
        if (
            self.resumable
            and all(r is not None and r.get("key") == self.key for r in records)
            and len(ids) == 1
            and not (next(iter(self.paths.values())) / RECORD_DIR / REWRITTEN).exists()
        ):
            self.run_id = ids.pop()
            self.blocks = records[0].get("blocks")
            self.done = self._read_log()
            self.resumed = True
            for role in self.paths:  # this process writes them now
                self._write_record(role)
            return
        for role, partial in self.paths.items():
            if found.get(role) is not None:
                discard(partial)
        self.run_id = uuid.uuid4().hex
        for role, partial in self.paths.items():
            tmp = temporary_sibling(partial)
            try:
                create(role, tmp)
                (tmp / RECORD_DIR).mkdir()
                self._write_record(role, tmp)
                (tmp / RECORD_DIR / "done").touch()
                os.replace(tmp, partial)
                self._created.append(partial)
            finally:
                remove(tmp)

    def _write_record(self, role: str, folder: Path | None = None) -> None:
        folder = self.paths[role] if folder is None else folder
        record = {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "output": self.outputs[role].name,
            "role": role,
            "run": self.run_id,
            "writer": _writer(),
            "blocks": self.blocks,
            "key": self.key,
        }
        write_json(folder / RECORD_DIR / "record.json", record)

    def set_blocks(self, size) -> None:
        """Name the block size (chunks per axis) this run uses in its records, so a resume can
        keep the same blocks."""
        self.blocks = [int(s) for s in size]
        for role in self.paths:
            self._write_record(role)

    @property
    def _log(self) -> Path:
        return next(iter(self.paths.values())) / RECORD_DIR / "done"

    def seeds(self, split_fit: float, create: Callable[[Path], None]) -> tuple[Path, list]:
        """The objects' seeds (``engine.plan.seeding_fit``), kept with the partials so that a
        resumed run need not segment its finished blocks again for them: a zarr array in the
        first partial's record folder (it goes with the record when the partials are published,
        and with them when they are discarded), and the boxes whose seeds it holds
        (``mark_seeds``). One kept for another ``split_fit``, or none, is made anew by
        ``create(folder)``, holding none."""
        record = next(iter(self.paths.values())) / RECORD_DIR
        folder, about = record / "seeds.zarr", record / "seeds.json"
        self._seeds_log = record / "seeds-done"
        try:
            kept = json.loads(about.read_text("utf-8"))["split_fit"] == split_fit
        except (OSError, ValueError, KeyError, TypeError):
            kept = False
        if kept and folder.is_dir():
            return folder, self._read_log(self._seeds_log)
        for old in (about, self._seeds_log, folder):
            remove(old)
        create(folder)
        self._seeds_log.write_text("", "ascii")
        write_json(about, {"split_fit": split_fit})  # last: the array and log are ready
        return folder, []

    def mark_seeds(self, box) -> None:
        """Log the block ``box`` as holding its seeds (``seeds``)."""
        with self._lock:
            _append_box(self._seeds_log, box)

    def _read_log(self, log: Path | None = None) -> list:
        try:
            text = (self._log if log is None else log).read_text("ascii")
        except (OSError, UnicodeDecodeError):
            return []
        boxes = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):  # a line cut short by a kill: that block is redone
                continue
            try:
                v = [int(x) for x in line.split()]
            except ValueError:
                continue
            if len(v) == 6 and all(0 <= v[i] < v[i + 1] for i in (0, 2, 4)):
                boxes.append(((v[0], v[1]), (v[2], v[3]), (v[4], v[5])))
        return boxes

    def mark(self, box) -> None:
        """Log the block ``box`` (``(z, y, x)`` ranges) as finished: every output's chunks of it
        are written."""
        with self._lock:
            self.done.append(_append_box(self._log, box))

    def rewriting(self) -> None:
        """Say that the partials are being rewritten after their blocks (cells mode's labels on
        the cells): from here they cannot be resumed (their blocks no longer hold what the
        blocks wrote), so a failure removes them, and a record left by a kill says so
        (``REWRITTEN``; ``_open`` then starts anew)."""
        (next(iter(self.paths.values())) / RECORD_DIR / REWRITTEN).touch()
        self.resumable = False

    def publish(self, overwrite: bool) -> None:
        """Rename each partial into place (``move_into_place``), then remove its record."""
        for role, partial in self.paths.items():
            out = self.outputs[role]
            move_into_place(partial, out, overwrite)
            remove(out / RECORD_DIR)
        self.release(keep=True)

    def release(self, keep: bool) -> None:
        """End this run's hold on its partials; unless ``keep``, remove them."""
        if not keep:
            for partial in self.paths.values():
                if read_record(partial) is not None:  # ours, never a folder we did not make
                    discard(partial)
        with _ACTIVE_LOCK:
            _ACTIVE.difference_update(self._held)
        self._held = []


def _append_box(log: Path, box) -> tuple:
    """``box`` (``(z, y, x)`` ranges) as a line of the log ``log`` (``PartialRun._read_log``
    reads it); returns it as int pairs. The caller holds the run's lock."""
    box = tuple((int(a), int(b)) for a, b in box)
    with open(log, "a", encoding="ascii") as f:
        f.write(" ".join(f"{a} {b}" for a, b in box) + "\n")
    return box
