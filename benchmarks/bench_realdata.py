"""Real images of other kinds (issue 35): classes and objects from a user's few strokes, against
what users run today.

The images are those of ``--data`` (default ``../shared/realdata`` beside the repository; its
README gives their provenance, spacing and object sizes; the data never enters the repository):
dense noisy Arabidopsis nuclei (3D, anisotropic), plant cells behind a membrane stain (3D) and
DSB 2018 fluorescence nuclei (2D).

Strokes (``--seeds``, default 0 1 2: one set of strokes per seed; ours is reported as the mean
and the worst over them), made from the reference labels as a user would paint them:

* nuclei: ``robustness.user_scribbles`` in z planes 30, 50 and 70 (the 2D image: its one plane):
  per plane 4 strokes of up to 6 voxels along x inside nuclei (2 voxels from their edge; class 2)
  and 4 of up to 20 voxels through the background (3 voxels from any nucleus; class 1).
* plant cells (``cell_scribbles``), in z planes 16, 32 and 48. The whole crop is tissue, so the
  user paints two classes, the membrane (value 1: the model's first class, named "membrane")
  and the cell interiors (value 2, "cell"), and asks for cells from the boundary class
  (``instances={"boundary": "membrane", "radius": R}``: cells enclosed by the membrane, tiling
  the tissue). The membrane is then also the label rule's background, so the foreground is
  "cell interior". The reference membrane is the band of voxels that have a face neighbour
  of another label (both sides of every boundary between two cells: 2 voxels wide); per plane,
  4 strokes of up to 20 voxels walk along the membrane (the band dilated by 1 voxel: the stain
  is about 4 voxels wide here; class 1) and 4 of up to 10 voxels run along x inside cells (2
  voxels from the band; class 2).

Methods (all on the same image, scored against the same reference):

* ours: ``train(image, strokes, spacing=...)`` (default features, seed 0), then ``segment(image,
  model, spacing=..., instances={"radius": R})`` (cells: plus ``"boundary": "membrane"``) with
  the radius a user reads off the image
  (README: nuclei ~2 um for Arabidopsis; plant cells ~10-15 voxels, 12 here; DSB nuclei ~4
  pixels; ``--radius STEM=R`` overrides, ``--instances-json`` adds other overrides), refined (the
  model's defaults) and unrefined (``refine=False``). "train s" is train(), "segment s"
  segment() with the instance step.
* Otsu: one global threshold (Otsu, ``bench_quality.otsu_threshold``) on the raw image and on
  copies smoothed by a Gaussian of sigma 1 and 2 voxels; "best Otsu" is the best of the three by
  Dice, chosen with hindsight. Cells: the foreground is the dark side (interiors).
* nuclei recipe, tuned: Gaussian (sigma in voxels) + Otsu foreground + distance transform (in
  physical units) + seeds at ``peak_local_max(distance, min_distance=k, labels=foreground)`` (k
  in voxels, as in scikit-image's watershed example) + watershed of the negated distance inside
  the foreground + removal of objects smaller than a ball (2D: disc) of radius f x R. Grid:
  sigma 1, 2; k = 1, 2, 3, 4, 5, 6, 8, 10, 12, 15; f = 0 (none), 0.35, 0.5, 0.7, 1 (100
  settings). The best by object F1 with hindsight, per image (its setting in the table). On the
  cells image it runs on the dark side (interiors).
* membrane watershed, tuned (cells only): Gaussian of the membrane signal (sigma 1, 2, 3
  voxels), seeds at its local minima (``peak_local_max(-smoothed, min_distance=k)``, k = 2, 3,
  5, 7, 10, 14, 20 voxels), watershed of the smoothed signal from them (cells tile the image);
  cells smaller than a ball of radius f x R (f = 0, 0.35, 0.5) merged into their neighbours
  (their seed dropped, the watershed flooded again; 63 settings). Best by object F1 with
  hindsight. It has no foreground (it tiles), so no Dice or boundary F.
* APOC (``--apoc-python``, default ``.apoc-venv/bin/python`` when present; see
  ``apoc_worker.py``): ``PixelClassifier`` (small_quick; foreground) and ``ObjectSegmenter``
  (small_quick; objects) trained on the same strokes. Skipped, and said so, when absent.
* all foreground: every voxel foreground (Dice only), to show what Dice alone is worth where
  the foreground fills most of the image (cells).

Scores against the reference:

* foreground Dice; boundary F: boundary voxels of the foreground within one voxel of the finest
  axis (physical units) of the reference's boundary (precision) and vice versa (recall)
  (``bench_quality.boundary_f``).
* objects: one-to-one matching at IoU > 0.5 (a match above 0.5 is unique); object F1 = 2 x
  matches / (reference + predicted objects); mean IoU of the matched pairs; objects found
  (predicted) / reference; over-split: reference objects holding at least half of each of two
  or more predicted objects; under-split: predicted objects holding at least half of each of
  two or more reference objects (as ``bench_instances``).
* cells: the reference foreground is the cells' interiors (the labelled voxels off the
  membrane band), and objects are compared off the band (the band's voxels are removed from
  the reference and predicted objects alike): the membrane belongs to two cells, so a method
  whose cells tile the tissue and one whose cells stop at the membrane are scored alike.
* cells, what the image shows of the reference's faces (``face_ridges``): per face between
  two touching reference cells, the ridge contrast across it (the brightest of the image near
  the face minus the brighter of the two cells a few voxels in; at or below 0 the image draws
  no membrane there, a count noise can only lower), for all faces and for the faces ours
  merges across (the under-splits' cells, ``merged_faces``): how many of ours' merges the
  image itself gives no face for.

Targets (issue 35), per image: foreground Dice >= best Otsu + 0.02; object F1 >= the best tuned
anchor (recipe; for cells also the membrane watershed) + 0.05; refinement never below the
unrefined result (Dice and boundary F, every seed); object count within 20% of the reference
(every seed). Writes ``benchmarks/results/realdata-<device>.md``.

``--halves``: each image's two halves (3D: along y, 2D: along x) as images of their own, with
the same strokes planes, radius and targets (their reference objects cut by the new border
included): held-back crops of these kinds are what the targets are checked on, and the halves
show how much the defaults' margins depend on the one crop (``realdata-<device>-halves.md``).

Usage: python benchmarks/bench_realdata.py [--data PATH] [--seeds 0 1 2] [--images STEM ...]
       [--radius STEM=R ...] [--instances-json JSON] [--train-json JSON --name NAME]
       [--halves] [--device cpu|cuda] [--apoc-python PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "realdata"
IOU = 0.5


@dataclass(frozen=True)
class RealImage:
    stem: str  # files <stem>_image.tif and <stem>_labels.tif
    kind: str  # "nuclei" (bright objects) or "cells" (dark regions behind bright membranes)
    spacing: tuple  # (z, y, x), or (y, x) for 2D
    planes: tuple  # z planes stroked; (None,) for a 2D image
    radius: float  # the object radius a user reads off the image (README), spacing units


IMAGES = (
    RealImage("arabidopsis_nuclei_3d", "nuclei", (0.284, 0.127, 0.127), (30, 50, 70), 2.0),
    RealImage("plant_cells_3d", "cells", (1.0, 1.0, 1.0), (16, 32, 48), 12.0),
    RealImage("dsb2018_nuclei_2d", "nuclei", (1.0, 1.0), (None,), 4.0),
)
STEMS = tuple(im.stem for im in IMAGES)

RECIPE_SIGMAS = (1.0, 2.0)  # voxels
RECIPE_MIN_DISTANCE = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15)  # voxels (peak_local_max's min_distance)
RECIPE_MIN = (0.0, 0.35, 0.5, 0.7, 1.0)  # radius of the smallest kept ball, x R
MEMBRANE_SIGMAS = (1.0, 2.0, 3.0)  # voxels
MEMBRANE_MIN_DISTANCE = (2, 3, 5, 7, 10, 14, 20)  # voxels
MEMBRANE_MERGE = (0.0, 0.35, 0.5)  # radius of the smallest kept cell, x R
RIDGE_SIGMA = 1.0  # voxels: the Gaussian the image is read through at a face (face_ridges)
RIDGE_REACH = 2  # voxels either side of a reference face where its membrane may lie
RIDGE_DEPTH = 6  # voxels into each cell where its inside is read
RIDGE_LEAST = 30  # voxel pairs: the smallest face read

OURS, UNREFINED = "ours, refined", "ours, no refinement"
OTSU = ("Otsu, raw", "Otsu, Gaussian sigma 1", "Otsu, Gaussian sigma 2")
BEST_OTSU = "best Otsu (hindsight)"
RECIPE = "nuclei recipe, tuned (hindsight)"
MEMBRANE = "membrane watershed, tuned (hindsight)"
APOC_PIXELS, APOC_OBJECTS = (
    "APOC PixelClassifier (small_quick)",
    "APOC ObjectSegmenter (small_quick)",
)
ALL_FG = "all foreground"
COLUMNS = ("Dice", "BF", "F1", "IoU", "objects", "over", "under", "train_s", "segment_s")


# --- strokes -------------------------------------------------------------------------------------


def membrane_band(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label: both sides of every boundary."""
    band = np.zeros(labels.shape, bool)
    for ax in range(labels.ndim):
        differ = np.diff(labels, axis=ax) != 0
        lo, hi = [slice(None)] * labels.ndim, [slice(None)] * labels.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        band[tuple(lo)] |= differ
        band[tuple(hi)] |= differ
    return band


