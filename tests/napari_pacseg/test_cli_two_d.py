"""The ``pacseg`` command on 2D images: PNG, JPEG, 2D TIFF, NPY, and stacks of frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
iio = pytest.importorskip("imageio.v3")

from napari_pacseg import load_model, segment  # noqa: E402
from napari_pacseg.cli import main  # noqa: E402
from napari_pacseg.io.images import is_2d_file, read_picture  # noqa: E402
from napari_pacseg.io.volumes import VolumeError, write_tiff  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE  # noqa: E402

from .test_two_d import _cells  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def pictures(tmp_path):
    """cells.png (uint8) + its scribbles, rgb.png, a 2D ImageJ TIFF with a pixel size, an NPY,
    and a 3-frame TIFF time-lapse with scribbles on frame 1."""
    image, scribbles, _ = _cells(shape=(64, 72))
    gray = np.clip(image * 2, 0, 255).astype(np.uint8)
    iio.imwrite(tmp_path / "cells.png", gray)
    iio.imwrite(tmp_path / "cells_scribbles.png", scribbles)
    iio.imwrite(tmp_path / "rgb.png", np.stack([gray, gray // 2, gray // 3], axis=-1))
    write_tiff(tmp_path / "flat.tif", gray, spacing=(0.25, 0.25))
    np.save(tmp_path / "plain.npy", gray)
    movie = np.stack([np.clip(_cells((64, 72), seed=s)[0] * 2, 0, 255) for s in range(3)])
    write_tiff(tmp_path / "movie.tif", movie.astype(np.uint8), axes="TYX")
    marks = np.zeros(movie.shape, np.uint8)
    marks[1] = scribbles
    write_tiff(tmp_path / "movie_scribbles.tif", marks, axes="TYX")
    return tmp_path


def test_reading_2d_files(pictures):
    png = read_picture(pictures / "cells.png")
    assert png.picture().shape == (1, 64, 72) and png.result_shape == (64, 72)
    rgb = read_picture(pictures / "rgb.png")
    assert rgb.picture().shape == (3, 64, 72)
    flat = read_picture(pictures / "flat.tif")
    assert flat.spacing == pytest.approx((0.25, 0.25)) and flat.picture().shape == (1, 64, 72)
    movie = read_picture(pictures / "movie.tif", frames=True)
    assert movie.picture().shape == (3, 1, 64, 72) and movie.result_shape == (3, 64, 72)
    with pytest.raises(VolumeError, match="--frames for a stack of 2D frames"):
        read_picture(pictures / "movie.tif")
    iio.imwrite(pictures / "cells.jpg", iio.imread(pictures / "cells.png"), quality=95)
    jpeg = read_picture(pictures / "cells.jpg")
    assert jpeg.kind == "jpeg" and jpeg.picture().shape == (1, 64, 72)
    assert jpeg.picture().dtype == np.uint8
    assert is_2d_file(pictures / "cells.png") and is_2d_file(pictures / "plain.npy")
    assert not is_2d_file(pictures / "movie.tif")


def test_train_and_segment_2d_images(pictures, capsys):
    model_path = pictures / "m.safetensors"
    assert main(["train", str(pictures / "cells.png"), str(pictures / "cells_scribbles.png"),
                 "-o", str(model_path), "--spacing", "0.25", "0.25", "--steps", "60", "-q"]) == 0  # fmt: skip
    assert "a 2D model" in capsys.readouterr().out
    model = load_model(model_path)
    assert model.config.ndim == 2 and model.config.in_plane_spacing == (0.25, 0.25)
    out = pictures / "out"
    inputs = [pictures / n for n in ("cells.png", "flat.tif", "plain.npy")]
    assert main(["segment", str(model_path), *map(str, inputs), "-o", str(out), "--instances", "-q"]) == 0  # fmt: skip
    labels = tifffile.imread(out / "cells_labels.tif")
    gray = iio.imread(pictures / "cells.png")
    np.testing.assert_array_equal(labels, segment(gray, model).labels)
    assert np.load(out / "plain_labels.npy").shape == (64, 72)
    assert tifffile.imread(out / "flat_matte.tif").dtype == np.float32
    record = json.loads((out / "flat_pacseg.json").read_text())
    assert record["parameters"]["spacing_source"] == "ImageJ metadata"
    assert record["parameters"]["spacing"] == pytest.approx([0.25, 0.25])
    header = (out / "cells_objects.csv").read_text().splitlines()[0]
    assert "area" in header and "circularity" in header and "volume" not in header


def test_frames(pictures, capsys):
    model_path = pictures / "mf.safetensors"
    assert main(["train", str(pictures / "movie.tif"), str(pictures / "movie_scribbles.tif"),
                 "--frames", "-o", str(model_path), "--steps", "40", "-q"]) == 0  # fmt: skip
    model = load_model(model_path)
    assert model.config.ndim == 2
    out = pictures / "out"
    assert main(["segment", str(model_path), str(pictures / "movie.tif"), "--frames", "-o", str(out), "-q"]) == 0  # fmt: skip
    labels = tifffile.imread(out / "movie_labels.tif")
    movie = tifffile.imread(pictures / "movie.tif")
    assert labels.shape == movie.shape
    np.testing.assert_array_equal(labels[2], segment(movie[2], model).labels)
    # without --frames: the TIFF's T axis says it is a stack of frames; an NPY's shape does not
    assert main(["segment", str(model_path), str(pictures / "movie.tif"), "-o", str(pictures / "o2"), "-q"]) == 0  # fmt: skip
    np.testing.assert_array_equal(tifffile.imread(pictures / "o2" / "movie_labels.tif"), labels)
    np.save(pictures / "movie.npy", movie)
    capsys.readouterr()
    assert main(["segment", str(model_path), str(pictures / "movie.npy"), "-o", str(pictures / "o3")]) == 1  # fmt: skip
    assert "--frames for a stack of 2D frames" in capsys.readouterr().err


def test_2d_and_3d_mismatches_are_said(pictures, capsys):
    assert main(["segment", str(DEMO_MODEL_FILE), str(pictures / "cells.png"), "-o", str(pictures / "o")]) == 1  # fmt: skip
    assert "a PNG is a 2D image" in capsys.readouterr().err
    assert main(["segment", str(DEMO_MODEL_FILE), str(pictures / "movie.tif"), "--frames", "-o", str(pictures / "o")]) == 2  # fmt: skip
    assert "2D model" in capsys.readouterr().err
    assert main(["segment", str(DEMO_MODEL_FILE), str(pictures / "cells.png"), "--spacing", "1", "-o", str(pictures / "o")]) == 2  # fmt: skip
    assert "--spacing takes 3 numbers" in capsys.readouterr().err
    rgb_marks = pictures / "rgb.png"
    assert main(["train", str(pictures / "cells.png"), str(rgb_marks), "-o", str(pictures / "x.safetensors")]) == 1  # fmt: skip
    assert "one channel of integer labels" in capsys.readouterr().err
    iio.imwrite(pictures / "marks.jpg", iio.imread(pictures / "cells_scribbles.png"))
    assert main(["train", str(pictures / "cells.png"), str(pictures / "marks.jpg"), "-o", str(pictures / "y.safetensors")]) == 1  # fmt: skip
    assert "JPEG scribbles are refused" in capsys.readouterr().err
    # a folder of volumes with a thumbnail beside them: a volume model leaves the PNG alone
    folder = pictures / "vols"
    folder.mkdir()
    np.save(folder / "vol.npy", np.zeros((4, 32, 32), np.uint16))
    iio.imwrite(folder / "thumbnail.png", np.zeros((8, 8), np.uint8))
    assert main(["segment", str(DEMO_MODEL_FILE), str(folder), "-o", str(pictures / "ov"), "-q"]) == 0  # fmt: skip
    assert not (pictures / "ov" / "thumbnail_labels.tif").exists()
    # a one-plane volume (an NPY (1, H, W)) trains a volume model, as train() does
    np.save(pictures / "one.npy", iio.imread(pictures / "cells.png")[None])
    np.save(pictures / "one_marks.npy", iio.imread(pictures / "cells_scribbles.png")[None])
    assert not is_2d_file(pictures / "one.npy")
    assert main(["train", str(pictures / "one.npy"), str(pictures / "one_marks.npy"), "-o", str(pictures / "v.safetensors"), "-q", "--steps", "20"]) == 0  # fmt: skip
    assert load_model(pictures / "v.safetensors").config.ndim == 3
