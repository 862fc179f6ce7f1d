"""2D images and stacks of 2D frames on disk: PNG and JPEG (imageio), 2D TIFF, NPY.

``read_picture`` returns an ``ImageFile`` (the one class of every image on disk; ``planar``):
``.picture()`` gives it channel first, ``(C, H, W)``, or ``(T, C, H, W)`` for a stack of frames,
with the pixel size ``(y, x)`` from a TIFF's metadata when it has one. Volumes (``volumes``) and
2D images are told apart by ``is_2d_file``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_pacseg.io.volumes import (
    PICTURE_SUFFIXES,
    TIFF_SUFFIXES,
    ImageFile,
    Layout,
    VolumeError,
    load_npy,
    read_tiff_raw,
    tiff_axis_names,
)


def picture_kind(path) -> str | None:
    """ "png" or "jpeg" by name; None for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        return None
    return "png" if suffix == ".png" else "jpeg"


def _raw(path: Path, load: bool = True):
    """``(array, axes, spacing, source, problem)`` in the file's own order (``array`` only its
    shape when not ``load``); ``axes`` one letter per axis (``y x c t z ?``, "" unknown)."""
    kind = picture_kind(path)
    if kind is not None:
        try:
            import imageio.v3 as iio
        except ImportError as err:  # a dependency of scikit-image, which we need anyway
            raise VolumeError(
                f"reading {kind.upper()} files needs imageio: pip install imageio"
            ) from err
        try:
            data = np.asarray(iio.imread(path))
        except (OSError, ValueError, RuntimeError) as err:
            raise VolumeError(f"{path}: not a readable {kind.upper()} image ({err})") from None
        if data.ndim not in (2, 3):
            raise VolumeError(f"{path}: a {kind.upper()} of shape {data.shape} is not a 2D image")
        return data, "yx" if data.ndim == 2 else "yxc", None, "", ""
    if path.suffix.lower() in TIFF_SUFFIXES:
        data, tiff_axes, spacing, source, problem = read_tiff_raw(path, load)
        axes = tiff_axis_names(tiff_axes)
        return data, axes, None if spacing is None else tuple(spacing[1:]), source, problem
    if path.suffix.lower() == ".npy":
        data = load_npy(path)
        return data if load else data.shape, "", None, "", ""
    raise VolumeError(f"{path}: unknown format; use PNG, JPEG, TIFF (.tif, .tiff) or NumPy (.npy)")


def _roles(axes: str, shape, channel_axis, frames: bool, path) -> dict[str, int | None]:
    """Raw axis of ``y``, ``x``, ``c`` (or None) and ``t`` (or None) of a 2D image or stack."""
    ndim = len(shape)
    names = list(axes) if axes else ["?"] * ndim
    if channel_axis is not None:
        if not -ndim <= channel_axis < ndim:
            raise VolumeError(
                f"{path}: channel axis {channel_axis} is out of range for a {ndim}D array of shape {tuple(shape)}"
            )
        names = ["?" if n == "c" else n for n in names]
        names[channel_axis % ndim] = "c"
    # axes of length 1 that are neither y nor x (a single plane, time point or channel) go
    others = [i for i, n in enumerate(names) if n not in "yxc"]
    fixed = [i for i in others if shape[i] == 1 and (not frames or len(others) > 1)]
    rest = [i for i in others if i not in fixed]
    if "y" not in names or "x" not in names:  # no names: the last two non-channel axes
        free = [i for i in range(ndim) if names[i] != "c" and i not in fixed]
        if len(free) < 2:
            raise VolumeError(f"{path}: shape {tuple(shape)} has no 2D image in it")
        names[free[-2]], names[free[-1]] = "y", "x"
        rest = free[:-2]
    want = 1 if frames else 0
    if len(rest) != want or names.count("c") > 1:
        what = "a stack of 2D frames (T, H, W)" if frames else "a 2D image (H, W)"
        hint = "" if frames else ", --frames for a stack of 2D frames (a time-lapse)"
        raise VolumeError(
            f"{path}: a 2D model segments {what}, with a channel axis if it has one; got shape "
            f"{tuple(shape)} (axes {''.join(names)!r}): pass --channel-axis N for channels "
            f"(-1 for an RGB NPY){hint}, or segment volumes with a volume model"
        )
    return {
        "y": names.index("y"),
        "x": names.index("x"),
        "c": names.index("c") if "c" in names else None,
        "t": rest[0] if frames else None,
        "fixed": fixed,
    }


def read_picture(path, channel_axis: int | None = None, frames: bool = False) -> ImageFile:
    """Read a 2D image (``frames=False``: PNG, JPEG, TIFF or NPY; RGB and multichannel) or a
    stack of 2D frames (TIFF or NPY: the one axis besides y, x and channels is the frame axis,
    a TIFF's T or Z). ``channel_axis`` is the raw index of the channel axis, overriding the
    file's metadata. Raises ``VolumeError`` for missing, unknown or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    data, axes, spacing, source, problem = _raw(path)
    r = _roles(axes, data.shape, channel_axis, frames, path)
    layout = Layout((r["t"], r["y"], r["x"]), r["c"], tuple(r["fixed"]))
    kind = picture_kind(path) or ("tiff" if path.suffix.lower() in TIFF_SUFFIXES else "npy")
    return ImageFile(path, kind, np.asarray(data), layout, spacing, source, problem, True, frames)


def is_time_lapse(path, channel_axis: int | None = None) -> bool:
    """True when ``path`` is a TIFF whose metadata names a time axis and no z axis (ImageJ's
    or OME's ``TYX``, with channels or not): a stack of 2D frames, which a 2D model segments
    frame by frame without being told (``frames``). Only its header is read."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        _, axes, *_ = _raw(path, load=False)
    except VolumeError:
        return False
    names = list(axes)
    if channel_axis is not None and -len(names) <= channel_axis < len(names):
        names[channel_axis] = "c"
    return "t" in names and "z" not in names


def is_2d_file(path, channel_axis: int | None = None) -> bool:
    """True when ``path`` holds a 2D image rather than a volume: a PNG or JPEG, a TIFF with no
    z or time axis (besides y, x and channels; length-1 axes of unknown kind are ignored), or
    an NPY of 2 dimensions (3 with ``channel_axis``). A one-plane volume (a TIFF's z of 1, an
    NPY ``(1, H, W)``) is a volume, as it is for ``train``."""
    path = Path(path)
    if picture_kind(path) is not None:
        return True
    if path.suffix.lower() not in (*TIFF_SUFFIXES, ".npy") or not path.is_file():
        return False
    try:
        shape, axes, *_ = _raw(path, load=False)
        if not axes:  # an NPY: its dimensions say it
            return len(shape) == 2 + (channel_axis is not None)
        names = list(axes)
        if channel_axis is not None and -len(names) <= channel_axis < len(names):
            names[channel_axis] = "c"
        if any(n in "zt" for n in names):
            return False
        _roles(axes, shape, channel_axis, False, path)
    except VolumeError:
        return False
    return True
