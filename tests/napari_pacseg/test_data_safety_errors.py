"""Unclear errors made clear (issue 33): a full disk or a file-size limit, output folders that
cannot be written, a file or link at a zarr output path, an output inside an input, huge
numbers, callbacks and seeds that are not what they should be, ragged lists, multichannel
scribbles and duplicate class names. Each is one line that says what is wrong and what to do,
raised before any long work."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")

from napari_pacseg import save_model, segment, train  # noqa: E402
from napari_pacseg.batch import segment_files, segment_zarr  # noqa: E402
from napari_pacseg.cli import main  # noqa: E402
from napari_pacseg.engine.preview import RegionSegmenter  # noqa: E402
from napari_pacseg.engine.segment import receptive_field  # noqa: E402
from napari_pacseg.instances.labels import instance_labels  # noqa: E402
from napari_pacseg.io import atomic  # noqa: E402
from napari_pacseg.io import volumes as vio  # noqa: E402
from napari_pacseg.io.model_file import ModelFileError, config_from_dict, config_to_dict  # noqa: E402
from napari_pacseg.model.network import ModelConfig  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_demo_model, load_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (8, 40, 40)
ONE_CHANNEL = "scribbles must be one channel of integer labels"


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def image():
    return np.ascontiguousarray(load_sample().image[24 : 24 + SHAPE[0], :40, :40])


@pytest.fixture(scope="module")
def marks():
    out = np.zeros(SHAPE, np.uint8)
    out[0, :4, :4] = 1
    out[1, 10:14, 10:14] = 2
    return out


def digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder``, links as their targets, folders as markers."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[key] = "link to " + os.readlink(path)
            elif os.path.isdir(path):
                out[key] = "dir"
            else:
                with open(path, "rb") as fh:
                    out[key] = hashlib.sha256(fh.read()).hexdigest()
    return out


def write_zarr(path, data):
    arr = zarr.open_array(str(path), mode="w", shape=data.shape, chunks=(8, 20, 20),
                          dtype=data.dtype)  # fmt: skip
    arr[:] = data
    return path


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def no_temporaries(folder) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# --- a full disk, a quota, the file-size limit ---------------------------------------------------

FULL = {
    "ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), "no space left on"),
    "EFBIG": (OSError(errno.EFBIG, "File too large"), "the file-size limit was reached"),
    "EDQUOT": (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is exceeded"),
    "short write": (OSError("393216 requested and 114560 written"),
                    "no space left on {folder} (or the file-size limit was reached)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FULL))
def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, model, image, monkeypatch, case):
    error, message = FULL[case]

    def full(path):
        raise error

    monkeypatch.setattr(atomic, "_fsync", full)  # after the data is written, as on a full disk
    writers = {
        "a.npy": lambda p: vio.write_npy(p, image),
        "a.tif": lambda p: vio.write_tiff(p, image),
        "a.bin": lambda p: atomic.write_bytes(p, b"data"),
        "a.json": lambda p: atomic.write_json(p, {"a": 1}),
        "m.safetensors": lambda p: save_model(model, p),
    }
    for name, write in writers.items():
        with pytest.raises(OSError) as info:
            write(tmp_path / name)
        text = str(info.value)
        assert message.format(folder=tmp_path) in text and f"writing {name}" in text, text
        assert "free some space" in text or "raise the limit" in text
        assert "\n" not in text and ".tmp" not in text and "[Errno" not in text
    assert list(tmp_path.iterdir()) == []  # every temporary removed, nothing in place


def test_a_full_disk_during_a_zarr_run(tmp_path, model, image, monkeypatch):
    from napari_pacseg.batch import zarr_runs as batch_zarr

    src = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out"
    out.mkdir()

    def full(job, region):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch_zarr, "segment_chunk", full)
    with pytest.raises(OSError, match=f"no space left on {out} writing labels.zarr or matte.zarr"):
        segment_zarr(src, model, out / "labels.zarr", out / "matte.zarr", refine=False)
    assert list(out.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_real_file_size_limit(tmp_path, image):
    """A real limit (``ulimit -f``, SIGXFSZ ignored): numpy's short write (NPY) and zarr's
    EFBIG become one line each; no temporary is left."""
    np.save(tmp_path / "x.npy", image)
    write_zarr(tmp_path / "v.zarr", image)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))
        from napari_pacseg.cli import main
        sys.exit(main(["segment", {str(DEMO_MODEL_FILE)!r}, "x.npy", "v.zarr", "-o", "out",
                       "-q"]))
    """)  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300, check=False)  # fmt: skip
    failed = [line for line in proc.stderr.splitlines() if line.startswith("pacseg: failed")]
    assert proc.returncode == 1 and len(failed) == 2, proc.stderr
    folder = tmp_path / "out"
    zarr_line, npy = sorted(failed)  # failed: v.zarr: ..., failed: x.npy: ...
    assert f"no space left on {folder} (or the file-size limit was reached) writing " in npy
    assert "x.npy" in npy and "choose another output folder (-o)" in npy
    assert "the file-size limit was reached writing v_labels.zarr or v_matte.zarr" in zarr_line
    assert "Traceback" not in proc.stderr and no_temporaries(folder)