def _walk(mask: np.ndarray, start, length: int) -> list[tuple[int, int]]:
    """A stroke of up to ``length`` pixels through ``mask`` (2D) from ``start``: each step to the
    unvisited 8-neighbour in the mask farthest from the start (so it runs along the mask)."""
    path, seen = [tuple(start)], {tuple(start)}
    y0, x0 = start
    while len(path) < length:
        y, x = path[-1]
        steps = [
            (y + dy, x + dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy or dx)
            and 0 <= y + dy < mask.shape[0]
            and 0 <= x + dx < mask.shape[1]
            and mask[y + dy, x + dx]
            and (y + dy, x + dx) not in seen
        ]
        if not steps:
            break
        nxt = max(steps, key=lambda p: (p[0] - y0) ** 2 + (p[1] - x0) ** 2)
        path.append(nxt)
        seen.add(nxt)
    return path


def cell_scribbles(labels: np.ndarray, planes, seed: int = 0) -> np.ndarray:
    """Strokes a user paints on cells behind a membrane stain, from reference cell labels that
    tile the tissue: per plane of ``planes`` 4 strokes of up to 20 voxels along the membrane
    (the membrane band dilated by 1; value 1, the membrane class, first: the background) and 4
    of up to 10 voxels along x inside cells (2 voxels from the band; value 2). uint8 of
    ``labels``' shape."""
    rng = np.random.default_rng(seed)
    band = membrane_band(labels)
    membrane = ndi.binary_dilation(band)
    interior = (labels > 0) & ~ndi.binary_dilation(band, iterations=2)
    out = np.zeros(labels.shape, np.uint8)
    for z in planes:
        at = () if z is None else (z,)
        plane = interior[at]
        ys, xs = np.nonzero(plane)
        for i in rng.choice(len(ys), size=min(4, len(ys)), replace=False):
            for dx in range(10):
                x = xs[i] + dx
                if x >= plane.shape[1] or not plane[ys[i], x]:
                    break
                out[(*at, ys[i], x)] = 2
        ys, xs = np.nonzero(band[at])
        for i in rng.choice(len(ys), size=min(4, len(ys)), replace=False):
            for y, x in _walk(membrane[at], (ys[i], xs[i]), 20):
                out[(*at, y, x)] = 1
    return out


