"""Edges of the command line a newcomer meets: the demo's suggested commands, `pacseg --help`
without the heavy imports, the headless demo's folder, `--frames` from a TIFF's axes, folder
runs that say what they skip."""

from __future__ import annotations

import shlex
import subprocess
import sys

import numpy as np
import pytest

from napari_pacseg import segment, train
from napari_pacseg.cli import build_parser, main
from napari_pacseg.io.model_file import load_model, save_model
from napari_pacseg.io.volumes import write_tiff
from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample_2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = (slice(96, 224), slice(0, 128))  # a window of the 2D sample with both classes painted


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    """A small 2D model file trained on the 2D sample's window (pixel size 0.4 um)."""
    s = load_sample_2d()
    model = train(s.image[WINDOW], s.scribbles[WINDOW], spacing=s.spacing, steps=20, device="cpu")
    path = tmp_path_factory.mktemp("model") / "cells.safetensors"
    save_model(model, path)
    return path


def test_the_demo_suggests_a_train_command_that_names_the_classes(tmp_path, capsys):
    assert main(["demo", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    command = next(line.strip() for line in lines if line.strip().startswith("pacseg train"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.class_names == ["background", "nucleus"]
    assert [str(p) for p in args.pairs] == [
        str(tmp_path / "nuclei.tif"),
        str(tmp_path / "nuclei_scribbles.tif"),
    ]


def test_help_needs_no_torch():
    """`pacseg --help` and `--version` load no torch (seconds of imports): the commands'
    options are only built when a command is named."""
    code = (
        "import sys\nfrom napari_pacseg.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
    assert "segment volumes with a model" in out.stdout  # the commands are listed
    # and the help lists what the full parser lists
    assert build_parser(commands_only=True).format_help() == build_parser().format_help()


def test_the_public_api_still_imports_by_name():
    import napari_pacseg

    for name in napari_pacseg.__all__:
        assert getattr(napari_pacseg, name) is not None
    assert set(napari_pacseg.__all__) <= set(dir(napari_pacseg))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        napari_pacseg.nothing  # noqa: B018


def test_instances_help_names_every_kind_of_input():
    seg = build_parser()._subparsers._group_actions[0].choices["segment"]
    text = " ".join(seg.format_help().split())
    assert "TIFF and NPY inputs" not in text
    assert "any input: volumes, zarr, 2D images, frames" in text


def test_the_headless_demo_writes_into_a_named_folder_and_never_over_files(tmp_path, capsys):
    pytest.importorskip("napari")
    from napari_pacseg._napari import demo

    args = demo.build_parser().parse_args(["--headless"])
    assert args.headless == demo.HEADLESS_OUT and str(demo.HEADLESS_OUT) == "pacseg-demo-output"
    assert demo.build_parser().parse_args(["--headless", str(tmp_path)]).headless == tmp_path
    (tmp_path / "labels.npy").write_bytes(b"someone's labels")
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--headless", str(tmp_path)])
    assert exit_.value.code == 2
    assert "already holds labels.npy; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "labels.npy").read_bytes() == b"someone's labels"


def _movie(folder):
    """A TIFF time-lapse (ImageJ axes TYX, 0.4 um pixels) of 3 frames of the 2D sample."""
    s = load_sample_2d()
    frame = s.image[WINDOW]
    movie = np.stack([frame, np.roll(frame, 7, axis=0), np.roll(frame, 13, axis=1)])
    write_tiff(folder / "movie.tif", movie.astype(np.uint16), (0.4, 0.4), axes="TYX")
    marks = np.zeros(movie.shape, np.uint8)
    marks[1] = np.roll(s.scribbles[WINDOW], 7, axis=0)
    write_tiff(folder / "movie_scribbles.tif", marks, (0.4, 0.4), axes="TYX")
    return movie


def test_frames_are_inferred_from_a_tiffs_time_axis(tmp_path, model_2d, capsys):
    import tifffile

    movie = _movie(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(model_2d), str(tmp_path / "movie.tif"), "-o", str(out), "-q"]) == 0
    labels = tifffile.imread(out / "movie_labels.tif")
    model = load_model(model_2d)
    want = segment(movie, model, spacing=(0.4, 0.4), frame_axis=0).labels
    np.testing.assert_array_equal(labels, want)
    # training too: the painted frames of a TYX TIFF train a 2D model without --frames
    trained = tmp_path / "movie.safetensors"
    assert main(["train", str(tmp_path / "movie.tif"), str(tmp_path / "movie_scribbles.tif"),
                 "-o", str(trained), "--steps", "10", "-q"]) == 0  # fmt: skip
    assert load_model(trained).config.ndim == 2
    assert "a 2D model" in capsys.readouterr().out


def _mixed_folder(folder):
    """A folder with a volume (NPY), a 2D image (PNG), a 2D NPY and a TIFF time-lapse."""
    import imageio.v3 as iio

    folder.mkdir()
    s = load_sample_2d()
    np.save(folder / "vol.npy", np.stack([s.image[WINDOW][:32, :32]] * 4))
    iio.imwrite(folder / "thumbnail.png", (s.image[WINDOW] // 16).astype(np.uint8))
    np.save(folder / "plane.npy", s.image[WINDOW])
    _movie(folder)
    (folder / "movie_scribbles.tif").unlink()
    return folder


def test_a_volume_models_folder_run_says_what_it_skips(tmp_path, capsys):
    folder = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["segment", str(DEMO_MODEL_FILE), str(folder), "-o", str(out), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = sorted(line for line in lines if line.startswith("skipped"))
    assert skipped == [
        f"skipped {folder / 'movie.tif'}: a stack of 2D frames (its TIFF axes say T), and the "
        "model segments volumes; segment it with a 2D model",
        f"skipped {folder / 'plane.npy'}: a 2D image, and the model segments volumes; segment "
        "it with a 2D model",
        f"skipped {folder / 'thumbnail.png'}: a 2D image, and the model segments volumes; "
        "segment it with a 2D model",
    ]
    assert [line.split()[1] for line in lines if line.startswith("done")] == [
        str(folder / "vol.npy")
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "vol_labels.npy",
        "vol_matte.npy",
        "vol_pacseg.json",
    ]


def test_a_2d_models_folder_run_skips_volumes_and_does_the_rest(tmp_path, model_2d, capsys):
    folder = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["segment", str(model_2d), str(folder), "-o", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line for line in lines if line.startswith("skipped")] == [
        f"skipped {folder / 'vol.npy'}: a volume, and the model segments 2D images; segment it "
        "with a volume model, or pass --frames if it is a stack of 2D frames"
    ]
    done = sorted(line.split()[1] for line in lines if line.startswith("done"))
    assert done == [str(folder / n) for n in ("movie.tif", "plane.npy", "thumbnail.png")]
    assert "failed" not in captured.err
    # named on the command line, a volume still fails with its reason (it was asked for)
    assert main(["segment", str(model_2d), str(folder / "vol.npy"), "-o", str(out), "-q"]) == 1
    assert "a 2D model segments a 2D image" in capsys.readouterr().err