# --- output folders that cannot be written: refused before training ------------------------------


def test_train_checks_its_output_folder_before_training(tmp_path, image, marks, capsys,
                                                        monkeypatch):  # fmt: skip
    import napari_pacseg.training.fit

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(napari_pacseg.training.fit, "train", no_training)
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "marks.npy", marks)
    pair = [str(tmp_path / "img.npy"), str(tmp_path / "marks.npy")]

    def run(output, *extra):
        return main(["train", *pair, "-o", str(output), "-q", *extra])

    assert run(tmp_path / "nodir" / "m.safetensors") == 2
    assert f"the folder of -o {tmp_path / 'nodir'} does not exist" in one_line_error(capsys)
    (tmp_path / "d.safetensors").mkdir()
    assert run(tmp_path / "d.safetensors", "--overwrite") == 2
    assert "is a folder" in one_line_error(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != ro and real_access(p, mode))
    assert run(ro / "m.safetensors") == 2
    assert f"the folder of -o {ro} is not writable" in one_line_error(capsys)
    assert list(ro.iterdir()) == []


def test_save_model_into_a_folder_it_cannot_write(tmp_path, model, monkeypatch):
    def denied(self, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(PermissionError) as info:
        save_model(model, tmp_path / "m.safetensors")
    text = str(info.value)
    assert f"cannot write m.safetensors in the folder {tmp_path} (permission denied)" in text
    assert ".tmp" not in text
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=f"the folder {tmp_path / 'no'} does not exist"):
        save_model(model, tmp_path / "no" / "m.safetensors")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_for_real(tmp_path, model, image, marks, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "marks.npy", marks)
    ro.chmod(0o500)
    try:
        code = main(["train", str(tmp_path / "img.npy"), str(tmp_path / "marks.npy"), "-o",
                     str(ro / "m.safetensors"), "-q"])  # fmt: skip
        assert code == 2 and "is not writable" in one_line_error(capsys)
        with pytest.raises(PermissionError, match="permission denied"):
            save_model(model, ro / "m.safetensors")
    finally:
        ro.chmod(0o700)


