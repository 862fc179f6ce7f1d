"""How many torch threads a segmentation should use on a machine that other work shares.

torch splits each operation over all its threads and waits for the slowest; when another
process holds a core, the thread that shares it stalls every operation (measured in
``benchmarks/results/busy-cpu.md``: with one core busy, ``segment()`` took 4.4x its quiet
one-thread time with two threads and 1.5x with one). So before a run the load of the other
processes is measured (Linux: ``/proc/stat`` minus this process's own time, over a short
interval) and torch is given the cores they leave free; a quiet machine keeps torch's default.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import torch

SAMPLE_S = 0.05  # how long the load is measured
REUSE_S = 2.0  # a measurement is reused this long (live previews start often)
_last: tuple[float, int] | None = None
_lock = threading.Lock()


def _jiffies() -> tuple[int, int, int] | None:
    """(busy, total) jiffies of the whole machine and this process's own, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values), int(own[11]) + int(own[12])


def other_load(sample_s: float = SAMPLE_S) -> float | None:
    """Cores kept busy by other processes, measured over ``sample_s`` seconds (None: unknown)."""
    first = _jiffies()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _jiffies()
    if second is None or second[1] <= first[1]:
        return None
    busy, total, own = (b - a for a, b in zip(first, second))
    cores = os.cpu_count() or 1
    return max(0.0, (busy - own) / total * cores)


def threads_for_load(default: int) -> int:
    """torch threads for a run now: ``default``, less one per core other processes keep busy
    (at least one)."""
    global _last
    with _lock:
        now = time.monotonic()
        if _last is not None and now - _last[0] < REUSE_S:
            return _last[1]
        load = other_load()
        threads = default if load is None else max(1, min(default, round(default - load)))
        _last = (now, threads)
        return threads


_default: int | None = None  # torch's thread count when this module first ran


@contextlib.contextmanager
def adaptive_threads():
    """Run the block with ``threads_for_load()`` torch threads, then restore the count. A user's
    own ``torch.set_num_threads`` below the default is respected (never raised)."""
    global _default
    before = torch.get_num_threads()
    if _default is None:
        _default = before
    threads = min(before, threads_for_load(_default))
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if threads != before:
            torch.set_num_threads(before)