# --- scores --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One image with its reference: ``truth`` the reference objects as scored (the cells'
    with the membrane band removed), ``ignore`` the voxels left out of object scores."""

    image: RealImage
    pixels: np.ndarray
    labels: np.ndarray
    truth: np.ndarray
    ignore: np.ndarray | None
    spacing: tuple
    radius: float

    @property
    def fg(self) -> np.ndarray:
        return self.truth > 0

    @property
    def tol(self) -> float:
        return float(min(self.spacing))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.count_nonzero(pred & truth) / max(1, pred.sum() + truth.sum()))


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """Every overlapping pair of a reference and a predicted object (int64 labels, 0
    background): ``(truth ids, predicted ids, shared voxels)``, int64 arrays, one row a pair."""
    both = (truth > 0) & (pred > 0)
    base = int(pred.max()) + 1
    pairs, inter = np.unique(truth[both] * base + pred[both], return_counts=True)
    return pairs // base, pairs % base, inter


def match(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Object scores of ``pred`` against ``truth`` (integer labels, 0 background); see the
    module docstring."""
    truth, pred = truth.astype(np.int64), pred.astype(np.int64)
    t_sizes, p_sizes = np.bincount(truth.ravel()), np.bincount(pred.ravel())
    n_t, n_p = int(np.count_nonzero(t_sizes[1:])), int(np.count_nonzero(p_sizes[1:]))
    ti, pi, inter = _overlaps(truth, pred)
    iou = inter / (t_sizes[ti] + p_sizes[pi] - inter)
    hit = iou > IOU  # above 0.5 each object has at most one partner: one-to-one
    tp = int(np.count_nonzero(hit))
    most_p = inter / p_sizes[pi] >= 0.5
    most_t = inter / t_sizes[ti] >= 0.5
    return {
        "F1": 2 * tp / (n_t + n_p) if n_t + n_p else 1.0,
        "IoU": float(np.mean(iou[hit])) if tp else 0.0,
        "objects": n_p,
        "reference": n_t,
        "over": int(np.count_nonzero(np.bincount(ti[most_p]) >= 2)),
        "under": int(np.count_nonzero(np.bincount(pi[most_t]) >= 2)),
    }


def object_f1(case: Case, ids: np.ndarray) -> float:
    return match(case.truth, _scored(case, ids))["F1"]


def _scored(case: Case, ids: np.ndarray) -> np.ndarray:
    if case.ignore is None:
        return ids
    return np.where(case.ignore, 0, ids)


def face_ridges(case: Case) -> dict:
    """How plainly the image shows each face between two scored reference cells: ``{(a, b):
    contrast}`` (``a < b`` reference ids, faces of at least ``RIDGE_LEAST`` voxel pairs along
    the axes). Per voxel pair across the face, along its axis: the brightest of the image
    (Gaussian ``RIDGE_SIGMA`` voxels) within ``RIDGE_REACH`` voxels of the face, minus the
    brighter of the image ``RIDGE_DEPTH`` voxels into either cell (pairs whose cells do not
    reach that deep are skipped); the face's contrast is the median over its pairs, in the
    image's units. Above 0 the face shows as a ridge (a membrane brighter than both cells
    beside it); at or below 0 the image does not separate the two cells there. The brightest of
    ``2 * RIDGE_REACH + 2`` samples against the brighter of 2 reads a flat noisy face slightly
    above 0, so the faces at or below 0 are a lower bound of those the image does not show."""
    labels = case.labels.astype(np.int64)
    scored = set(np.unique(case.truth).tolist()) - {0}
    smooth = ndi.gaussian_filter(case.pixels.astype(np.float64), RIDGE_SIGMA)
    values: dict[tuple[int, int], list] = {}
    reach, depth = RIDGE_REACH, RIDGE_DEPTH
    for axis, n in enumerate(labels.shape):
        lo, hi = depth, n - depth - 1  # the face lies between index i and i + 1
        if hi <= lo:
            continue

        def at(offset, lo=lo, hi=hi, axis=axis):
            return tuple(slice(lo + offset, hi + offset) if a == axis else slice(None)
                         for a in range(labels.ndim))  # fmt: skip

        a, b = labels[at(0)], labels[at(1)]
        deep = (labels[at(-depth)] == a) & (labels[at(depth + 1)] == b)
        pick = (a != b) & (a > 0) & (b > 0) & deep
        face = np.max([smooth[at(k)][pick] for k in range(-reach, reach + 2)], axis=0)
        inside = np.maximum(smooth[at(-depth)][pick], smooth[at(depth + 1)][pick])
        keys = zip(np.minimum(a[pick], b[pick]).tolist(), np.maximum(a[pick], b[pick]).tolist())
        for key, value in zip(keys, (face - inside).tolist()):
            values.setdefault(key, []).append(value)
    return {key: float(np.median(v)) for key, v in values.items()
            if len(v) >= RIDGE_LEAST and key[0] in scored and key[1] in scored}  # fmt: skip


