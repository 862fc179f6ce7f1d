"""``train()``: a PacSegModel from a few scribbles (a sparse napari Labels array)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from napari_pacseg.checks import (
    as_array,
    as_image,
    check_callable,
    check_int,
    check_ints,
    check_seed,
    check_spacing,
    resolve_device,
    short_repr,
)
from napari_pacseg.engine.frames import painted_frames
from napari_pacseg.engine.plan import features, prepare, split_box, whole
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.io.provenance import training_provenance
from napari_pacseg.model.classes import MAX_CLASSES, class_infos
from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.model.network import (
    ContextConfig,
    HeadConfig,
    ModelConfig,
    PacSegModel,
    plane_spacing,
)
from napari_pacseg.model.normalise import (
    CONTRAST_FRACTION,
    MAX_MIN_CONTRAST,
    Normalisation,
    contrast,
)
from napari_pacseg.progress import stop_if_cancelled
from napari_pacseg.training.adam import adam_step
from napari_pacseg.training.context import (
    CONTEXT_STEPS,
    FitRun,
    fit_context,
    graft_head,
    init_context,
    sites,
)
from napari_pacseg.training.defaults import (
    INPUT_NOISE,
    default_features,
    default_instances,
    default_refine,
    default_steps,
)
from pacseg_kernels.mlp_torch import activate
from pacseg_kernels.threads import adaptive_threads

MAX_SAMPLES_PER_CLASS = 20000
TRAIN_TILE = (32, 128, 128)


def train(
    image,
    scribbles,
    *,
    spacing=None,
    channel_axis: int | None = None,
    frame_axis: int | None = None,
    features: FeatureSpec | None = None,
    hidden=(64, 64),
    context=None,
    steps: int | None = None,
    device="auto",
    seed: int = 0,
    class_names=None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> PacSegModel:
    """Train the per-voxel MLP head on the labelled voxels of ``scribbles``.

    Parameters
    ----------
    image : ``(D, H, W)`` array for a 3D model, ``(H, W)`` for a 2D model (``ModelConfig.ndim =
        2``), with one more axis for ``channel_axis`` (RGB ``(H, W, 3)``: ``channel_axis=-1``);
        or a list of such images, all 2D or all 3D (one model from all of them; each is
        normalised by its own intensity range, as ``segment`` normalises it).
    scribbles : integer array of the image's spatial shape: 0 unlabelled, 1..K the classes
        (1 = background), as painted in a napari Labels layer; a list of one per image when
        ``image`` is a list. Every value 1..K must occur (in at least one of them), and every
        image must have some labelled voxels.
    spacing : ``(z, y, x)`` (``(y, x)`` for 2D images); with a list of images, one for all or
        a list of one per image (the model's training spacing is the first image's).
    channel_axis : the channel axis of each image as given, None for one channel.
    frame_axis : the axis of independent 2D frames of ``image`` (a time-lapse ``(T, H, W)``,
        scribbles of the same shape): the frames holding scribbles are the training images of
        a 2D model (``segment(..., frame_axis=...)`` then segments every frame).
    features : the feature bank (sigmas in the units of ``spacing``; default
        ``default_features``: every kind for volumes, Gaussians only for 2D images).
    hidden : widths of the MLP's hidden layers.
    context : a ``ContextConfig`` (or True for the default one) to also train a context
        encoder/decoder (conv + ReLU, max pooling with indices, ``max_unpool3d`` back up, skip
        additions) jointly with the head, on crops around the scribbles
        (``context_training``; ``CONTEXT_STEPS`` more steps); None: features only.
    steps : optimisation steps of the head (default ``default_steps``: 400 for volumes, 100 for
        2D images): full-batch Adam on at most 20000 voxels per class, class-balanced cross entropy. Deterministic for a given ``seed`` on
        one device at one torch thread count.
    progress, should_cancel : as in ``segment`` (``progress(step, steps)``).
    seed : the random seed, an int in ``[0, 2**63 - 1]``.
    """
    check_callable(progress, "train: progress", "progress(step, steps)")
    check_callable(should_cancel, "train: should_cancel", "should_cancel() -> bool")
    seed = check_seed(seed, "train: seed")
    if context is True:
        context = ContextConfig()
    if context is not None and not isinstance(context, ContextConfig):
        raise TypeError(
            f"train: context must be None, True or a ContextConfig, got {short_repr(context)}"
        )
    if frame_axis is not None:
        image, scribbles, channel_axis = painted_frames(image, scribbles, frame_axis, channel_axis, "train")
    pairs, ndim = _training_pairs(image, scribbles, channel_axis, spacing)
    vol, _, spacing = pairs[0]
    k = max(_classes_painted(m, i, len(pairs)) for i, (_, m, _) in enumerate(pairs))
    everywhere = set().union(*(np.unique(m[m > 0]).tolist() for _, m, _ in pairs))
    if k < 2:
        raise ValueError(
            "train: only one class is painted; paint background (1) and at least one more class"
        )
    missing = sorted(set(range(1, k + 1)) - everywhere)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"train: scribble values must be 1..{k} with each present; missing {shown}"
        )
    spec = features or default_features(ndim)
    if not isinstance(spec, FeatureSpec):
        raise TypeError(f"train: features must be a FeatureSpec, got {type(spec).__name__}")
    steps = default_steps(ndim) if steps is None else check_int(steps, "train: steps", 1, 100_000)
    hidden = check_ints(hidden, None, "train: hidden (MLP widths)", 1, 1024)
    if class_names is not None and (
        isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__")
    ):
        raise ValueError(
            f"train: class_names must be a list of names, background first, got {short_repr(class_names)}"
        )
    names = (
        list(class_names)
        if class_names is not None
        else ["background"] + [f"class {v}" for v in range(2, k + 1)]
    )
    if len(names) != k:
        raise ValueError(f"train: {len(names)} class names for {k} classes")
    classes = class_infos(names, "train: class_names")
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    config = ModelConfig(
        in_channels=vol.shape[0],
        classes=classes,
        features=spec,
        head=HeadConfig(hidden),
        context=context,
        spacing=spacing,
        ndim=ndim,
        refine=default_refine(ndim),
        instances=default_instances(ndim),
        normalisation=training_normalisation([v for v, _, _ in pairs]),
        provenance=training_provenance(
            sum(np.count_nonzero(m) for _, m, _ in pairs), seed, len(pairs)
        ),
    )
    model = PacSegModel(config)
    # the feature bank's head (the whole model without context)
    head_only = PacSegModel(dataclasses.replace(config, context=None)) if context else model
    total = steps + (CONTEXT_STEPS if context else 0)
    relay = None if progress is None else (lambda done, _: progress(done, total))
    # The features and the head fit run with fewer threads while other processes hold cores, as
    # segment() does: they give bitwise the same model at every thread count
    # (tests/kernels/test_threads.py). The context fit runs at the caller's count: the backward
    # of its convolutions sums over threads and can round differently at another count, and a
    # seed must give the same model at every load.
    plans, parts = [], []
    with adaptive_threads():
        for v, m, sp in pairs:
            request = SegmentRequest.build(head_only, spacing=sp, channel_axis=0, refine=False,
                                           device="cpu")  # fmt: skip
            plans.append(prepare(v, request))
            parts.append(_labelled_features(plans[-1], m, should_cancel))
        x, y = _balanced(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), gen)
        with torch.enable_grad():  # also when called under torch.no_grad()
            _fit(head_only, x.to(dev), y.to(dev), k, steps, gen, relay, should_cancel)
    if context:
        with torch.enable_grad():
            run = FitRun(gen, dev, progress, should_cancel, done=steps, total=total)
            _fit_context(model, head_only, plans, pairs, k, run)
    model = model.cpu().eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ValueError(
            "train: the optimisation diverged (the weights are not finite); check the image for "
            "extreme values and try fewer steps"
        )
    return model


def training_normalisation(images) -> Normalisation:
    """The ``Normalisation`` of a model trained on ``images`` (each ``(C, D, H, W)``): the
    default clip, and ``CONTRAST_FRACTION`` of the smallest contrast (percentile range in noise
    levels, per channel) among them as the minimum contrast of the images it segments."""
    lowest = torch.stack([contrast(v) for v in images]).amin(dim=0)
    floor = (CONTRAST_FRACTION * lowest).clamp(0.0, MAX_MIN_CONTRAST)
    return Normalisation(min_contrast=tuple(round(float(v), 4) for v in floor))


def _fit_context(model, head_only, plans, pairs, k: int, run: FitRun) -> None:
    """Train ``model``'s context net and head jointly, from ``head_only``'s fitted head, on
    the scribbles of ``pairs`` (their ``plans`` normalise them); ``k`` classes."""
    graft_head(model, head_only.cpu())
    init_context(model, run.gen)
    cancel = run.should_cancel
    found = [s for plan, (_, m, _) in zip(plans, pairs) for s in sites(plan, m, head_only, model, cancel)]  # fmt: skip
    counts = torch.bincount(torch.cat([s.labels for s in found]), minlength=k).float()
    weight = counts.sum() / (k * counts.clamp_min(1))
    model.to(run.dev)
    fit_context(model, found, weight, CONTEXT_STEPS, run)


def _training_pairs(image, scribbles, channel_axis, spacing) -> tuple[list, int]:
    """``([(volume (C, D, H, W), scribbles (D, H, W), spacing (z, y, x))], ndim)``, checked,
    one per image; 2D images are one-plane volumes (ndim 2)."""
    many = isinstance(image, (list, tuple))
    if many != isinstance(scribbles, (list, tuple)):
        raise TypeError(
            "train: give one image and one scribbles array, or a list of images and a list of "
            "their scribbles"
        )
    images, marks = (list(image), list(scribbles)) if many else ([image], [scribbles])
    if not images:
        raise ValueError("train: the list of images is empty")
    if len(images) != len(marks):
        raise ValueError(f"train: {len(images)} images but {len(marks)} scribbles arrays")
    if many and spacing is not None and len(spacing) and isinstance(spacing[0], (list, tuple)):
        if len(spacing) != len(images):
            raise ValueError(f"train: {len(images)} images but {len(spacing)} spacings")
        spacings = list(spacing)
    else:
        spacings = [spacing] * len(images)
    pairs, kinds = [], []
    for i, (img, scr, sp) in enumerate(zip(images, marks, spacings)):
        where = f"train: image {i}: " if many else "train: "
        vol, flat = as_image(img, channel_axis, f"train: image {i}" if many else "train: image")
        kinds.append(flat)
        if kinds[0] != flat:
            raise ValueError(
                f"{where}is {'2D' if flat else '3D'} but image 0 is {'2D' if kinds[0] else '3D'}: "
                "a model is of 2D images or of volumes; train one of each"
            )
        if isinstance(scr, (str, bytes)) or scr is None:
            raise TypeError(f"{where}scribbles must be an integer array, got {short_repr(scr)}")
        m = as_array(scr, f"{where}scribbles")
        spatial = vol.shape[2:] if flat else vol.shape[1:]
        channels = (
            m.shape[-1] if m.shape[:-1] == spatial else m.shape[0] if m.shape[1:] == spatial else 1
        )
        if m.shape != spatial and channels > 1:
            raise ValueError(
                f"{where}scribbles must be one channel of integer labels (0 unlabelled, 1 "
                f"background, 2.. classes), got {channels} channels (shape {m.shape}); paint "
                "them in a napari Labels layer"
            )
        if m.shape != spatial:
            raise ValueError(
                f"{where}scribbles have shape {m.shape} but the image's spatial shape is {spatial}"
            )
        if flat:
            m = m[None]
        if not (np.issubdtype(m.dtype, np.integer) or m.dtype == bool):
            raise ValueError(
                f"{where}scribbles must be an integer (Labels) array, got dtype {m.dtype}"
            )
        if pairs and vol.shape[0] != pairs[0][0].shape[0]:
            raise ValueError(
                f"{where}{vol.shape[0]} channel(s) but image 0 has {pairs[0][0].shape[0]}"
            )
        if flat:
            pairs.append((vol, m, plane_spacing(check_spacing(sp, (1.0, 1.0), 2))))
        else:
            pairs.append((vol, m, check_spacing(sp, (1.0, 1.0, 1.0))))
    return pairs, 2 if kinds[0] else 3


def _classes_painted(marks: np.ndarray, index: int = 0, count: int = 1) -> int:
    """The largest class K painted in ``marks`` (values 0 unlabelled and 1..K); with one image,
    each of 1..K must be present."""
    where = f"train: image {index}: " if count > 1 else "train: "
    if marks.size and int(marks.min()) < 0:
        raise ValueError(
            f"{where}scribbles hold negative values; use 0 for unlabelled and 1..K for classes"
        )
    present = np.unique(marks[marks > 0]).tolist()
    big = [v for v in present if v > MAX_CLASSES]
    if big:
        shown = ", ".join(str(v) for v in big[:3]) + (", ..." if len(big) > 3 else "")
        raise ValueError(
            f"{where}scribble values must be at most {MAX_CLASSES} (one per class); found "
            f"{len(big)} larger value(s): {shown}. Relabel the scribbles 1..K"
        )
    if not present:
        raise ValueError(
            f"{where}the scribbles label no voxel; paint at least two classes (1 = background)"
            + ("" if count == 1 else ", or leave this image out")
        )
    k = int(present[-1])
    if count > 1:  # the classes need only be painted across all the images (checked there)
        return k
    if k < 2:
        raise ValueError(
            "train: only one class is painted; paint background (1) and at least one more class"
        )
    missing = sorted(set(range(1, k + 1)) - set(present))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"train: scribble values must be 1..{k} with each present; missing {shown}"
        )
    return k


@torch.no_grad()
def _labelled_features(plan, marks, should_cancel):
    """Features ``(M, F)`` and class indices ``(M,)`` of the labelled voxels, computed only on
    the scribbles' bounding box in each tile, with a halo for the filters, normalised as
    ``segment`` normalises (the plan's range)."""
    xs, ys = [], []
    cpu = torch.device("cpu")
    for box in split_box(whole(marks.shape), TRAIN_TILE):
        stop_if_cancelled(should_cancel, "training cancelled; no model was produced")
        tile_marks = marks[tuple(slice(a, b) for a, b in box)]
        if not tile_marks.any():
            continue
        # Only the scribbles' bounding box in this tile needs features: strokes lie in a few
        # planes, so this is often 100x fewer voxels than the tile (plus its halo).
        hit = [(int(w.min()), int(w.max()) + 1) for w in np.nonzero(tile_marks)]
        tile_marks = tile_marks[tuple(slice(a, b) for a, b in hit)]
        box = tuple((o + a, o + b) for (o, _), (a, b) in zip(box, hit))
        feats = features(plan, box, plan.model, cpu, {})
        where = np.nonzero(tile_marks)
        xs.append(feats[(slice(None), *(torch.from_numpy(w) for w in where))].T)
        ys.append(torch.from_numpy(tile_marks[where].astype(np.int64) - 1))
    return torch.cat(xs), torch.cat(ys)


def _balanced(x, y, gen):
    """At most ``MAX_SAMPLES_PER_CLASS`` random rows of each class."""
    keep = []
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() > MAX_SAMPLES_PER_CLASS:
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:MAX_SAMPLES_PER_CLASS]]
        keep.append(idx)
    keep = torch.cat(keep)
    return x[keep], y[keep]


