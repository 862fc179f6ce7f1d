"""The GUI stack works: a real napari viewer under Xvfb shows a 3D image layer."""

import numpy as np
import pytest

pytest.importorskip("napari")


def test_viewer_shows_a_volume(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(0)
    volume = np.zeros((8, 32, 32), dtype=np.float32)
    volume[:, 8:24, 8:24] = 1.0
    volume += 0.05 * rng.random(volume.shape, dtype=np.float32)
    layer = viewer.add_image(volume, name="volume", scale=(2.0, 0.5, 0.5))
    assert viewer.layers["volume"] is layer
    assert layer.data.shape == (8, 32, 32)
    assert tuple(layer.scale) == (2.0, 0.5, 0.5)
    shot = viewer.screenshot(canvas_only=True)
    assert shot.ndim == 3 and shot.shape[2] == 4
    assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 1, "the canvas rendered blank"


def test_package_imports_without_gui():
    import napari_pacseg
    import pacseg_kernels

    assert napari_pacseg.__version__
    assert callable(pacseg_kernels.voxel_mlp)