def merged_faces(case: Case, ids: np.ndarray, ridges: dict) -> list[float]:
    """The ``face_ridges`` contrasts of the reference faces that ``ids`` draws no face across:
    pairs of touching reference cells each at least half inside one predicted object (the
    under-splits' cells)."""
    truth, pred = case.truth.astype(np.int64), _scored(case, ids).astype(np.int64)
    ti, pi, inter = _overlaps(truth, pred)
    most = inter / np.bincount(truth.ravel())[ti] >= 0.5  # the reference cell at least half inside
    held: dict[int, list[int]] = {}
    for t, p in zip(ti[most].tolist(), pi[most].tolist()):
        held.setdefault(p, []).append(t)
    return [ridges[(x, y)] for cells in held.values() for x in cells for y in cells
            if x < y and (x, y) in ridges]  # fmt: skip


def score(case: Case, fg=None, ids=None, train_s=None, segment_s=None, note="") -> dict:
    """A table row: foreground scores of ``fg``, object scores of ``ids`` (either may be None)."""
    from bench_quality import boundary_f

    row = dict.fromkeys(COLUMNS)
    row.update(train_s=train_s, segment_s=segment_s, note=note)
    if fg is not None:
        row["Dice"] = dice(fg, case.fg)
        row["BF"] = boundary_f(fg, case.fg, case.spacing, case.tol)
    if ids is not None:
        row.update(match(case.truth, _scored(case, ids)))
    return row


# --- anchors -------------------------------------------------------------------------------------


def _local_max_markers(values: np.ndarray, min_distance: int, mask=None) -> np.ndarray:
    """Seeds at ``peak_local_max(values, min_distance=...)`` (voxels, as users call it)."""
    from skimage.feature import peak_local_max

    coords = peak_local_max(
        values, min_distance=min_distance, exclude_border=False,
        labels=None if mask is None else mask.astype(np.int32),
    )  # fmt: skip
    peaks = np.zeros(values.shape, bool)
    peaks[tuple(coords.T)] = True
    return ndi.label(peaks)[0]  # a plateau's peaks: one seed


def _ball_voxels(radius: float, spacing) -> float:
    """Voxels (2D: pixels) of a ball (disc) of ``radius`` physical units."""
    size = 4 / 3 * np.pi * radius**3 if len(spacing) == 3 else np.pi * radius**2
    return size / float(np.prod(spacing))


def _smooth(case: Case, sigma: float) -> np.ndarray:
    img = case.pixels.astype(np.float32)
    return ndi.gaussian_filter(img, sigma) if sigma else img


def _otsu_fg(case: Case, img: np.ndarray) -> np.ndarray:
    from bench_quality import otsu_threshold

    t = otsu_threshold(img)
    return img < t if case.image.kind == "cells" else img > t


def otsu_rows(case: Case) -> dict:
    rows = {}
    for name, sigma in zip(OTSU, (0.0, 1.0, 2.0)):
        start = time.perf_counter()
        fg = _otsu_fg(case, _smooth(case, sigma))
        rows[name] = score(case, fg, segment_s=time.perf_counter() - start)
    best = max(OTSU, key=lambda n: rows[n]["Dice"])
    rows[BEST_OTSU] = {**rows[best], "note": best.split(", ", 1)[1]}
    return rows


def _drop_small(ids: np.ndarray, min_voxels: float) -> np.ndarray:
    if min_voxels <= 0:
        return ids
    small = np.bincount(ids.ravel()) < min_voxels
    small[0] = False
    return np.where(small[ids], 0, ids)


def recipe(case: Case) -> dict:
    """The classic nuclei recipe over its grid; the best by object F1 (hindsight)."""
    from skimage.segmentation import watershed

    best = None
    tried = 0
    for sigma in RECIPE_SIGMAS:
        start = time.perf_counter()
        mask = _otsu_fg(case, _smooth(case, sigma))
        dist = ndi.distance_transform_edt(mask, sampling=case.spacing).astype(np.float32)
        base_s = time.perf_counter() - start
        for f in RECIPE_MIN_DISTANCE:
            start = time.perf_counter()
            markers = _local_max_markers(dist, f, mask)
            ids = watershed(-dist, markers, mask=mask)
            ws_s = time.perf_counter() - start
            for m in RECIPE_MIN:
                start = time.perf_counter()
                kept = _drop_small(ids, _ball_voxels(m * case.radius, case.spacing) if m else 0)
                seconds = base_s + ws_s + time.perf_counter() - start
                f1 = object_f1(case, kept)
                tried += 1
                if best is None or f1 > best[0]:
                    best = (f1, (sigma, f, m), kept, seconds)
    _, (sigma, f, m), ids, seconds = best
    note = (f"sigma {sigma:g}, min_distance {f}, min size {'none' if not m else f'ball of {m:g} R'} "
            f"(best of {tried})")  # fmt: skip
    return score(case, ids > 0, ids, segment_s=seconds, note=note)


def membrane_watershed(case: Case) -> dict:
    """Seeded watershed of the smoothed membrane signal over its grid; best by F1 (hindsight)."""
    from skimage.segmentation import watershed

    best = None
    tried = 0
    for sigma in MEMBRANE_SIGMAS:
        start = time.perf_counter()
        smooth = _smooth(case, sigma)
        base_s = time.perf_counter() - start
        for f in MEMBRANE_MIN_DISTANCE:
            start = time.perf_counter()
            ids = watershed(smooth, _local_max_markers(-smooth, f))
            ws_s = time.perf_counter() - start
            for m in MEMBRANE_MERGE:
                start = time.perf_counter()
                cells = ids
                if m:  # small cells give their seed up; their neighbours flood them
                    cells = watershed(smooth, _drop_small(ids, _ball_voxels(m * case.radius, case.spacing)))  # fmt: skip
                seconds = base_s + ws_s + time.perf_counter() - start
                f1 = object_f1(case, cells)
                tried += 1
                if best is None or f1 > best[0]:
                    best = (f1, (sigma, f, m), cells, seconds)
    _, (sigma, f, m), ids, seconds = best
    note = (f"sigma {sigma:g}, min_distance {f}, {'no merge' if not m else f'cells under a ball of {m:g} R merged'} "
            f"(best of {tried})")  # fmt: skip
    return score(case, None, ids, segment_s=seconds, note=note)


