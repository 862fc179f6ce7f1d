"""The engine under every face: a validated plan, and the two stages that run on boxes of it.

``prepare(image, model, ...)`` checks everything once and returns a ``Plan``: the volume view,
the spacing, the refinement to run (``Settings``: window, halo, reach), the device, the whole
volume's intensity range, the label rule and the tiles. Two stages run on boxes of a plan:

- ``logits(plan, box, ...)``: the model's logits (features -> context -> head, owned by the model:
  ``PacSegModel.crop_logits``) of a box, from the box plus the features' halo, kept as
  differences to the background's logit ``(K - 1, d, h, w)``;
- ``refine(plan, box, diffs, ...)``: class probabilities ``(K, d, h, w)`` of a box from the logit
  differences of ``plan.refine_extent(box)``, refined by ``pac_crf3d`` guided by the image.

Every halo covers the whole receptive field, so a box's result is the same whatever the tiling:
``segment``, the live ``RegionSegmenter``, ``train``'s feature extraction, ``receptive_field``
and each zarr chunk (through ``segment``) all run on a plan.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from napari_pacseg.checks import as_image, check_spacing, short_repr
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.model.features import axis_radii
from napari_pacseg.model.network import InstanceConfig, PacSegModel, RefineConfig, with_overrides
from napari_pacseg.model.normalise import (
    apply_range,
    image_normalisation,
    image_range,
    volume_noise_level,
)
from napari_pacseg.progress import stop_if_cancelled
from napari_pacseg.refine.guide import GuideFilter, guide_filter, make_guide
from napari_pacseg.refine.local_fit import local_fit
from pacseg_kernels import pac_crf3d
from pacseg_kernels.crf_torch import wavefront_plan
from pacseg_kernels.threads import current_load, readapt, usable_cores

# Core tile sizes (D, H, W) of the two passes on this budget: at 256^3 on a 2-core CPU, peak
# memory stays under 4x the float32 image (benchmarks/bench_pipeline.py; 64-plane refinement
# tiles took 4.3x: the mean field keeps its weights for a few planes of 77 taps).
UNARY_TILE = (32, 128, 128)
REFINE_TILE = (32, 128, 128)
# Volumes at most this deep are refined in full-depth tiles: no z halo to recompute.
REFINE_FULL_DEPTH = 64
STAGES = ("features", "context", "head", "refine")
# Mean-field steps of the refinement that seeds the objects (``refine(split_fit=...)``): its guide
# and fit are the refinement's own. In an ad-hoc sweep on bench_realdata.py's nuclei, 2 steps
# split touching nuclei as well as the refinement's 5 (object F1 and counts within the spread
# of the stroke sets) at 2/5 of the mean field's cost.
SEED_ITERATIONS = 2
# Bounds on the refinement's work, beyond which a run would take hours on a CPU: tap visits per
# voxel (iterations x window taps; the model default is 5 x 74 = 370 at the sample's spacing),
# and how many times over the refinement tiles, each grown by the CRF's reach (iterations x
# window radius x dilation), cover the volume (the defaults: 1.2-2.2x; 30 iterations at
# isotropic spacing: ~9x).
MAX_TAP_STEPS = 10_000
MAX_REFINE_OVERLAP = 16.0
# Bound on tiles the caller chooses (``tile_shape``): the work of both passes over them (each
# tile grown by the voxels it reads: the logits' halo, then the refinement's read reach, plus
# ``TILE_COST_VOXELS`` per tile) over the image's own work (its voxels once per pass, as one
# tile). The default tiles cost 1-3x (up to ``MAX_REFINE_OVERLAP`` with a long reach), tiles
# about as wide as the halo 5-40x, single-voxel tiles thousands of times.
MAX_TILE_WORK = 64.0
# A tile's fixed cost (copies, dispatch, the Python loop), in voxels: ~1 ms per tile and pass
# on one CPU core, where a pass takes ~0.5 us per voxel.
TILE_COST_VOXELS = 2048

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# --- what does not depend on the image ------------------------------------------------------------


def refine_params(model: PacSegModel, refine) -> RefineConfig | None:
    """The refinement to run: model defaults (True), none (False or None), a ``RefineConfig``,
    or overrides (a dict)."""
    if refine is False or refine is None:
        return None
    return with_overrides(model.config.refine, refine, "refine")


@dataclass(frozen=True)
class Settings:
    """The image-independent part of a plan, for one model at one spacing.

    spacing : ``(z, y, x)``. refine : the ``RefineConfig`` to run, None for no refinement (also
    for 0 iterations). kernel, sigma : the CRF window and spatial sigma per axis (voxels), None
    without refinement. halo : voxels the logits of a voxel depend on beyond it (features,
    context net). reach : voxels the CRF carries messages. grid : the context net's pooling
    grid (tile origins are multiples of it). ndim : the model's kind (2: one-plane windows).
    fit_sigma : the local intensity fit's Gaussian per axis (voxels), None without it;
    fit_reach : voxels it reads beyond the CRF's reach.
    """

    spacing: tuple[float, float, float]
    refine: RefineConfig | None
    kernel: tuple[int, int, int] | None
    sigma: tuple[float, float, float] | None
    halo: tuple[int, int, int]
    reach: tuple[int, int, int]
    grid: int
    ndim: int = 3
    fit_sigma: tuple[float, float, float] | None = None
    fit_reach: tuple[int, int, int] = (0, 0, 0)

    @property
    def read_reach(self) -> tuple[int, int, int]:
        """Voxels of logits and image the refinement of a voxel reads beyond it: the CRF's
        reach plus the local fit's."""
        return tuple(r + f for r, f in zip(self.reach, self.fit_reach))

    @property
    def receptive_field(self) -> tuple[int, int, int]:
        """``halo + read_reach`` per axis, rounded up to whole pooling cells (see
        ``receptive_field``)."""
        return tuple(
            -(-(h + r) // self.grid) * self.grid for h, r in zip(self.halo, self.read_reach)
        )


def seeding_fit(config: InstanceConfig | None, settings: Settings) -> float | None:
    """The local fit's weight in the refinement whose labels seed the objects of ``config``
    (``InstanceConfig.split_fit``; ``refine(split_fit=...)``), or None where the labels seed
    them themselves: no objects asked, cells mode, ``split_fit`` 0, no refinement or no local
    fit in it (``settings``), or a fit of that weight already."""
    if config is None or config.boundary is not None or not config.split_fit:
        return None
    refine = settings.refine
    if refine is None or settings.fit_sigma is None or refine.fit_weight == config.split_fit:
        return None
    return config.split_fit


def settle(model: PacSegModel, spacing=None, refine=True) -> Settings:
    """Checked ``Settings`` of ``model`` at ``spacing`` (default: its training spacing; ``(y,
    x)`` for a 2D model, see ``ModelConfig.volume_spacing``) with ``refine`` (True, False, a dict of overrides or a ``RefineConfig``)."""
    spacing = model.config.volume_spacing(spacing)
    params = refine_params(model, refine)
    if params is not None and not params.iterations:
        params = None
    ndim = model.config.ndim
    kernel, sigma = params.window(spacing, ndim) if params is not None else (None, None)
    reach = (
        (0, 0, 0)
        if params is None
        else tuple(params.iterations * (k // 2) * params.dilation for k in kernel)
    )
    fit_sigma = params.fit_window(spacing, ndim) if params is not None else None
    fit_reach = (0, 0, 0) if fit_sigma is None else axis_radii(fit_sigma)
    settings = Settings(
        spacing, params, kernel, sigma, model.halo(spacing), reach, model.grid, ndim,
        fit_sigma, fit_reach,
    )  # fmt: skip
    _check_refine_work(settings)
    return settings


def _check_refine_work(s: Settings) -> None:
    """``ValueError`` when the refinement would visit more than ``MAX_TAP_STEPS`` window taps
    per voxel."""
    if s.refine is None:
        return
    taps = math.prod(s.kernel) - 1
    steps = s.refine.iterations * taps
    if steps > MAX_TAP_STEPS:
        default = RefineConfig()
        usual = default.iterations * (math.prod(default.window(s.spacing, s.ndim)[0]) - 1)
        raise ValueError(
            f"refinement too costly: {s.refine.iterations} iterations x {taps} taps of a "
            f"{s.kernel} window = {steps} tap visits per voxel, over the limit of "
            f"{MAX_TAP_STEPS} (the default refinement makes {usual} at this spacing); lower "
            "iterations or kernel_size"
        )


def check_overlap(boxes, reach, shape, what: str = "tiles") -> None:
    """``ValueError`` when ``boxes`` grown by ``reach`` (clipped to ``shape``) would cover the
    volume more than ``MAX_REFINE_OVERLAP`` times: a reach far beyond the box size, where every
    box would redo most of the volume."""
    covered = sum(math.prod(b - a for a, b in extend_box(box, reach, shape)[0]) for box in boxes)
    ratio = covered / math.prod(shape)
    if ratio > MAX_REFINE_OVERLAP:
        raise ValueError(
            f"the result of a voxel reaches {tuple(reach)} voxels (refinement: iterations x "
            f"window radius x dilation): the {len(boxes)} {what} would process {ratio:.1f}x the "
            f"volume's voxels (limit {MAX_REFINE_OVERLAP:g}x); lower iterations or dilation, or "
            f"use larger {what}"
        )


def _check_overlap(plan: Plan) -> None:
    if plan.settings.refine is not None:
        check_overlap(plan.refine_boxes(), plan.settings.read_reach, plan.shape)


def tiling_work(shape, tile, settings: Settings) -> tuple[int, int]:
    """``(work, tiles)`` of segmenting a ``(D, H, W)`` volume in core tiles ``tile`` ``(D, H,
    W)``: the voxels both passes read (the logits pass each tile grown by ``settings.halo``,
    on the pooling grid; the refinement each grown by ``settings.read_reach``) plus
    ``TILE_COST_VOXELS`` per tile and pass, and the logits pass's tile count. The sum over
    ``split_box``'s boxes of ``extend_box``'s voxels, taken one axis at a time (a box's
    voxels are the product of its axes'), so it is quick for any tile count."""
    passes = [(settings.halo, settings.grid)]
    if settings.refine is not None:
        passes.append((settings.read_reach, 1))
    work, count = 0, None
    for grow, grid in passes:
        axes = [_axis_reads(n, t, g, grid) for n, t, g in zip(shape, tile, grow)]
        tiles = math.prod(c for _, c in axes)
        work += math.prod(v for v, _ in axes) + TILE_COST_VOXELS * tiles
        count = tiles if count is None else count
    return work, count


def _axis_reads(n: int, tile: int, grow: int, grid: int) -> tuple[int, int]:
    """``(voxels, tiles)`` along one axis of ``n`` voxels cut into tiles of ``tile`` (rounded
    down to a multiple of ``grid``, as ``split_box``), each grown by ``grow`` on both sides and
    clipped, its start rounded down to ``grid`` (as ``extend_box``)."""
    t = max(grid, tile - tile % grid)
    starts = np.arange(0, n, t, dtype=np.int64)
    lo = np.maximum(starts - grow, 0)
    lo -= lo % grid
    hi = np.minimum(starts + t + grow, n)
    return int((hi - lo).sum()), len(starts)


def _check_tiles(shape, tile, s: Settings, flat: bool = False) -> None:
    """``ValueError`` when core tiles ``tile`` ``(D, H, W)`` of a ``(D, H, W)`` volume would
    make over ``MAX_TILE_WORK`` times its own work (``tiling_work``), naming larger tiles that
    do not. ``flat``: a 2D image (one plane), whose tiles the message gives as ``(h, w)``."""
    shape, tile = tuple(int(n) for n in shape), tuple(tile)
    passes = 1 if s.refine is None else 2
    limit = MAX_TILE_WORK * passes * (math.prod(shape) + TILE_COST_VOXELS)
    work, tiles = tiling_work(shape, tile, s)
    if work <= limit:
        return
    grow = tuple(max(h, r) for h, r in zip(s.halo, s.read_reach))
    better = tuple(min(n, max(t, 2 * g)) for n, t, g in zip(shape, tile, grow))
    while better != shape and tiling_work(shape, better, s)[0] > limit:
        better = tuple(min(n, 2 * t) for n, t in zip(shape, better))
    axes = slice(1, None) if flat else slice(None)  # a 2D image's tiles are (h, w)
    raise ValueError(
        f"tile_shape {tile[axes]}: {tiles} tiles, each grown by up to {grow[axes]} voxels "
        f"of halo, would cost {work * MAX_TILE_WORK / limit:.0f}x the work of the image in one "
        f"tile (limit {MAX_TILE_WORK:g}x); use larger tiles, e.g. {better[axes]}, or leave "
        "tile_shape unset"
    )


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything a segmentation of one image needs, validated once by ``prepare``.

    vol : ``(C, D, H, W)`` view of the image in its own dtype (any strides). request : the
    ``SegmentRequest`` (model, label rule, device, tiles; the stages run a copy of the model on
    the device when it lives elsewhere). settings : ``Settings`` at the image's spacing.
    lo, hi : the intensities mapped to 0 and 1, ``(1, C, 1, 1, 1)`` float32.
    noise : the image's noise level per channel ``(C,)`` in normalised units
    (``guide.volume_noise_level``), which sets how the refinement's guide is denoised; None
    when the plan does not refine. flat : the image was 2D (``vol`` is its one-plane view;
    results are returned without the plane axis).
    """

    vol: np.ndarray
    request: SegmentRequest
    settings: Settings
    lo: torch.Tensor
    hi: torch.Tensor
    noise: torch.Tensor | None = None
    flat: bool = False

    @property
    def model(self) -> PacSegModel:
        return self.request.model

    @property
    def device(self) -> torch.device:
        return self.request.device

    @property
    def threshold(self) -> float:
        return self.request.threshold

    @property
    def background(self) -> int:
        return self.request.background

    @property
    def tile(self) -> tuple[int, int, int] | None:
        """Core tile ``(D, H, W)`` of both passes, or None for ``UNARY_TILE`` /
        ``refine_tile``."""
        return self.request.tile_shape

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.vol.shape[1:])

    @property
    def n_classes(self) -> int:
        return self.model.config.n_classes

    def guide(self) -> GuideFilter | None:
        """How the refinement's guide is made (None without refinement)."""
        s = self.settings
        if s.refine is None:
            return None
        return guide_filter(self.noise, s.refine.guide_sigma, s.spacing)

    def with_refine(self, refine) -> Plan:
        """The same plan with another refinement (the image, range and device are shared)."""
        settings = settle(self.model, self.settings.spacing, refine)
        noise = self.noise
        if noise is None and settings.refine is not None:
            noise = volume_noise_level(self.vol, self.lo, self.hi)
        return dataclasses.replace(self, settings=settings, noise=noise)

    @property
    def split_fit(self) -> float | None:
        """``seeding_fit`` of the request's objects."""
        return seeding_fit(self.request.instances, self.settings)

    def unary_boxes(self) -> list[Box]:
        """Core boxes of the logits pass (origins on the model's pooling grid)."""
        return split_box(whole(self.shape), self.tile or UNARY_TILE, self.settings.grid)

    def refine_boxes(self) -> list[Box]:
        """Core boxes of the refinement pass."""
        return split_box(whole(self.shape), self.tile or refine_tile(self.shape), 1)

    def refine_extent(self, box: Box) -> Box:
        """``box`` grown by the refinement's ``read_reach`` (clipped to the volume): what
        ``refine`` reads."""
        return extend_box(box, self.settings.read_reach, self.shape)[0]

    def with_reach(self, reach) -> Plan:
        """The same plan with the CRF run on boxes grown by ``reach`` only (a bounded preview;
        ``refine`` is then exact only where ``reach`` is the settings' own)."""
        settings = dataclasses.replace(self.settings, reach=tuple(int(r) for r in reach))
        return dataclasses.replace(self, settings=settings)

    def refine_work(self, box: Box, seeding: bool = False) -> int:
        """Tap visits of the mean-field steps of the refinement of ``box``, at most: per step,
        the voxels it runs on x the window's taps. The CRF runs on the box grown by its reach;
        where it runs its z wavefront, step ``k`` of ``n`` runs only on the planes within
        ``n - k`` steps' z reach of the box (``pac_crf3d``'s ``keep``, which also skips some
        taps on the CPU), else on every plane (the y wavefront's cone is not counted; the
        weights and the local fit are not counted either). ``seeding``: with the mean field
        that seeds the objects (``refine``'s ``split_fit``)."""
        s = self.settings
        if s.refine is None:
            return 0
        ext = extend_box(box, s.reach, self.shape)[0]
        (e0, e1), plane = ext[0], math.prod(b - a for a, b in ext[1:])
        (z0, z1), taps = box[0], math.prod(s.kernel) - 1
        runs = [s.refine.iterations]
        if seeding:
            runs.append(min(SEED_ITERATIONS, s.refine.iterations))
        if not self._z_wavefront(ext):
            return plane * (e1 - e0) * sum(runs) * taps  # every step on every plane
        step_z = (s.kernel[0] // 2) * s.refine.dilation  # z voxels one step carries messages
        planes = sum(
            min(e1, z1 + (n - k) * step_z) - max(e0, z0 - (n - k) * step_z)
            for n in runs
            for k in range(1, n + 1)
        )
        return plane * planes * taps

    def _z_wavefront(self, ext: Box) -> bool:
        """Whether ``pac_crf3d`` refines the region ``ext`` with its z wavefront (float32,
        ``crf_torch.wavefront_plan``: its weights fit the memory budget along z)."""
        s, shape = self.settings, [b - a for a, b in ext]
        unary = torch.empty((1, self.model.config.n_classes, *shape), device="meta")
        guide = torch.empty((1, self.vol.shape[0], *shape), device="meta")
        dilation = (s.refine.dilation,) * 3
        wave = wavefront_plan(unary, guide, s.refine.iterations, s.kernel, dilation)
        return wave is not None and wave[0] == 0


@dataclass(frozen=True)
class Bounded:
    """A live preview bounded to a budget of tap visits (``bound_preview``): the box it
    computes (the request's, or an in-plane window of it around its centre), the plan whose
    CRF reach it uses, and the request's box and reach."""

    box: Box
    plan: Plan
    requested: Box
    full_reach: tuple[int, int, int]

    @property
    def exact(self) -> bool:
        """True when the preview equals the full run on its box (nothing was cut)."""
        return self.plan.settings.reach == self.full_reach and self.box == self.requested

    def describe(self) -> str:
        """What the bound changed, for a status line ('' when exact)."""
        if self.exact:
            return ""
        have = self.plan.settings.reach
        cuts = [f"{n} {w} -> {h}" for n, h, w in zip("zyx", have, self.full_reach) if h != w]
        text = "approximate preview: refinement reach cut (" + ", ".join(cuts) + " voxels)"
        if self.box != self.requested:
            (_, _), (y0, y1), (x0, x1) = self.box
            text += f", in-plane window {y1 - y0} x {x1 - x0} around the centre"
        return text + " to stay within the preview's budget; Run on full image is exact"


def bound_preview(plan: Plan, box: Box, budget: float, seeding: bool = False) -> Bounded:
    """The preview of ``box`` whose refinement makes at most ``budget`` tap visits
    (``Plan.refine_work``; ``seeding``: with the mean field that seeds the objects). Within
    budget it is the full run's (exact). Else, in this order: the CRF's reach along z is cut
    (down to 0: the slab's planes then see no planes beyond it), the box's in-plane window
    shrinks around its centre (down to ``MIN_PREVIEW_WINDOW``), and last the reach along y
    and x is cut."""
    full = plan.settings.reach

    def work(p: Plan, window: Box) -> int:
        return p.refine_work(window, seeding)

    if work(plan, box) <= budget:
        return Bounded(box, plan, box, full)
    cut = plan.with_reach((0, *full[1:]))
    if work(cut, box) <= budget:  # the longest z reach that fits
        zr = _longest(lambda r: work(plan.with_reach((r, *full[1:])), box) <= budget, full[0] - 1)
        return Bounded(box, plan.with_reach((zr, *full[1:])), box, full)
    (z0, z1), (y0, y1), (x0, x1) = box
    sizes = (y1 - y0, x1 - x0)
    smallest = tuple(min(MIN_PREVIEW_WINDOW, n) for n in sizes)
    factor, window, shape = 1.0, box, sizes
    while work(cut, window) > budget and shape != smallest:
        factor *= 0.9
        shape = tuple(max(m, int(n * factor)) for n, m in zip(sizes, smallest))
        window = ((z0, z1), _centred(y0, y1, shape[0]), _centred(x0, x1, shape[1]))

    def in_plane(r: int) -> Plan:
        return plan.with_reach((0, min(full[1], r), min(full[2], r)))

    r = _longest(lambda r: work(in_plane(r), window) <= budget, max(full[1:]))
    return Bounded(window, in_plane(r), box, full)


def _longest(fits, top: int) -> int:
    """The largest reach ``r`` in ``0 .. top`` with ``fits(r)``, or 0 where none fits (the
    work grows with the reach, so ``fits`` holds up to some reach and not beyond: bisected)."""
    if fits(top):
        return top
    low, high = 0, top  # high does not fit; low fits, or is the answer anyway
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


MIN_PREVIEW_WINDOW = 16  # the in-plane window a bounded preview never shrinks below
# Tap visits a live preview's refinement may make: ~1.1 s on one core of this project's CPU
# (pac_crf3d visits ~1.1e9 taps/s per core: benchmarks/results/busy-cpu.md), so a preview with
# its logits stays within ~3 s even on a busy machine; GPUs visit ~100x more per second.
PREVIEW_WORK_CPU = 1.2e9
PREVIEW_WORK_GPU = 1e11
# The refinement's seconds that budget takes at that rate: where the refinements of recent
# previews ran slower (another machine, a laptop, a host that slows this one), the budget
# shrinks to this many seconds at their rate.
PREVIEW_REFINE_S = 1.1
MIN_CORE_SHARE = 0.25  # the least share of its budget a preview gets from the load
# The least budget a rate gives: every preview then does enough work to count towards the rate
# (more than ``preview.RATE_MIN_WORK``), which so follows the machine back, and no more, so a
# rate measured low holds the preview to it.
PREVIEW_RATE_FLOOR = 1.5e8


def preview_budget(device: torch.device, load: float | None = None,
                   rate: float | None = None) -> float:  # fmt: skip
    """Tap visits a live preview's refinement may make on ``device``. On the CPU the budget is
    one core's; where other processes keep busy (``load``, cores; default: measured,
    ``pacseg_kernels.threads.current_load``) all but a share of a core, it shrinks to that
    share, so the preview's time stays bounded on a saturated machine. ``rate``: the tap
    visits per second recent refinements made (``RegionSegmenter.rate``), or None: on the CPU
    the budget is also at most ``PREVIEW_REFINE_S`` seconds at that rate, so a slower machine
    gets less work (never more than one core's budget, nor less than
    ``PREVIEW_RATE_FLOOR``)."""
    if torch.device(device).type != "cpu":
        return PREVIEW_WORK_GPU
    if load is None:
        load = current_load()
    budget = PREVIEW_WORK_CPU * core_share(load)
    if rate is not None and rate > 0:
        budget = min(budget, max(PREVIEW_RATE_FLOOR, PREVIEW_REFINE_S * float(rate)))
    return budget


def core_share(load: float | None) -> float:
    """The share of one core a thread of this process gets while other processes keep ``load``
    cores busy: 1 while a core is free, else the cores split evenly between them and it (at
    least ``MIN_CORE_SHARE``)."""
    cores = usable_cores()
    if load is None or cores - load >= 1:
        return 1.0
    return max(MIN_CORE_SHARE, min(1.0, cores / (load + 1)))


def _centred(a: int, b: int, n: int) -> tuple[int, int]:
    """The ``n`` (at most ``b - a``) positions of ``[a, b)`` around its centre."""
    n = min(n, b - a)
    start = a + (b - a - n) // 2
    return start, start + n


def prepare(image, request: SegmentRequest, *, intensity_range=None, noise_level=None) -> Plan:
    """A checked ``Plan`` for segmenting ``image`` as ``request`` asks (``segment``'s
    ``image``, ``intensity_range`` and ``noise_level``)."""
    model = request.model
    vol, flat = as_image(image, request.channel_axis, ndim=model.config.ndim)
    check_channels((vol.shape[0], *vol.shape[2:]) if flat else vol.shape, model, request.channel_axis)
    spacing = request.spacing
    if flat and spacing is not None:
        spacing = check_spacing(spacing, None, 2)  # a 2D image takes (y, x)
    settings = settle(model, spacing, request.refine)
    if request.tile_shape is not None:  # before the image is read
        _check_tiles(vol.shape[1:], request.tile_shape, settings, flat)
    norm, noise = model.config.normalisation, None
    if noise_level is not None:
        noise = _checked_noise(noise_level, vol.shape[0])
    if intensity_range is not None:
        lo, hi = _checked_range(intensity_range, vol.shape[0])
    elif noise is None and settings.refine is not None:
        lo, hi, noise = image_normalisation(vol, norm)  # one pass for the range and the noise
    else:
        lo, hi = image_range(vol, norm)
    if noise is None and settings.refine is not None:
        # only the refinement's guide needs it (``with_refine`` measures it when it does)
        noise = volume_noise_level(vol, lo, hi)
    plan = Plan(vol, request, settings, lo, hi, noise, flat)
    if request.tile_shape is None:  # the caller's tiles are bounded by their work (_check_tiles)
        _check_overlap(plan)
    return plan


def check_channels(shape, model: PacSegModel, channel_axis) -> None:
    """``ValueError`` when a ``(C, D, H, W)`` (or 2D ``(C, H, W)``) image's C is not the model's
    channel count."""
    if shape[0] != model.config.in_channels:
        raise ValueError(
            f"the image has {shape[0]} channel(s) (shape {tuple(shape)}) but the model expects "
            f"{model.config.in_channels}"
            + ("" if channel_axis is not None else "; pass channel_axis for a multichannel image")
        )


def _checked_range(intensity_range, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        lo, hi = (
            torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1) for v in intensity_range
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"intensity_range must be (lo, hi) with one number per channel, got "
            f"{short_repr(intensity_range)}"
        ) from err
    if lo.numel() != channels or hi.numel() != channels:
        raise ValueError(
            f"intensity_range: the image has {channels} channel(s) but lo/hi have {lo.numel()}/{hi.numel()} values"
        )
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"intensity_range must be finite, got {short_repr(intensity_range)}")
    if not (hi > lo).all():
        raise ValueError(
            f"intensity_range {short_repr(intensity_range)} is empty or inverted: give (lo, hi) "
            "with hi > lo in every channel (lo maps to 0, hi to 1)"
        )
    return lo.view(1, -1, 1, 1, 1), hi.view(1, -1, 1, 1, 1)


def _checked_noise(noise_level, channels: int) -> torch.Tensor:
    try:
        noise = torch.as_tensor(np.asarray(noise_level, dtype=np.float32)).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"noise_level must be one number per channel, got {short_repr(noise_level)}"
        ) from err
    if noise.numel() == 1 and channels > 1:
        noise = noise.expand(channels).clone()
    if noise.numel() != channels:
        raise ValueError(
            f"noise_level: the image has {channels} channel(s) but {noise.numel()} values were given"
        )
    if not (torch.isfinite(noise).all() and (noise >= 0).all()):
        raise ValueError(
            f"noise_level must be finite and >= 0 (normalised units), got {short_repr(noise_level)}"
        )
    return noise


# --- boxes ----------------------------------------------------------------------------------------


def whole(shape) -> Box:
    return tuple((0, int(n)) for n in shape)


def refine_tile(shape) -> tuple[int, int, int]:
    """Core tile of the refinement pass: ``REFINE_TILE``, but the whole depth for volumes at
    most ``REFINE_FULL_DEPTH`` planes deep."""
    depth = shape[0] if shape[0] <= REFINE_FULL_DEPTH else REFINE_TILE[0]
    return (depth, *REFINE_TILE[1:])


def split_box(box: Box, tile, grid: int = 1) -> list[Box]:
    """``box`` cut into boxes of at most ``tile`` voxels per axis, origins (relative to the
    box) on multiples of ``grid``."""
    tile = [max(grid, t - t % grid) for t in tile]
    return list(
        itertools.product(
            *[[(s, min(s + t, b)) for s in range(a, b, t)] for (a, b), t in zip(box, tile)]
        )
    )


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


def region(vol, ext, dev) -> torch.Tensor:
    """``(1, C, d, h, w)`` float32 on ``dev``: the image inside the box ``ext``."""
    part = np.ascontiguousarray(vol[(slice(None), *(slice(s, e) for s, e in ext))], np.float32)
    if not part.flags.writeable:  # a read-only memory map of float32 data (an NPY input)
        part = part.copy()
    return torch.from_numpy(part)[None].to(dev)


# --- the two stages -------------------------------------------------------------------------------


class Stopwatch:
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
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@torch.no_grad()
def features(plan: Plan, box: Box, model: PacSegModel, dev, timings: dict) -> torch.Tensor:
    """Head input ``(n_features, *box)`` float32 of a box, from the box plus its halo."""
    ext, core = extend_box(box, plan.settings.halo, plan.shape, plan.settings.grid)
    norm = apply_range(
        region(plan.vol, ext, dev), plan.lo.to(dev), plan.hi.to(dev), plan.model.clip
    )
    return model.crop_features(norm, plan.settings.spacing, core, Stopwatch(timings, dev))[0]


@torch.no_grad()
def logits(plan: Plan, box: Box, model: PacSegModel, dev, timings: dict) -> np.ndarray:
    """Logits minus the background logit, ``(K - 1, *box)`` float32, of one box, computed from
    the box plus its halo by ``model`` (the plan's model, on ``dev``)."""
    ext, core = extend_box(box, plan.settings.halo, plan.shape, plan.settings.grid)
    watch = Stopwatch(timings, dev)
    with watch("features"):
        norm = apply_range(
            region(plan.vol, ext, dev), plan.lo.to(dev), plan.hi.to(dev), plan.model.clip
        )
    out = model.crop_logits(norm, plan.settings.spacing, core, watch, plan.request.head_dtype)[0]
    del norm
    with watch("head"):
        out = (out[1:] - out[:1]).cpu().numpy()
    if not np.isfinite(out).all():
        raise ValueError(
            f"the model gives non-finite logits on the image in the box {short_repr(box)}: its "
            "weights or the image's values are out of range (max |weight| "
            f"{max(float(p.abs().max()) for p in model.parameters()):.3g}); retrain or rescale"
        )
    return out


@torch.no_grad()
def refine(
    plan: Plan, box: Box, diffs: np.ndarray, dev, timings: dict, progress=None, split_fit=None
):
    """Class probabilities ``(K, *box)`` float32 of one box: ``diffs`` (``(K - 1, ...)``, the
    logit differences of ``plan.refine_extent(box)``) divided by the temperature, plus the
    local intensity fit (``local_fit``, computed over the box grown by the CRF's reach), then
    refined by ``pac_crf3d`` on that region, when the plan refines. ``progress(done,
    total)``: ``pac_crf3d``'s (it may raise to stop).

    ``split_fit`` (a weight, ``seeding_fit``): also the probabilities that seed the objects,
    ``(p, seed_p)``: the same guide and fit, the fit weighing ``split_fit``, refined by
    ``SEED_ITERATIONS`` steps of the mean field (timed as ``timings["seeds"]``; ``progress``
    counts its units after the refinement's); the plan must refine with a local fit."""
    ext = plan.refine_extent(box)
    s = plan.settings
    if split_fit is not None and s.fit_sigma is None:
        raise ValueError("refine: split_fit needs a plan that refines with a local fit")
    out = torch.zeros((1, diffs.shape[0] + 1, *diffs.shape[1:]), dtype=torch.float32, device=dev)
    out[0, 1:] = torch.from_numpy(diffs).to(dev)  # a strided view of the caller's buffer
    if s.refine is not None:
        with Stopwatch(timings, dev)("refine"):
            filt = plan.guide()
            read, within = extend_box(ext, filt.radius, plan.shape)
            norm = apply_range(
                region(plan.vol, read, dev), plan.lo.to(dev), plan.hi.to(dev), plan.model.clip
            )
            guide = make_guide(norm, filt, [(c.start, c.stop) for c in within])
            del norm
            out.div_(s.refine.temperature)
            crf = extend_box(box, s.reach, plan.shape)[0]  # within ext: ext adds the fit's reach
            inner = [(a - e, b - e) for (a, b), (e, _) in zip(crf, ext)]
            cut = (slice(None), slice(None), *(slice(a, b) for a, b in inner))
            fit = None
            if s.fit_sigma is not None:
                fit = local_fit(
                    out, guide * filt.guide_sigma, filt.residual_noise, s.fit_sigma, inner
                )
            # The CRF's region as compact copies, the fit's larger region freed before the
            # mean field, whose weights are the peak of memory (bench_pipeline.py)
            out = out[cut].contiguous()
            seed_unary = None if split_fit is None else torch.add(out, fit, alpha=split_fit)
            if fit is not None:
                out.add_(fit, alpha=s.refine.fit_weight)
            del fit
            guide = guide[cut].contiguous()
            crf_kw = dict(kernel_size=s.kernel, dilation=s.refine.dilation,
                          compat=s.refine.compat, spatial_sigma=s.sigma,
                          keep=[(a - e, b - e) for (a, b), (e, _) in zip(box, crf)])  # fmt: skip
            counted = [0]  # the main mean field's units, after which the seeding's count on
            main_progress = progress
            if progress is not None and seed_unary is not None:

                def main_progress(done: int, total: int) -> None:
                    counted[0] = total
                    progress(done, total)

            out = pac_crf3d(
                out, guide, iterations=s.refine.iterations, progress=main_progress, **crf_kw
            )
            ext = box
        if seed_unary is not None:
            # fewer steps reach less far than the region holds: the box's values are exact
            steps = min(SEED_ITERATIONS, s.refine.iterations)

            def seed_progress(done: int, total: int) -> None:
                progress(counted[0] + done, counted[0] + total)

            with Stopwatch(timings, dev)("seeds"):
                seed_out = pac_crf3d(seed_unary, guide, iterations=steps, **crf_kw,
                                     progress=None if progress is None else seed_progress)
                seed_p = torch.softmax(seed_out, dim=1)[0].cpu().numpy()
            del seed_unary, seed_out
            if not np.isfinite(seed_p).all():
                raise ValueError(
                    f"the seeding refinement gave NaN in the box {short_repr(box)}: the image's "
                    "normalised values are out of range for the guide; clip outliers or pass "
                    "intensity_range"
                )
    core = tuple(slice(a - e, b - e) for (a, b), (e, _) in zip(box, ext))
    p = torch.softmax(out[(slice(None), slice(None), *core)], dim=1)[0].cpu().numpy()
    if not np.isfinite(p).all():
        raise ValueError(
            f"the refinement gave NaN in the box {short_repr(box)}: the image's normalised values "
            "are out of range for the guide; clip outliers or pass intensity_range"
        )
    return p if split_fit is None else (p, seed_p)


# --- running a pass over boxes --------------------------------------------------------------------


def model_on_device(model: PacSegModel, device: torch.device) -> PacSegModel:
    """``model`` in eval mode on ``device``: the caller's own object when it is already there,
    else a copy (``nn.Module.to`` moves in place, and callers keep using their model)."""
    here = next(model.parameters()).device
    if here.type == device.type and (device.index is None or here == device):
        return model.eval()
    return copy.deepcopy(model).to(device).eval()


class TileRunner:
    """Runs a pass over boxes: cancellation, progress over all passes, and the out-of-memory
    policy (split the box and retry on the same device, then continue on the CPU)."""

    def __init__(self, plan: Plan, progress=None, should_cancel: Callable[[], bool] | None = None):
        self.device, self.model, self.grid = plan.device, plan.model, plan.settings.grid
        self.progress, self.should_cancel = progress, should_cancel
        self.done = self.total = 0
        self._copies: dict[torch.device, PacSegModel] = {}

    def model_on(self, device: torch.device) -> PacSegModel:
        """The model on ``device``: the caller's own when already there, else a copy."""
        if device not in self._copies:
            self._copies[device] = model_on_device(self.model, device)
        return self._copies[device]

    def run(self, boxes, work) -> None:
        """``work(box, device, model_on_device)`` for each box."""
        pending = list(boxes)
        while pending:
            box = pending.pop(0)
            stop_if_cancelled(self.should_cancel, "segmentation cancelled; no result was produced")
            if self.device.type == "cpu":
                readapt()  # the load may have changed since the run began
            try:
                work(box, self.device, self.model_on(self.device))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                sizes = [b - a for a, b in box]
                if max(sizes) > self.grid * 8:  # split the box, try again on the same device
                    warnings.warn(
                        f"GPU out of memory on a tile of {sizes}; retrying with smaller tiles",
                        stacklevel=3,
                    )
                    sub = split_box(box, [max(self.grid, n // 2) for n in sizes], self.grid)
                    pending = sub + pending
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
