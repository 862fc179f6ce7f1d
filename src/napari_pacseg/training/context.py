"""Training the context encoder/decoder jointly with the MLP head, from sparse scribbles.

The head is first fitted on the feature bank alone (``training._fit``); its weights go into the
full model with zero weights on the context channels, so training starts from the head-only
model. Then context net and head are fitted together by Adam on crops around the scribbles
("sites": each tile of ``SITE_TILE`` that holds scribbles, with the context net's reach
around it), loss on the scribbled voxels only (class-balanced cross entropy). Each step runs
``SITES_PER_STEP`` random sites as one batch, each with random flips and intensity gain and
offset of the context net's input (its output is flipped back, so features and labels stay
put) and Gaussian noise on the features as in the head's fit. Deterministic for a seed on one
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from napari_pacseg.engine.plan import features, region, split_box, whole
from napari_pacseg.model.network import PacSegModel
from napari_pacseg.model.normalise import apply_range
from napari_pacseg.progress import Progress, ShouldCancel, stop_if_cancelled
from napari_pacseg.training.adam import adam_step
from napari_pacseg.training.defaults import INPUT_NOISE

SITE_TILE = (8, 32, 32)
SITES_PER_STEP = 4
MAX_SITES = 256
CONTEXT_STEPS = 150
CONTEXT_LR = 3e-3
HEAD_LR = 3e-4  # small: the head is already fitted on all scribbled voxels
JITTER_GAIN = (0.8, 1.25)
JITTER_OFFSET = 0.1


@dataclass
class Site:
    """A crop for context training: the normalised image ``(C, *crop)`` float32, the feature
    bank at the scribbled voxels of its core tile ``(M, F)``, their class indices ``(M,)``
    int64, and where those voxels lie in the crop (3 index tensors ``(M,)``)."""

    image: torch.Tensor
    feats: torch.Tensor
    labels: torch.Tensor
    where: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def crop_shape(model: PacSegModel, shape) -> tuple[int, int, int]:
    """The crops' shape in a volume of ``shape``: ``SITE_TILE`` plus the context net's reach on
    both sides, at most the volume. One shape for all sites, so a step's sites run as one
    batch (CPU convolutions of a batch of one take a path up to 10x slower)."""
    reach = model.context_reach
    return tuple(min(n, t + 2 * reach) for t, n in zip(SITE_TILE, shape))


@torch.no_grad()
def sites(plan, marks: np.ndarray, feature_model: PacSegModel, model: PacSegModel, should_cancel):
    """The ``Site`` s of one image: its ``plan`` (normalisation), scribbles ``marks`` (D, H, W)
    and the head-only ``feature_model`` that computes the feature bank. One per tile of
    ``SITE_TILE`` holding scribbles; its crop holds the tile and the context net's reach
    around it (shifted inside the volume at its borders)."""
    out = []
    reach, size = model.context_reach, crop_shape(model, marks.shape)
    cpu = torch.device("cpu")
    for box in split_box(whole(marks.shape), SITE_TILE):
        stop_if_cancelled(should_cancel, "training cancelled; no model was produced")
        tile = marks[tuple(slice(a, b) for a, b in box)]
        if not tile.any():
            continue
        feats = features(plan, box, feature_model, cpu, {})
        where = np.nonzero(tile)
        starts = [min(max(0, a - reach), n - e) for (a, _), e, n in zip(box, size, marks.shape)]
        crop = tuple((s, s + e) for s, e in zip(starts, size))
        image = apply_range(region(plan.vol, crop, cpu), plan.lo, plan.hi, plan.model.clip)[0]
        out.append(
            Site(
                image,
                feats[(slice(None), *(torch.from_numpy(w) for w in where))].T.contiguous(),
                torch.from_numpy(tile[where].astype(np.int64) - 1),
                tuple(torch.from_numpy(w + a - s) for w, (a, _), s in zip(where, box, starts)),
            )
        )
    return out


def _context_out(model: PacSegModel, batch: list[Site], gen: torch.Generator, dev) -> list:
    """Context channels ``(M_i, ctx)`` at each site's scribbled voxels, the sites' crops run as
    one batch, each with its own random flips and intensity gain and offset."""
    xs, flips = [], []
    for site in batch:
        gain = float(torch.empty(1).uniform_(*JITTER_GAIN, generator=gen))
        offset = float(torch.empty(1).uniform_(-JITTER_OFFSET, JITTER_OFFSET, generator=gen))
        axes = [1 + a for a in range(3) if bool(torch.rand(1, generator=gen) < 0.5)]
        x = site.image.to(dev) * gain + offset
        xs.append(torch.flip(x, axes) if axes else x)
        flips.append(axes)
    h = model.context(torch.stack(xs).contiguous(memory_format=torch.channels_last_3d))
    out = []
    for hi, axes, site in zip(h, flips, batch):
        hi = torch.flip(hi, axes) if axes else hi
        out.append(hi[(slice(None), *(w.to(dev) for w in site.where))].T)
    return out


@dataclass(frozen=True)
class FitRun:
    """How a fit runs: its random generator and device, the caller's ``progress(done,
    total)`` and ``should_cancel()`` (``napari_pacseg.progress``), and where its steps sit in
    the whole training (``done`` before it, ``total`` in all)."""

    gen: torch.Generator
    dev: torch.device
    progress: Progress | None = None
    should_cancel: ShouldCancel | None = None
    done: int = 0
    total: int = 0

    def step(self, i: int) -> None:
        """Before step ``i`` (0-based): ``SegmentationCancelled`` when the caller cancelled."""
        stop_if_cancelled(self.should_cancel, "training cancelled; no model was produced")

    def report(self, i: int) -> None:
        """Step ``i`` (0-based) is done."""
        if self.progress is not None:
            self.progress(self.done + i + 1, self.total)


def fit_context(
    model: PacSegModel, all_sites: list[Site], weight: torch.Tensor, steps: int, run: FitRun
) -> None:
    """Adam on the context net and the head of ``model`` (on ``run.dev``), ``steps`` steps of
    ``SITES_PER_STEP`` random sites of one crop shape each (at most ``MAX_SITES`` sites, a
    random choice of them when there are more). ``weight``: class weights of the loss
    ``(K,)``."""
    gen, dev = run.gen, run.dev
    if len(all_sites) > MAX_SITES:
        keep = torch.randperm(len(all_sites), generator=gen)[:MAX_SITES].sort().values
        all_sites = [all_sites[i] for i in keep.tolist()]
    feats = torch.cat([s.feats for s in all_sites])
    std = feats.std(0).clamp_min(1e-6).to(dev)
    # Channels-last convolutions while training: their CPU backward is ~2x faster (measured
    # on the default net's batches of crops); the saved weights are made contiguous again.
    model.context.to(memory_format=torch.channels_last_3d)
    try:
        _adam_steps(model, all_sites, std, weight, steps, run)
    finally:
        model.context.to(memory_format=torch.contiguous_format)


def _adam_steps(model, all_sites, std, weight, steps: int, run: FitRun) -> None:
    """The Adam steps of ``fit_context`` on its chosen sites; ``std``: the features' spread."""
    gen, dev = run.gen, run.dev
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(dev))
    ctx_params, head_params = list(model.context.parameters()), list(model.head.parameters())
    params = ctx_params + head_params
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    n_ctx = len(ctx_params)
    by_shape: dict[tuple, list[int]] = {}  # images of other shapes can have other crop shapes
    for i, site in enumerate(all_sites):
        by_shape.setdefault(tuple(site.image.shape), []).append(i)
    for step in range(steps):
        run.step(step)
        first = int(torch.randint(len(all_sites), (1,), generator=gen))
        group = by_shape[tuple(all_sites[first].image.shape)]  # by its share of the sites
        pick = torch.randperm(len(group), generator=gen)[:SITES_PER_STEP].tolist()
        loss = batch_loss(model, [all_sites[group[j]] for j in pick], std, loss_fn, gen, dev)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        adam_step(ctx_params, grads[:n_ctx], moments[:n_ctx], step + 1, lr=CONTEXT_LR)
        adam_step(head_params, grads[n_ctx:], moments[n_ctx:], step + 1, lr=HEAD_LR)
        run.report(step)


