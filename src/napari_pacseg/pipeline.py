"""``segment()``: image -> labels + matte, tiled with halos so tiling never changes the result."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from pacseg_kernels import pac_crf3d

from .checks import FLOAT32_MAX, as_volume, check_ints, check_spacing, resolve_device, short_repr
from .classes import DEFAULT_THRESHOLD, check_output_rule, labels_from_probabilities
from .features import compute_features
from .model import PacSegModel, RefineConfig, apply_range, intensity_range

# Core tile sizes (D, H, W) of the two passes on this budget: at 256^3 on a 2-core CPU, peak
# memory stays under 4x the float32 image (benchmarks/bench_pipeline.py; 64-plane refinement
# tiles took 4.3x: the mean field keeps its weights for a few planes of 77 taps).
UNARY_TILE = (32, 128, 128)
REFINE_TILE = (32, 128, 128)
# Volumes at most this deep are refined in full-depth tiles: no z halo to recompute.
REFINE_FULL_DEPTH = 64
STAGES = ("features", "context", "head", "refine")
# Bounds on the refinement's work, beyond which a run would take hours on a CPU or every tile
# would have to hold most of the volume: tap visits per voxel (iterations x window taps; the
# model default is 5 x 74 = 370) and the CRF's reach per axis (iterations x window radius x
# dilation; the default reaches 5 or 10 voxels).
MAX_TAP_STEPS = 10_000
MAX_CRF_REACH = 64


class SegmentationCancelled(RuntimeError):
    """Raised by ``segment``/``train`` when ``should_cancel()`` returned True; nothing is returned."""


@dataclass
class Segmentation:
    """Result of ``segment``.

    labels : ``(D, H, W)`` uint8: class per voxel by ``classes.labels_from_probabilities``
        (background 0, every other class its scribble value, model class index + 1).
    matte : ``(D, H, W)`` float32 in [0, 1]: 1 - P(background) after refinement.
    probabilities : ``(K, D, H, W)`` float32 class probabilities when asked for, else None.
    timings : wall seconds per stage, summed over tiles: ``features``, ``context``, ``head``,
        ``refine``, and ``total`` (the whole call, input checks and output writes included).
    """

    labels: np.ndarray
    matte: np.ndarray
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def refine_params(model: PacSegModel, refine) -> RefineConfig | None:
    """The refinement to run: model defaults (True), none (False), or overrides (a dict)."""
    if refine is False:
        return None
    base = model.config.refine
    if refine is True:
        return base
    if isinstance(refine, dict):
        known = {f.name for f in fields(RefineConfig)}
        unknown = sorted(set(map(str, refine)) - known)
        if unknown:
            raise ValueError(
                f"refine: unknown parameters {short_repr(unknown)}; known: {sorted(known)}"
            )
        return dataclasses.replace(base, **refine)
    raise ValueError(
        f"refine must be True, False or a dict of RefineConfig overrides, got {short_repr(refine)}"
    )


def check_refine_work(params: RefineConfig | None, spacing) -> None:
    """``ValueError`` when the refinement at ``spacing`` would visit more than ``MAX_TAP_STEPS``
    window taps per voxel or reach more than ``MAX_CRF_REACH`` voxels along an axis."""
    if params is None or not params.iterations:
        return
    kernel, _ = params.window(spacing)
    steps = params.iterations * (math.prod(kernel) - 1)
    reach = _crf_reach(params, spacing)
    fix = "lower iterations, kernel_size or dilation"
    if steps > MAX_TAP_STEPS:
        raise ValueError(
            f"refinement too costly: {params.iterations} iterations x {math.prod(kernel) - 1} "
            f"taps of a {kernel} window = {steps} tap visits per voxel, over the limit of "
            f"{MAX_TAP_STEPS} (the default is {5 * 74}); {fix}"
        )
    if max(reach) > MAX_CRF_REACH:
        raise ValueError(
            f"refinement reaches {reach} voxels (iterations x window radius x dilation), over "
            f"the limit of {MAX_CRF_REACH}: every tile would need most of the volume; {fix}"
        )


def as_model(model) -> PacSegModel:
    """``model`` itself, or the model file at that path (``load_model``)."""
    if isinstance(model, PacSegModel):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from .model_io import load_model

        return load_model(model)
    raise TypeError(
        f"model must be a PacSegModel or the path of a model file (see load_model), got "
        f"{type(model).__name__}"
    )


def refine_tile(shape) -> tuple[int, int, int]:
    """Core tile of the refinement pass: ``REFINE_TILE``, but the whole depth for volumes at
    most ``REFINE_FULL_DEPTH`` planes deep."""
    depth = shape[0] if shape[0] <= REFINE_FULL_DEPTH else REFINE_TILE[0]
    return (depth, *REFINE_TILE[1:])


def _tiles(shape, tile, grid):
    """Core boxes of at most ``tile`` voxels per axis, origins on multiples of ``grid``."""
    tile = [max(grid, t - t % grid) for t in tile]
    return list(
        itertools.product(
            *[[(s, min(s + t, n)) for s in range(0, n, t)] for n, t in zip(shape, tile)]
        )
    )


def segment(
    image,
    model: PacSegModel,
    *,
    spacing=None,
    channel_axis: int | None = None,
    refine=True,
    device="auto",
    tile_shape=None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    return_probabilities: bool = False,
    intensity_range=None,
    threshold: float = DEFAULT_THRESHOLD,
    background: int = 0,
) -> Segmentation:
    """Segment a 3D image with a trained model: logits, PAC-CRF refinement, labels and matte.

    Two passes over tiles: the first computes the head's logits of each tile (features and
    context net on the tile plus their halo) into one ``(K - 1, D, H, W)`` float32 buffer of
    logit differences; the second refines each tile with the CRF on the tile plus the CRF's
    reach. Every halo covers the whole receptive field, so results do not depend on tiling,
    and memory is bounded by the tile size plus that buffer and the outputs.

    Parameters
    ----------
    image : array ``(D, H, W)`` or 4D with ``channel_axis``; numpy or anything ``np.asarray``
        takes (a dask array is read tile by tile only through ``segment_zarr``; here it is loaded).
    model : PacSegModel (not modified; it is copied to the device when that is another one).
    spacing : (z, y, x) voxel size in the model's units (napari's layer ``scale``); defaults to
        the spacing the model was trained at.
    refine : True (model defaults), False, or a dict overriding ``RefineConfig`` fields.
    device : "auto", "cpu", "cuda", "cuda:1", ...; on a CUDA out-of-memory error the tile is
        retried smaller, then on the CPU, with a warning.
    tile_shape : core tile size (D, H, W) of both passes (default: ``UNARY_TILE`` for the
        first, ``refine_tile()`` for the second).
    progress : called as ``progress(done_tiles, total_tiles)`` over both passes.
    should_cancel : polled between tiles; True raises ``SegmentationCancelled``.
    return_probabilities : also return the ``(K, D, H, W)`` class probabilities.
    threshold, background : the label rule (``classes.labels_from_probabilities``): matte =
        1 - P(class ``background``); a voxel whose matte is >= ``threshold`` takes the most
        probable other class, the rest are 0.
    intensity_range : ``(lo, hi)``, one value per channel: the intensities mapped to 0 and 1
        (default: ``volume_intensity_range`` of this image). Give the range of the whole volume
        when segmenting it piece by piece (e.g. dask chunks with ``receptive_field`` as halo),
        so every piece is normalised alike and the pieces equal the whole.
    """
    start = time.perf_counter()
    model = as_model(model)
    vol = as_volume(image, channel_axis)
    if vol.shape[0] != model.config.in_channels:
        raise ValueError(
            f"the image has {vol.shape[0]} channel(s) but the model expects {model.config.in_channels}"
            + ("" if channel_axis is not None else "; pass channel_axis for a multichannel image")
        )
    spacing = check_spacing(spacing, model.config.spacing)
    params = refine_params(model, refine)
    if params is not None and not params.iterations:
        params = None
    check_refine_work(params, spacing)
    threshold, background = check_output_rule(threshold, background, model.config.n_classes)
    if tile_shape is not None:
        tile_shape = check_ints(tile_shape, 3, "tile_shape", 1, 1 << 20)
    runner = _TileRunner(resolve_device(device), model, progress, should_cancel)
    shape = vol.shape[1:]
    lo, hi = (
        volume_intensity_range(vol)
        if intensity_range is None
        else _checked_range(intensity_range, vol.shape[0])
    )
    k = model.config.n_classes
    # Softmax and the Potts mean field only see differences between a voxel's logits, so the
    # logits are kept as differences to the background's: one channel fewer.
    diffs = np.empty((k - 1, *shape), dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    matte = np.zeros(shape, dtype=np.float32)
    probs = np.zeros((k, *shape), dtype=np.float32) if return_probabilities else None
    timings = dict.fromkeys(STAGES, 0.0)
    halo = model.halo(spacing)
    unary_boxes = _tiles(shape, tile_shape or UNARY_TILE, model.grid)
    final_boxes = _tiles(shape, tile_shape or refine_tile(shape), 1)
    runner.total = len(unary_boxes) + len(final_boxes)
    reach = _crf_reach(params, spacing)

    def unary_pass(box, dev, dev_model):
        d = _tile_logit_diffs(vol, lo, hi, box, halo, dev_model, spacing, dev, timings)
        diffs[(slice(None), *(slice(a, b) for a, b in box))] = d

    runner.run(unary_boxes, unary_pass)
    kernel, sigma = params.window(spacing) if params is not None else (None, None)

    def final_pass(box, dev, _):
        p = _tile_probabilities(vol, lo, hi, diffs, box, reach, params, kernel, sigma, dev, timings)
        sl = tuple(slice(a, b) for a, b in box)
        labels[sl], matte[sl] = labels_from_probabilities(p, threshold, background)
        if probs is not None:
            probs[(slice(None), *sl)] = p

    runner.run(final_boxes, final_pass)
    timings["total"] = time.perf_counter() - start
    return Segmentation(labels, matte, probs, timings)


def model_on_device(model: PacSegModel, device: torch.device) -> PacSegModel:
    """``model`` in eval mode on ``device``: the caller's own object when it is already there,
    else a copy (``nn.Module.to`` moves in place, and callers keep using their model)."""
    here = next(model.parameters()).device
    if here.type == device.type and (device.index is None or here == device):
        return model.eval()
    return copy.deepcopy(model).to(device).eval()


class _TileRunner:
    """Runs a pass over tiles: cancellation, progress over all passes, and the out-of-memory
    policy (split the tile and retry on the same device, then continue on the CPU)."""

    def __init__(self, device, model, progress, should_cancel) -> None:
        self.device, self.model = device, model
        self.progress, self.should_cancel = progress, should_cancel
        self.done = self.total = 0
        self._copies: dict[torch.device, PacSegModel] = {}

    def model_on(self, device: torch.device) -> PacSegModel:
        """The model on ``device``: the caller's own when already there, else a copy."""
        if device not in self._copies:
            self._copies[device] = model_on_device(self.model, device)
        return self._copies[device]

    def run(self, boxes, work) -> None:
        pending = list(boxes)
        while pending:
            box = pending.pop(0)
            if self.should_cancel is not None and self.should_cancel():
                raise SegmentationCancelled("segmentation cancelled; no result was produced")
            try:
                work(box, self.device, self.model_on(self.device))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                sizes = [b - a for a, b in box]
                grid = self.model.grid
                if max(sizes) > grid * 8:  # split the tile, try again on the same device
                    warnings.warn(
                        f"GPU out of memory on a tile of {sizes}; retrying with smaller tiles",
                        stacklevel=3,
                    )
                    smaller = [max(grid, s // 2) for s in sizes]
                    sub = _tiles(sizes, smaller, grid)
                    pending = [
                        tuple((a0 + a, a0 + b) for (a0, _), (a, b) in zip(box, s)) for s in sub
                    ] + pending
                    self.total += len(sub) - 1
                    continue
                warnings.warn(
                    "GPU out of memory even on small tiles; continuing on the CPU", stacklevel=3
                )
                self.device = torch.device("cpu")
                pending.insert(0, box)
                continue
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total)


def receptive_field(model: PacSegModel, spacing=None, refine=True) -> tuple[int, int, int]:
    """Voxels per axis ``(z, y, x)`` that a voxel's result depends on beyond itself: the
    features' and context net's halo plus, with refinement, the CRF's reach. A piece of a
    volume extended by this much on every side (clipped at the volume's edges) gives exactly
    the whole-volume result on the piece (with the whole volume's ``intensity_range``; with a
    context net, pieces must also start on multiples of ``model.grid``)."""
    spacing = check_spacing(spacing, model.config.spacing)
    params = refine_params(model, refine)
    check_refine_work(params, spacing)
    grid = model.grid  # whole pooling cells, so a piece's context net sees the volume's grid
    return tuple(
        -(-(h + r) // grid) * grid
        for h, r in zip(model.halo(spacing), _crf_reach(params, spacing), strict=True)
    )


def _crf_reach(params: RefineConfig | None, spacing) -> tuple[int, int, int]:
    if params is None or not params.iterations:
        return (0, 0, 0)
    kernel, _ = params.window(spacing)
    return tuple(params.iterations * (k // 2) * params.dilation for k in kernel)


def volume_intensity_range(vol) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel intensity range ``(lo, hi)``, each ``(1, C, 1, 1, 1)`` float32, of a
    ``(C, D, H, W)`` array (numpy, dask or zarr): ``intensity_range`` of a regular grid of at
    most ~4M voxels (every ``step``-th along each axis, ``step`` set by the shape alone, so every
    array type gives the same range)."""
    n = math.prod(vol.shape[1:])
    step = max(1, math.ceil((n / (1 << 22)) ** (1 / 3)))
    sample = np.asarray(vol[:, ::step, ::step, ::step], dtype=np.float64)  # no overflow here
    if sample.size and not (np.isfinite(sample).all() and np.abs(sample).max() <= FLOAT32_MAX / 4):
        raise ValueError(
            "the image holds NaN, infinite values or values beyond the float32 range the "
            f"segmentation computes in (|x| < {FLOAT32_MAX / 4:.2g}); clean or rescale it first"
        )
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    return intensity_range(torch.from_numpy(sample)[None])


def _checked_range(intensity_range, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        lo, hi = (
            torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1) for v in intensity_range
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"intensity_range must be (lo, hi) with one number per channel, got {intensity_range!r}"
        ) from err
    if lo.numel() != channels or hi.numel() != channels:
        raise ValueError(
            f"intensity_range: the image has {channels} channel(s) but lo/hi have {lo.numel()}/{hi.numel()} values"
        )
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"intensity_range must be finite, got {intensity_range!r}")
    return lo.view(1, -1, 1, 1, 1), hi.view(1, -1, 1, 1, 1)


class _Stopwatch:
    """Adds the wall time of each ``with watch("stage"):`` block to ``timings[stage]``
    (CUDA work is synchronised so it is charged to the stage that launched it)."""

    def __init__(self, timings: dict, device: torch.device) -> None:
        self.timings, self.cuda = timings, device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[stage] += time.perf_counter() - start


def extend_box(box, halo, shape, grid: int = 1):
    """``(ext, core)``: ``box`` (3 ``(start, stop)`` pairs) grown by ``halo`` voxels per axis and
    clipped to ``shape``, its starts rounded down to multiples of ``grid`` (the context net's
    pooling grid); ``core`` the slices of ``box`` inside ``ext``."""
    ext = []
    for (a, b), h, n in zip(box, halo, shape):
        start = max(0, a - h)
        ext.append((start - start % grid, min(n, b + h)))
    core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(box, ext))
    return tuple(ext), core


def _region(vol, ext, dev) -> torch.Tensor:
    """``(1, C, d, h, w)`` float32 on ``dev``: the image inside the box ``ext``."""
    region = np.ascontiguousarray(vol[(slice(None), *(slice(s, e) for s, e in ext))], np.float32)
    if not region.flags.writeable:  # a read-only memory map of float32 data (an NPY input)
        region = region.copy()
    return torch.from_numpy(region)[None].to(dev)


@torch.no_grad()
def _tile_logit_diffs(vol, lo, hi, box, halo, model, spacing, dev, timings) -> np.ndarray:
    """Logits minus the background logit, ``(K - 1, *core)`` float32, of one core box, computed
    from the box plus its halo (features and context net). ``vol`` is ``(C, D, H, W)`` in its own
    dtype; only the region is made float32."""
    ext, core = extend_box(box, halo, vol.shape[1:], model.grid)
    watch = _Stopwatch(timings, dev)
    with watch("features"):
        norm = apply_range(_region(vol, ext, dev), lo.to(dev), hi.to(dev))
        feats = compute_features(norm, model.config.features, spacing, crop=core)
    if model.context is not None:
        with watch("context"):
            feats = torch.cat([feats, model.context(norm)[(slice(None), slice(None), *core)]], 1)
    del norm
    with watch("head"):
        logits = model.head(feats)[0]
        del feats
        out = (logits[1:] - logits[:1]).cpu().numpy()
    if not np.isfinite(out).all():
        raise ValueError(
            f"the model gives non-finite logits on the image in the box {short_repr(box)}: its "
            "weights or the image's values are out of range (max |weight| "
            f"{max(float(p.abs().max()) for p in model.parameters()):.3g}); retrain or rescale"
        )
    return out


@torch.no_grad()
def _tile_probabilities(
    vol, lo, hi, diffs, box, reach, params, kernel, sigma, dev, timings
) -> np.ndarray:
    """Class probabilities ``(K, *core)`` of one core box: the stored logit differences, refined
    by ``pac_crf3d`` on the box plus the CRF's ``reach`` when ``params`` is given."""
    ext, core = extend_box(box, reach, vol.shape[1:])
    d = diffs[(slice(None), *(slice(s, e) for s, e in ext))]
    logits = torch.zeros((1, d.shape[0] + 1, *d.shape[1:]), dtype=torch.float32, device=dev)
    logits[0, 1:] = torch.from_numpy(d).to(dev)
    if params is not None:
        with _Stopwatch(timings, dev)("refine"):
            guide = apply_range(_region(vol, ext, dev), lo.to(dev), hi.to(dev))
            logits = pac_crf3d(
                logits.div_(params.temperature),
                guide.div_(params.guide_sigma),
                iterations=params.iterations,
                kernel_size=kernel,
                dilation=params.dilation,
                compat=params.compat,
                spatial_sigma=sigma,
            )
    p = torch.softmax(logits[(slice(None), slice(None), *core)], dim=1)[0].cpu().numpy()
    if not np.isfinite(p).all():
        raise ValueError(
            f"the refinement gave NaN in the box {short_repr(box)}: the image's normalised values "
            "are out of range for the guide; clip outliers or pass intensity_range"
        )
    return p
