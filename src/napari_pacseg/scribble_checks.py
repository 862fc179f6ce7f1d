"""Warnings about where scribbles were painted: a class painted only along the image's border
teaches the model that class from the border's look alone (a tester who painted the background
that way got bright nuclear rims labelled background)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BORDER = 0.06  # of the in-plane extent: "on the border" means within this of an edge


def coverage_warnings(scribbles: Sequence[np.ndarray], names: Sequence[str]) -> list[str]:
    """One sentence per class (scribble value ``i + 1`` is ``names[i]``) whose scribbles, over
    all the ``(D, H, W)`` (or ``(..., H, W)``) scribble arrays, lie only within ``BORDER`` of
    the images' edges in y and x; [] when every class was painted inside too (or not at all)."""
    out = []
    for i, name in enumerate(names):
        value, inside, painted = i + 1, False, False
        for marks in scribbles:
            where = np.argwhere(np.asarray(marks) == value)
            if not where.size:
                continue
            painted = True
            h, w = marks.shape[-2:]
            y, x = where[:, -2], where[:, -1]
            my, mx = max(1, round(BORDER * h)), max(1, round(BORDER * w))
            away = (y >= my) & (y < h - my) & (x >= mx) & (x < w - mx)
            if away.any():
                inside = True
                break
        if painted and not inside:
            out.append(
                f"the {name} scribbles are all on the image border: add some away from it "
                + ("(between objects), " if i == 0 else "")
                + "or the model learns the border's look as the class"
            )
    return out