# --- a file or a link at a zarr output path -------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_link_at_a_zarr_output_path(tmp_path, image, model, capsys, kind, monkeypatch):
    from napari_pacseg.batch import zarr_runs as batch_zarr

    write_zarr(tmp_path / "v.zarr", image)
    out = tmp_path / "out"
    out.mkdir()
    if kind == "file":
        (out / "v_labels.zarr").write_text("mine")
        what = "a file"
    else:
        (out / "real").mkdir()
        (out / "real" / "notes.txt").write_text("mine")
        (out / "v_labels.zarr").symlink_to("real")
        what = "a symbolic link"
    before = digest(out)

    def no_work(job, region):
        raise AssertionError("chunks were segmented")

    monkeypatch.setattr(batch_zarr, "segment_chunk", no_work)
    code = main(["segment", str(DEMO_MODEL_FILE), str(tmp_path / "v.zarr"), "-o", str(out), "-q",
                 "--overwrite"])  # fmt: skip
    line = one_line_error(capsys)
    assert code == 1 and f"{out / 'v_labels.zarr'} is {what}, not a folder" in line, line
    assert "move it away or choose another output folder" in line and "Errno" not in line
    assert digest(out) == before
    with pytest.raises(NotADirectoryError, match=f"is {what}"):
        segment_zarr(tmp_path / "v.zarr", model, out / "v_labels.zarr", overwrite=True)
    assert digest(out) == before


# --- an output inside an input names the input ----------------------------------------------------


def test_an_output_folder_inside_a_zarr_input_names_the_input(tmp_path, image, capsys):
    write_zarr(tmp_path / "v.zarr", image)
    before = digest(tmp_path)
    code = main(["segment", str(DEMO_MODEL_FILE), str(tmp_path / "v.zarr"), "-o",
                 str(tmp_path / "v.zarr"), "-q"])  # fmt: skip
    line = one_line_error(capsys)
    assert code == 2
    assert line.startswith(f"pacseg segment: error: {tmp_path / 'v.zarr'} is an input"), line
    assert "choose another output folder" in line
    assert digest(tmp_path) == before


# --- numbers are clipped ---------------------------------------------------------------------------


def test_a_tiny_spacing_gives_a_short_message(image, model, marks):
    for call in (
        lambda: segment(image, model, spacing=(1e-300, 1, 1)),
        lambda: receptive_field(model, (1e-300, 1, 1)),
        lambda: train(image, marks, spacing=(1e-300, 1, 1), steps=2),
    ):
        with pytest.raises(ValueError) as info:
            call()
        text = str(info.value)
        assert len(text) < 300 and "1e-300" in text and "spacing" in text, text


# --- callbacks and seeds, checked where they are passed ---------------------------------------------


def test_callbacks_are_checked_at_the_api_edge(tmp_path, image, model, marks):
    src = write_zarr(tmp_path / "in.zarr", image)
    calls = {
        "segment: progress": lambda: segment(image, model, progress=5),
        "segment: should_cancel": lambda: segment(image, model, should_cancel=5),
        "train: progress": lambda: train(image, marks, progress=5),
        "train: should_cancel": lambda: train(image, marks, should_cancel=5),
        "segment_zarr: progress": lambda: segment_zarr(src, model, tmp_path / "l.zarr", progress=5),
        "progress": lambda: segment_files([src], model, tmp_path / "o", progress=5),
        "instance_labels: should_cancel": lambda: instance_labels(
            np.zeros((4, 4), np.uint8), (1, 1), should_cancel=5
        ),
        "probabilities: progress": lambda: RegionSegmenter(image, model).probabilities(
            ((0, 1), (0, 8), (0, 8)), progress=5
        ),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value).startswith(f"{name} must be a callable"), str(info.value)
        assert str(info.value).endswith("got int 5")
    assert not (tmp_path / "o").exists() and not (tmp_path / "l.zarr").exists()


@pytest.mark.parametrize("seed", [2**70, -1, "x", 1.5, True, None])
def test_seeds_are_checked(image, marks, seed):
    with pytest.raises(ValueError, match=r"^train: seed must be an integer in \[0, 2\*\*63 - 1\]"):
        train(image, marks, steps=2, seed=seed)


