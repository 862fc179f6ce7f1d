"""The widget's background work, each job in a thread of its own (``_Job``): ``TaskRunner`` for
full runs and training (one at a time, the widget's progress bar, cancel through the session's
task) and ``LiveRunner`` for live previews (debounced, one job in flight, stale results dropped).

Workers never raise: ``run_caught`` turns an error into an ``Outcome`` that the main thread
reports, so napari does not show a second, raw notification of it.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from qtpy.QtCore import QObject, QTimer, Signal

from napari_pacseg.progress import SegmentationCancelled

DEBOUNCE_MS = 100  # coalesces a slider drag; a newer change also aborts the preview in flight
PROGRESS_S = 0.25  # a live preview's progress reaches the status line at most this often
# ... and a full run's or training's the bar: each report repaints part of the window (~5 ms of
# the main thread on a software-rendered display), time taken from the run's threads; once a
# second still counts the seconds left.
TASK_PROGRESS_S = 1.0


@dataclass
class Outcome:
    """What a background job returns: its result, or the error it raised."""

    result: object = None
    error: BaseException | None = None
    details: str = ""


def run_caught(fn: Callable, *args, **kwargs) -> Outcome:
    """``fn(*args, **kwargs)`` as an ``Outcome`` (what a ``_Job`` delivers)."""
    try:
        return Outcome(result=fn(*args, **kwargs))
    except Exception as err:  # reported in the main thread by the caller
        return Outcome(error=err, details=traceback.format_exc())


def message(err: BaseException) -> str:
    """An error for a person: its text, with its type unless it is a ``ValueError``."""
    text = str(err) or type(err).__name__
    if not isinstance(err, ValueError):
        text = f"{type(err).__name__}: {text}"
    return text


class _Job(QObject):
    """``run_caught(fn, *args, **kwargs)`` in a thread of its own that ends with the job;
    ``returned(outcome)`` then ``finished()`` run in the main thread.

    Not napari's worker pool: its threads outlive their jobs (30 s), and torch's OpenMP keeps a
    team of threads for every thread that has run a parallel op while that thread lives. With
    more team threads than cores, libgomp stops spinning between parallel regions and wakes its
    threads through the kernel for every one, so each of the pipeline's many mid-sized torch
    calls pays a wake-up: after a few live previews a full run took 3x its time
    (``benchmarks/results/live-cpu.md``, full-run rows). A thread that ends frees its team."""

    delivered = Signal(object)  # the Outcome, queued to the main thread

    def __init__(self, fn: Callable, args, kwargs, returned: Callable, finished: Callable):
        super().__init__()
        self._call = partial(run_caught, fn, *args, **kwargs)
        self._returned, self._finished = returned, finished
        self.delivered.connect(self._deliver)

    def start(self) -> None:
        threading.Thread(target=self._run, name="pacseg-job", daemon=True).start()

    def _run(self) -> None:
        self.delivered.emit(self._call())

    def _deliver(self, outcome: Outcome) -> None:
        self._returned(outcome)
        self._finished()


def serial_numba_in_this_thread() -> None:
    """Make numba's parallel loops launched from the calling thread (napari's main thread) run
    on one thread; numba's thread count is per thread, so other threads keep theirs.

    napari colours label layers with numba's parallel loops when numba is installed, and numba
    runs them on the same OpenMP runtime as torch: the main thread then keeps an OpenMP team
    of its own for the rest of the process, and with it the widget's jobs are throttled as
    ``_Job`` says (a full run of the sample took 3x its time after the first label layer was
    drawn). One thread per label slice is ample: the colouring is per displayed slice."""
    try:
        import numba
    except Exception:  # no numba (or a broken one): napari colours labels without it
        return
    numba.set_num_threads(1)


def _worker(fn: Callable, *args, returned: Callable, finished: Callable, **kwargs) -> _Job:
    """A job (not started) running ``run_caught(fn, *args, **kwargs)`` in its own thread."""
    return _Job(fn, args, kwargs, returned, finished)


class _Relay(QObject):
    """Carries progress from worker threads to the main thread (queued signals)."""

    progressed = Signal(int, int, int)  # task id, done, total
    live = Signal(int, int, int)  # live generation, done, total


class _Throttled:
    """A job's ``progress(done, total)`` (worker thread): relays ``emit(ident, done, total)``
    for the first call, the last (``done == total``) and at most one call per ``every`` seconds
    in between. Every relayed call costs the main thread a status and bar repaint, and
    main-thread Python work holds the GIL that the worker's many short torch calls need back
    between them (a full run reports every tile and every slab of the refinement)."""

    def __init__(self, emit: Callable, ident: int, every: float = PROGRESS_S) -> None:
        self.emit, self.ident, self.every = emit, ident, every
        self.last = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every or done >= total:
            self.last = now
            self.emit(self.ident, done, total)


UNITS = {"segmentation": "tiles", "training": "steps"}  # what a task's progress counts


def progress_text(kind: str, done: int, total: int, seconds: float) -> str:
    """A task's progress for its bar: "tiles 5/12 (41%, ~6 s left)" for a segmentation (the
    time left from the rate so far, once a second has passed)."""
    unit = UNITS.get(kind, "")
    percent = 100 * done // total if total else 0
    left = ""
    if 0 < done < total and seconds >= 1.0:
        left = f", ~{seconds * (total - done) / done:.0f} s left"
    return f"{unit} {done}/{total} ({percent}%{left})".strip()


class TaskRunner:
    """Full runs and training in a worker thread, one at a time (``session.begin``).

    ``start(kind, work, on_result)`` runs ``work(progress=..., should_cancel=...)`` (a
    ``session.FullRun`` or ``session.Training``); the main thread
    gets ``on_result(result, seconds)``, or a status line when it was cancelled
    (``session.cancel()``), or ``error(text)`` when it failed (also when ``on_result`` raises
    ``ValueError``). ``status(text)`` says when a task starts, is being cancelled and ends;
    ``running(flag)`` is called when a task starts and ends; ``progressed(done, total, text)``,
    when given, with each progress report (the widget's bar; ``text``: ``progress_text``, with
    units, percent and time left).

    The progress goes to the bar only: a bar's value and text repaint the bar, while a new
    status line re-lays out the dock and napari's window around it, and on a
    software-rendered display (a VM, a remote desktop, Xvfb) each such repaint takes the CPU
    the run needs (``benchmarks/results/live-cpu.md``, full-run rows). napari's activity bar is
    not used for the same reason: while any of its bars runs, its status-bar spinner repaints
    the window without pause."""

    def __init__(
        self, session, status: Callable, error: Callable, running: Callable,
        progressed: Callable | None = None,
    ) -> None:  # fmt: skip
        self.session, self.status, self.error, self.running = session, status, error, running
        self.progressed = progressed
        self._showing = False  # a task's progress is shown (from its start to its result)
        self._worker = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)

    def start(self, kind: str, work: Callable, on_result: Callable) -> None:
        task = self.session.begin(kind)
        self._showing = True
        self._worker = _worker(
            work, progress=_Throttled(self._relay.progressed.emit, task.ident, TASK_PROGRESS_S),
            should_cancel=task.should_cancel, returned=partial(self._returned, task, on_result),
            finished=partial(self._finished, task),
        )  # fmt: skip
        self.running(True)
        self.status(f"{kind} running…")
        self._worker.start()

    def cancel(self) -> None:
        """Cancel the running task (between tiles or steps)."""
        task = self.session.cancel()
        if task is not None:
            self.status(f"cancelling the {task.kind}…")

    def _on_progress(self, ident: int, done: int, total: int) -> None:
        task = self.session.task
        if task is None or task.ident != ident or not self._showing:
            return  # queued from a task whose result is in (or that has ended)
        if task.should_cancel():
            unit = UNITS.get(task.kind, "")
            self.status(f"cancelling the {task.kind}… ({done}/{total} {unit} done)")
        if self.progressed is not None:
            self.progressed(done, total, progress_text(task.kind, done, total, task.seconds))

    def _returned(self, task, on_result: Callable, outcome: Outcome) -> None:
        from napari.utils.notifications import show_info

        self.session.end(task)  # progress still queued from it is now ignored
        # The controls come back with the end of the task, not with the worker's later
        # `finished` signal: in between, the widget is idle and its buttons must work.
        self.running(False)
        self._showing = False
        if isinstance(outcome.error, SegmentationCancelled):
            self.status(f"{task.kind} cancelled; the layers were not changed")
            show_info(f"PAC {task.kind} cancelled; nothing was written")
        elif outcome.error is not None:
            self.error(f"{task.kind} failed: {message(outcome.error)}")
        else:
            try:
                on_result(outcome.result, task.seconds)
            except ValueError as err:
                self.error(str(err))

    def _finished(self, task) -> None:
        self.session.end(task)  # also when the worker ended without a result
        self._worker = None
        self.running(False)


class LiveRunner:
    """Debounced recomputation in a worker thread.

    ``request()`` (main thread) restarts a single-shot timer; when it fires, ``prepare()``
    (main thread) snapshots the job or returns None, ``compute(job, should_cancel, progress)``
    runs in a worker thread, and ``deliver(job, result)`` or ``fail(job, outcome)`` run in the
    main thread. One job at a time: a request during a job makes the job's ``should_cancel()``
    true (the job stops at its next check) and starts the newest job when it ends. A result of
    a request that is no longer the newest is dropped (counted in ``dropped``).

    ``progressed(job, done, total)`` (main thread) reports the running job's
    ``progress(done, total)`` calls while it is the newest; ``idle()`` (main thread) is
    called when a job ends without a delivered result and no other job follows.
    """

    def __init__(
        self, prepare, compute, deliver, fail, delay_ms: int = DEBOUNCE_MS, *,
        progressed: Callable | None = None, idle: Callable | None = None,
    ) -> None:  # fmt: skip
        self.prepare, self.compute, self.deliver, self.fail = prepare, compute, deliver, fail
        self.progressed, self.idle = progressed, idle
        self._job = self._outcome = None
        self._relay = _Relay()
        self._relay.live.connect(self._on_progress)
        self.generation = 0
        self.dropped = 0
        self.delivered = 0
        self._worker = None
        self._again = False
        self.closed = False
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self._launch)

    @property
    def busy(self) -> bool:
        """True while a request waits for its timer or a job runs."""
        return self._timer.isActive() or self._worker is not None or self._again

    def request(self) -> None:
        """Ask for a recomputation (debounced)."""
        if self.closed:
            return
        self.generation += 1
        self._timer.start()

    def stop(self) -> None:
        """Drop pending requests and make a running job's result stale."""
        self.generation += 1
        self._again = False
        try:
            self._timer.stop()
        except RuntimeError:  # Qt deleted the timer first (the application is closing)
            pass

    def close(self) -> None:
        """Stop for good (the widget is gone): later requests are ignored."""
        self.stop()
        self.closed = True

    def _launch(self) -> None:
        if self.closed:
            return
        if self._worker is not None:
            self._again = True
            return
        try:
            job = self.prepare()
        except Exception as err:  # a bug or an unexpected layer state: report, stay usable
            self.fail(None, Outcome(error=err, details=traceback.format_exc()))
            return
        if job is None:
            return
        gen = self.generation
        self._job, self._outcome = job, None
        progress = _Throttled(self._relay.live.emit, gen)
        self._worker = _worker(
            self.compute, job, lambda: gen != self.generation, progress,
            returned=partial(self._returned, gen, job), finished=self._finished,
        )  # fmt: skip
        self._worker.start()

    def _on_progress(self, gen: int, done: int, total: int) -> None:
        if gen == self.generation and self._worker is not None and self.progressed is not None:
            self.progressed(self._job, done, total)

    def _returned(self, gen: int, job, outcome: Outcome) -> None:
        self._outcome = "dropped"
        if gen != self.generation or self.closed:
            self.dropped += 1
        elif outcome.error is not None:
            self._outcome = "failed"
            self.fail(job, outcome)
        else:
            self._outcome = "delivered"
            self.delivered += 1
            self.deliver(job, outcome.result)

    def _finished(self) -> None:
        self._worker = self._job = None
        if self._again and not self.closed:
            self._again = False
            self._launch()
        if self._worker is None and self._outcome == "dropped" and not self._timer.isActive():
            if self.idle is not None and not self.closed:
                self.idle()