def _fit(model, x, y, k, steps, gen, progress, should_cancel) -> None:
    """Class-balanced full-batch Adam on standardised features, with ``INPUT_NOISE`` added at each
    step; the standardisation is then folded into the first layer, so the saved model takes raw
    features."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    layers = model.head.layers
    with torch.no_grad():
        for layer in layers:
            bound = 1 / layer.in_features**0.5
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound)
            layer.bias.copy_((torch.rand(layer.bias.shape, generator=gen) * 2 - 1) * bound)
    model.head.to(x.device)
    counts = torch.bincount(y, minlength=k).float()
    loss_fn = nn.CrossEntropyLoss(weight=(counts.sum() / (k * counts.clamp_min(1))))
    params = list(model.head.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    act = model.head.activation
    for step in range(steps):
        stop_if_cancelled(should_cancel, "training cancelled; no model was produced")
        h = xs
        if INPUT_NOISE > 0:
            h = xs + INPUT_NOISE * torch.randn(xs.shape, generator=gen).to(xs.device)
        for i, layer in enumerate(layers):
            h = layer(h)
            if i < len(layers) - 1:
                h = activate(h, act)
        loss = loss_fn(h, y)
        grads = torch.autograd.grad(loss, params)
        adam_step(params, grads, moments, step + 1)
        if progress is not None:
            progress(step + 1, steps)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - W m / s)
        first = layers[0]
        first.bias.sub_(first.weight @ (mean / std))
        first.weight.div_(std)
