"""``segment()``: image -> labels + matte, tiled with halos so tiling never changes the result;
``receptive_field()``: how far a voxel's result reaches. Both run on the engine's plan."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_pacseg.checks import check_callable
from napari_pacseg.engine import plan as engine
from napari_pacseg.engine.frames import frame_views
from napari_pacseg.engine.plan import STAGES, TileRunner, prepare, settle
from napari_pacseg.engine.request import SegmentRequest
from napari_pacseg.instances.cells import (
    boundary_label,
    boundary_on_cells,
    enclosed_labels,
    image_sums,
)
from napari_pacseg.instances.labels import (
    as_table,
    brightness_evidence,
    instance_labels,
    object_table,
)
from napari_pacseg.model.classes import DEFAULT_THRESHOLD, labels_from_probabilities
from napari_pacseg.model.network import PacSegModel
from napari_pacseg.model.normalise import image_range, volume_intensity_range, volume_noise_level
from napari_pacseg.progress import SegmentationCancelled
from pacseg_kernels.threads import adaptive_threads

__all__ = [
    "Segmentation",
    "SegmentationCancelled",
    "image_range",
    "receptive_field",
    "segment",
    "volume_intensity_range",
    "volume_noise_level",
]


@dataclass
class Segmentation:
    """Result of ``segment``.

    Arrays have the input's spatial shape: ``(D, H, W)`` for a volume, ``(H, W)`` for a 2D
    image, ``(T, H, W)`` (the frame axis where the image had it) with ``frame_axis``.

    labels : ``(D, H, W)`` uint8: class per voxel by ``classes.labels_from_probabilities``
        (background 0, every other class its scribble value, model class index + 1).
    matte : ``(D, H, W)`` float32 in [0, 1]: 1 - P(background) after refinement.
    probabilities : ``(K, D, H, W)`` float32 class probabilities when asked for, else None.
    timings : wall seconds per stage, summed over tiles: ``features``, ``context``, ``head``,
        ``refine``, ``instances`` (with ``instances=``), and ``total`` (the whole call, input
        checks and output writes included).
    instances : ``(D, H, W)`` int32 object ids (0 background, 1..N; ``instances.instance_labels``)
        when asked for, else None. With ``frame_axis`` each frame's objects are its own, and
        ids run on from frame to frame (unique in the stack).
    objects : the per-object measurements (``instances.object_table``: id, class,
        class_name, volume, centroid, bounding box, intensities, surface area, sphericity; for
        2D images area, perimeter and circularity; with ``frame_axis`` a ``frame`` column
        after ``id``), a pandas DataFrame when pandas is installed, else a dict of columns;
        None without ``instances``.
    seeds : uint8 class labels like ``labels``, of the refinement whose local fit weighs
        ``InstanceConfig.split_fit``, when the objects were seeded from it; else None.
    """

    labels: np.ndarray
    matte: np.ndarray
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    instances: np.ndarray | None = None
    objects: object = None
    seeds: np.ndarray | None = None


def segment(
    image,
    model: PacSegModel | SegmentRequest,
    *,
    spacing=None,
    channel_axis: int | None = None,
    frame_axis: int | None = None,
    refine=True,
    device="auto",
    tile_shape=None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    return_probabilities: bool = False,
    intensity_range=None,
    threshold: float = DEFAULT_THRESHOLD,
    background: int = 0,
    noise_level=None,
    instances=False,
    precision: str = "auto",
) -> Segmentation:
    """Segment a volume or a 2D image with a trained model: logits, PAC-CRF refinement,
    labels and matte.

    Two passes over tiles: the first computes the head's logits of each tile (features and
    context net on the tile plus their halo) into one ``(K - 1, D, H, W)`` float32 buffer of
    logit differences; the second refines each tile with the CRF on the tile plus the CRF's
    reach. Every halo covers the whole receptive field, so results do not depend on tiling,
    and memory is bounded by the tile size plus that buffer and the outputs.

    Parameters
    ----------
    image : array ``(D, H, W)`` for a 3D model, ``(H, W)`` for a 2D model (``ModelConfig.ndim``;
        a one-plane volume ``(1, H, W)`` also works with either), with one more axis for
        ``channel_axis`` (e.g. RGB ``(H, W, 3)`` with ``channel_axis=-1``) and one more for
        ``frame_axis``; numpy or anything ``np.asarray`` takes (a dask array is read tile by
        tile only through ``segment_zarr``; here it is loaded).
    model : PacSegModel (not modified; it is copied to the device when that is another one),
        the path of a model file, or a ``SegmentRequest`` holding the model and every choice
        below but the image's own (``progress``, ``should_cancel``, ``return_probabilities``,
        ``intensity_range``, ``noise_level``); its keywords are then left out.
    spacing : (z, y, x) voxel size in the model's units (napari's layer ``scale``); ``(y, x)``
        for a 2D image; defaults to the spacing the model was trained at.
    channel_axis : the axis of the channels (of ``image`` as given), None for one channel.
    frame_axis : the axis of independent frames (a time-lapse ``(T, H, W)``, or ``(T, C, H,
        W)`` with ``channel_axis``), as given: each frame is segmented alone (its own intensity
        range and noise level unless ``intensity_range`` / ``noise_level`` are given) and the
        results are stacked along that axis; ``progress`` counts tiles over all frames.
    refine : True (model defaults), False, or a dict overriding ``RefineConfig`` fields.
    device : "auto", "cpu", "cuda", "cuda:1", ...; on a CUDA out-of-memory error the tile is
        retried smaller, then on the CPU, with a warning.
    tile_shape : core tile size (D, H, W) of both passes (default: ``UNARY_TILE`` for the
        first, ``refine_tile()`` for the second).
    progress : called as ``progress(done_tiles, total_tiles)`` over both passes.
    should_cancel : polled between tiles; True raises ``SegmentationCancelled``.
    return_probabilities : also return the ``(K, D, H, W)`` class probabilities.
    threshold, background : the label rule (``classes.labels_from_probabilities``): matte =
        1 - P(class ``background``); a voxel whose matte is >= ``threshold`` takes the most
        probable other class, the rest are 0.
    intensity_range : ``(lo, hi)``, one value per channel with hi > lo: the intensities mapped
        to 0 and 1 (default: ``image_range(image, model.config.normalisation)``: this image's
        percentile range, widened to the model's minimum contrast). Give the whole volume's
        when segmenting it piece by piece (e.g. dask chunks with ``receptive_field`` as halo),
        so every piece is normalised alike and the pieces equal the whole.
    noise_level : the image's noise standard deviation per channel, in units of the normalised
        image (default: ``volume_noise_level`` of this image). It sets how much the
        refinement's guide is smoothed (``guide.guide_filter``; none on clean images). Give the
        whole volume's, as with ``intensity_range``, when segmenting it piece by piece.
    instances : also separate the objects (``Segmentation.instances`` and ``.objects``): True
        (the model's ``InstanceConfig``), an ``InstanceConfig``, or a dict overriding its
        fields (``{"boundary": "membrane", "radius": 12}``: the cells a boundary class
        encloses, tiling the tissue). Lengths in the units of ``spacing``.
    precision : "auto" (the head's matrix products in bfloat16 on CPUs with AMX matrix units,
        where they run about 1.6x faster than float32, ``benchmarks/results/mlp-cpu.md``, and
        move the labels of a few voxels near a class boundary; float32 elsewhere) or "float32"
        (float32 everywhere, the same result on every machine).
    """
    check_callable(progress, "segment: progress", "progress(done_tiles, total_tiles)")
    check_callable(should_cancel, "segment: should_cancel", "should_cancel() -> bool")
    request = as_request(
        model, spacing=spacing, channel_axis=channel_axis, frame_axis=frame_axis, refine=refine,
        device=device, tile_shape=tile_shape, threshold=threshold, background=background,
        instances=instances, precision=precision,
    )  # fmt: skip
    image_options = ImageOptions(return_probabilities, intensity_range, noise_level)
    if request.frame_axis is not None:
        return segment_frames(image, request, image_options, progress, should_cancel)
    return run(image, request, image_options, progress, should_cancel)


# segment()'s keywords that make up its request, with their defaults
REQUEST_KEYWORDS = {
    "spacing": None, "channel_axis": None, "frame_axis": None, "refine": True, "device": "auto",
    "tile_shape": None, "threshold": DEFAULT_THRESHOLD, "background": 0, "instances": False,
    "precision": "auto",
}  # fmt: skip


def as_request(model, **keywords) -> SegmentRequest:
    """``model`` when it is a ``SegmentRequest`` (then ``keywords``, ``REQUEST_KEYWORDS``, must
    be at their defaults), else the request of ``model`` with ``keywords``."""
    if isinstance(model, SegmentRequest):
        given = sorted(k for k, v in keywords.items() if v is not REQUEST_KEYWORDS[k]
                       and not (isinstance(v, (int, float)) and v == REQUEST_KEYWORDS[k]
                                and not isinstance(v, bool)))  # fmt: skip
        if given:
            raise TypeError(
                f"a SegmentRequest already holds {', '.join(given)}; pass the request alone, or "
                "a model with those keywords"
            )
        return model
    return SegmentRequest.build(model, **keywords)


@dataclass(frozen=True)
class ImageOptions:
    """What ``segment`` is asked about one image beyond its request: also return the class
    probabilities; the intensity range and noise level to use instead of the image's own
    (``segment``'s parameters of those names)."""

    return_probabilities: bool = False
    intensity_range: object = None
    noise_level: object = None
    # the fit weight of the seeding refinement (``plan.seeding_fit``) for a request without
    # objects whose caller separates them later (``segment_zarr``'s blocks); None: the plan's
    split_fit: float | None = None


def run(image, request: SegmentRequest, options: ImageOptions, progress=None, should_cancel=None):
    """``segment`` of one image (no frame axis) as ``request`` asks: the ``Segmentation``."""
    start = time.perf_counter()
    with adaptive_threads():  # fewer threads while other processes hold cores
        plan = prepare(image, request, intensity_range=options.intensity_range,
                       noise_level=options.noise_level)  # fmt: skip
        shape, k = plan.shape, plan.n_classes
        # Softmax and the Potts mean field only see differences between a voxel's logits, so the
        # logits are kept as differences to the background's: one channel fewer.
        diffs = np.empty((k - 1, *shape), dtype=np.float32)
        labels = np.zeros(shape, dtype=np.uint8)
        matte = np.zeros(shape, dtype=np.float32)
        probs = np.zeros((k, *shape), dtype=np.float32) if options.return_probabilities else None
        # the labels of the refinement with a stronger local fit, which seed the objects
        split_fit = plan.split_fit if options.split_fit is None else options.split_fit
        seeds = None if split_fit is None else np.zeros(shape, dtype=np.uint8)
        timings = dict.fromkeys(STAGES, 0.0)
        unary_boxes, final_boxes = plan.unary_boxes(), plan.refine_boxes()
        runner = TileRunner(plan, progress, should_cancel)
        runner.total = len(unary_boxes) + len(final_boxes)

        def unary_pass(box, dev, dev_model):
            diffs[(slice(None), *_slices(box))] = engine.logits(plan, box, dev_model, dev, timings)

        def final_pass(box, dev, _):
            ext = plan.refine_extent(box)
            view = diffs[(slice(None), *_slices(ext))]
            if seeds is None:
                p = engine.refine(plan, box, view, dev, timings)
            else:
                p, seed_p = engine.refine(plan, box, view, dev, timings, split_fit=split_fit)
            sl = _slices(box)
            labels[sl], matte[sl] = labels_from_probabilities(p, plan.threshold, plan.background)
            if seeds is not None:
                seeds[sl] = labels_from_probabilities(seed_p, plan.threshold, plan.background)[0]
            if probs is not None:
                probs[(slice(None), *sl)] = p

        runner.run(unary_boxes, unary_pass)
        runner.run(final_boxes, final_pass)
    if plan.flat:  # a 2D image: its results without the plane axis
        labels, matte = labels[0], matte[0]
        probs = None if probs is None else probs[:, 0]
        seeds = None if seeds is None else seeds[0]
    ids = objects = None
    if request.instances is not None:
        t0 = time.perf_counter()
        ids, objects, labels = _objects(plan, labels, should_cancel, seeds)
        # the seeding mean field is part of the instance step
        timings["instances"] = time.perf_counter() - t0 + timings.pop("seeds", 0.0)
    timings["total"] = time.perf_counter() - start
    return Segmentation(labels, matte, probs, timings, ids, objects, seeds)


def _objects(plan, labels, should_cancel, seeds=None):
    """``(ids, table, labels)``: the object ids and measurement table of ``labels``
    (``plan``'s image and request), and the labels (in cells mode with the boundary class
    drawn where the cells meet: ``cells.boundary_on_cells``; else ``labels`` itself);
    ``seeds``: the labels that seed the objects (``refine(split_fit=...)``), or None."""
    model = plan.model
    plane = model.config.ndim == 2  # a 2D model's objects are 2D (also of a (1, H, W) input)
    flat_labels = labels if plan.flat or not plane else labels[0]
    if seeds is not None and plane and not plan.flat:
        seeds = seeds[0]
    spacing = plan.settings.spacing[1:] if plane else plan.settings.spacing
    config = plan.request.instances
    vol = plan.vol[:, 0] if plane else plan.vol
    bright = brightness_evidence(vol, plan.lo.cpu().numpy(), plan.hi.cpu().numpy(), spacing, config)
    classes, background = plan.request.classes, plan.request.background
    boundary = boundary_label(config, classes, background)
    # cells mode: the boundary's stain sums, read by the cells and by the labels' drawing
    sums = None
    if boundary is not None:
        sums = image_sums(bright.reshape(flat_labels.shape), flat_labels, boundary)
    ids = instance_labels(flat_labels, spacing, config, should_cancel=should_cancel,
                          evidence=bright, classes=classes, background=background,
                          seeds=seeds, stain=sums)  # fmt: skip
    measured = flat_labels
    if boundary is not None:  # a cell's class is the one it encloses
        measured = enclosed_labels(ids, flat_labels, boundary)
    objects = as_table(object_table(ids, measured, vol, spacing, classes))
    if boundary is not None:  # the boundary class where the cells meet
        drawn = boundary_on_cells(flat_labels, ids, boundary, bright.reshape(flat_labels.shape),
                                  measured, sums)  # fmt: skip
        labels = drawn.reshape(labels.shape)
    if plane and not plan.flat:
        ids = ids[None]
    return ids, objects, labels


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def receptive_field(model: PacSegModel, spacing=None, refine=True) -> tuple[int, ...]:
    """Voxels per axis ``(z, y, x)`` (``(y, x)`` for a 2D model) that a voxel's result
    depends on beyond itself: the
    features' and context net's halo plus, with refinement, the CRF's reach. A piece of a
    volume extended by this much on every side (clipped at the volume's edges) gives exactly
    the whole-volume result on the piece (with the whole volume's ``intensity_range``; with a
    context net, pieces must also start on multiples of ``model.grid``)."""
    field = settle(model, spacing, refine).receptive_field
    return field[1:] if model.config.ndim == 2 else field


def segment_frames(image, request: SegmentRequest, options: ImageOptions, progress=None,
                   should_cancel=None):  # fmt: skip
    """``segment`` of each frame alone, results stacked along ``request.frame_axis`` (see
    ``segment``'s ``frame_axis``). Object ids run on from frame to frame and the objects table
    gains a ``frame`` column."""
    start = time.perf_counter()
    frames, ca, position = frame_views(image, request.frame_axis, request.channel_axis)
    one_frame = request.replace(channel_axis=ca, frame_axis=None)
    n = frames.shape[0]
    results = []
    for t in range(n):
        relay = None
        if progress is not None:

            def relay(done, total, t=t):
                progress(t * total + done, n * total)

        results.append(run(frames[t], one_frame, options, relay, should_cancel))

    labels = np.stack([r.labels for r in results], position)
    matte = np.stack([r.matte for r in results], position)
    seeds = None
    if results[0].seeds is not None:
        seeds = np.stack([r.seeds for r in results], position)
    probs = None
    if results[0].probabilities is not None:
        probs = np.stack([r.probabilities for r in results], position + 1)
    timings: dict[str, float] = {}
    for r in results:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    ids = objects = None
    if results[0].instances is not None:
        shifted, offset = [], 0
        tables = []
        for t, r in enumerate(results):
            frame_ids = r.instances.copy()
            frame_ids[frame_ids > 0] += offset
            shifted.append(frame_ids)
            cols = {k: np.asarray(r.objects[k]) for k in r.objects.keys()}
            cols["id"] = cols["id"] + offset
            tables.append({"id": cols.pop("id"), "frame": np.full(len(cols["class"]), t), **cols})
            offset += int(r.instances.max())
        ids = np.stack(shifted, position)
        objects = as_table({k: np.concatenate([tb[k] for tb in tables]) for k in tables[0]})
    timings["total"] = time.perf_counter() - start
    return Segmentation(labels, matte, probs, timings, ids, objects, seeds)
