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

The labels follow the cells (``boundary_on_cells``): a classifier trained on strokes a few
voxels wide paints the boundary class as wide as the strokes, and calls dark interiors it has
not seen boundary, while a membrane is a thin sheet between two cells. So in cells mode the
boundary class is where the cells meet (``cell_band``: a cell's voxels with a face neighbour
of another cell, the background or tissue no cell reaches; two voxels across a face between
cells), and the rest of a cell takes its enclosed class (the interior class most of its
interior voxels have). Tissue no cell reaches stays as the classifier called it where the
image looks like the boundary's stain (on the boundary's side of the level halfway between
the two classes where they meet), and takes the image's most common interior class where it
does not (``unstained``): dark cells a classifier called membrane beyond the fill's reach are
interiors, the background around nuclei taken as cells stays background. The labels and the
objects then tell one story: every face between two cells is drawn, and a membrane the cells
do not follow is not. The band depends on the ids one voxel around, and the classes on sums
over chunks, so chunk by chunk gives the same labels.
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
    "apply_enclosed",
    "beside",
    "boundary_label",
    "boundary_on_cells",
    "cell_band",
    "draw_cells",
    "enclosed_labels",
    "enclosed_lut",
    "enclosed_pairs",
    "face_pairs",
    "fill_boundary",
    "fill_halo",
    "fill_rounds",
    "image_sums",
    "interior_counts",
    "interior_mask",
    "levels",
    "main_interior",
    "stain_contrast",
    "stain_is_bright",
    "stain_sums",
    "unstained",
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


def face_pairs(planar: bool = False):
    """``(lo, hi)`` index tuples per axis of a ``(D, H, W)`` array (``planar``: y and x only):
    ``a[lo]`` and ``a[hi]`` are the two voxels of each face along that axis."""
    for axis in (1, 2) if planar else (0, 1, 2):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        yield lo, hi


def beside(mask: np.ndarray, planar: bool = False) -> np.ndarray:
    """The voxels with a face neighbour in ``mask`` (bool ``(D, H, W)``; ``planar``: in the
    plane only): bool of its shape."""
    out = np.zeros(mask.shape, bool)
    for lo, hi in face_pairs(planar):
        out[lo] |= mask[hi]
        out[hi] |= mask[lo]
    return out


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
    on_edge, inner_edge = on & beside(inner, planar), inner & beside(on, planar)
    if core is not None:
        window = tuple(slice(a, b) for a, b in core)
        bright, on_edge, inner_edge = bright[window], on_edge[window], inner_edge[window]
    bright = np.asarray(bright)
    on_sum, in_sum = (int(levels(bright[edge]).sum()) for edge in (on_edge, inner_edge))
    return on_sum, int(on_edge.sum()), in_sum, int(inner_edge.sum())


def levels(bright: np.ndarray) -> np.ndarray:
    """``bright`` (the brightness evidence, 0..1) in units of ``1 / LEVELS``, rounded: int64 of
    its shape. ``LEVELS`` is a power of two, so the scaling is exact in the evidence's own
    float type and every caller gets the same integers for the same value."""
    return np.rint(np.asarray(bright) * LEVELS).astype(np.int64)


def image_sums(evidence: np.ndarray, labels: np.ndarray, boundary: int) -> tuple[int, ...]:
    """``stain_sums`` of a whole image: ``evidence`` (the brightness evidence:
    ``labels.brightness_evidence``) and ``labels``, ``(D, H, W)`` or a 2D image's ``(H, W)``
    (neighbours in the plane). The cells (``instance_labels``' ``stain``) and the labels'
    drawing (``boundary_on_cells``' ``sums``) read these one sums."""
    planar = np.ndim(labels) == 2
    lift = (lambda a: np.asarray(a)[None]) if planar else np.asarray
    return stain_sums(lift(evidence), lift(labels), boundary, planar)



def stain_is_bright(sums) -> bool:
    """Whether the boundary is brighter than the interiors where they meet (``stain_sums``,
    added over chunks); True when they never meet (the common fluorescent stain)."""
    on_sum, on_n, in_sum, in_n = (int(v) for v in sums)
    if on_n == 0 or in_n == 0:
        return True
    return on_sum * in_n >= in_sum * on_n


