"""Stacks of independent frames (time-lapses): ``frame_axis`` of ``segment`` and ``train``.

Each frame is an image of its own (2D for a 2D model): segmented alone, its results stacked
back along the frame axis; for training, the frames holding scribbles are the training images.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from napari_pacseg.checks import as_array, check_int, short_repr


def frame_views(image, frame_axis, channel_axis, what: str = "image"):
    """``(frames, channel_axis_in_a_frame, position)``: ``image`` with ``frame_axis`` moved
    first (a view), the channel axis's index within one frame, and where the frame axis sits
    among the non-channel axes (where results stack it)."""
    if isinstance(image, (str, bytes)) or image is None:
        raise TypeError(f"{what} must be an array, got {short_repr(image)}")
    arr = as_array(image, what)
    if arr.ndim < 3:
        raise ValueError(
            f"{what} with frame_axis={short_repr(frame_axis)} needs a frame axis besides a 2D "
            f"frame's, got shape {short_repr(arr.shape)}"
        )
    fa = check_int(frame_axis, "frame_axis", low=-arr.ndim, high=arr.ndim - 1) % arr.ndim
    ca = None
    position = fa
    if channel_axis is not None:
        full = check_int(channel_axis, "channel_axis", low=-arr.ndim, high=arr.ndim - 1)
        full %= arr.ndim
        if full == fa:
            raise ValueError(
                f"frame_axis and channel_axis are the same axis ({fa}) of {what} of shape "
                f"{short_repr(arr.shape)}; give the time/frames axis and the channel axis"
            )
        ca = full - (full > fa)
        position = fa - (full < fa)
    return np.moveaxis(arr, fa, 0), ca, position


def segment_frames(
    image,
    model,
    frame_axis,
    channel_axis,
    progress: Callable[[int, int], None] | None,
    should_cancel: Callable[[], bool] | None,
    **kwargs,
):
    """``segment`` of each frame alone, results stacked along the frame axis (see
    ``segment``'s ``frame_axis``). Object ids run on from frame to frame and the objects table
    gains a ``frame`` column."""
    from napari_pacseg.engine.segment import Segmentation, segment
    from napari_pacseg.instances.labels import as_table

    start = time.perf_counter()
    frames, ca, position = frame_views(image, frame_axis, channel_axis)
    n = frames.shape[0]
    results = []
    for t in range(n):
        relay = None
        if progress is not None:

            def relay(done, total, t=t):
                progress(t * total + done, n * total)

        one = segment(frames[t], model, channel_axis=ca, progress=relay, should_cancel=should_cancel, **kwargs)  # fmt: skip
        results.append(one)

    labels = np.stack([r.labels for r in results], position)
    matte = np.stack([r.matte for r in results], position)
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
    return Segmentation(labels, matte, probs, timings, ids, objects)
