"""Cells from a boundary class: objects are the regions that a boundary class (membrane, cell
wall) encloses, and they tile the tissue (``InstanceConfig.boundary``).

The tissue is every voxel of a non-background class (every voxel when the boundary class is
the background class: the image is a crop inside the tissue). The other non-background classes
are the cells' interiors. ``instances.labels.instance_labels`` splits each connected piece of
the interiors like a blob (``split_piece``: seeds at the h-maxima of the distance to the
boundary in units of ``radius``, plus the image's boundary contrast as a valley, a watershed
inside the piece), then ``fill_boundary`` gives every other tissue voxel (the boundary, and
interior pieces under ``min_volume``) to the cell it reaches most cheaply through them.

The fill is what keeps chunked runs equal to in-memory ones without the tissue ever being one
piece: each round of it moves one voxel step, and it runs a fixed number of rounds
(``fill_rounds``: ``REACH`` radii in steps of the finest axis), so a voxel's cell depends only
on the cells' ids and the labels within that many voxels of it (``fill_halo``). Boundary
voxels farther than that from every cell (a boundary region wider than ``2 * REACH`` radii,
between no cells) and boundary regions that touch no cell stay 0.

The image enters as the boundary's contrast (``stain_contrast``): the brightness evidence
(``brightness_evidence``), turned so the boundary's stain is high (membrane stains are bright,
electron-microscopy membranes dark). The side is read where the classes meet: the mean evidence
on the boundary voxels beside an interior against the interior voxels beside the boundary (not
the classes' means: a classifier that calls dark cells boundary would turn those round), summed
in integers so chunk by chunk gives the same answer.
"""

from __future__ import annotations

import math

import numpy as np

from napari_pacseg.checks import short_repr
from napari_pacseg.model.network import InstanceConfig

REACH = 2.0  # the fill reaches this many radii (in steps of the finest axis) into the boundary
STEP_COST = 10.0  # a step through the strongest stain costs 1 + STEP_COST plain steps
LEVELS = 1 << 16  # the contrast's sums count the evidence in units of 1 / LEVELS

__all__ = [
    "boundary_label",
    "enclosed_labels",
    "fill_boundary",
    "fill_halo",
    "fill_rounds",
    "interior_mask",
    "stain_contrast",
    "stain_is_bright",
    "stain_sums",
]


def boundary_label(
    config: InstanceConfig | None, classes, background: int = 0, what: str = "instances"
) -> int | None:
    """The label value of ``config.boundary`` among ``classes`` (the model's class names or
    ``ClassInfo``, background first; ``background`` the index of the class that comes out as
    0): the class's index + 1, or 0 when it is the background class. None in blobs mode
    (``config`` None or without a boundary). ``ValueError`` naming ``what`` when the name is
    no class of the model (listing them), when no class is left for the cells' interiors, or
    when ``classes`` is missing."""
    if config is None or config.boundary is None:
        return None
    name = config.boundary
    if classes is None:
        raise ValueError(
            f"{what}: boundary {short_repr(name)} is a class name; give the model's classes "
            "(classes=[...], background first) to find it"
        )
    names = [str(getattr(c, "name", c)) for c in classes]
    found = [i for i, n in enumerate(names) if n.strip() == name.strip()]
    if not found:
        raise ValueError(
            f"{what}: boundary {short_repr(name)} is not a class of the model; its classes are "
            f"{', '.join(map(repr, names))} (name the one that separates the cells, or None "
            "for blobs)"
        )
    index = found[0]
    interiors = [n for i, n in enumerate(names) if i not in (index, background)]
    if not interiors:
        raise ValueError(
            f"{what}: boundary {short_repr(name)} leaves no class for the cells' interiors "
            f"(classes {', '.join(map(repr, names))}, background {names[background]!r}): name "
            "the class that separates the cells (the background class when the whole image "
            "is tissue)"
        )
    return 0 if index == background else index + 1


