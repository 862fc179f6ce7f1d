"""Regenerate the bundled sample: a synthetic 3D nuclei volume, its ground truth, scribbles as a
user would paint them, and a demo model trained from those scribbles.

Deterministic (fixed seeds): ``python sample_data/make_sample.py`` rewrites
``src/napari_pacseg/data/nuclei.npz`` (image, truth, instance truth, scribbles) and
``src/napari_pacseg/data/nuclei_demo.safetensors`` (package data, so an installed plugin has
its sample; load them with ``napari_pacseg.sample``).

The volume imitates a widefield/confocal stack of nuclei: ellipsoids with a few touching
neighbours, chromatin-like texture, uneven illumination, an anisotropic blur (longer along z),
a z-spacing of 1.0 um against 0.4 um in y/x, Poisson shot noise and camera read noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "src" / "napari_pacseg" / "data"
SHAPE = (64, 256, 256)
SPACING = (1.0, 0.4, 0.4)  # (z, y, x) um
DEMO_SIGMAS = (0.5, 1.0, 2.0)  # um: the demo model's feature scales


def _blur(vol: np.ndarray, sigmas_vox) -> np.ndarray:
    t = torch.from_numpy(vol.astype(np.float32))[None, None]
    for axis, s in enumerate(sigmas_vox):
        r = max(1, math.ceil(3 * s))
        x = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = (k / k.sum()).view([1, 1] + [-1 if a == axis else 1 for a in range(3)])
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        t = F.conv3d(F.pad(t, pad, mode="replicate"), k)
    return t[0, 0].numpy()


def make_volume(seed: int = 0, clusters: int = 0):
    """Returns ``image`` (uint16), ``truth`` (uint8, 1 = nucleus) and the nuclei list (centre,
    radii, brightness; ``make_instances`` labels them). ``clusters``: that many more groups of
    two or three nuclei in contact (of different sizes), placed after the others with their
    own random stream, so ``clusters=0`` gives the bundled sample's volume unchanged."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = (np.arange(n, dtype=np.float32) * s for n, s in zip(SHAPE, SPACING))
    z, y, x = np.meshgrid(zz, yy, xx, indexing="ij")
    extent = [n * s for n, s in zip(SHAPE, SPACING)]
    nuclei, truth, brightness = [], np.zeros(SHAPE, bool), np.zeros(SHAPE, np.float32)
    attempts = 0
    while len(nuclei) < 45 and attempts < 5000:
        attempts += 1
        radii = rng.uniform([3.0, 4.0, 4.0], [4.5, 6.5, 6.5])
        centre = rng.uniform([4, 4, 4], [extent[0] - 4, extent[1] - 4, extent[2] - 4])
        # touching neighbours allowed, deep overlaps not
        if any(np.linalg.norm((centre - c) / ((radii + r) / 2)) < 1.6 for c, r, _ in nuclei):
            continue
        nuclei.append((centre, radii, rng.uniform(0.6, 1.0)))
    nuclei += _clusters(np.random.default_rng([seed, 1]), nuclei, extent, clusters)
    for centre, radii, level in nuclei:
        inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
            (x - centre[2]) / radii[2]
        ) ** 2 < 1
        truth |= inside
        brightness = np.where(inside, np.maximum(brightness, level), brightness)
    texture = _blur(rng.standard_normal(SHAPE).astype(np.float32), (0.8, 2.0, 2.0))
    texture /= texture.std()
    signal = brightness * (1 + 0.25 * texture)
    illumination = 0.6 + 0.4 * np.exp(
        -(((y - extent[1] * 0.3) ** 2 + (x - extent[2] * 0.7) ** 2) / (2 * 60.0**2))
    )
    background = 0.08 + 0.06 * (z / extent[0])
    blurred = _blur(signal * illumination, (1.2, 1.0, 1.0)) + background
    photons = rng.poisson(np.clip(blurred, 0, None) * 400).astype(np.float32)
    image = np.clip(photons + rng.normal(100, 6, SHAPE), 0, 65535).astype(np.uint16)
    return image, truth.astype(np.uint8), nuclei