def run_apoc(python: str, case: Case, scribbles: np.ndarray) -> dict:
    import common

    out = common.run_apoc_worker(python, case.pixels, scribbles, 1, ["small_quick", "objects:small_quick"])  # fmt: skip
    rows = {}
    for name, key, fg in ((APOC_PIXELS, "small_quick", True), (APOC_OBJECTS, "objects_small_quick", False)):  # fmt: skip
        labels = out[f"{key}_labels"]
        train_s, predict_s = (float(v) for v in out[f"{key}_times"][0])
        if fg:
            rows[name] = score(case, labels == 2, None, train_s, predict_s)
        else:
            rows[name] = score(case, labels > 0, labels, train_s, predict_s)
    return rows


# --- ours ----------------------------------------------------------------------------------------


CELL_CLASSES = ("membrane", "cell")  # the strokes' values 1 and 2 on the cells image


def run_ours(
    case: Case, scribbles, instances: dict, device: str, train_kw=None, ridges=None
) -> dict:
    """Ours refined and unrefined on one stroke set: ``{method: row}``; ``ridges``
    (``face_ridges``, or None): each row also gets ``merged_faces``."""
    from napari_pacseg import segment, train

    names = CELL_CLASSES if case.image.kind == "cells" else None
    start = time.perf_counter()
    model = train(case.pixels, scribbles, spacing=case.spacing, seed=0, device=device,
                  class_names=names, **(train_kw or {}))  # fmt: skip
    train_s = time.perf_counter() - start
    rows = {}
    for refine, name in ((False, UNREFINED), (True, OURS)):
        start = time.perf_counter()
        seg = segment(case.pixels, model, spacing=case.spacing, refine=refine,
                      instances=instances, device=device)  # fmt: skip
        seconds = time.perf_counter() - start
        rows[name] = score(case, seg.labels > 0, seg.instances, train_s, seconds)
        if ridges is not None:
            rows[name]["merged_faces"] = merged_faces(case, seg.instances, ridges)
    return rows


# --- the run -------------------------------------------------------------------------------------


def load_case(folder: Path, image: RealImage, radius: float) -> Case:
    import tifffile

    pixels = tifffile.imread(folder / f"{image.stem}_image.tif")
    labels = tifffile.imread(folder / f"{image.stem}_labels.tif")
    if pixels.shape != labels.shape or pixels.ndim != len(image.spacing):
        raise SystemExit(f"{image.stem}: image {pixels.shape} and labels {labels.shape} do not "
                         f"fit a {len(image.spacing)}D spacing")  # fmt: skip
    ignore = None
    truth = labels
    if image.kind == "cells":
        ignore = membrane_band(labels)
        truth = np.where(ignore, 0, labels)
    return Case(image, pixels, labels, truth, ignore, image.spacing, radius)