def unstained(bright: np.ndarray, sums) -> np.ndarray | None:
    """The voxels whose ``bright`` (the brightness evidence, 0..1) lies on the interiors' side
    of the level halfway between the boundary's and the interiors' means where they meet
    (``stain_sums``, added over chunks; the side: ``stain_is_bright``): bool of its shape, or
    None when they never meet. Counted in units of ``1 / LEVELS`` as the sums are, so a chunk
    gives the whole volume's answer."""
    on_sum, on_n, in_sum, in_n = (int(v) for v in sums)
    if on_n == 0 or in_n == 0:
        return None
    middle = 0.5 * (on_sum / on_n + in_sum / in_n)
    counted = levels(bright)
    return counted < middle if stain_is_bright(sums) else counted > middle


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
    todo = np.flatnonzero(beside(lab > 0, planar).ravel() & free)
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


def enclosed_pairs(ids: np.ndarray, labels: np.ndarray, boundary: int, core=None):
    """``(cells, values, counts)`` int64 arrays: how many interior voxels of each class value
    each cell of ``ids`` holds (``labels`` the classes, ``boundary`` the boundary's label
    value), one row per (cell, value) pair; ``core``: only the voxels of this box (``((z0,
    z1), ...)``). Summed over chunks they give the whole volume's (``enclosed_lut``)."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    if core is not None:
        window = tuple(slice(a, b) for a, b in core)
        ids, labels = ids[window], labels[window]
    inner = interior_mask(labels, boundary) & (ids > 0)
    if not inner.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    width = int(labels.max()) + 1
    keys, counts = np.unique(ids[inner].astype(np.int64) * width + labels[inner],
                             return_counts=True)  # fmt: skip
    return keys // width, keys % width, counts.astype(np.int64)


def enclosed_lut(cells, values, counts, size: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's enclosed class from ``enclosed_pairs`` (rows from any number of chunks, a
    pair may repeat): ``(lut, has)`` of length ``size`` (more than the largest id), ``lut[i]``
    the class value most of cell ``i``'s interior voxels have (a tie: the smaller value),
    ``has[i]`` whether it has any."""
    cells = np.asarray(cells, np.int64)
    values = np.asarray(values, np.int64)
    lut = np.zeros(size, dtype)
    has = np.zeros(size, bool)
    if cells.size == 0:
        return lut, has
    width = int(values.max()) + 1
    keys, where = np.unique(cells * width + values, return_inverse=True)
    totals = np.bincount(where.reshape(-1), weights=np.asarray(counts, np.float64))
    cell, value = keys // width, keys % width
    order = np.lexsort((value, -totals, cell))  # per cell: most voxels first, then smaller value
    cell, value = cell[order], value[order]
    first = np.r_[True, cell[1:] != cell[:-1]]
    lut[cell[first]] = value[first]
    has[cell[first]] = True
    return lut, has


def enclosed_labels(ids: np.ndarray, labels: np.ndarray, boundary: int) -> np.ndarray:
    """``labels`` with each cell's voxels set to its enclosed class (the interior class most of
    its interior voxels have; a tie: the smaller label value), so ``object_table`` gives a cell
    the class it encloses, not the boundary's. Same shape and dtype as ``labels``."""
    labels = np.asarray(labels)
    ids = np.asarray(ids)
    lut, has = enclosed_lut(*enclosed_pairs(ids, labels, boundary), int(ids.max(initial=0)) + 1,
                            labels.dtype)  # fmt: skip
    return apply_enclosed(labels, ids, lut, has)


def apply_enclosed(labels: np.ndarray, ids: np.ndarray, lut: np.ndarray, has: np.ndarray):
    """``labels`` with each voxel of a cell ``i`` of ``ids`` that ``has[i]`` set to ``lut[i]``
    (``enclosed_lut``): a copy, same dtype."""
    out = np.array(labels, copy=True)
    where = has[ids]
    out[where] = lut[ids[where]]
    return out


