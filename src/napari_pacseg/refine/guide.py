"""The refinement's guide: the normalised image, denoised at a scale set by its noise level.

``pac_crf3d`` passes messages between voxels of similar guide values, ``exp(-1/2 ||g_i -
g_j||^2)`` with ``g = image / guide_sigma``. Pixel noise of the order of ``guide_sigma``
randomises those weights, and the refinement then does nothing (or harm). So the guide is

smoothed by a Gaussian just wide enough that the noise left in it is at most
``RESIDUAL_TARGET x guide_sigma`` (no smoothing on clean images), then divided by
``guide_sigma``. (Also widening ``guide_sigma`` by the remaining noise measured worse: it blurs
the contrast at dim edges; see the issue 18 note.)

The noise level is a robust estimate (median absolute deviation of second differences along
x) over the whole volume, computed once per image like its intensity range, so every
tile and chunk of a volume gets the same guide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from napari_pacseg.model.features import (
    MIN_AXIS_SIGMA,
    axis_kernels,
    axis_radii,
    gauss_kernel,
    smoothed,
)
from napari_pacseg.model.normalise import volume_noise_level  # noqa: F401  (re-exported)

# Smoothing scales tried, in voxels of the finest axis (coarser axes: the same physical width).
SMOOTHING_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
RESIDUAL_TARGET = 0.3


def _residual_factor(sigmas) -> float:
    """Standard deviation of white noise after the separable Gaussian of ``sigmas``, relative."""
    var = 1.0
    for s in sigmas:
        if s:
            var *= float((gauss_kernel(s, torch.float64, "cpu") ** 2).sum())
    return math.sqrt(var)


@dataclass(frozen=True)
class GuideFilter:
    """How the guide is made from the normalised image: Gaussian ``sigmas`` per axis (voxels;
    0 = that axis unsmoothed; all 0 = no smoothing), then divided by ``guide_sigma``; ``noise``
    is the per-channel noise level it was chosen for."""

    sigmas: tuple[float, float, float]
    guide_sigma: float
    noise: tuple[float, ...]

    @property
    def residual_noise(self) -> torch.Tensor:
        """The noise left in the guide per channel, ``(C,)`` float32, normalised units."""
        return torch.tensor(self.noise, dtype=torch.float32) * _residual_factor(self.sigmas)

    @property
    def radius(self) -> tuple[int, int, int]:
        """Voxels of image beyond a box its guide depends on."""
        return axis_radii(self.sigmas)

    def describe(self) -> str:
        noise = ", ".join(f"{n:.3g}" for n in self.noise)
        if not any(self.sigmas):
            return f"guide: noise {noise} (normalised), not smoothed"
        sig = " x ".join(f"{s:.2g}" for s in self.sigmas)
        return f"guide: noise {noise} (normalised), smoothed by a Gaussian of {sig} voxels"


def guide_filter(noise: torch.Tensor, guide_sigma: float, spacing) -> GuideFilter:
    """The ``GuideFilter`` for per-channel ``noise`` (``volume_noise_level``), the refinement's
    ``guide_sigma`` and the ``(z, y, x)`` spacing: the smallest of ``SMOOTHING_SIGMAS`` that
    brings the noisiest channel to ``RESIDUAL_TARGET x guide_sigma`` (the largest when none
    does), none when it is there already."""
    worst = float(noise.max()) if noise.numel() else 0.0
    finest = min(spacing)
    chosen = (0.0, 0.0, 0.0)
    if worst > RESIDUAL_TARGET * guide_sigma:
        for s in SMOOTHING_SIGMAS:
            per_axis = tuple(s * (finest / sp) for sp in spacing)
            chosen = tuple(a if a >= MIN_AXIS_SIGMA else 0.0 for a in per_axis)
            if worst * _residual_factor(chosen) <= RESIDUAL_TARGET * guide_sigma:
                break
    return GuideFilter(chosen, float(guide_sigma), tuple(float(n) for n in noise))


def make_guide(norm: torch.Tensor, filt: GuideFilter, keep) -> torch.Tensor:
    """The guide ``(1, C, *keep sizes)`` of a normalised region ``norm`` ``(1, C, D, H, W)``:
    smoothed over the ranges ``keep`` (3 ``(start, stop)`` in ``norm``'s coordinates; past its
    edges the image is extended by replicating them, which is right where ``norm`` ends at the
    volume's edge and never needed elsewhere: callers read ``filt.radius`` beyond ``keep``),
    then divided by ``filt.guide_sigma``."""
    c = norm.shape[1]
    if any(filt.sigmas):
        out = smoothed(
            norm.reshape(c, 1, *norm.shape[2:]), axis_kernels(filt.sigmas, norm.device), keep
        )
        out = out.reshape(1, c, *out.shape[2:])
    else:
        out = norm[(slice(None), slice(None), *(slice(a, b) for a, b in keep))].clone()
    return out.div_(filt.guide_sigma)
