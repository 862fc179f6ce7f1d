"""Per-voxel feature bank: separable Gaussian-derivative filters in torch, anisotropic.

Scales are in physical units: with a voxel spacing of (2.0, 0.3, 0.3) um, sigma = 1 um spans
0.5 voxel in z and 3.3 voxels in y and x. Derivatives are per physical unit too, so features
of a volume mean the same thing whatever its sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FEATURE_KINDS = ("gaussian", "gradient_magnitude", "laplacian", "hessian_eigenvalues")
_PER_SCALE = {"gaussian": 1, "gradient_magnitude": 1, "laplacian": 1, "hessian_eigenvalues": 3}
MAX_SIGMA_VOXELS = 64.0


@dataclass(frozen=True)
class FeatureSpec:
    """Which filters to compute, at which scales (sigmas in physical units).

    ``include_raw`` adds the (normalised) image itself as a feature.
    """

    kinds: tuple[str, ...] = FEATURE_KINDS
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)
    include_raw: bool = True

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in FEATURE_KINDS]
        if unknown:
            raise ValueError(
                f"FeatureSpec: unknown feature kinds {unknown}; choose from {FEATURE_KINDS}"
            )
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"FeatureSpec: kinds repeat: {list(self.kinds)}")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.sigmas):
            raise ValueError(
                f"FeatureSpec: sigmas must be positive finite numbers, got {list(self.sigmas)}"
            )
        if not self.kinds and not self.include_raw:
            raise ValueError("FeatureSpec: no features: give kinds or include_raw=True")
        if self.kinds and not self.sigmas:
            raise ValueError("FeatureSpec: feature kinds need at least one sigma")

    def channels_per_image_channel(self) -> int:
        return int(self.include_raw) + len(self.sigmas) * sum(_PER_SCALE[k] for k in self.kinds)

    def names(self) -> list[str]:
        """Feature names in output order (per image channel)."""
        names = ["raw"] if self.include_raw else []
        for s in self.sigmas:
            for k in self.kinds:
                if k == "hessian_eigenvalues":
                    names += [f"{k}_{i}@{s:g}" for i in range(3)]
                else:
                    names.append(f"{k}@{s:g}")
        return names

    def radius(self, spacing) -> tuple[int, int, int]:
        """Half-width in voxels of the largest filter per axis (the feature receptive field)."""
        if not self.kinds:
            return (0, 0, 0)
        return tuple(_kernel_radius(max(self.sigmas) / sp) for sp in spacing)


def _kernel_radius(sigma_vox: float) -> int:
    return max(1, math.ceil(4.0 * sigma_vox))


def _gauss_kernels(sigma_vox: float, dtype, device):
    """Gaussian, first and second derivative 1-D kernels (per voxel), normalised."""
    r = _kernel_radius(sigma_vox)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    g = g / g.sum()
    # conv3d correlates (sum_k w[k] f(i + k)), so the first-derivative kernel is +x g. Both
    # derivative kernels are rescaled to be exact on polynomials up to degree 2: at small
    # sigmas (0.5 voxel along a coarse z axis) the sampled Gaussian moments are off by %.
    d1 = x * g
    d1 = d1 / (x * d1).sum()
    d2 = (x**2 / sigma_vox**2 - 1) * g
    d2 = d2 - d2.mean()  # no response to a constant
    d2 = d2 / (0.5 * x**2 * d2).sum()
    return [k.to(dtype=dtype, device=device) for k in (g, d1, d2)]


def _conv_axis(t: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Filter ``t`` ``(M, 1, D, H, W)`` along spatial ``axis`` with reflect-like edge padding."""
    r = kernel.numel() // 2
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = kernel.numel()
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
    return F.conv3d(F.pad(t, pad, mode="replicate"), kernel.view(shape))


def compute_features(
    image: torch.Tensor, spec: FeatureSpec, spacing=(1.0, 1.0, 1.0)
) -> torch.Tensor:
    """Feature bank of an image.

    Parameters
    ----------
    image : Tensor ``(N, C, D, H, W)``, float32 (already intensity-normalised).
    spec : FeatureSpec
    spacing : (z, y, x) voxel size in the units of ``spec.sigmas``.

    Returns
    -------
    Tensor ``(N, C * spec.channels_per_image_channel(), D, H, W)``, float32; per image channel
    the features in ``spec.names()`` order.
    """
    n, c = image.shape[:2]
    flat = image.reshape(n * c, 1, *image.shape[2:]).float()
    out = [flat] if spec.include_raw else []
    for sigma in spec.sigmas:
        sig_vox = [sigma / sp for sp in spacing]
        if max(sig_vox) > MAX_SIGMA_VOXELS:
            raise ValueError(
                f"compute_features: sigma {sigma} is {max(sig_vox):.0f} voxels with spacing {tuple(spacing)}; "
                f"at most {MAX_SIGMA_VOXELS:g} voxels are supported (check the spacing units)"
            )
        kernels = [_gauss_kernels(s, flat.dtype, flat.device) for s in sig_vox]

        def filtered(orders, kernels=kernels, spacing=spacing):
            t = flat
            scale = 1.0
            for axis in range(3):
                t = _conv_axis(t, kernels[axis][orders[axis]], axis)
                scale /= spacing[axis] ** orders[axis]
            return t * scale

        wanted = set(spec.kinds)
        first = (
            [filtered(tuple(int(a == b) for b in range(3))) for a in range(3)]
            if "gradient_magnitude" in wanted
            else None
        )
        need_hessian = wanted & {"laplacian", "hessian_eigenvalues"}
        hess = {}
        if need_hessian:
            for a in range(3):
                for b in range(a, 3):
                    orders = [0, 0, 0]
                    orders[a] += 1
                    orders[b] += 1
                    hess[a, b] = filtered(tuple(orders))
        for kind in spec.kinds:
            if kind == "gaussian":
                out.append(filtered((0, 0, 0)))
            elif kind == "gradient_magnitude":
                out.append(torch.sqrt(sum(g * g for g in first)))
            elif kind == "laplacian":
                out.append(hess[0, 0] + hess[1, 1] + hess[2, 2])
            else:
                h = torch.stack(
                    [
                        torch.stack([hess[min(a, b), max(a, b)] for b in range(3)], -1)
                        for a in range(3)
                    ],
                    -2,
                )  # (M, 1, D, H, W, 3, 3)
                eig = torch.linalg.eigvalsh(h)  # ascending
                out.extend(eig[..., i] for i in range(3))
    feats = torch.cat(out, dim=1)  # (N*C, F, D, H, W)
    return feats.reshape(n, c * feats.shape[1], *image.shape[2:])
