"""napari reader for zarr arrays and OME-Zarr images (napari's builtins read neither): the
image as a lazy dask array when dask is installed, with the voxel size as the layer scale."""

from __future__ import annotations

from pathlib import Path

from napari_pacseg.io.volumes import VolumeError, is_zarr_path, open_zarr


def get_reader(path):
    """npe2 reader hook: a reader for one zarr / OME-Zarr folder, else None (napari then asks
    other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not is_zarr_path(path):
        return None
    return read_zarr


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
