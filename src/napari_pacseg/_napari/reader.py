"""napari reader for zarr arrays, OME-Zarr images (napari's builtins read neither) and TIFFs
(napari's builtins open them at scale 1): the voxel size from the file's metadata as the layer
scale; zarr as a lazy dask array when dask is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_pacseg.io.volumes import (
    TIFF_SUFFIXES,
    VolumeError,
    is_zarr_path,
    open_zarr,
    read_tiff_raw,
    tiff_axis_names,
)

# integer TIFFs with these name endings open as Labels layers: the scribbles and ground truth
# that `pacseg demo` writes, the labels and objects that `pacseg segment` writes
LABEL_ENDINGS = ("_scribbles", "_truth", "_labels", "_instances")


def get_reader(path):
    """npe2 reader hook: a reader for one zarr / OME-Zarr folder or one TIFF file, else None
    (napari then asks other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if is_zarr_path(path):
        return read_zarr
    if Path(path).suffix.lower() in TIFF_SUFFIXES and Path(path).is_file():
        return read_tiff
    return None


def read_tiff(path):
    """Layer data of a TIFF's first series: ``[(data, kwargs, "image" or "labels")]``.

    The axes stay in the file's order, except a channel axis (not RGB samples), which goes
    first (the widget's 4D layout). ``scale``: the voxel size from ImageJ or OME metadata in um
    on the z, y and x axes (absent without metadata); ``axis_labels``: the file's axes (t, z, y,
    x, c), so a ``TYX`` stack is a time-lapse to the widget. An integer TIFF named
    ``*_scribbles``, ``*_truth``, ``*_labels`` or ``*_instances`` is a Labels layer;
    ``<image>_scribbles.tif`` is named ``"<image> scribbles"``, the name the widget looks for.
    """
    if isinstance(path, list):
        path = path[0]
    path = Path(path)
    try:
        data, tiff_axes, spacing, _, problem = read_tiff_raw(path)
    except VolumeError as err:
        raise ValueError(str(err)) from err
    axes = list(tiff_axis_names(tiff_axes))
    rgb = tiff_axes.endswith("S") and data.shape[-1] in (3, 4) and data.ndim >= 3
    if "c" in axes[: len(axes) - rgb]:
        c = axes.index("c")
        data, axes = np.moveaxis(data, c, 0), ["c", *axes[:c], *axes[c + 1 :]]
    layer_axes = axes[:-1] if rgb else axes
    labels = [a if a in "tzyxc" else f"axis {i}" for i, a in enumerate(layer_axes)]
    name = path.name.rsplit(".", 1)[0].removesuffix(".ome")
    kwargs: dict = {"name": name, "axis_labels": labels}
    if rgb:
        kwargs["rgb"] = True
    if spacing is not None:
        size = dict(zip("zyx", spacing))
        kwargs["scale"] = [size.get(a, 1.0) for a in layer_axes]
    elif problem:  # shown, not guessed: the user sets Spacing in the widget
        from napari.utils.notifications import show_warning

        show_warning(
            f"{path.name}: {problem}; the layer has scale 1, set its voxel size (Spacing in the "
            "PAC Segmentation widget) before segmenting"
        )
    kind = "image"
    ending = next((e for e in LABEL_ENDINGS if name.lower().endswith(e)), None)
    if ending and np.issubdtype(data.dtype, np.integer) and "c" not in axes:
        kind = "labels"
        if ending == "_scribbles":
            kwargs["name"] = f"{name[: -len(ending)]} scribbles"
    return [(data, kwargs, kind)]


def read_zarr(path):
    """Layer data of a zarr array or OME-Zarr image: ``[(data, kwargs, "image")]``.

    ``data`` is ``(D, H, W)`` or, with channels, ``(C, D, H, W)`` with ``channel_axis=0``, a
    dask array (nothing loaded) when dask is installed, else numpy. ``scale`` is the spacing
    from the OME-Zarr metadata in um (absent for plain arrays, which carry none).
    """
    if isinstance(path, list):
        path = path[0]
    path = Path(path)
    try:
        volume = open_zarr(path)
    except VolumeError as err:
        raise ValueError(str(err)) from err
    try:
        import dask.array as da

        raw = da.from_zarr(volume.data)
    except ImportError:  # the `dask` extra is not installed: read it whole
        raw = volume.data[...]
    data = volume.layout.arrange(raw[volume.layout.selection([(0, n) for n in volume.shape[1:]])])
    kwargs = {"name": path.name.removesuffix(".zarr").removesuffix(".ome")}
    if volume.spacing is not None:
        kwargs["scale"] = volume.spacing
    elif volume.spacing_problem:  # shown, not guessed: the user sets the layer's scale
        from napari.utils.notifications import show_warning

        show_warning(
            f"{path.name}: {volume.spacing_problem}; the layer has scale 1, set its voxel size "
            "(layer scale) before segmenting"
        )
    if data.shape[0] == 1:
        data = data[0]
    else:
        kwargs["channel_axis"] = 0
    return [(data, kwargs, "image")]
