"""Intensity normalisation: each image's intensities mapped to about 0..1 before the features.

Images of one kind differ in exposure and offset, so each is scaled by its own robust range
(the 1st and 99.8th percentiles per channel: one hot pixel does not move it). Two guards keep
that from inventing objects:

- The normalised values are clipped (``Normalisation.clip``), so an outlier (a hot pixel of
  1e10) weighs in the smoothing features like one bright voxel, not like a bright object.
- A model stores the contrast of its training images in units of their noise
  (``Normalisation.min_contrast``: the percentile range over the noise level, times
  ``CONTRAST_FRACTION``). An image whose own range is narrower than that many noise levels (a
  field of background only: its range is its noise) is scaled by that width instead of its own,
  so its noise stays as small as the training background's. Both the range and the noise level
  scale with exposure and ignore an offset, so images of the same kind at another exposure are
  scaled as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from napari_pacseg.checks import FLOAT32_MAX, as_tuple_field, is_real, short_repr

# Voxels read for the noise estimate (whole rows along x, on a regular grid of rows).
NOISE_SAMPLE_VOXELS = 1 << 21
# The share of the training images' contrast (in noise levels) below which an image is taken
# for one without objects and scaled by the training contrast instead of its own range.
CONTRAST_FRACTION = 0.75
# The largest minimum contrast a model stores (a noise-free training image has an infinite one).
MAX_MIN_CONTRAST = 1e6
# Normalised intensities are clipped to this range (the percentile range maps to 0..1).
DEFAULT_CLIP = (-1.0, 3.0)


@dataclass(frozen=True)
class Normalisation:
    """How a model maps each image's intensities before the features (stored in its file).

    clip : ``(low, high)``: normalised values are clipped to it (outliers weigh as one bright
        or dark voxel).
    min_contrast : per channel, the narrowest percentile range, in units of the image's noise
        level, that an image is scaled by (``train`` sets ``CONTRAST_FRACTION`` of the smallest
        range of its training images); None: every image by its own range.

    A model file written before this existed has ``ModelConfig.normalisation = None``: its
    images are scaled by their own percentile range, unclipped, as it was trained.
    """

    clip: tuple[float, float] = DEFAULT_CLIP
    min_contrast: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        as_tuple_field(self, "clip")
        if not (
            isinstance(self.clip, tuple) and len(self.clip) == 2
            and all(is_real(v) and abs(v) <= 1e6 for v in self.clip)
            and self.clip[0] < 0 and self.clip[1] > 1
        ):  # fmt: skip
            raise ValueError(
                "Normalisation: clip must be (low, high) with low < 0 and high > 1 (the "
                f"percentile range maps to 0..1), finite, got {short_repr(self.clip)}"
            )
        if self.min_contrast is not None:
            as_tuple_field(self, "min_contrast")
            if not (
                isinstance(self.min_contrast, tuple) and self.min_contrast
                and all(is_real(v) and 0 <= v <= MAX_MIN_CONTRAST for v in self.min_contrast)
            ):  # fmt: skip
                raise ValueError(
                    "Normalisation: min_contrast must be None or one number in [0, "
                    f"{MAX_MIN_CONTRAST:g}] per channel, got {short_repr(self.min_contrast)}"
                )


def intensity_range(
    image: torch.Tensor, low: float = 1.0, high: float = 99.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``low`` and ``high`` percentiles of ``(N, C, D, H, W)``, each ``(N, C, 1, 1, 1)``.

    Computed on at most ~4M evenly strided samples per channel.
    """
    n, c = image.shape[:2]
    flat = image.reshape(n, c, -1)
    step = max(1, flat.shape[-1] // (1 << 22))
    sample = flat[..., ::step].float()
    if sample.device.type == "cpu":  # numpy selects (partition); torch.quantile sorts: 13x slower
        q = np.quantile(sample.detach().numpy(), [low / 100, high / 100], axis=-1)
        q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    else:
        q = torch.quantile(
            sample, torch.tensor([low / 100, high / 100], device=sample.device), dim=-1
        )
    return q[0].view(n, c, 1, 1, 1), q[1].view(n, c, 1, 1, 1)


def apply_range(
    image: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, clip=None
) -> torch.Tensor:
    """Map ``lo``..``hi`` to 0..1 (float32); a flat channel (hi == lo) is only shifted; then
    clipped to ``clip`` = ``(low, high)`` when given (``Normalisation.clip``)."""
    scale = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    out = (image.float() - lo) / scale
    return out if clip is None else out.clamp_(clip[0], clip[1])


def volume_intensity_range(vol) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel intensity range ``(lo, hi)``, each ``(1, C, 1, 1, 1)`` float32, of a
    ``(C, D, H, W)`` array (numpy, dask, zarr or a CPU tensor): ``intensity_range`` of a regular
    grid of at most ~4M voxels (every ``step``-th along each axis, ``step`` set by the shape
    alone, so every array type gives the same range). ``ValueError`` for NaN, infinite values
    or values beyond the float32 range the segmentation computes in."""
    n = math.prod(vol.shape[1:])
    step = max(1, math.ceil((n / (1 << 22)) ** (1 / 3)))
    sample = vol[:, ::step, ::step, ::step]
    if isinstance(sample, torch.Tensor):
        sample = sample.numpy()
    if not np.issubdtype(sample.dtype, np.integer) and sample.dtype != bool:
        sample = np.asarray(sample)  # in its own dtype: a float64 value beyond float32 stays
        if sample.size and not (  # min and max: NaN fails both; no array-sized temporaries
            -FLOAT32_MAX / 4 <= sample.min() and sample.max() <= FLOAT32_MAX / 4
        ):
            raise ValueError(
                "the image holds NaN, infinite values or values beyond the float32 range the "
                f"segmentation computes in (|x| < {FLOAT32_MAX / 4:.2g}); clean or rescale it "
                "first"
            )
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if not sample.flags.writeable:  # a read-only memory map of float32 data (an NPY input)
        sample = sample.copy()
    return intensity_range(torch.from_numpy(sample)[None])


def volume_noise_level(vol, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Noise standard deviation per channel, ``(C,)`` float32, in the units of the image
    normalised by ``lo``/``hi`` (``(1, C, 1, 1, 1)``): ``1.4826 x MAD / sqrt(6)`` of the second
    differences along x (``x[i-1] - 2 x[i] + x[i+1]``: blind to intensity ramps), over whole rows
    of a regular grid of at most ``NOISE_SAMPLE_VOXELS`` voxels (set by the shape alone: numpy,
    dask and zarr arrays give the same estimate). Edges are sparse, so they barely move the
    median."""
    c, d, h, w = vol.shape
    if w < 3:
        return torch.zeros(c)
    rows = max(1, NOISE_SAMPLE_VOXELS // w)
    step = max(1, math.ceil(math.sqrt(d * h / rows)))
    sample = np.ascontiguousarray(np.asarray(vol[:, ::step, ::step, :]), dtype=np.float32)
    if not sample.flags.writeable:  # a read-only memory map of float32 data (an NPY input)
        sample = sample.copy()
    sample = torch.from_numpy(sample)
    norm = apply_range(sample[None], lo.cpu(), hi.cpu())[0]
    diff = (norm[..., :-2] - 2 * norm[..., 1:-1] + norm[..., 2:]).reshape(c, -1)
    dev = (diff - diff.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    return (1.4826 / math.sqrt(6.0) * dev).float()


def image_range(vol, norm: Normalisation | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(lo, hi)`` a model with normalisation ``norm`` maps to 0..1 on a ``(C, D, H, W)``
    image (numpy, dask, zarr or a CPU tensor), each ``(1, C, 1, 1, 1)`` float32: the percentile
    range (``volume_intensity_range``), widened to ``norm.min_contrast`` noise levels
    (``volume_noise_level``) where it is narrower."""
    lo, hi = volume_intensity_range(vol)
    if norm is None or norm.min_contrast is None:
        return lo, hi
    return _floored(vol, norm, lo, hi, volume_noise_level(vol, lo, hi))[:2]


def image_normalisation(vol, norm: Normalisation | None):
    """``image_range`` and the image's noise level in units of that range
    (``volume_noise_level``, ``(C,)``): ``(lo, hi, noise)``, the noise measured once where the
    floor leaves the range as it was (the image's rows are read once, not twice)."""
    lo, hi = volume_intensity_range(vol)
    noise = volume_noise_level(vol, lo, hi)
    if norm is None or norm.min_contrast is None:
        return lo, hi, noise
    return _floored(vol, norm, lo, hi, noise)


def _floored(vol, norm: Normalisation, lo, hi, noise):
    """``(lo, hi', noise')``: ``hi`` raised to ``norm.min_contrast`` noise levels where the
    range is narrower; ``noise`` measured in units of ``(lo, hi)``, re-measured for ``hi'``
    where it differs."""
    floor = torch.tensor(norm.min_contrast, dtype=torch.float32)
    if floor.numel() != lo.shape[1]:
        raise ValueError(
            f"the image has {lo.shape[1]} channel(s) but the model's normalisation has "
            f"{floor.numel()}"
        )
    width = (hi - lo).view(-1)
    sigma = noise * torch.where(width > 0, width, torch.ones_like(width))
    width = torch.maximum(width, floor * sigma)
    floored = lo + width.view(lo.shape)
    if not torch.equal(floored, hi):
        noise = volume_noise_level(vol, lo, floored)
    return lo, floored, noise


def contrast(vol) -> torch.Tensor:
    """Per channel ``(C,)`` float32: the percentile range of a ``(C, D, H, W)`` image in units
    of its noise level (inf where the noise level is 0: a noise-free image)."""
    lo, hi = volume_intensity_range(vol)
    noise = volume_noise_level(vol, lo, hi)
    return torch.where(noise > 0, 1 / noise.clamp_min(1e-30), torch.full_like(noise, math.inf))