def test_the_largest_seed_trains_and_the_cli_refuses_others(tmp_path, image, marks, capsys):
    train(image, marks, steps=2, seed=2**63 - 1)
    train(image, marks, steps=2, seed=np.int64(7))
    code = main(["train", "a.npy", "b.npy", "-o", str(tmp_path / "m.safetensors"), "--seed",
                 str(2**70)])  # fmt: skip
    assert code == 2 and "--seed: expected an integer in [0, 2**63 - 1]" in one_line_error(capsys)


# --- ragged lists -------------------------------------------------------------------------------


def test_a_ragged_list_is_named(image, model, marks):
    with pytest.raises(ValueError, match=r"^image: a ragged nested list \(rows of different"):
        segment([[1, 2], [3]], model)
    with pytest.raises(ValueError, match="ragged nested list"):
        segment([[[1, 2], [3]]], model, frame_axis=0)
    ragged = [m.tolist() for m in marks]
    ragged[0] = ragged[0][:-1]
    with pytest.raises(ValueError, match=r"^train: image 0: scribbles: a ragged nested list"):
        train([image], [ragged], steps=2)  # a list is a list of scribbles arrays


# --- multichannel scribbles, on every path ------------------------------------------------------------


def test_multichannel_scribbles_are_refused_on_every_path(tmp_path, image, marks, capsys):
    rgb = np.stack([marks] * 3, -1)
    for scribbles in (rgb, np.moveaxis(rgb, -1, 0)):  # (Z, Y, X, 3) and (3, Z, Y, X)
        with pytest.raises(ValueError, match=f"^train: {ONE_CHANNEL} .*got 3 channels"):
            train(image, scribbles, steps=2)
    with pytest.raises(ValueError, match=f"{ONE_CHANNEL} .*got 3 channels"):
        train(image[0], rgb[0], steps=2)  # a 2D image
    np.save(tmp_path / "img.npy", image)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.save(tmp_path / "rgb.npy", rgb)
    np.save(tmp_path / "plane.npy", image[0])
    tifffile.imwrite(tmp_path / "plane_rgb.tif", rgb[0], photometric="rgb")
    out = str(tmp_path / "m.safetensors")
    cases = {
        ("img.npy", "rgb.tif"): "got 3 channels",  # the volume path, an RGB TIFF
        ("img.npy", "rgb.npy"): "got a 4D array of shape (8, 40, 40, 3)",  # a 4D NPY
        ("plane.npy", "plane_rgb.tif"): "got 3 channels",  # the 2D path
    }
    for (img, scribbles), what in cases.items():
        code = main(["train", str(tmp_path / img), str(tmp_path / scribbles), "-o", out, "-q",
                     "--steps", "2"])  # fmt: skip
        line = one_line_error(capsys)
        assert code == 1 and f"{tmp_path / scribbles}: {ONE_CHANNEL}" in line and what in line
    assert not (tmp_path / "m.safetensors").exists()


# --- class names ---------------------------------------------------------------------------------


def test_duplicate_class_names_are_refused(tmp_path, image, marks, model, capsys):
    for names in (["a", "a"], ["nucleus", " nucleus "]):
        with pytest.raises(ValueError, match=r"^train: class_names: class names must be distinct"):
            train(image, marks, steps=2, class_names=names)
    with pytest.raises(ValueError, match="name must be a non-empty string, not only spaces"):
        train(image, marks, steps=2, class_names=["a", "  "])
    classes = model.config.classes
    with pytest.raises(ValueError, match="ModelConfig: classes: class names must be distinct"):
        ModelConfig(in_channels=1, classes=(classes[0], classes[0]))
    data = config_to_dict(model.config)
    data["classes"][1]["name"] = data["classes"][0]["name"]
    with pytest.raises(ModelFileError, match="class names must be distinct"):
        config_from_dict(data)
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "marks.npy", marks)
    code = main(["train", str(tmp_path / "img.npy"), str(tmp_path / "marks.npy"), "-o",
                 str(tmp_path / "m.safetensors"), "--class-names", "a", "a"])  # fmt: skip
    assert code == 2 and "--class-names: class names must be distinct" in one_line_error(capsys)
