"""``segment()``: image -> labels + matte, tiled with halos so tiling never changes the result."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from pacseg_kernels import pac_crf3d

from .model import PacSegModel, RefineConfig, apply_range, intensity_range

DEFAULT_TILE = (64, 128, 128)


class SegmentationCancelled(RuntimeError):
    """Raised by ``segment``/``train`` when ``should_cancel()`` returned True; nothing is returned."""


@dataclass
class Segmentation:
    """Result of ``segment``.

    labels : ``(D, H, W)`` uint8 (uint16 beyond 255 values): class per voxel, background 0, every
        other class its scribble value (model class index + 1).
    matte : ``(D, H, W)`` float32 in [0, 1]: 1 - P(background) after refinement.
    probabilities : ``(K, D, H, W)`` float32 class probabilities when asked for, else None.
    """

    labels: np.ndarray
    matte: np.ndarray
    probabilities: np.ndarray | None = None


def as_volume(image, channel_axis: int | None, what: str = "image") -> np.ndarray:
    """``(C, D, H, W)`` view of a 3D image, or of a 4D one with ``channel_axis``; checks values."""
    arr = np.asarray(image)
    if channel_axis is None:
        if arr.ndim != 3:
            raise ValueError(
                f"{what} must be 3D (D, H, W), got shape {arr.shape}; for a multichannel 4D image "
                "pass channel_axis"
            )
        arr = arr[None]
    else:
        if arr.ndim != 4:
            raise ValueError(
                f"{what} with channel_axis={channel_axis} must be 4D, got shape {arr.shape}"
            )
        arr = np.moveaxis(arr, channel_axis, 0)
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{what} has dtype {arr.dtype}; a numeric image is required")
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ValueError(f"{what} holds {bad} NaN or infinite values; fill or mask them first")
    return arr


def check_spacing(spacing, default) -> tuple[float, float, float]:
    if spacing is None:
        return tuple(float(s) for s in default)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}")
    return spacing


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def refine_params(model: PacSegModel, refine) -> RefineConfig | None:
    """The refinement to run: model defaults (True), none (False), or overrides (a dict)."""
    if refine is False:
        return None
    base = model.config.refine
    if refine is True:
        return base
    if isinstance(refine, dict):
        known = {f.name for f in fields(RefineConfig)}
        unknown = sorted(set(refine) - known)
        if unknown:
            raise ValueError(f"refine: unknown parameters {unknown}; known: {sorted(known)}")
        return dataclasses.replace(base, **refine)
    raise ValueError(
        f"refine must be True, False or a dict of RefineConfig overrides, got {refine!r}"
    )


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
) -> Segmentation:
    """Segment a 3D image with a trained model: logits, PAC-CRF refinement, labels and matte.

    Parameters
    ----------
    image : array ``(D, H, W)`` or 4D with ``channel_axis``; numpy or anything ``np.asarray``
        takes (a dask array is read tile by tile only through ``segment_zarr``; here it is loaded).
    model : PacSegModel
    spacing : (z, y, x) voxel size in the model's units (napari's layer ``scale``); defaults to
        the spacing the model was trained at.
    refine : True (model defaults), False, or a dict overriding ``RefineConfig`` fields.
    device : "auto", "cpu", "cuda", "cuda:1", ...; on a CUDA out-of-memory error the tile is
        retried smaller, then on the CPU, with a warning.
    tile_shape : core tile size (D, H, W); each tile is computed with a halo covering the
        features, the context net and every refinement step, so results do not depend on it.
    progress : called as ``progress(done_tiles, total_tiles)``.
    should_cancel : polled between tiles; True raises ``SegmentationCancelled``.
    """
    vol = as_volume(image, channel_axis)
    if vol.shape[0] != model.config.in_channels:
        raise ValueError(
            f"the image has {vol.shape[0]} channel(s) but the model expects {model.config.in_channels}"
            + ("" if channel_axis is not None else "; pass channel_axis for a multichannel image")
        )
    spacing = check_spacing(spacing, model.config.spacing)
    params = refine_params(model, refine)
    dev = resolve_device(device)
    tile_shape = tuple(tile_shape or DEFAULT_TILE)
    if len(tile_shape) != 3 or not all(int(t) >= 1 for t in tile_shape):
        raise ValueError(f"tile_shape must be 3 positive ints (D, H, W), got {tile_shape!r}")
    shape = vol.shape[1:]
    full = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None]
    lo, hi = intensity_range(full)
    halo = list(model.halo(spacing))
    if params is not None and params.iterations:
        reach = params.iterations * (params.kernel_size // 2) * params.dilation
        halo = [h + reach for h in halo]
    k = model.config.n_classes
    labels = np.zeros(shape, dtype=np.uint8 if k <= 255 else np.uint16)
    matte = np.zeros(shape, dtype=np.float32)
    probs = np.zeros((k, *shape), dtype=np.float32) if return_probabilities else None
    model = model.eval()
    pending = _tiles(shape, tile_shape, model.grid)
    done, total = 0, len(pending)
    while pending:
        box = pending.pop(0)
        if should_cancel is not None and should_cancel():
            raise SegmentationCancelled("segmentation cancelled; no result was produced")
        try:
            p = _tile_probabilities(full, lo, hi, box, halo, model, params, spacing, dev)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            sizes = [b - a for a, b in box]
            if max(sizes) > model.grid * 8:  # split the tile, try again on the same device
                warnings.warn(
                    f"GPU out of memory on a tile of {sizes}; retrying with smaller tiles",
                    stacklevel=2,
                )
                smaller = [max(model.grid, s // 2) for s in sizes]
                sub = _tiles(sizes, smaller, model.grid)
                pending = [
                    tuple((a0 + a, a0 + b) for (a0, _), (a, b) in zip(box, s)) for s in sub
                ] + pending
                total += len(sub) - 1
                continue
            warnings.warn(
                "GPU out of memory even on small tiles; continuing on the CPU", stacklevel=2
            )
            dev = torch.device("cpu")
            pending.insert(0, box)
            continue
        sl = tuple(slice(a, b) for a, b in box)
        labels[sl] = _labels_from(p)
        matte[sl] = 1.0 - p[0]
        if probs is not None:
            probs[(slice(None), *sl)] = p
        done += 1
        if progress is not None:
            progress(done, total)
    return Segmentation(labels, matte, probs)


def _labels_from(p: np.ndarray) -> np.ndarray:
    """Class index 0 (background) -> 0; class index i -> its scribble value i + 1."""
    best = p.argmax(0)
    return np.where(best == 0, 0, best + 1)


@torch.no_grad()
def _tile_probabilities(full, lo, hi, box, halo, model, params, spacing, dev) -> np.ndarray:
    """Class probabilities ``(K, *core)`` of one core box, computed on the box plus its halo."""
    grid = model.grid
    ext = []
    for (a, b), h, n in zip(box, halo, full.shape[2:]):
        start = max(0, a - h)
        start -= start % grid  # keep the context net's pooling grid aligned with the volume's
        ext.append((start, min(n, b + h)))
    region = full[(slice(None), slice(None), *(slice(s, e) for s, e in ext))].to(dev)
    norm = apply_range(region, lo.to(dev), hi.to(dev))
    logits = model.to(dev).logits(norm, spacing)
    if params is not None and params.iterations:
        logits = pac_crf3d(
            logits,
            norm / params.guide_sigma,
            iterations=params.iterations,
            kernel_size=params.kernel_size,
            dilation=params.dilation,
            compat=params.compat,
            spatial_sigma=params.spatial_sigma,
        )
    p = torch.softmax(logits, dim=1)[0]
    core = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(box, ext))
    return p[(slice(None), *core)].cpu().numpy()
