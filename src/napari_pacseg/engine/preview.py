"""Segment boxes of one volume, exactly as ``segment`` does on the whole volume, with the head's
logits cached per z plane: the live view of the widget.

``RegionSegmenter(image, model, ...).probabilities(box, refine)`` returns the class
probabilities of a box. The head's logits are computed from the box plus the feature halo and
kept per plane, so a second request for the same planes with other refinement parameters runs
only ``pac_crf3d``, and moving the box by one plane computes the logits of one new plane. The
CRF runs on the box plus its reach, with the whole volume's intensity range, so the result on
the box equals the whole-volume ``segment`` result there.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np

from napari_pacseg.checks import check_callable
from napari_pacseg.engine import plan as engine
from napari_pacseg.engine.plan import (
    Box,
    model_on_device,
    prepare,
    split_box,
)
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.model.network import PacSegModel
from napari_pacseg.progress import stop_if_cancelled
from pacseg_kernels.threads import adaptive_threads

Progress = Callable[[str, int, int], None]

DEFAULT_CACHE_BYTES = 256 << 20
# A refinement counts towards ``RegionSegmenter.rate`` from this many tap visits up (about a
# tenth of a second on this project's CPU; smaller ones mostly measure the fixed costs). The
# least budget a rate gives (``engine.PREVIEW_RATE_FLOOR``) is more, so a rate measured low is
# measured again.
RATE_MIN_WORK = 1e8
# The rate is the slowest of this many recent refinements: per tap visit, refinements of other
# settings run up to several times faster or slower (the taps a window skips at a thin
# region's ends, the weights' share of the work), so the slowest recent one holds the next
# preview's time when the settings change (an average lets a costly preview right after a fast
# one overrun its time: docs/benchmarks.md, the live preview); it follows the machine back up
# after this many faster ones.
RATE_KEPT = 4


class RegionSegmenter:
    """Probabilities of boxes of one image under one model, head logits cached per plane.

    Parameters
    ----------
    image : ``(D, H, W)`` array, or 4D with ``channel_axis`` (as for ``segment``).
    model : the PacSegModel (not modified; copied when it lives on another device).
    spacing : ``(z, y, x)`` voxel size (default: the model's training spacing).
    device : "auto", "cpu", "cuda:1", ...
    max_cache_bytes : bound on the cached logits; least recently used planes go first.

    Thread-safe: calls are serialised by a lock, so one segmenter may serve a worker thread
    while another thread queues the next request.
    """

    def __init__(
        self,
        image,
        model: PacSegModel,
        *,
        spacing=None,
        channel_axis: int | None = None,
        device="auto",
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        request = SegmentRequest.build(
            model, spacing=spacing, channel_axis=channel_axis, refine=False, device=device
        )
        self.plan = prepare(image, request)
        self.shape = self.plan.shape
        self.spacing = self.plan.settings.spacing
        self.device = self.plan.device
        self.model = model_on_device(model, self.device)
        self.config = model.config
        self.max_cache_bytes = int(max_cache_bytes)
        self._planes: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._last: tuple[tuple, np.ndarray] | None = None
        self._lock = threading.Lock()
        #: Counters for callers and tests: planes of head logits computed, CRF runs.
        self.stats = {"logit_planes": 0, "crf_runs": 0}
        self.timings = {"features": 0.0, "context": 0.0, "head": 0.0, "refine": 0.0}
        #: Tap visits per second of the slowest of the last ``RATE_KEPT`` refinements of at
        #: least ``RATE_MIN_WORK`` (``Plan.refine_work`` over their time), or None before the
        #: first: what ``engine.preview_budget`` holds a preview's work to.
        self.rate: float | None = None
        self._rates: deque[float] = deque(maxlen=RATE_KEPT)

    def check_box(self, box) -> Box:
        """``box`` as three ``(start, stop)`` int pairs inside the volume, or ValueError."""
        box = tuple((int(a), int(b)) for a, b in box)
        if len(box) != 3 or not all(0 <= a < b <= n for (a, b), n in zip(box, self.shape)):
            raise ValueError(
                f"box must be 3 (start, stop) ranges inside the volume {self.shape}, got {box}"
            )
        return box

    def smoothed(self, box, sigma: float, planar: bool = False) -> np.ndarray:
        """The image as the object steps read it on ``box`` (``instances.evidence.smoothed_image``
        at ``sigma``, spacing units; float32 ``(d, h, w)``, or ``(h, w)`` for a 2D image,
        ``planar``): read on the box grown by the smoothing, so it equals the whole image's
        there."""
        from napari_pacseg.instances.evidence import smoothed_on

        box = self.check_box(box)
        vol = self.plan.vol[:, 0] if planar else self.plan.vol
        spacing = self.plan.settings.spacing[1:] if planar else self.plan.settings.spacing
        lo, hi = self.plan.lo.cpu().numpy(), self.plan.hi.cpu().numpy()

        def read(ext):
            return vol[(slice(None), *(slice(a, b) for a, b in ext))]

        return smoothed_on(read, box[1:] if planar else box, vol.shape[1:], spacing, sigma, lo, hi)

    def probabilities(
        self,
        box,
        refine=True,
        should_cancel: Callable[[], bool] | None = None,
        progress: Progress | None = None,
        *,
        reach=None,
        split_fit=None,
    ):
        """Class probabilities ``(K, d, h, w)`` float32 of ``box`` (``((z0, z1), (y0, y1),
        (x0, x1))``), refined with ``refine`` (True: model defaults, False, or a dict of
        ``RefineConfig`` overrides). ``should_cancel`` is polled between logit tiles and
        between the CRF's units of work; True raises ``SegmentationCancelled``.
        ``progress(done, total)`` counts them: the logit tiles still to compute, then the
        CRF's units (``total`` grows by them when the refinement starts).
        ``reach``: the CRF's reach per axis instead of the refinement's own (a bounded preview,
        ``engine.bound_preview``; the result is then approximate near the box's ends).
        ``split_fit``: also the probabilities that seed the objects, ``(p, seed_p)``
        (``engine.refine``'s ``split_fit``; the refinement must have a local fit). The same
        request twice returns the cached result."""
        box = self.check_box(box)
        check_callable(should_cancel, "probabilities: should_cancel", "should_cancel() -> bool")
        check_callable(progress, "probabilities: progress", "progress(done, total)")
        with self._lock:
            plan = self.plan.with_refine(refine)
            if self.plan.noise is None and plan.noise is not None:  # measured once per image
                self.plan = dataclasses.replace(self.plan, noise=plan.noise)
            if reach is not None:
                plan = plan.with_reach(reach)
            key = (box, plan.settings.refine, plan.settings.reach, split_fit)
            if self._last is not None and self._last[0] == key:
                return self._last[1]
            with adaptive_threads():  # fewer threads while other processes hold cores, as segment()
                return self._probabilities(plan, box, key, should_cancel, progress, split_fit)

    def _probabilities(self, plan, box: Box, key, should_cancel, progress, split_fit=None):
        """``probabilities`` of a checked ``box`` under ``plan``, cached under ``key``."""
        ext = plan.refine_extent(box)
        refining = plan.settings.refine is not None
        # one count over both stages: the logit tiles, then the CRF's units (one until the
        # CRF reports how many it has)
        diffs, tiles = self._logit_diffs(ext, should_cancel, progress, int(refining))

        def step(done: int, total: int) -> None:
            stop_if_cancelled(should_cancel, "region segmentation cancelled")
            if progress is not None:
                progress(tiles + done, tiles + total)

        stop_if_cancelled(should_cancel, "region segmentation cancelled")
        if refining and progress is not None:
            progress(tiles, tiles + 1)  # the logits are done before the CRF's first unit
        spent = -(self.timings["refine"] + self.timings.get("seeds", 0.0))
        p = engine.refine(plan, box, diffs, self.device, self.timings, progress=step,
                          split_fit=split_fit)  # fmt: skip
        if refining:
            self.stats["crf_runs"] += 1
            spent += self.timings["refine"] + self.timings.get("seeds", 0.0)
            self._measured(plan.refine_work(box, split_fit is not None), spent)
        self._last = (key, p)
        return p

    def _measured(self, work: int, seconds: float) -> None:
        """Count a refinement of ``work`` tap visits that took ``seconds`` in ``rate``."""
        if work < RATE_MIN_WORK or seconds <= 0:
            return
        self._rates.append(work / seconds)
        self.rate = min(self._rates)

    def _logit_diffs(
        self, ext: Box, should_cancel, progress=None, later: int = 0
    ) -> tuple[np.ndarray, int]:
        """Head logits minus the background's, ``(K - 1, *ext shape)``, and the number of
        tiles computed for them. ``progress(done, total)`` counts the tiles, ``later`` more
        units of work after them in ``total``. The logits come from the plane cache (a
        plane of this in-plane window, or the cached whole plane cut to it: a bounded preview's
        smaller window after previews of whole planes); missing planes are computed in runs
        of consecutive planes, tile by tile."""
        (z0, z1), ys, xs = ext
        window = (ys, xs)
        whole = ((0, self.shape[1]), (0, self.shape[2]))
        out = np.empty(
            (self.config.n_classes - 1, z1 - z0, ys[1] - ys[0], xs[1] - xs[0]), np.float32
        )
        missing = []
        for z in range(z0, z1):
            key = (window, z)
            plane = self._planes.get(key)
            if plane is None and window != whole:
                key = (whole, z)
                plane = self._planes.get(key)
                if plane is not None:
                    plane = plane[:, ys[0] : ys[1], xs[0] : xs[1]]
            if plane is None:
                missing.append(z)
            else:
                self._planes.move_to_end(key)
                out[:, z - z0] = plane
        grid = self.plan.settings.grid
        runs = [
            (run, split_box(((run[0], run[-1] + 1), ys, xs), engine.UNARY_TILE, grid))
            for run in _runs(missing)
        ]
        total, done = sum(len(tiles) for _, tiles in runs), 0
        for run, tiles in runs:
            for tile in tiles:
                stop_if_cancelled(should_cancel, "region segmentation cancelled")
                if progress is not None:
                    progress(done, total + later)
                d = engine.logits(self.plan, tile, self.model, self.device, self.timings)
                (ta, tb), (ya, yb), (xa, xb) = ((a - s, b - s) for (a, b), (s, _) in zip(tile, ext))
                out[:, ta:tb, ya:yb, xa:xb] = d
                done += 1
            for z in run:
                self._store((window, z), out[:, z - z0].copy())
            self.stats["logit_planes"] += len(run)
        return out, total

    def _store(self, key, plane: np.ndarray) -> None:
        self._planes[key] = plane
        self._cached_bytes += plane.nbytes
        while self._cached_bytes > self.max_cache_bytes and len(self._planes) > 1:
            _, old = self._planes.popitem(last=False)
            self._cached_bytes -= old.nbytes


def _runs(values: list[int]) -> list[list[int]]:
    """Sorted ints split into runs of consecutive values."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs
