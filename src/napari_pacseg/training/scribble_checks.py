"""Warnings about where scribbles were painted: a class painted only along the image's border
teaches the model that class from the border's look alone (a tester who painted the background
that way got bright nuclear rims labelled background); a class painted in one shade only is
extrapolated to its other shades; a class marked on a handful of voxels (a thin membrane
touched once) gives the head too few examples to learn it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BORDER = 0.06  # of the in-plane extent: "on the border" means within this of an edge


def coverage_warnings(scribbles: Sequence[np.ndarray], names: Sequence[str]) -> list[str]:
    """One sentence per class (scribble value ``i + 1`` is ``names[i]``) whose scribbles, over
    all the ``(D, H, W)`` (or ``(..., H, W)``) scribble arrays, lie only within ``BORDER`` of
    the images' edges in y and x; [] when every class was painted inside too (or not at all)."""
    out = []
    for i, name in enumerate(names):
        value, inside, painted = i + 1, False, False
        for marks in scribbles:
            where = np.argwhere(np.asarray(marks) == value)
            if not where.size:
                continue
            painted = True
            h, w = marks.shape[-2:]
            y, x = where[:, -2], where[:, -1]
            my, mx = max(1, round(BORDER * h)), max(1, round(BORDER * w))
            away = (y >= my) & (y < h - my) & (x >= mx) & (x < w - mx)
            if away.any():
                inside = True
                break
        if painted and not inside:
            out.append(
                f"the {name} scribbles are all on the image border: add some away from it "
                + ("(between objects), " if i == 0 else "")
                + "or the model learns the border's look as the class"
            )
    return out


NARROW = 0.03  # of the image's intensity range: a class painted within this is "narrow"
MIN_VOXELS = 20  # fewer scribbled voxels of a class say too little to judge their range
SAMPLE_VOXELS = 1 << 20  # image voxels read for its intensity range


def intensity_warnings(
    images: Sequence[np.ndarray], scribbles: Sequence[np.ndarray], names: Sequence[str]
) -> list[str]:
    """One sentence per class whose scribbled voxels, over all images, span less than
    ``NARROW`` of the images' intensity range (1st to 99.8th percentile, per channel) in every
    channel: a class taught from one shade only is extrapolated to every other shade of it. A
    class whose shade is the image's darkest or brightest (within ``NARROW`` of either end of
    the range: a black background, saturated objects) has no other shades to miss and is not
    warned about. ``images`` are channel first ``(C, ...)`` with the scribbles' spatial shape."""
    spans: dict[int, list[float]] = {}
    ranges, lows = [], []
    for image, marks in zip(images, scribbles):
        image = np.asarray(image)
        marks = np.asarray(marks)
        step = max(1, int(np.ceil((marks.size / SAMPLE_VOXELS) ** (1 / marks.ndim))))
        grid = (slice(None), *(slice(None, None, step),) * marks.ndim)
        lo, hi = np.percentile(image[grid].reshape(image.shape[0], -1), [1, 99.8], axis=1)
        ranges.append(hi - lo)
        lows.append(lo)
        for value in np.unique(marks[marks > 0]).tolist():
            vals = image[:, marks == value].astype(np.float64)
            spans.setdefault(int(value), []).append(vals)
    whole = np.max(ranges, axis=0)
    if not np.any(whole > 0):  # a flat image: no shades to miss
        return []
    low, high = np.min(lows, axis=0), np.min(lows, axis=0) + whole
    whole = np.where(whole > 0, whole, np.inf)
    out = []
    for value, parts in sorted(spans.items()):
        vals = np.concatenate(parts, axis=1)
        if vals.shape[1] < MIN_VOXELS or value > len(names):
            continue
        p1, middle, p99 = np.percentile(vals, [1, 50, 99], axis=1)
        widest = float(np.max((p99 - p1) / whole))
        margin = NARROW * whole
        at_an_end = np.all((middle <= low + margin) | (middle >= high - margin))
        if widest < NARROW and not at_an_end:
            out.append(
                f"the {names[value - 1]} scribbles cover {100 * widest:.1f}% of the image's "
                "intensity range: paint the class also where it looks different (brighter or "
                "darker parts of it)"
            )
    return out


MIN_LEARN_VOXELS = 16  # fewer scribbled voxels of a class than this are too few to learn from


def sparsity_warnings(scribbles: Sequence[np.ndarray], names: Sequence[str]) -> list[str]:
    """One sentence per class (scribble value ``i + 1`` is ``names[i]``) painted on fewer than
    ``MIN_LEARN_VOXELS`` voxels over all the scribble arrays, but not on none (a class not
    painted at all is ``train``'s error): the per-voxel head sees too few examples of it. Thin
    classes (a membrane 1-3 voxels wide) need strokes along them, in several places."""
    counts = np.zeros(len(names) + 1, np.int64)
    for marks in scribbles:
        marks = np.asarray(marks)
        values, n = np.unique(marks[(marks > 0) & (marks <= len(names))], return_counts=True)
        counts[values.astype(np.int64)] += n
    return [
        f"the {name} scribbles mark only {int(counts[i + 1])} voxels: too few to learn the class "
        "from; paint more of it, in several places (along thin structures such as membranes)"
        for i, name in enumerate(names)
        if 0 < counts[i + 1] < MIN_LEARN_VOXELS
    ]
