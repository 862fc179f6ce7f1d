"""An opt-in thread policy for CPU work on a machine that other processes share.

torch splits each operation over all its threads and waits for the slowest; when another
process holds a core, the thread that shares it stalls every operation (with one of two cores
busy, ``pac3d`` on two threads takes several times its quiet one-thread time without this
policy, ``benchmarks/results/busy-cpu-before.md``, and about its quiet time with it,
``busy-cpu.md``). ``adaptive_threads()`` is a context manager that measures the load of the
other processes (Linux: ``/proc/stat`` minus this process's own time) and gives torch the cores
they leave free while its block runs; ``readapt()`` measures again inside a long block. A quiet
machine keeps the caller's thread count; it is never raised.

Nothing here runs unless called: the ops (``voxel_mlp``, ``pac3d``, ``pac_crf3d``,
``max_unpool3d`` and their modules) never change torch's thread count themselves, as with any
torch op. The policy is the caller's choice: ``napari_pacseg`` applies it around ``segment()``,
the feature and head fit of ``train()`` and the live preview, and users of the ops can wrap their
own calls. torch's thread count is process-wide, so while a block runs every thread of the
process sees the lowered count.

The load is the average since the previous measurement when that was 50 ms to 5 s ago (no
waiting), else over a 50 ms sleep; a result is reused for 2 s, so blocks entered in a loop pay
nothing. ``set_adaptive(False)`` turns the policy off for the process (blocks then keep torch's
thread count as set).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from pathlib import Path

import torch

SAMPLE_S = 0.05  # the shortest interval a load is measured over (a sleep when no earlier one)
REUSE_S = 2.0  # a measured load is reused this long (blocks and live previews start often)
MAX_WINDOW_S = 5.0  # an earlier reading older than this is too stale to average from

_lock = threading.Lock()
_enabled = True
_reading: tuple[float, tuple[int, int, int]] | None = None  # (monotonic time, jiffies)
_last: tuple[float, float | None] | None = None  # (monotonic time, load)
_depth = 0  # adaptive blocks running (in any thread); the outermost one sets and restores
_restore = 0


def set_adaptive(enabled: bool) -> None:
    """Turn the load-adaptive thread count on (the default) or off for this process."""
    global _enabled
    _enabled = bool(enabled)


def _jiffies() -> tuple[int, int, int] | None:
    """(busy, total) jiffies of the whole machine and this process's own, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields[:8]]  # guest time (fields 9, 10) is already in user
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values), int(own[11]) + int(own[12])


def _load_between(first, second) -> float | None:
    busy, total, own = (b - a for a, b in zip(first, second))
    if total <= 0:
        return None
    return max(0.0, (busy - own) / total * (os.cpu_count() or 1))


def current_load() -> float | None:
    """Cores other processes keep busy now: reused for ``REUSE_S``, else averaged since the
    previous reading when it is ``SAMPLE_S`` to ``MAX_WINDOW_S`` old, else over a
    ``SAMPLE_S`` sleep. None where it cannot be measured (off Linux)."""
    global _reading, _last
    now = time.monotonic()
    if _last is not None and now - _last[0] < REUSE_S:
        return _last[1]
    reading = _jiffies()
    if reading is None:
        load = None
    elif _reading is not None and SAMPLE_S <= now - _reading[0] <= MAX_WINDOW_S:
        load = _load_between(_reading[1], reading)
    else:
        time.sleep(SAMPLE_S)
        first, reading = reading, _jiffies()
        load = None if reading is None else _load_between(first, reading)
    _reading = None if reading is None else (time.monotonic(), reading)
    _last = (now, load)
    return load


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for_load(threads: int, load: float | None) -> int:
    """``threads``, lowered to the cores ``load`` (busy cores of other processes) leaves free
    (at least one); ``threads`` when the load is unknown."""
    if load is None:
        return threads
    free = round(min(usable_cores(), (os.cpu_count() or 1) - load))
    return max(1, min(threads, free))


@contextlib.contextmanager
def adaptive_threads():
    """Run the block with torch's thread count lowered to the cores other processes leave
    free, then restore the count; yields the count the block runs with.

    Use it around CPU work (the ops of this package, or any torch code) that runs on a machine
    where other processes may hold cores, e.g. a service or a GUI beside other jobs::

        with pacseg_kernels.adaptive_threads():
            out = pac_crf3d(unary, guide)

    The count is never raised above the caller's, and is kept when the load cannot be measured
    (off Linux) or after ``set_adaptive(False)``. It is process-wide while the block runs: other
    threads of the process see the lowered count too. Nested and concurrent blocks keep the
    outermost block's choice, and the outermost one restores the count. Results may round
    differently at another thread count (sums split over threads), so code that must give
    bitwise the same result on a busy and a quiet machine keeps such sums outside the block.
    Call ``readapt()`` between the units of a long block to follow a load that changes."""
    global _depth, _restore
    with _lock:
        _depth += 1
        if _depth == 1:
            _restore = torch.get_num_threads()
            if _enabled:
                threads = threads_for_load(_restore, current_load())
                if threads != _restore:
                    torch.set_num_threads(threads)
        threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and torch.get_num_threads() != _restore:
                torch.set_num_threads(_restore)


def readapt() -> int:
    """Inside an ``adaptive_threads()`` block, set torch's thread count again for the load
    now (lowered when another process took a core since the block began, back up to the
    block's starting count when it left); returns the count. Long runs call it between their
    units of work (``napari_pacseg``'s tiles): a count chosen once at the start goes stale when
    the load changes during a run, or was measured over a window that was mostly quiet.
    Outside a block it changes nothing."""
    with _lock:
        if _depth > 0 and _enabled:
            threads = threads_for_load(_restore, current_load())
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()


_numba_lock = threading.Lock()


def numba_threadsafe() -> bool:
    """True when numba imports and has a threading layer that other threads may use at the same
    time (OpenMP or TBB). Without one numba falls back to its workqueue layer, which aborts the
    process when two threads launch parallel loops at once, and napari launches its own (label
    colouring) from the main thread: the package's numba loops are then not used (their torch
    paths run instead). Imports numba, on first use."""
    return _numba_threadsafe()


@functools.cache
def _numba_threadsafe() -> bool:
    import importlib

    try:
        import numba  # noqa: F401
    except Exception:  # no numba, or a broken one
        return False
    layer = os.environ.get("NUMBA_THREADING_LAYER", "default").lower()
    pools = {"omp": ["omppool"], "tbb": ["tbbpool"], "workqueue": []}.get(
        layer, ["tbbpool", "omppool"]
    )
    for pool in pools:
        try:
            importlib.import_module(f"numba.np.ufunc.{pool}")
        except Exception:  # that layer's library is missing here
            continue
        return True
    return False


@contextlib.contextmanager
def numba_threads():
    """Run the block's numba parallel loops one caller at a time, on as many threads as torch
    has now (``adaptive_threads`` lowers both).

    numba's thread count is per calling thread (this sets only the caller's); the lock keeps
    two of the package's callers from launching loops at once (callers check
    ``numba_threadsafe`` first: other libraries launch theirs without this lock). numba is
    imported here, on first use."""
    import numba

    with _numba_lock:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        yield
