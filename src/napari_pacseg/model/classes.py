"""Classes and label values: the one convention, the palette, and the one rule from class
probabilities to labels that the API, the command, zarr runs and the widget all use.

Convention: class ``i`` of a model (``classes[0]`` the background) is painted in scribbles with
value ``i + 1`` (0 = unlabelled) and comes out of a segmentation with the same value, except the
background class, which comes out as 0.

Rule: ``matte = 1 - P(background)``; a voxel is foreground when ``matte >= threshold`` and then
takes the most probable non-background class. For two classes and ``threshold = 0.5`` this is
the argmax of the probabilities (up to exact ties, which go to the foreground).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from napari_pacseg.checks import (
    as_tuple_field,
    check_int,
    check_number,
    is_real,
    short_repr,
    unprintable_chars,
)

MAX_CLASSES = 255  # so labels always fit uint8
DEFAULT_THRESHOLD = 0.5
DEFAULT_COLORS = [
    (0.0, 0.0, 0.0, 0.0),
    (1.0, 0.2, 0.2, 1.0),
    (0.2, 0.8, 0.2, 1.0),
    (0.3, 0.5, 1.0, 1.0),
    (1.0, 0.8, 0.1, 1.0),
    (0.8, 0.3, 1.0, 1.0),
    (0.1, 0.9, 0.9, 1.0),
]


@dataclass(frozen=True)
class ClassInfo:
    """A class: its name and RGBA colour (components in [0, 1])."""

    name: str
    color: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 100:
            raise ValueError(
                f"ClassInfo: name must be a non-empty string of at most 100 characters, got {short_repr(self.name)}"
            )
        bad = unprintable_chars(self.name)
        if bad:
            raise ValueError(
                f"ClassInfo: name {short_repr(self.name)} holds control or invisible characters "
                f"{short_repr(''.join(dict.fromkeys(bad)))}; use printable text"
            )
        if not self.name.strip():
            raise ValueError(
                f"ClassInfo: name must be a non-empty string, not only spaces, got {short_repr(self.name)}"
            )
        as_tuple_field(self, "color")
        if (
            not isinstance(self.color, tuple)
            or len(self.color) != 4
            or not all(is_real(v) and 0 <= v <= 1 for v in self.color)
        ):
            raise ValueError(
                f"ClassInfo: color must be 4 numbers in [0, 1] (RGBA), got {short_repr(self.color)}"
            )


def check_distinct_names(names, what: str = "classes") -> None:
    """``ValueError`` when two class names are the same (ignoring spaces around them): labels,
    object tables and the widget tell classes apart by name."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = name.strip()
        if key in seen:
            raise ValueError(
                f"{what}: class names must be distinct, but classes {seen[key]} and {i} are both "
                f"named {short_repr(key)}; give each class its own name"
            )
        seen[key] = i


def class_infos(classes, what: str = "classes") -> tuple[ClassInfo, ...]:
    """``ClassInfo`` for each of ``classes`` (names or ``ClassInfo``), background first, names
    given as strings coloured from ``DEFAULT_COLORS``."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise ValueError(
            f"{what}: classes must be a list of names or ClassInfo, background first, got "
            f"{short_repr(classes)}"
        )
    infos = []
    for i, c in enumerate(classes):
        if isinstance(c, ClassInfo):
            infos.append(c)
        elif isinstance(c, (str, numbers.Integral)) and not isinstance(c, bool):
            infos.append(ClassInfo(str(c), DEFAULT_COLORS[i % len(DEFAULT_COLORS)]))
        else:
            raise ValueError(f"{what}: class names must be strings, got {short_repr(c)}")
    check_distinct_names([c.name for c in infos], what)
    return tuple(infos)


def scribble_values(n_classes: int) -> list[int]:
    """Scribble value of each class: ``i + 1`` (0 is unlabelled)."""
    return list(range(1, n_classes + 1))


def label_values(n_classes: int, background: int = 0) -> list[int]:
    """Label value of each class: ``i + 1``, except 0 for the background class."""
    return [0 if i == background else i + 1 for i in range(n_classes)]


def check_output_rule(threshold, background, n_classes: int) -> tuple[float, int]:
    """``(threshold, background)`` checked: a number in [0, 1] and a class index."""
    threshold = check_number(threshold, "threshold")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {short_repr(threshold)}")
    background = check_int(background, "background (class index)", 0, n_classes - 1)
    return threshold, background


def labels_from_probabilities(
    probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD, background: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and matte from class probabilities ``(K, ...)`` float32, by the module's rule.

    Returns ``labels`` (``...``, uint8: 0 where the matte is below ``threshold``, else the label
    value of the most probable non-background class) and ``matte`` (``...``, float32,
    ``1 - P(background)``).
    """
    k = probabilities.shape[0]
    threshold, background = check_output_rule(threshold, background, k)
    matte = (1.0 - probabilities[background]).astype(np.float32)
    if k == 2:
        best = np.full(matte.shape, 1 - background, dtype=np.intp)
    else:
        others = probabilities.copy()
        others[background] = -1.0
        best = others.argmax(0)
    values = np.array(label_values(k, background), dtype=np.uint8)
    labels = np.where(matte >= threshold, values[best], 0).astype(np.uint8)
    return labels, matte