def interior_counts(labels: np.ndarray, boundary: int, size: int, core=None) -> np.ndarray:
    """int64 ``(size,)``: voxels per label value (``size`` more than the largest) of the
    interior classes of ``labels`` (0 for the background and the boundary); ``core``: only the
    voxels of this box. Summed over chunks it is the whole volume's."""
    labels = np.asarray(labels)
    if core is not None:
        labels = labels[tuple(slice(a, b) for a, b in core)]
    inner = labels[interior_mask(labels, boundary)]
    return np.bincount(inner.astype(np.int64).ravel(), minlength=size)[:size].astype(np.int64)


def main_interior(counts) -> int | None:
    """The interior class most voxels have (``interior_counts``; a tie: the smaller value), or
    None when there are none."""
    counts = np.asarray(counts)
    return int(np.argmax(counts)) if counts.any() else None


def cell_band(ids: np.ndarray, planar: bool = False) -> np.ndarray:
    """The voxels of a cell (``ids`` > 0, ``(D, H, W)``) with a face neighbour (``planar``:
    in the plane) of another id: where cells meet one another (both sides of the face), the
    background, or tissue no cell reaches. bool of its shape; a chunk's ``ids`` reach one
    voxel beyond it."""
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, bool)
    for lo, hi in face_pairs(planar):
        differ = ids[lo] != ids[hi]
        out[lo] |= differ
        out[hi] |= differ
    return out & (ids > 0)


def draw_cells(labels: np.ndarray, ids: np.ndarray, band: np.ndarray, enclosed: np.ndarray,
               boundary: int, fallback: int | None,
               free: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """The labels of cells mode: ``labels`` with the boundary class (label value
    ``boundary``) on the cells' ``band`` (``cell_band``) and nowhere else in a cell: a
    boundary voxel of cell ``i`` off the band takes ``enclosed``'s class there (its cell's
    enclosed class: ``apply_enclosed``). A boundary voxel in no cell (tissue the fill does not
    reach) where ``free`` (``unstained``: the image does not look like the boundary's stain
    there) takes ``fallback`` (``main_interior``); elsewhere, or without them (None), it
    stays. Interior voxels off the band keep their class, and so does the background unless
    it is the boundary class (``boundary`` 0: the whole image is tissue). All arrays of one
    shape; same dtype as ``labels``."""
    labels, ids = np.asarray(labels), np.asarray(ids)
    on = labels == boundary
    out = np.where(on & (ids > 0), np.asarray(enclosed), labels)
    if fallback is not None and free is not None:
        out[on & (ids == 0) & free] = fallback
    out[band] = boundary
    return out.astype(labels.dtype, copy=False)


def boundary_on_cells(labels: np.ndarray, ids: np.ndarray, boundary: int,
                      evidence: np.ndarray | None = None,
                      enclosed: np.ndarray | None = None, sums=None) -> np.ndarray:  # fmt: skip
    """The labels of cells mode in memory (``draw_cells``): ``labels`` ``(D, H, W)`` (or a 2D
    image's ``(H, W)``: neighbours in the plane) with the boundary class where the cells
    ``ids`` (``instance_labels``) meet; ``evidence``: the brightness evidence of the same
    shape (``labels.brightness_evidence``), which tells the tissue in no cell that is not the
    boundary's stain (None: that tissue keeps its class); ``enclosed``: ``enclosed_labels`` of
    the cells, and ``sums``: ``image_sums`` of ``evidence`` and ``labels``, when already made.
    Same shape and dtype as ``labels``."""
    labels, ids = np.asarray(labels), np.asarray(ids)
    planar = labels.ndim == 2
    if enclosed is None:
        enclosed = enclosed_labels(ids, labels, boundary)
    lift = (lambda a: np.asarray(a)[None]) if planar else np.asarray
    labels3, ids3 = lift(labels), lift(ids)
    free = None
    if evidence is not None:
        bright = lift(evidence)
        if sums is None:
            sums = stain_sums(bright, labels3, boundary, planar)
        free = unstained(bright, sums)
    fallback = main_interior(interior_counts(labels3, boundary, int(labels.max(initial=0)) + 1))
    out = draw_cells(labels3, ids3, cell_band(ids3, planar), lift(enclosed), boundary,
                     fallback, free)  # fmt: skip
    return out.reshape(labels.shape)
