"""Live mode: which region of the image is visible, and a debounced background runner that
keeps at most one computation in flight and drops results that a newer request made stale."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

SLAB_HALF = 1  # 2D view: planes on each side of the current one (3 planes in all)
MAX_PLANE = 1024  # 2D view: in-plane extent beyond which only a window around the centre is done
BOX_3D = (32, 192, 192)  # 3D view: the bounded region around the camera centre (z, y, x)
DEBOUNCE_MS = 150


def visible_box(
    viewer,
    layer,
    channel_axis: int | None,
    shape,
    *,
    slab_half: int = SLAB_HALF,
    max_plane: int = MAX_PLANE,
    box_3d=BOX_3D,
) -> tuple[tuple[int, int], ...]:
    """The spatial box ``((z0, z1), (y0, y1), (x0, x1))`` of ``layer`` that the live mode
    computes: in a 2D view the slab of ``2 * slab_half + 1`` planes around the current step of
    the axis not shown (the in-plane extent cut to ``max_plane`` around the camera centre); in
    a 3D view (or when a channel axis is displayed) a box of at most ``box_3d`` voxels around
    the camera centre."""
    nd = layer.ndim
    offset = viewer.dims.ndim - nd
    displayed = list(viewer.dims.displayed)
    point = list(viewer.dims.point)
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; viewer.camera before
    camera = scene.camera if scene is not None else viewer.camera
    center = list(camera.center)[-len(displayed) :]
    for axis, c in zip(displayed, center):
        point[axis] = c
    data_point = np.asarray(layer.world_to_data(point), dtype=float)[-nd:]
    spatial_axes = [a for a in range(nd) if channel_axis is None or a != channel_axis % nd]
    centre = [data_point[a] for a in spatial_axes]
    shown = {spatial_axes.index(d - offset) for d in displayed if d - offset in spatial_axes}
    if viewer.dims.ndisplay == 2 and len(shown) == 2:
        (slab_axis,) = {0, 1, 2} - shown
        sizes = [max_plane] * 3
        sizes[slab_axis] = 2 * slab_half + 1
    else:
        sizes = list(box_3d)
    return tuple(_window(c, s, n) for c, s, n in zip(centre, sizes, shape))


def _window(centre: float, size: int, n: int) -> tuple[int, int]:
    """``size`` consecutive indices (fewer at the edges of ``[0, n)``) centred on ``centre``."""
    c = int(np.clip(round(float(centre)), 0, n - 1))
    if size >= n:
        return (0, n)
    start = int(np.clip(c - size // 2, 0, n - size))
    return (start, start + size)


@dataclass
class Outcome:
    """What a background job returns: its result, or the error it raised (never raised in the
    worker, so napari does not show a second, raw notification of it)."""

    result: object = None
    error: BaseException | None = None
    details: str = ""


def run_caught(fn: Callable, *args, **kwargs) -> Outcome:
    """``fn(*args, **kwargs)`` as an ``Outcome`` (for ``create_worker``)."""
    try:
        return Outcome(result=fn(*args, **kwargs))
    except Exception as err:  # reported in the main thread by the caller
        return Outcome(error=err, details=traceback.format_exc())


class LiveRunner:
    """Debounced recomputation in a worker thread.

    ``request()`` (main thread) restarts a single-shot timer; when it fires, ``prepare()``
    (main thread) snapshots the job or returns None, ``compute(job, should_cancel)`` runs in a
    worker thread, and ``deliver(job, result)`` or ``fail(job, error)`` run in the main thread.
    One job at a time: a request during a job makes the job's ``should_cancel()`` true and
    starts the newest job when it ends. A result of a request that is no longer the newest is
    dropped (counted in ``dropped``).
    """

    def __init__(self, prepare, compute, deliver, fail, delay_ms: int = DEBOUNCE_MS) -> None:
        from qtpy.QtCore import QTimer

        self.prepare, self.compute, self.deliver, self.fail = prepare, compute, deliver, fail
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
        self._timer.stop()

    def close(self) -> None:
        """Stop for good (the widget is gone): later requests are ignored."""
        self.stop()
        self.closed = True

    def _launch(self) -> None:
        from napari.qt.threading import create_worker

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
        worker = create_worker(
            run_caught, self.compute, job, lambda: gen != self.generation, _start_thread=False
        )
        worker.returned.connect(partial(self._returned, gen, job))
        worker.finished.connect(self._finished)
        self._worker = worker
        worker.start()

    def _returned(self, gen: int, job, outcome: Outcome) -> None:
        if gen != self.generation or self.closed:
            self.dropped += 1
        elif outcome.error is not None:
            self.fail(job, outcome)
        else:
            self.delivered += 1
            self.deliver(job, outcome.result)

    def _finished(self) -> None:
        self._worker = None
        if self._again and not self.closed:
            self._again = False
            self._launch()
