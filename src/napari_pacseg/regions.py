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

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from .model import PacSegModel
from .pipeline import (
    UNARY_TILE,
    SegmentationCancelled,
    _crf_reach,
    _tile_logit_diffs,
    _tile_probabilities,
    _tiles,
    as_volume,
    check_refine_work,
    check_spacing,
    extend_box,
    model_on_device,
    refine_params,
    resolve_device,
    volume_intensity_range,
)

DEFAULT_CACHE_BYTES = 256 << 20

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


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
        self.vol = as_volume(image, channel_axis)
        if self.vol.shape[0] != model.config.in_channels:
            raise ValueError(
                f"the image has {self.vol.shape[0]} channel(s) but the model expects "
                f"{model.config.in_channels}"
            )
        self.shape = tuple(self.vol.shape[1:])
        self.spacing = check_spacing(spacing, model.config.spacing)
        self.device = resolve_device(device)
        self.model = model_on_device(model, self.device)
        self.config = model.config
        self.halo = self.model.halo(self.spacing)
        self.max_cache_bytes = int(max_cache_bytes)
        self.lo, self.hi = volume_intensity_range(self.vol)
        self._planes: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._last: tuple[tuple, np.ndarray] | None = None
        self._lock = threading.Lock()
        #: Counters for callers and tests: planes of head logits computed, CRF runs.
        self.stats = {"logit_planes": 0, "crf_runs": 0}
        self.timings = {"features": 0.0, "context": 0.0, "head": 0.0, "refine": 0.0}

    def check_box(self, box) -> Box:
        """``box`` as three ``(start, stop)`` int pairs inside the volume, or ValueError."""
        box = tuple((int(a), int(b)) for a, b in box)
        if len(box) != 3 or not all(0 <= a < b <= n for (a, b), n in zip(box, self.shape)):
            raise ValueError(
                f"box must be 3 (start, stop) ranges inside the volume {self.shape}, got {box}"
            )
        return box

    def probabilities(
        self, box, refine=True, should_cancel: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """Class probabilities ``(K, d, h, w)`` float32 of ``box`` (``((z0, z1), (y0, y1),
        (x0, x1))``), refined with ``refine`` (True: model defaults, False, or a dict of
        ``RefineConfig`` overrides). ``should_cancel`` is polled between logit tiles;
        True raises ``SegmentationCancelled``. The same request twice returns the cached array."""
        box = self.check_box(box)
        params = refine_params(self.model, refine)
        if params is not None and not params.iterations:
            params = None
        check_refine_work(params, self.spacing)
        key = (box, params)
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
            reach = _crf_reach(params, self.spacing)
            ext, core = extend_box(box, reach, self.shape)
            diffs = self._logit_diffs(ext, should_cancel)
            sub = self.vol[(slice(None), *(slice(s, e) for s, e in ext))]
            rel = tuple((c.start, c.stop) for c in core)
            kernel, sigma = params.window(self.spacing) if params is not None else (None, None)
            if should_cancel is not None and should_cancel():
                raise SegmentationCancelled("region segmentation cancelled")
            p = _tile_probabilities(
                sub, self.lo, self.hi, diffs, rel, reach, params, kernel, sigma, self.device,
                self.timings,
            )  # fmt: skip
            if params is not None:
                self.stats["crf_runs"] += 1
            self._last = (key, p)
            return p

    def _logit_diffs(self, ext: Box, should_cancel) -> np.ndarray:
        """Head logits minus the background's, ``(K - 1, *ext shape)``, from the plane cache;
        missing planes are computed in runs of consecutive planes, tile by tile."""
        (z0, z1), ys, xs = ext
        window = (ys, xs)
        out = np.empty(
            (self.config.n_classes - 1, z1 - z0, ys[1] - ys[0], xs[1] - xs[0]), np.float32
        )
        missing = []
        for z in range(z0, z1):
            plane = self._planes.get((window, z))
            if plane is None:
                missing.append(z)
            else:
                self._planes.move_to_end((window, z))
                out[:, z - z0] = plane
        for run in _runs(missing):
            box = ((run[0], run[-1] + 1), ys, xs)
            size = tuple(b - a for a, b in box)
            for tile in _tiles(size, UNARY_TILE, self.model.grid):
                if should_cancel is not None and should_cancel():
                    raise SegmentationCancelled("region segmentation cancelled")
                abs_tile = tuple((o + a, o + b) for (o, _), (a, b) in zip(box, tile))
                d = _tile_logit_diffs(
                    self.vol, self.lo, self.hi, abs_tile, self.halo, self.model, self.spacing,
                    self.device, self.timings,
                )  # fmt: skip
                (ta, tb), (ya, yb), (xa, xb) = (
                    (a - s, b - s) for (a, b), (s, _) in zip(abs_tile, ext)
                )
                out[:, ta:tb, ya:yb, xa:xb] = d
            for z in run:
                self._store((window, z), out[:, z - z0].copy())
            self.stats["logit_planes"] += len(run)
        return out

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