def interior_mask(labels: np.ndarray, boundary: int) -> np.ndarray:
    """The cells' interiors: bool of ``labels``' shape, the voxels of a class that is neither
    the background (0) nor the boundary (``boundary``, a label value)."""
    return (labels != 0) & (labels != boundary)


def fill_rounds(spacing, config: InstanceConfig) -> int:
    """The fill's rounds: ``REACH`` radii in steps of the finest axis of ``spacing``."""
    return max(1, math.ceil(REACH * config.radius / min(float(s) for s in spacing)))


def fill_halo(spacing, config: InstanceConfig) -> tuple[int, ...]:
    """Voxels per axis that a voxel's cell depends on beyond it (one per round)."""
    rounds = fill_rounds(spacing, config)
    return (rounds,) * len(spacing)


def stain_sums(
    bright: np.ndarray, labels: np.ndarray, boundary: int, planar: bool = False, core=None
) -> tuple[int, ...]:
    """``(sum, voxels)`` of ``bright`` (the brightness evidence, 0..1, ``(D, H, W)``) on the
    boundary voxels with a face neighbour in an interior, then the same on the interior voxels
    with a face neighbour on the boundary: Python ints, the evidence counted in units of ``1 /
    LEVELS``, so sums over chunks equal the whole volume's. ``planar``: neighbours in the plane
    only (a 2D image). ``core``: count only the voxels of this box (``((z0, z1), ...)`` in the
    arrays' indices; the arrays reach one voxel beyond it where the volume goes on), else all."""
    on = labels == boundary
    inner = interior_mask(labels, boundary)
    on_edge, inner_edge = np.zeros(on.shape, bool), np.zeros(on.shape, bool)
    for axis in (1, 2) if planar else (0, 1, 2):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        on_edge[lo] |= on[lo] & inner[hi]
        on_edge[hi] |= on[hi] & inner[lo]
        inner_edge[lo] |= inner[lo] & on[hi]
        inner_edge[hi] |= inner[hi] & on[lo]
    if core is not None:
        window = tuple(slice(a, b) for a, b in core)
        bright, on_edge, inner_edge = bright[window], on_edge[window], inner_edge[window]
    levels = np.rint(np.asarray(bright, np.float64) * LEVELS).astype(np.int64)
    return (int(levels[on_edge].sum()), int(on_edge.sum()), int(levels[inner_edge].sum()),
            int(inner_edge.sum()))  # fmt: skip


def stain_is_bright(sums) -> bool:
    """Whether the boundary is brighter than the interiors where they meet (``stain_sums``,
    added over chunks); True when they never meet (the common fluorescent stain)."""
    on_sum, on_n, in_sum, in_n = (int(v) for v in sums)
    if on_n == 0 or in_n == 0:
        return True
    return on_sum * in_n >= in_sum * on_n


def stain_contrast(bright: np.ndarray, is_bright: bool) -> np.ndarray:
    """The boundary's contrast: float32 0..1 of ``bright``'s shape, high where the image looks
    like the boundary's stain (``bright`` itself for a bright stain, ``1 - bright`` for a dark
    one)."""
    bright = np.asarray(bright, np.float32)
    return bright if is_bright else (np.float32(1.0) - bright)


