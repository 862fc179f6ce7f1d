"""Robustness of a trained model to what differs between images of one kind (``bench_quality``'s
robustness section; ``--robustness-only`` runs it alone):

* exposure: Dice of the foreground on the same image at half and double the intensity, and with
  an offset of 30% of its 99.8th percentile added, against the image as it is;
* empty fields: the foreground fraction ours gives on crops that hold no object (at least 3
  voxels from every object of the reference), where the whole image's result is background too;
  the same crops with the normalisation of model files written before it (each image by its
  own range, unclipped; same weights), to show what it changes.

Real images (``--realdata DIR``, the folder described in its README) get user-like scribbles
made from their reference labels (``user_scribbles``): short strokes inside a few objects and
longer ones through the background, in three planes (one image for 2D), well under 1% of the
voxels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_pacseg import segment

EXPOSURES = (("x0.5", 0.5, 0.0), ("x2", 2.0, 0.0), ("+offset", 1.0, 0.3))
CROP_SHAPES = {3: (12, 48, 48), 2: (64, 64)}
CROPS_PER_IMAGE = 6
# (file stem, spacing (z, y, x) or (y, x), the planes scribbled, crop shape)
REAL_3D = (("arabidopsis_nuclei_3d", (0.284, 0.127, 0.127), (30, 50, 70), (12, 32, 32)),)
REAL_2D = (("dsb2018_nuclei_2d", (1.0, 1.0), (None,), (48, 48)),)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.count_nonzero(pred & truth) / max(1, pred.sum() + truth.sum()))


def user_scribbles(labels: np.ndarray, planes, seed: int = 0) -> np.ndarray:
    """Scribbles a user would paint on a labelled image ``labels`` (0 background, 1..N
    objects): in each of ``planes`` (z indices; ``(None,)`` for a 2D image) 4 strokes of up to 6
    voxels along x inside objects (2 voxels from their edge, value 2) and 4 of up to 20 voxels
    through the background (3 voxels from any object, value 1). uint8 of ``labels``' shape."""
    rng = np.random.default_rng(seed)
    fg = labels > 0
    inside = ndimage.binary_erosion(fg, iterations=2)
    outside = ~ndimage.binary_dilation(fg, iterations=3)
    out = np.zeros(labels.shape, np.uint8)
    for z in planes:
        at = () if z is None else (z,)
        for mask, value, strokes, length in ((inside, 2, 4, 6), (outside, 1, 4, 20)):
            plane = mask[at]
            ys, xs = np.nonzero(plane)
            for i in rng.choice(len(ys), size=min(strokes, len(ys)), replace=False):
                for dx in range(length):
                    x = xs[i] + dx
                    if x >= plane.shape[1] or not plane[ys[i], x]:
                        break
                    out[(*at, ys[i], x)] = value
    return out


def background_crops(truth: np.ndarray, shape, n: int, seed: int = 1) -> list[tuple]:
    """Up to ``n`` boxes of ``shape`` holding no voxel within 3 of an object of ``truth``."""
    near = ndimage.binary_dilation(truth, iterations=3)
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(20000):
        lo = [int(rng.integers(0, s - c + 1)) for s, c in zip(truth.shape, shape)]
        box = tuple(slice(a, a + c) for a, c in zip(lo, shape))
        if not near[box].any():
            boxes.append(box)
            if len(boxes) == n:
                break
    return boxes


def _legacy(model):
    """``model`` with the normalisation of files written before it (same weights)."""
    old = type(model)(dataclasses.replace(model.config, normalisation=None))
    old.load_state_dict(model.state_dict())
    return old.eval()


def measure(name: str, model, image, truth, spacing, crop_shape=None) -> dict:
    """Exposure Dice and empty-crop foreground fractions of ``model`` on one image."""
    truth = truth.astype(bool)
    img = image.astype(np.float32)
    row = {"name": name, "x1": _dice(segment(img, model, spacing=spacing).labels > 0, truth)}
    top = float(np.percentile(img, 99.8))
    for label, gain, offset in EXPOSURES:
        pred = segment(img * gain + offset * top, model, spacing=spacing).labels > 0
        row[label] = _dice(pred, truth)
    crop_shape = crop_shape or CROP_SHAPES[img.ndim]
    boxes = background_crops(truth, crop_shape, CROPS_PER_IMAGE)
    whole = segment(img, model, spacing=spacing).labels > 0
    old = _legacy(model)
    row["crops"], row["crop_shape"] = len(boxes), crop_shape
    row["whole_there"] = float(np.mean([whole[b].mean() for b in boxes])) if boxes else None
    for key, m in (("crop_fg", model), ("crop_fg_before", old)):
        fractions = [float((segment(img[b], m, spacing=spacing).labels > 0).mean()) for b in boxes]
        row[key] = (float(np.mean(fractions)), float(np.max(fractions))) if fractions else None
    print(f"  robustness {name}: " + ", ".join(
        f"{k} {row[k]:.3f}" for k in ("x1", *(e[0] for e in EXPOSURES))
    ) + f"; empty crops {row['crop_fg']} (before: {row['crop_fg_before']})", flush=True)  # fmt: skip
    return row


def real_images(folder, two_d: bool):
    """``(name, image, truth, scribbles, spacing, crop shape)`` of the real images in
    ``folder`` of the kind asked (2D or 3D)."""
    import tifffile

    folder = Path(folder)
    for stem, spacing, planes, crop in REAL_2D if two_d else REAL_3D:
        image = tifffile.imread(folder / f"{stem}_image.tif")
        labels = tifffile.imread(folder / f"{stem}_labels.tif")
        yield (f"real: {stem}", image, labels > 0, user_scribbles(labels, planes), spacing, crop)


def table(rows) -> list[str]:
    """The robustness rows as a markdown section."""
    lines = [
        "## Robustness: other exposures, and fields without objects",
        "",
        "Dice of the foreground (refined) on the image as it is and at other exposures; the "
        "foreground fraction on crops holding no object (mean / max over the crops) with the "
        "model's normalisation, and with the normalisation of model files written before it "
        "(each image by its own range, unclipped; same weights). 'whole' is the whole image's "
        "result on the same crops.",
        "",
        "| image | Dice | x0.5 | x2 | +offset | max change | empty crops | whole there | "
        "fg on empty crops | before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = max(abs(r[e[0]] - r["x1"]) for e in EXPOSURES)
        shape = "x".join(map(str, r["crop_shape"]))
        crops = "-" if not r["crops"] else f"{r['crops']} of {shape}"

        def frac(v):
            return "-" if v is None else f"{v[0]:.3f} / {v[1]:.3f}"

        whole = "-" if r["whole_there"] is None else f"{r['whole_there']:.3f}"
        lines.append(
            f"| {r['name']} | {r['x1']:.3f} | {r['x0.5']:.3f} | {r['x2']:.3f} | "
            f"{r['+offset']:.3f} | {change:.3f} | {crops} | {whole} | {frac(r['crop_fg'])} | "
            f"{frac(r['crop_fg_before'])} |"
        )
    return lines