def batch_loss(model: PacSegModel, batch: list[Site], std, loss_fn, gen, dev) -> torch.Tensor:
    """The loss of one step: the sites' features (plus Gaussian noise of ``INPUT_NOISE`` x
    ``std`` ``(F,)``, as in the head's fit) and context channels through ``model.head`` (the
    ``voxel_mlp`` that ``segment`` runs), ``loss_fn`` against the scribbled classes."""
    f = torch.cat([s.feats for s in batch]).to(dev)
    f = f + INPUT_NOISE * std * torch.randn(f.shape, generator=gen).to(dev)
    h = torch.cat([f, torch.cat(_context_out(model, batch, gen, dev))], dim=1)
    logits = model.head(h.T[None, :, :, None, None])[0, :, :, 0, 0].T
    return loss_fn(logits, torch.cat([s.labels for s in batch]).to(dev))


@torch.no_grad()
def init_context(model: PacSegModel, gen: torch.Generator) -> None:
    """He-uniform weights and zero biases for the context convolutions, from ``gen``."""
    for conv in [*model.context.enc, *model.context.dec]:
        fan_in = conv.weight[0].numel()
        bound = (6.0 / fan_in) ** 0.5
        conv.weight.copy_((torch.rand(conv.weight.shape, generator=gen) * 2 - 1) * bound)
        conv.bias.zero_()


@torch.no_grad()
def graft_head(model: PacSegModel, head_only: PacSegModel) -> None:
    """``model``'s head := ``head_only``'s, with zero weights on the context channels."""
    for dst, src in zip(model.head.layers, head_only.head.layers):
        dst.bias.copy_(src.bias)
        dst.weight.zero_()
        dst.weight[:, : src.weight.shape[1]] = src.weight