def fill_boundary(
    ids: np.ndarray,
    labels: np.ndarray,
    boundary: int,
    spacing,
    config: InstanceConfig,
    contrast: np.ndarray | None = None,
    planar: bool = False,
) -> np.ndarray:
    """The cells tiling the tissue: ``ids`` ``(D, H, W)`` int32 (the interiors' cells, 0
    elsewhere) with every other tissue voxel of ``labels`` (the boundary class ``boundary``,
    and interior voxels without a cell) given the id of the cell it reaches most cheaply
    through such voxels: a face step along axis ``a`` costs ``spacing[a] * (1 + STEP_COST *
    mean contrast of its two voxels)`` (``contrast``: ``stain_contrast``, or None: plain steps),
    ties to the smaller id. The search runs ``fill_rounds`` rounds of one step (Bellman-Ford),
    so paths have at most that many steps; tissue voxels no cell reaches stay 0. ``planar``:
    a 2D image (``D`` 1), steps in the plane only. Returns int32 of ``ids``' shape."""
    ids = np.asarray(ids)
    open_ = (ids == 0) & ((labels != 0) | (boundary == 0))  # tissue without a cell
    lab = np.pad(ids.astype(np.int32), 1)
    free = np.pad(open_, 1).ravel()
    dist = np.where(lab > 0, np.float32(0.0), np.float32(np.inf)).ravel()
    cost = None if contrast is None else np.pad(np.asarray(contrast, np.float32), 1).ravel()
    flat = lab.ravel()
    strides = [int(np.prod(lab.shape[a + 1 :])) for a in range(3)]
    axes = (1, 2) if planar else (0, 1, 2)
    steps = [(sign * strides[a], np.float32(spacing[a])) for a in axes for sign in (1, -1)]
    # round 0: the free voxels beside a cell
    beside = np.zeros(lab.shape, bool)
    cells = lab > 0
    for a in axes:
        beside[tuple(slice(1, None) if b == a else slice(None) for b in range(3))] |= cells[
            tuple(slice(None, -1) if b == a else slice(None) for b in range(3))
        ]
        beside[tuple(slice(None, -1) if b == a else slice(None) for b in range(3))] |= cells[
            tuple(slice(1, None) if b == a else slice(None) for b in range(3))
        ]
    todo = np.flatnonzero(beside.ravel() & free)
    marks = np.zeros(free.size, bool)
    half = np.float32(0.5 * STEP_COST)
    for _ in range(fill_rounds([spacing[a] for a in axes], config)):
        if todo.size == 0:
            break
        old_d, old_l = dist[todo], flat[todo]
        best_d, best_l = old_d.copy(), old_l.copy()
        here = None if cost is None else cost[todo]
        for offset, length in steps:
            near = todo + offset
            near_l = flat[near]
            if cost is None:
                d = dist[near] + length
            else:
                d = dist[near] + length * (np.float32(1.0) + half * (here + cost[near]))
            better = (near_l > 0) & ((d < best_d) | ((d == best_d) & (near_l < best_l)))
            best_d = np.where(better, d, best_d)
            best_l = np.where(better, near_l, best_l)
        changed = (best_d != old_d) | (best_l != old_l)
        moved = todo[changed]
        dist[moved], flat[moved] = best_d[changed], best_l[changed]
        for offset, _ in steps:  # next round: the free voxels beside one that changed
            marks[moved + offset] = True
        todo = np.flatnonzero(marks)
        marks[todo] = False
        todo = todo[free[todo]]
    return lab[1:-1, 1:-1, 1:-1]


def enclosed_labels(ids: np.ndarray, labels: np.ndarray, boundary: int) -> np.ndarray:
    """``labels`` with each cell's voxels set to its enclosed class (the interior class most of
    its interior voxels have; a tie: the smaller label value), so ``object_table`` gives a cell
    the class it encloses, not the boundary's. Same shape and dtype as ``labels``."""
    labels = np.asarray(labels)
    ids = np.asarray(ids)
    inner = interior_mask(labels, boundary) & (ids > 0)
    out = labels.copy()
    if not inner.any():
        return out
    width = int(labels.max()) + 1
    keys, counts = np.unique(
        ids[inner].astype(np.int64) * width + labels[inner].astype(np.int64), return_counts=True
    )
    cell, value = keys // width, keys % width
    order = np.lexsort((value, -counts, cell))  # per cell: most voxels first, then smaller value
    cell, value = cell[order], value[order]
    first = np.r_[True, cell[1:] != cell[:-1]]
    lut = np.zeros(int(ids.max()) + 1, labels.dtype)
    has = np.zeros(lut.size, bool)
    lut[cell[first]] = value[first]
    has[cell[first]] = True
    where = has[ids]
    out[where] = lut[ids[where]]
    return out
