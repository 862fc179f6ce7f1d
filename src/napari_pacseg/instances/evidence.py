"""The image as the object steps read it: normalised, smoothed by a Gaussian in physical units.

``instances.labels.brightness_evidence`` (the objects' brightness, smoothed at a quarter of
the radius; in cells mode also the boundary's contrast) is this.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["smoothed_image", "smoothed_on", "smoothing_reach"]


def smoothed_image(image: np.ndarray, lo, hi, spacing, sigma: float) -> np.ndarray:
    """``image`` ``(C, D, H, W)`` (or ``(C, H, W)`` with a ``(y, x)`` spacing: not smoothed
    across planes) smoothed by a Gaussian of ``sigma`` (physical units) per axis, mapped by
    ``lo``/``hi`` (one value per channel: the segmentation's normalisation) to 0..1, clipped,
    averaged over channels: float32 of the spatial shape."""
    image = np.asarray(image)
    lo = np.asarray(lo, np.float32).reshape(-1)
    hi = np.asarray(hi, np.float32).reshape(-1)
    sigmas = [sigma / s for s in spacing]
    out = np.zeros(image.shape[1:], np.float32)
    for c in range(image.shape[0]):
        smooth = ndi.gaussian_filter(image[c].astype(np.float32), sigmas, mode="reflect")
        scale = hi[c] - lo[c] if hi[c] > lo[c] else 1.0
        out += np.clip((smooth - lo[c]) / scale, 0.0, 1.0)
    return out / image.shape[0]


def smoothing_reach(spacing, sigma: float) -> tuple[int, ...]:
    """Voxels per axis that ``smoothed_image`` of a voxel reads beyond it (the Gaussian as
    ``scipy.ndimage.gaussian_filter`` truncates it, at 4 sigma)."""
    return tuple(int(4.0 * sigma / s + 0.5) for s in spacing)


def smoothed_on(read, box, shape, spacing, sigma: float, lo, hi) -> np.ndarray:
    """``smoothed_image`` on ``box`` (a ``(start, stop)`` pair per axis of ``spacing``) of an
    image of spatial ``shape``: ``read(ext)`` gives the image ``(C, ...)`` on ``ext``, the box
    grown by ``smoothing_reach`` (clipped to the image, as the whole image's smoothing reflects
    at its edges), so the result equals the whole image's on the box."""
    reach = smoothing_reach(spacing, sigma)
    ext = tuple((max(0, a - r), min(n, b + r)) for (a, b), r, n in zip(box, reach, shape))
    out = smoothed_image(read(ext), lo, hi, spacing, sigma)
    return out[tuple(slice(a - e, b - e) for (a, b), (e, _) in zip(box, ext))]
