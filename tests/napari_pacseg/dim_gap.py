"""A 2D image of two nuclei whose foreground fuses into one piece with no neck, split by a dim
gap: the seeded objects' test case (``InstanceConfig.split_fit``)."""

from __future__ import annotations

import numpy as np

SHAPE = (48, 64)


def fused_pair(gap_value: float = 0.5, gap_width: float = 3.0, seed: int = 0):
    """``(image float32 (48, 64), scribbles uint8)``: an ellipse of intensity 1 (semi-axes 9 x
    19.8 pixels; its distance transform has one ridge, so its shape alone is one object) on a
    background of 0.1, cut across its middle by a band ``gap_width`` pixels wide at
    ``gap_value`` (1: no gap), with noise of sigma 0.03; strokes of class 2 in each half and of
    class 1 (background) above and below."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(float)
    inside = ((yy - 24) / 9.0) ** 2 + ((xx - 32) / 19.8) ** 2 < 1
    image = np.full(SHAPE, 0.1)
    image[inside] = 1.0
    image[inside & (np.abs(xx - 32) < gap_width / 2)] = gap_value
    image = image + rng.normal(0.0, 0.03, SHAPE)
    strokes = np.zeros(SHAPE, np.uint8)
    strokes[22:27, 17:23] = 2
    strokes[22:27, 41:47] = 2
    strokes[2:5, 5:60] = 1
    strokes[43:46, 5:60] = 1
    return image.astype(np.float32), strokes
