"""Which voxel size a run uses for an image: the one given, else the file's metadata, else a
default (the model's training spacing, or none for training)."""

from __future__ import annotations

from napari_pacseg.checks import check_spacing
from napari_pacseg.io.volumes import VolumeError


def resolve_spacing(given, image, default, ndim: int = 3) -> tuple[tuple[float, ...] | None, str]:
    """``(spacing, source)`` for ``image`` (an ``ImageFile`` or None): ``given``
    ("argument"; a 2D image, ``ndim`` 2, takes its last two numbers), else the file's metadata
    (its ``spacing_source``), else ``default`` ("model"; None stays None, "default").
    ``(z, y, x)``, or ``(y, x)`` for ``ndim`` 2. ``VolumeError`` naming the file when its
    metadata holds a voxel size that cannot be read and none is given."""
    if given is not None:
        given = tuple(given)[-2:] if ndim == 2 else given
        return check_spacing(given, None, ndim), "argument"
    if image is not None and image.spacing_problem:
        axes = "Y X" if ndim == 2 else "Z Y X"
        raise VolumeError(
            f"{image.path}: {image.spacing_problem}; give the voxel size (--spacing {axes}, or "
            "spacing=...)"
        )
    if image is not None and image.spacing is not None:
        return tuple(image.spacing), image.spacing_source
    if default is None:
        return None, "default"
    return check_spacing(tuple(default), None, ndim), "model"
