"""Atomic writes: a result is written under a temporary name in its target's folder, flushed
to disk, then renamed into place, so a target path only ever holds a complete file (or folder,
for a zarr result) and a failed or interrupted write leaves the target as it was.

A temporary's name (``temporary_sibling``) holds the writer's process id and host, so a later
run removes what a killed process left (``remove_stale_temporaries``) and keeps what a live one,
or another machine sharing the folder, is still writing. A write that fails for a full disk, a
quota, the file-size limit or a folder that cannot be written is re-raised as one line naming
the file and its folder (``write_error``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# --- temporaries: names, liveness of their writers, cleaning -------------------------------------


def _host() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


# ``.<name>.<pid>-<8 hex>@<host>.tmp``; a name without ``@<host>`` (older releases) is matched too.
_TEMPORARY = re.compile(
    r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}(?:@(?P<host>[A-Za-z0-9_-]+))?\.tmp"
)


def temporary_sibling(path) -> Path:
    """A hidden, unique name in ``path``'s folder (same file system, so a rename is atomic). It
    holds this process's id and host, so a later run can tell a dead process's leftover from the
    temporary of a run still in progress (``remove_stale_temporaries``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}@{_host()}.tmp")


def process_alive(pid: int) -> bool:
    """Whether the process ``pid`` runs on this host (this process counts; another user's, or
    one that cannot be told, is taken as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or cannot tell: keep its files
    return True


_SCANNED: dict[Path, float] = {}  # folder -> when this process last cleaned it
RESCAN_S = 60.0  # a long-lived process (napari) cleans a folder again after this long


def remove_stale_temporaries(path) -> list[Path]:
    """Delete the temporaries (``temporary_sibling`` names) in ``path``'s folder left by
    processes of this host that no longer run (a SIGKILL, a power cut); those of live processes,
    and of other hosts sharing the folder, are kept. A folder is scanned at most once a minute
    per process, so a batch of thousands of outputs lists it rarely. Returns what was
    removed."""
    folder = Path(path).parent
    try:
        key = folder.resolve()
    except (OSError, RuntimeError):
        return []
    if time.monotonic() - _SCANNED.get(key, -math.inf) < RESCAN_S:
        return []
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    _SCANNED[key] = time.monotonic()
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["host"] not in (None, _host()) or process_alive(int(match["pid"])):
            continue
        remove(entry)
        removed.append(entry)
    return removed


def remove(path) -> None:
    """Delete a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_replaceable(path, folder: bool) -> None:
    """``IsADirectoryError`` / ``NotADirectoryError`` when what is at ``path`` can never be
    replaced by a result that is a ``folder`` (a zarr array) or a file: a file never replaces
    a folder, and a folder never replaces a file or a symbolic link (the user's, whatever it
    points to). Nothing there, or the same kind, passes."""
    path = Path(path)
    link, real_dir = path.is_symlink(), path.is_dir() and not path.is_symlink()
    if not folder and real_dir:
        raise IsADirectoryError(
            f"{path} is a folder; a file never replaces a folder: move it away or choose "
            "another name"
        )
    if folder and (link or (path.exists() and not real_dir)):
        what = "a symbolic link" if link else "a file"
        raise NotADirectoryError(
            f"{path} is {what}, not a folder, and a zarr result (a folder) never replaces "
            f"{what}: move it away or choose another output folder"
        )


def move_into_place(tmp, path, overwrite: bool) -> None:
    """Rename ``tmp`` (file or folder) to ``path``. An existing ``path`` is replaced only with
    ``overwrite`` (a folder is first renamed aside, then deleted), else ``FileExistsError``;
    never when the kinds differ (``check_replaceable``)."""
    tmp, path = Path(tmp), Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        check_replaceable(path, tmp.is_dir())
        if path.is_dir() and not path.is_symlink():
            aside = temporary_sibling(path)
            os.replace(path, aside)
            os.replace(tmp, path)
            remove(aside)
            return
    os.replace(tmp, path)


# --- failures of writing, as one line that names the folder ---------------------------------------

# numpy's ``tofile`` (``np.save``) on a full disk or past the file-size limit: no errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_NO_SPACE = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` says that a write found the disk full, the quota or the file-size limit
    reached (an ``OSError`` of those errnos, or numpy's short-write error, which has none)."""
    if not isinstance(err, OSError):
        return False
    if err.errno in _NO_SPACE and err.strerror is not None:
        return True
    return err.errno is None and bool(_SHORT_WRITE.fullmatch(str(err).strip()))


def write_error(err: BaseException, path, name: str | None = None) -> OSError | None:
    """``err``, raised while writing ``path`` (or its temporary), as an error of the same class
    whose one-line message names the file (``name``, default ``path``'s) and its folder and
    says what to do: a full disk, a quota or the file-size limit, a folder that cannot be
    written or does not exist. None for any other error, and for one already described."""
    if not isinstance(err, OSError):
        return None
    path = Path(path)
    name, folder = name or path.name, os.path.abspath(path.parent)
    hint = "choose another output folder (-o)"
    code = err.errno
    if out_of_space(err):
        if code == errno.ENOSPC:
            text = f"no space left on {folder} writing {name}: free some space or {hint}"
        elif code == errno.EFBIG:
            text = (
                f"the file-size limit was reached writing {name} in {folder} (ulimit -f, or the "
                f"file system's largest file): raise the limit or {hint}"
            )
        elif code is not None:
            text = (
                f"the disk quota is exceeded on {folder} writing {name}: free some space or {hint}"
            )
        else:
            text = (
                f"no space left on {folder} (or the file-size limit was reached) writing "
                f"{name}: free some space or {hint}"
            )
    elif err.strerror is None or (
        err.filename is not None and os.path.abspath(os.path.dirname(err.filename)) != folder
    ):
        return None  # already described, or about another file than this output's
    elif code in _DENIED:
        why = "a read-only file system" if code == errno.EROFS else "permission denied"
        text = f"cannot write {name} in the folder {folder} ({why}): {hint}, one you can write to"
    elif code == errno.ENOENT and not path.parent.is_dir():
        text = f"cannot write {name}: the folder {folder} does not exist; create it or {hint}"
    else:
        return None
    described = type(err)(text)
    described.errno = code  # the message stays the text above (no strerror)
    return described


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_output(p) as tmp:`` write ``tmp``; on success it is renamed to ``p``, on any
    error (Ctrl-C included) it is deleted and ``p`` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        move_into_place(tmp, path, overwrite)
    except OSError as err:
        described = write_error(err, path)
        if described is None:
            raise
        raise described from err
    finally:
        remove(tmp)


def _fsync(path) -> None:
    """Flush ``path``'s content to disk (before the rename that publishes it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomically(path, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Write ``path`` through ``write(tmp)``, which writes the file ``tmp``; ``tmp`` is then
    flushed to disk and renamed to ``path`` (``atomic_output``). Returns ``path``."""
    with atomic_output(path, overwrite) as tmp:
        write(tmp)
        _fsync(tmp)
    return Path(path)


def write_bytes(path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), overwrite)


def write_json(path, obj, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_atomically(
        path,
        lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"),
        overwrite,
    )
