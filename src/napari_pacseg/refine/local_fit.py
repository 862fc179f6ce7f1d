"""The refinement's local intensity fit: a data term that holds under uneven illumination.

The head's decision is learned on absolute intensities, so under uneven light it over-segments
where the image is bright and under-segments where it is dim, and the PAC-CRF's Potts prior,
which shrinks convex regions where edges are weak, can only make the dim side worse (issue
18). This term compares each voxel's guide value with the local mean of each class around it,
as in local binary fitting (Li et al., CVPR 2007): a dim nucleus is judged against the dim
background beside it, not against the image's global levels.

For class probabilities ``q = softmax(logits / temperature)`` and the denoised guide ``g``
(``guide.make_guide`` times ``guide_sigma``: normalised units), with ``G`` a Gaussian of
``sigma`` voxels per axis (edges replicated):

* the local weight of class c: ``w_c = G(q_c)``; its local mean ``mu_c = G(q_c g) / w_c``;
* the fit of class c: ``D_c = -min(sum_channels (g - mu_c)^2 / (2 s^2), CAP)``, ``s`` the
  noise left in the guide (per channel), so one default serves clean and noisy images;
* a class with ``w_c <= PRESENT`` has no local mean: it gets the worst fit of the classes that
  have one; where fewer than two classes are present there is nothing to compare and the
  term is 0.

The refinement adds ``fit_weight * (D - D_background)`` to ``logits / temperature`` before the
mean field (``engine.refine``). ``CAP`` bounds what textured interiors and outliers can do.
"""

from __future__ import annotations

import torch

from napari_pacseg.model.features import axis_kernels, smoothed

CAP = 5.0  # noise units squared over 2: a voxel 3.2 noise levels off a class mean is "not it"
PRESENT = 0.02  # local weight below which a class has no local mean
MIN_NOISE = 1e-3  # normalised units: a noiseless guide still gives finite fits
# Planes of the result computed at a time: the smoothings' passes over a slab's temporaries stay
# in a core's cache (256 x 256 planes, the sample's 2 x 5 x 5-voxel Gaussian: 2 planes take 0.65x
# the time of 8, 1 plane 0.75x).
SLAB = 2


def local_fit(
    scaled: torch.Tensor, guide: torch.Tensor, noise: torch.Tensor, sigmas, keep
) -> torch.Tensor:
    """The fit term ``D_c - D_0`` ``(1, K, *keep sizes)`` float32 of a region.

    scaled : ``(1, K, D, H, W)`` float32, the logits divided by the temperature (class 0 the
        background). guide : ``(1, C, D, H, W)`` float32 in normalised units (not divided by
        ``guide_sigma``). noise : ``(C,)`` the noise left in the guide, normalised units.
    sigmas : the window's Gaussian per axis (voxels; 0 = none). keep : 3 ``(start, stop)``
        ranges of the region to return; the region must hold ``features.axis_radii(sigmas)`` voxels
        beyond them except where it ends at the volume's edge (there edges are replicated).
    """
    k, c = scaled.shape[1], guide.shape[1]
    kernels = axis_kernels(sigmas, scaled.device)
    # (K-1, D, H, W): the background's is 1 - their sum
    if k == 2:
        q = torch.sigmoid(scaled[0, 1:] - scaled[0, :1])
    else:
        q = torch.softmax(scaled[0], dim=0)[1:]
    g = guide[0]  # (C, D, H, W)
    qg = (q[:, None] * g[None]).reshape((k - 1) * c, *g.shape[1:])
    s2 = 2.0 * noise.to(g.device).clamp(min=MIN_NOISE).square().view(c, 1, 1, 1)
    (z0, z1), ys, xs = keep
    out = torch.empty((1, k, z1 - z0, ys[1] - ys[0], xs[1] - xs[0]), device=scaled.device)
    for start in range(z0, z1, SLAB):
        part = [(start, min(z1, start + SLAB)), ys, xs]
        inner = tuple(slice(lo, hi) for lo, hi in part)
        out[0, :, start - z0 : part[0][1] - z0] = _fit(
            q, qg, g, g[(slice(None), *inner)], s2, kernels, part
        )
    return out


def _fit(q, qg, g, g_in, s2, kernels, part) -> torch.Tensor:
    """``D_c - D_0`` ``(K, *part sizes)`` over the ranges ``part`` (see ``local_fit``)."""

    def smooth(t: torch.Tensor) -> torch.Tensor:  # (M, D, H, W) -> (M, *part sizes)
        return smoothed(t.unsqueeze(1), kernels, part)[:, 0]

    k, c = q.shape[0] + 1, g.shape[0]
    # The background's sums are the whole's minus the other classes' (G(1) = 1): one
    # smoothing fewer per channel and class 0 for free.
    w = smooth(q)  # (K-1, ...)
    a = smooth(qg).reshape(k - 1, c, *w.shape[1:])
    a0 = smooth(g) - a.sum(dim=0)
    w = torch.cat([1.0 - w.sum(dim=0, keepdim=True), w])
    a = torch.cat([a0[None], a])
    present = w > PRESENT
    mean = a / w.clamp(min=PRESENT)[:, None]
    fit = ((g_in[None] - mean).square() / s2[None]).sum(dim=1).clamp(max=CAP).neg()
    worst = torch.where(present, fit, torch.full_like(fit, 1.0)).amin(dim=0, keepdim=True)
    fit = torch.where(present, fit, worst.clamp(max=0.0))
    fit = fit - fit[:1]
    return fit * (present.sum(dim=0, keepdim=True) >= 2)