def halves(case: Case) -> list[Case]:
    """The two halves of ``case`` along y (a 2D image: along x), each a case of its own named
    after the half (its stem gains ", y 0-100" and so on)."""
    axis = case.pixels.ndim - (1 if case.pixels.ndim == 2 else 2)
    n = case.pixels.shape[axis]
    out = []
    for lo, hi in ((0, n // 2), (n // 2, n)):
        window = tuple(slice(lo, hi) if a == axis else slice(None) for a in range(case.pixels.ndim))
        name = f"{case.image.stem}, {'zyx'[axis + 3 - case.pixels.ndim]} {lo}-{hi}"
        out.append(dataclasses.replace(
            case, image=dataclasses.replace(case.image, stem=name), pixels=case.pixels[window],
            labels=case.labels[window], truth=case.truth[window],
            ignore=None if case.ignore is None else case.ignore[window],
        ))  # fmt: skip
    return out


def strokes(case: Case, seed: int) -> np.ndarray:
    if case.image.kind == "cells":
        return cell_scribbles(case.labels, case.image.planes, seed)
    from robustness import user_scribbles

    return user_scribbles(case.labels, case.image.planes, seed)


def evaluate(
    case: Case, seeds, instances: dict, device: str, apoc_python: str, train_kw=None
) -> dict:
    """Per image: ``{"seeds": {method: [row per seed]}, "anchors": {method: row}, ...}``."""
    print(f"{case.image.stem}: {case.pixels.shape}, instances {instances}", flush=True)
    anchors = {ALL_FG: {**score(case, np.ones(case.fg.shape, bool)), "BF": None}}  # no boundary
    anchors.update(otsu_rows(case))
    anchors[RECIPE] = recipe(case)
    if case.image.kind == "cells":
        anchors[MEMBRANE] = membrane_watershed(case)
    for name, row in anchors.items():
        print(f"  {name}: {_brief(row)}", flush=True)
    ridges = face_ridges(case) if case.image.kind == "cells" else None
    per_seed: dict[str, list] = {}
    coverage = []
    for seed in seeds:
        scribbles = strokes(case, seed)
        coverage.append(np.count_nonzero(scribbles) / scribbles.size)
        rows = run_ours(case, scribbles, instances, device, train_kw, ridges)
        if apoc_python:
            rows.update(run_apoc(apoc_python, case, scribbles))
        for name, row in rows.items():
            per_seed.setdefault(name, []).append(row)
            print(f"  seed {seed}, {name}: {_brief(row)}", flush=True)
    return {"case": case, "anchors": anchors, "seeds": per_seed, "coverage": float(np.mean(coverage)),
            "instances": instances, "ridges": ridges}  # fmt: skip


def _brief(row: dict) -> str:
    parts = [f"{k} {row[k]:.3f}" for k in ("Dice", "BF", "F1", "IoU") if row[k] is not None]
    if row["objects"] is not None:
        parts.append(f"{row['objects']} / {row['reference']} objects, over {row['over']}, "
                     f"under {row['under']}")  # fmt: skip
    return ", ".join(parts) + (f" [{row['note']}]" if row.get("note") else "")


def _mean_row(rows: list[dict]) -> dict:
    out = {}
    for k in COLUMNS:
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["reference"] = rows[0].get("reference")
    return out


def _worst_row(rows: list[dict]) -> dict:
    """Each column's worst value over the seeds, independently."""
    out = {}
    for k in COLUMNS:
        vals = [r[k] for r in rows if r[k] is not None]
        if not vals:
            out[k] = None
        elif k in ("Dice", "BF", "F1", "IoU"):
            out[k] = min(vals)
        elif k == "objects":
            out[k] = max(vals, key=lambda v: abs(v - rows[0]["reference"]))
        else:
            out[k] = max(vals)
    out["reference"] = rows[0].get("reference")
    return out


HEAD = ("| method | fg Dice | boundary F | object F1@0.5 | mean matched IoU | objects / reference "
        "| over-split | under-split | train s | segment s | notes |")  # fmt: skip
RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


def _line(name: str, row: dict, counts: str = "d") -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    objects = "-" if row["objects"] is None else f"{f(row['objects'], counts)} / {row['reference']}"
    cells = [f(row["Dice"], ".3f"), f(row["BF"], ".3f"), f(row["F1"], ".3f"), f(row["IoU"], ".3f"),
             objects, f(row["over"], counts), f(row["under"], counts), f(row["train_s"], ".2f"),
             f(row["segment_s"], ".2f"), row.get("note", "") or ""]  # fmt: skip
    return f"| {name} | " + " | ".join(cells) + " |"


def _fragments_line(case: Case, instances: dict) -> str:
    """How many scored reference objects are smaller than the smallest object ours keeps
    (``InstanceConfig.smallest``: whole, or cut by the image's border), and how many of those
    the crop's border cuts."""
    from napari_pacseg.model.network import InstanceConfig

    config, planar = InstanceConfig(**instances), len(case.spacing) == 2
    whole, cut = config.smallest(planar), config.smallest(planar, cut=True)
    truth = case.truth
    sizes = np.bincount(truth.ravel()) * float(np.prod(case.spacing))
    ids = np.flatnonzero(sizes[1:]) + 1
    border = set()
    for axis in range(truth.ndim):
        for end in (0, -1):
            border |= {int(v) for v in np.unique(np.take(truth, end, axis=axis))}
    small = {int(i) for i in ids if sizes[i] < (cut if int(i) in border else whole)}
    return (
        f"Of the {len(ids)} scored reference objects, {len(small)} are smaller than the smallest "
        f"object ours keeps ({whole:.3g} spacing units^{truth.ndim}, {cut:.3g} where the "
        f"image's border cuts it: `InstanceConfig.smallest`), {len(small & border)} of them cut "
        f"by the crop's border; without those the reference holds {len(ids) - len(small)}."
    )


def _ridges_line(result: dict) -> str:
    """What the image shows of the reference's faces (``face_ridges``), and of those ours
    merges across (refined, every seed: ``merged_faces``)."""
    case: Case = result["case"]
    faces = np.array(list(result["ridges"].values()))
    merged = np.array([v for row in result["seeds"][OURS] for v in row.get("merged_faces", [])])
    lo, hi = np.percentile(case.pixels, [1, 99])

    def part(values):
        if values.size == 0:
            return "none"
        return (f"{values.size}, of which {int(np.count_nonzero(values <= 0))} show no ridge "
                f"(median contrast {np.median(values):.2f})")  # fmt: skip

    return (
        f"Faces the image shows (`face_ridges`: per face between two touching scored reference "
        f"cells, the brightest of the image, Gaussian {RIDGE_SIGMA:g} voxel, within "
        f"{RIDGE_REACH} voxels of the face minus the brighter of the two cells {RIDGE_DEPTH} "
        f"voxels in; no ridge: at or below 0, a count noise can only lower; the image's "
        f"1st-99th percentile range is {hi - lo:.3g}): faces of at least "
        f"{RIDGE_LEAST} voxel pairs {part(faces)}; the faces ours (refined) merges across, "
        f"counted over the seeds: {part(merged)}."
    )


def image_section(result: dict, seeds) -> list[str]:
    case: Case = result["case"]
    im = case.image
    sizes = np.bincount(case.labels.ravel())[1:]
    sizes = sizes[sizes > 0] * float(np.prod(case.spacing))
    eq = (sizes * 3 / (4 * np.pi)) ** (1 / 3) if len(case.spacing) == 3 else np.sqrt(sizes / np.pi)
    planes = "its one plane" if im.planes == (None,) else "z " + ", ".join(map(str, im.planes))
    unit = "voxels" if len(case.spacing) == 3 else "pixels"
    lines = [
        f"## {im.stem}",
        "",
        f"{case.pixels.shape} {unit}, spacing {case.spacing}; {len(sizes)} reference objects, "
        f"equivalent radius 10th percentile / median {np.percentile(eq, 10):.2f} / "
        f"{np.median(eq):.2f} (spacing units); radius given to ours R = {case.radius:g}; "
        f"ours' instances: `{json.dumps(result['instances'])}`. Strokes in {planes} cover "
        f"{100 * result['coverage']:.3f}% of the {unit} (mean over seeds {', '.join(map(str, seeds))}). "
        f"Boundary F tolerance {case.tol:g}.",
        "",
    ]
    lines += [_fragments_line(case, result["instances"]), ""]
    if im.kind == "cells":
        lines += [
            "Cells: foreground = cell interiors (labelled voxels off the 2-voxel membrane band, "
            f"{100 * case.fg.mean():.1f}% of the voxels); objects scored off the band (there "
            f"{int(np.count_nonzero(np.bincount(case.truth.ravel())[1:]))} reference objects; "
            "predicted voxels on the band are left out).",
            "",
        ]
        lines += [_ridges_line(result), ""]
    lines += [HEAD, RULE]
    for name, rows in result["seeds"].items():
        lines.append(_line(f"{name}, mean", _mean_row(rows), ".1f"))
        lines.append(_line(f"{name}, worst", _worst_row(rows)))
    for name, row in result["anchors"].items():
        lines.append(_line(name, row))
    lines += ["", "Ours per seed (refined / unrefined):", "",
              "| seed | Dice | boundary F | object F1 | objects | over | under | Dice unrefined "
              "| boundary F unrefined | F1 unrefined | objects unrefined |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for seed, r, u in zip(seeds, result["seeds"][OURS], result["seeds"][UNREFINED]):
        lines.append(f"| {seed} | {r['Dice']:.3f} | {r['BF']:.3f} | {r['F1']:.3f} | "
                     f"{r['objects']} | {r['over']} | {r['under']} | {u['Dice']:.3f} | "
                     f"{u['BF']:.3f} | {u['F1']:.3f} | {u['objects']} |")  # fmt: skip
    return lines


def targets(results: list[dict]) -> list[str]:
    lines = ["## Targets (issue 35), this run", "",
             "Ours refined, mean over the seeds (worst seed in brackets); the anchors chosen with "
             "hindsight. Refinement and object count: every seed.", ""]  # fmt: skip
    met_all = 0
    for result in results:
        case: Case = result["case"]
        ours, unref, anchors = result["seeds"][OURS], result["seeds"][UNREFINED], result["anchors"]
        checks = []
        mean, worst = _mean_row(ours), _worst_row(ours)
        otsu = anchors[BEST_OTSU]["Dice"]
        ok = mean["Dice"] >= otsu + 0.02
        checks.append(ok)
        lines.append(f"- {case.image.stem}, foreground Dice: {mean['Dice']:.3f} ({worst['Dice']:.3f}) "
                     f"vs best Otsu {otsu:.3f} + 0.02: {'met' if ok else 'NOT met'}")  # fmt: skip
        object_anchors = [n for n in (RECIPE, MEMBRANE) if n in anchors]
        best = max(object_anchors, key=lambda n: anchors[n]["F1"])
        ok = mean["F1"] >= anchors[best]["F1"] + 0.05
        checks.append(ok)
        lines.append(f"- {case.image.stem}, object F1: {mean['F1']:.3f} ({worst['F1']:.3f}) vs "
                     f"{best} {anchors[best]['F1']:.3f} + 0.05: {'met' if ok else 'NOT met'}")  # fmt: skip
        lowered = [
            f"seed {s}: {what} {u[k]:.3f} -> {r[k]:.3f}"
            for s, r, u in zip(result["seeds_used"], ours, unref)
            for what, k in (("Dice", "Dice"), ("boundary F", "BF"))
            if r[k] < u[k]
        ]
        ok = not lowered
        checks.append(ok)
        deltas = ", ".join(f"{r['Dice'] - u['Dice']:+.3f} / {r['BF'] - u['BF']:+.3f}"
                           for r, u in zip(ours, unref))  # fmt: skip
        lines.append(f"- {case.image.stem}, refinement never below unrefined (Dice / boundary F "
                     f"change per seed: {deltas}): "
                     + ("met" if ok else "NOT met (" + "; ".join(lowered) + ")"))  # fmt: skip
        n_ref = ours[0]["reference"]
        counts = [r["objects"] for r in ours]
        ok = all(abs(c - n_ref) <= 0.2 * n_ref for c in counts)
        checks.append(ok)
        lines.append(f"- {case.image.stem}, objects within 20% of the reference {n_ref}: "
                     f"{', '.join(map(str, counts))}: {'met' if ok else 'NOT met'}")  # fmt: skip
        met_all += all(checks)
    lines += ["", f"All four targets met on {met_all} of {len(results)} images."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None,
                        help=f"folder of the real images (default {DEFAULT_DATA} when it exists)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one set of strokes per seed")  # fmt: skip
    parser.add_argument("--images", nargs="+", choices=STEMS, default=list(STEMS))
    parser.add_argument("--radius", action="append", default=[], metavar="STEM=R",
                        help="the radius given to ours (and the anchors' minimum sizes) for one image")  # fmt: skip
    parser.add_argument("--instances-json", default="{}", metavar="JSON",
                        help='more InstanceConfig overrides for ours per image, e.g. '
                        '\'{"plant_cells_3d": {"sensitivity": 0.9}}\'')  # fmt: skip
    parser.add_argument("--train-json", default="{}", metavar="JSON",
                        help='train() keyword overrides for ours, e.g. \'{"context": true}\'; the '
                        "results then go to realdata-<device>-<--name>.md")  # fmt: skip
    parser.add_argument("--name", default="variant",
                        help="the results file's suffix with --train-json (default 'variant')")
    parser.add_argument("--halves", action="store_true",
                        help="each image's two halves (3D: along y, 2D: along x) as images of "
                        "their own (results in realdata-<device>-halves.md)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="for ours")
    parser.add_argument("--apoc-python", default=None,
                        help="interpreter with apoc installed (default: .apoc-venv/bin/python "
                        "when present; '' skips APOC)")  # fmt: skip
    args = parser.parse_args()

    data = Path(args.data) if args.data else DEFAULT_DATA
    if not (data / "README.md").exists():
        raise SystemExit(f"no real data at {data} (give --data PATH; see the issue 35 README)")
    radii = {im.stem: im.radius for im in IMAGES}
    for item in args.radius:
        stem, _, value = item.partition("=")
        if stem not in radii:
            raise SystemExit(f"--radius {item}: unknown image {stem!r} (one of {', '.join(STEMS)})")
        radii[stem] = float(value)
    train_kw = json.loads(args.train_json)
    if not isinstance(train_kw, dict):
        raise SystemExit("--train-json: a dict of train() keywords")
    extra = json.loads(args.instances_json)
    if not isinstance(extra, dict) or not set(extra) <= set(STEMS):
        raise SystemExit(f"--instances-json: a dict keyed by image ({', '.join(STEMS)})")

    sys.path.insert(0, str(HERE))
    import common

    apoc_python = args.apoc_python
    if apoc_python is None:
        apoc_python = str(common.DEFAULT_APOC) if common.DEFAULT_APOC.exists() else ""
    started = time.perf_counter()
    results = []
    for image in IMAGES:
        if image.stem not in args.images:
            continue
        case = load_case(data, image, radii[image.stem])
        instances = {"radius": radii[image.stem]}
        if image.kind == "cells":  # cells enclosed by the membrane class
            instances["boundary"] = CELL_CLASSES[0]
        instances.update(extra.get(image.stem, {}))
        for part in halves(case) if args.halves else [case]:
            result = evaluate(part, args.seeds, instances, args.device, apoc_python, train_kw)
            result["seeds_used"] = args.seeds
            results.append(result)
    run_s = time.perf_counter() - started

    shown_data = "../shared/realdata" if data == DEFAULT_DATA else common.shown_path(str(data))
    flags = f" --data {shown_data}" if args.data else ""
    flags += f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else ""
    flags += f" --images {' '.join(args.images)}" if args.images != list(STEMS) else ""
    flags += "".join(f" --radius {r}" for r in args.radius)
    flags += f" --instances-json '{args.instances_json}'" if extra else ""
    flags += f" --train-json '{args.train_json}' --name {args.name}" if train_kw else ""
    flags += " --halves" if args.halves else ""
    flags += f" --device {args.device}" if args.device != "cpu" else ""
    flags += f" --apoc-python {common.shown_path(apoc_python)}" if args.apoc_python else ""
    dev = args.device
    lines = [
        f"# Real images of other kinds: classes and objects from a few strokes ({common.device_name(dev)})",
        "",
        f"Command: `python benchmarks/bench_realdata.py{flags}`  ",
        f"Machine: {common.describe_machine('cpu')}"
        + (f"; ours on {common.describe_machine(dev)}" if dev != "cpu" else "")
        + "  ",
        f"Data: `{shown_data}` (not in the repository; its README). Whole run: {run_s:.0f} s.",
        "",
        "Definitions (module docstring of `benchmarks/bench_realdata.py`): strokes made from the "
        "reference labels in 3 planes (2D: the one plane), one set per seed; ours = train() "
        '(defaults) + segment(instances={"radius": R}; cells: with "boundary": '
        "\"membrane\", cells mode), refined and unrefined, 'mean' and "
        "'worst' (each column's worst value) over the seeds. Objects matched one-to-one at IoU "
        "> 0.5; F1 = 2 matches / (reference + predicted); over-split = reference objects holding "
        ">= half of each of 2+ predicted objects; under-split = predicted objects holding >= half "
        "of each of 2+ reference objects. Otsu: best of raw / Gaussian 1 / Gaussian 2 voxels by "
        "Dice; the recipe (Gaussian + Otsu + distance-transform seeded watershed + small-object "
        "removal) and the membrane watershed (cells) tuned over a small grid by object F1 on the "
        "same image (hindsight: an upper bound of what a user tuning by eye gets). Times: "
        "train() and segment() for ours, the chosen setting's run for the anchors."
        + (f" Ours trained with `train(..., **{train_kw})`." if train_kw else "")
        + (" Each image's two halves (3D: along y; 2D: along x) are images of their own here, "
           "their reference objects cut by the new border included: a check that the defaults "
           "hold on other crops of the same kinds." if args.halves else ""),
        "",
        "APOC: "
        + (
            f"`{common.shown_path(apoc_python)}`"
            if apoc_python
            else "not run (no `--apoc-python` interpreter here; `.apoc-venv` absent)."
        ),
        "",
    ]
    lines += targets(results)
    for result in results:
        lines += ["", *image_section(result, args.seeds)]
    suffix = (f"-{args.name}" if train_kw else "") + ("-halves" if args.halves else "")
    out = common.write_result(
        f"realdata-{common.device_name(dev)}{suffix}.md", "\n".join(lines) + "\n"
    )
    print(f"wrote {out} ({run_s:.0f} s)")


if __name__ == "__main__":
    main()
