"""The zarr / OME-Zarr reader contribution: napari opens both through the plugin."""

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("napari")

from napari_pacseg._napari.reader import get_reader  # noqa: E402


def _ome_zarr(path, channels: int):
    root = zarr.open_group(str(path), mode="w")
    shape = (1, channels, 4, 6, 5)
    level0 = zarr.open_array(str(path / "0"), mode="w", shape=shape, chunks=shape, dtype="u2")
    data = np.arange(np.prod(shape), dtype="u2").reshape(shape)
    level0[:] = data
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]
    axes += [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, 1.0, 2.0, 0.5, 0.5]}
                    ],
                }
            ],
        }
    ]
    return data[0]


def test_reader_claims_only_zarr(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2)))
    assert get_reader(str(tmp_path / "a.npy")) is None
    assert get_reader([str(tmp_path / "x.zarr"), str(tmp_path / "y.zarr")]) is None
    zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=(3, 4, 5), dtype="f4")
    assert callable(get_reader(str(tmp_path / "v.zarr")))


@pytest.mark.parametrize("channels", [1, 2])
def test_napari_opens_ome_zarr_with_its_spacing(make_napari_viewer, tmp_path, channels):
    data = _ome_zarr(tmp_path / "cells.ome.zarr", channels)
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "cells.ome.zarr"), plugin="napari-pacseg")
    assert len(layers) == channels
    for c, layer in enumerate(layers):
        assert tuple(layer.scale) == (2.0, 0.5, 0.5)
        np.testing.assert_array_equal(np.asarray(layer.data), data[c])


def test_napari_opens_a_plain_zarr_array(make_napari_viewer, tmp_path):
    arr = zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=(3, 8, 9), dtype="f4")
    arr[:] = np.random.default_rng(0).random((3, 8, 9), dtype=np.float32)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "plain.zarr"), plugin="napari-pacseg")
    assert layer.name == "plain" and tuple(layer.scale) == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(layer.data), arr[:])