def _clusters(rng, nuclei, extent, count: int) -> list:
    """``count`` groups of 2-3 nuclei, each next one touching the group's first (centres 0.85
    of the sum of their radii along the line apart, so they share a contact face), sizes
    0.65-1.1 of the first's, mostly side by side in y/x; a group is kept only where it keeps
    clear of every nucleus placed before."""
    groups, attempts = [], 0
    while len(groups) < count and attempts < 5000:
        attempts += 1
        radii = rng.uniform([3.0, 4.0, 4.0], [4.5, 6.5, 6.5])
        centre = rng.uniform([5, 8, 8], [extent[0] - 5, extent[1] - 8, extent[2] - 8])
        group = [(centre, radii, rng.uniform(0.6, 1.0))]
        for _ in range(int(rng.integers(1, 3))):
            other = radii * rng.uniform(0.65, 1.1)
            angle = rng.uniform(0, 2 * math.pi)
            direction = np.array([rng.uniform(-0.25, 0.25), math.sin(angle), math.cos(angle)])
            direction /= np.linalg.norm(direction)
            # the ellipsoids' extents along the line, so the contact is the same for any angle
            reach = 1 / np.linalg.norm(direction / radii) + 1 / np.linalg.norm(direction / other)
            group.append((centre + 0.85 * reach * direction, other, rng.uniform(0.6, 1.0)))
        inside = all(
            np.all(c - r * 0.5 > 0) and np.all(c + r * 0.5 < np.array(extent)) for c, r, _ in group
        )
        placed = nuclei + [n for g in groups for n in g]
        clear = all(
            np.linalg.norm((c - c2) / ((r + r2) / 2)) >= 2.2
            for c, r, _ in group
            for c2, r2, _ in placed
        )
        # the followers must not touch each other deeply either
        apart = all(
            np.linalg.norm((a[0] - b[0]) / ((a[1] + b[1]) / 2)) >= 1.6
            for i, a in enumerate(group[1:], 1)
            for b in group[i + 1 :]
        )
        if inside and clear and apart:
            groups.append(group)
    return [n for g in groups for n in g]


def make_instances(nuclei) -> np.ndarray:
    """Instance truth ``(D, H, W)`` uint16 for ``make_volume``'s nuclei: 0 background, nucleus
    ``i`` is ``i + 1``; a voxel inside two (a contact face) goes to the one whose surface is
    further (smaller normalised radius)."""
    zz, yy, xx = (np.arange(n, dtype=np.float32) * s for n, s in zip(SHAPE, SPACING))
    out = np.zeros(SHAPE, np.uint16)
    best = np.full(SHAPE, np.inf, np.float32)
    for i, (centre, radii, _) in enumerate(nuclei):
        lo = [max(0, int((c - r) / s) - 1) for c, r, s in zip(centre, radii, SPACING)]
        hi = [min(n, int((c + r) / s) + 2) for c, r, s, n in zip(centre, radii, SPACING, SHAPE)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        z, y, x = np.meshgrid(zz[box[0]], yy[box[1]], xx[box[2]], indexing="ij")
        r = (
            ((z - centre[0]) / radii[0]) ** 2
            + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2
        )
        take = (r < 1) & (r < best[box])
        out[box][take] = i + 1
        best[box][take] = r[take]
    return out


def make_scribbles(truth: np.ndarray, nuclei, seed: int = 1) -> np.ndarray:
    """Strokes a user would paint on three z slices: short lines inside a few nuclei (value 2)
    and longer lines through the background away from nuclei (value 1)."""
    rng = np.random.default_rng(seed)
    scribbles = np.zeros(SHAPE, np.uint8)
    t = torch.from_numpy(truth.astype(np.float32))[None, None]
    near = (
        F.max_pool3d(t, (1, 9, 9), stride=1, padding=(0, 4, 4))[0, 0].numpy() > 0
    )  # within 1.6 um
    core = (
        -F.max_pool3d(-t, (1, 5, 5), stride=1, padding=(0, 2, 2))[0, 0].numpy() > 0
    )  # 0.8 um inside
    for zi in (20, 32, 44):
        painted = 0
        for centre, _, _ in nuclei:
            cz, cy, cx = (round(c / s) for c, s in zip(centre, SPACING))
            if abs(cz - zi) > 1 or painted >= 3:
                continue
            for dx in range(-5, 6):
                yy, xx = cy + dx // 3, cx + dx
                if 0 <= yy < SHAPE[1] and 0 <= xx < SHAPE[2] and core[zi, yy, xx]:
                    scribbles[zi, yy, xx] = 2
            painted += 1
        for _ in range(6):  # background strokes
            y0, x0 = rng.integers(0, SHAPE[1]), rng.integers(0, SHAPE[2])
            angle = rng.uniform(0, math.pi)
            for step in range(40):
                yy = round(y0 + step * math.sin(angle))
                xx = round(x0 + step * math.cos(angle))
                if not (0 <= yy < SHAPE[1] and 0 <= xx < SHAPE[2]) or near[zi, yy, xx]:
                    break
                scribbles[zi, yy, xx] = 1
    return scribbles


def main() -> None:
    from napari_pacseg import FeatureSpec, save_model, train

    image, truth, nuclei = make_volume()
    scribbles = make_scribbles(truth, nuclei)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / ".nuclei.npz.tmp.npz"
    np.savez_compressed(
        tmp, image=image, truth=truth, scribbles=scribbles, spacing=np.array(SPACING),
        instances=make_instances(nuclei),
    )  # fmt: skip
    tmp.replace(OUT / "nuclei.npz")
    model = train(
        image, scribbles, spacing=SPACING, features=FeatureSpec(sigmas=DEMO_SIGMAS),
        class_names=["background", "nucleus"], seed=0,
    )  # fmt: skip
    save_model(model, OUT / "nuclei_demo.safetensors")
    print(f"{len(nuclei)} nuclei, {int(truth.sum())} nucleus voxels, "
          f"{int((scribbles == 1).sum())} + {int((scribbles == 2).sum())} scribbled voxels")  # fmt: skip


if __name__ == "__main__":
    main()
