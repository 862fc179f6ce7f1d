"""Stacks of independent frames (time-lapses): ``frame_axis`` of ``segment`` and ``train``.

Each frame is an image of its own (2D for a 2D model): ``segment`` segments each alone and
stacks its results back along the frame axis (``segment.segment_frames``); for training, the
frames holding scribbles are the training images.
"""

from __future__ import annotations

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


def painted_frames(image, scribbles, frame_axis, channel_axis, who: str = "train"):
    """``(images, scribbles, channel_axis)``: the frames of ``image`` along ``frame_axis`` that
    hold scribbles, as lists (the training images of a stack of frames), and the channel axis
    within a frame. ``who`` names the caller in messages."""
    if isinstance(image, (list, tuple)) or isinstance(scribbles, (list, tuple)):
        raise TypeError(
            f"{who}: frame_axis takes one stack of frames and its scribbles, not lists; "
            "concatenate the stacks, or pass the frames as a list of images without frame_axis"
        )
    frames, ca, _ = frame_views(image, frame_axis, channel_axis, f"{who}: image")
    marks, _, _ = frame_views(scribbles, frame_axis, None, f"{who}: scribbles")
    if marks.shape[0] != frames.shape[0]:
        raise ValueError(
            f"{who}: the image has {frames.shape[0]} frames along frame_axis but the scribbles "
            f"{marks.shape[0]}"
        )
    painted = [t for t in range(marks.shape[0]) if np.any(marks[t])]
    if not painted:
        raise ValueError(
            f"{who}: the scribbles label no pixel in any frame; paint at least two classes"
        )
    return [frames[t] for t in painted], [marks[t] for t in painted], ca
