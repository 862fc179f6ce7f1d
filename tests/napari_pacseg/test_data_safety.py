"""Data safety and bad input (issue 15): no user file is ever lost, no silent NaN, and every user
mistake is one clear error. The model-file corpus is in test_model_file_corpus.py, the kernels'
argument cases in tests/kernels/test_bad_arguments.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")

from napari_pacseg import save_model, segment, train  # noqa: E402
from napari_pacseg.batch import segment_zarr, source_paths  # noqa: E402
from napari_pacseg.cli import main  # noqa: E402
from napari_pacseg.io.atomic import remove_stale_temporaries, temporary_sibling  # noqa: E402
from napari_pacseg.io.volumes import (  # noqa: E402
    VolumeError,
    read_volume,
    write_tiff,
)
from napari_pacseg.model.network import RefineConfig, refine_params_schema  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_demo_model, load_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (8, 40, 40)
FAST = {"iterations": 1}
FLAGS = ("--iterations", 1)


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def image():
    return np.ascontiguousarray(load_sample().image[24 : 24 + SHAPE[0], :40, :40])


def digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (names relative to it), folders as markers."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = "dir"
        for f in files:
            path = os.path.join(root, f)
            if os.path.islink(path) and not os.path.exists(path):
                out[os.path.relpath(path, folder)] = "broken link"
                continue
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run(model_file, *args) -> int:
    return main(["segment", str(model_file), *map(str, args)])


# --- 1. an existing file at an output path ------------------------------------------------------


def test_a_users_file_named_like_an_output_is_never_replaced(tmp_path, image, capsys):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "cells.npy", image)
    truth = (image > image.mean()).astype(np.uint8)
    np.save(d / "cells_labels.npy", truth)  # the user's ground truth
    (d / "a_labels.npy").mkdir()  # a folder named like an output
    (d / "a_labels.npy" / "keep.txt").write_text("mine")
    np.save(d / "a.npy", image)
    before = digest(d)
    code = run(DEMO_MODEL_FILE, d / "cells.npy", d / "a.npy", "-o", d, "-q", "--iterations", 1)
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in "".join(err)
    assert all("was not written by pacseg" in line and "--overwrite" in line for line in err)
    assert digest(d) == before  # nothing touched, not even a record
    # With --overwrite the user asked for it: replaced.
    assert run(DEMO_MODEL_FILE, d / "cells.npy", "-o", d, "-q", "--iterations", 1,
               "--overwrite") == 0  # fmt: skip
    assert not np.array_equal(np.load(d / "cells_labels.npy"), truth)
    assert np.load(d / "cells.npy").tobytes() == image.tobytes()


def test_a_foreign_record_is_not_taken_for_ours(tmp_path, image, capsys):
    np.save(tmp_path / "x.npy", image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_pacseg.json").write_text('{"my": "notes"}')
    before = digest(out)
    assert run(DEMO_MODEL_FILE, tmp_path / "x.npy", "-o", out, "-q") == 1
    assert "not pacseg's record of this input" in capsys.readouterr().err
    assert digest(out) == before


def test_zarr_outputs_never_replace_a_users_folder(tmp_path, image, capsys):
    inp = tmp_path / "vol.zarr"
    zarr.open_array(str(inp), mode="w", shape=image.shape, chunks=(8, 20, 20), dtype=image.dtype)[
        :
    ] = image
    out = tmp_path / "out"
    (out / "vol_labels.zarr").mkdir(parents=True)
    (out / "vol_labels.zarr" / "notes.txt").write_text("precious")
    before = digest(out)
    assert run(DEMO_MODEL_FILE, inp, "-o", out, "-q", "--chunks", 8, 40, 40) == 1
    assert "vol_labels.zarr exists and was not written by pacseg" in capsys.readouterr().err
    assert digest(out) == before


# --- 2. segment_zarr never replaces its input --------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "zarr.Array", "dask", "dask inline", "group member"])
def test_segment_zarr_refuses_its_input_as_output(tmp_path, image, model, kind):
    import dask.array as da

    if kind == "group member":
        group = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
        arr = group.create_array("0", shape=image.shape, chunks=(8, 20, 20), dtype=image.dtype)
    else:
        arr = zarr.open_array(
            str(tmp_path / "in.zarr"), mode="w", shape=image.shape, chunks=(8, 20, 20),
            dtype=image.dtype,
        )  # fmt: skip
    arr[:] = image
    source = {
        "path": tmp_path / "in.zarr",
        "zarr.Array": arr,
        "dask": da.from_zarr(arr) + 0,
        "dask inline": da.from_zarr(arr, inline_array=True)[::1] * 1,
        "group member": arr,
    }[kind]
    if kind == "group member":
        source = arr
    before = digest(tmp_path)
    with pytest.raises(ValueError, match="would overwrite the input"):
        segment_zarr(source, model, tmp_path / "in.zarr", overwrite=True, refine=False)
    assert digest(tmp_path) == before
    assert next(p.resolve() for p in source_paths(source)).is_relative_to(
        (tmp_path / "in.zarr").resolve()
    )


# --- 3. resume when the output folder is the input folder ----------------------------------------


def test_resume_in_the_input_folder(tmp_path, image, capsys, monkeypatch):
    from napari_pacseg.batch import files as batch_module

    np.save(tmp_path / "x.npy", image)
    real = batch_module.write_npy

    def crash_on_matte(path, *args, **kwargs):
        if str(path).endswith("_matte.npy"):
            raise KeyboardInterrupt  # the process dies after writing x_labels.npy
        return real(path, *args, **kwargs)

    monkeypatch.setattr(batch_module, "write_npy", crash_on_matte)
    assert run(DEMO_MODEL_FILE, tmp_path, "-o", tmp_path, "-q", "--iterations", 1) == 130
    assert (tmp_path / "x_labels.npy").exists() and not (tmp_path / "x_matte.npy").exists()
    monkeypatch.setattr(batch_module, "write_npy", real)
    capsys.readouterr()
    assert run(DEMO_MODEL_FILE, tmp_path, "-o", tmp_path, "-q", "--iterations", 1) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done") and "x.npy" in lines[0]
    assert json.loads((tmp_path / "x_pacseg.json").read_text())["status"] == "complete"
    assert run(DEMO_MODEL_FILE, tmp_path, "-o", tmp_path, "-q", "--iterations", 1) == 0
    assert capsys.readouterr().out.startswith("skipped")  # the outputs are not new inputs


def test_resume_with_a_shell_expanded_pattern(tmp_path, image, capsys):
    np.save(tmp_path / "a.npy", image)
    assert run(DEMO_MODEL_FILE, tmp_path / "a.npy", "-o", tmp_path, "-q", "--iterations", 1) == 0
    capsys.readouterr()
    expanded = sorted(tmp_path.glob("*.npy"))  # what the shell makes of *.npy: the outputs too
    assert len(expanded) == 3
    assert run(DEMO_MODEL_FILE, *expanded, "-o", tmp_path, "-q", "--iterations", 1) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(line.startswith("skipped") for line in out)
    assert sum("a pacseg output of a.npy" in line for line in out) == 2


@pytest.mark.parametrize(
    ("named", "extra"),
    [("a_labels.npy", ()), ("a_matte.npy", ()), ("a_instances.npy", ("--instances",))],
)
def test_a_file_named_as_an_input_is_never_replaced(tmp_path, image, capsys, named, extra):
    """A file is an input because the user named it, whatever its name looks like: with
    --overwrite too, and whether pacseg segments it or not."""
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "a.npy", image)
    np.save(d / named, (image > image.mean()).astype(np.uint8))  # the user's own file
    before = digest(d)
    code = run(DEMO_MODEL_FILE, d / "a.npy", d / named, "-o", d, "-q", "--overwrite", *FLAGS,
               *extra)  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would overwrite the input" in err[0] and named in err[0]
    assert digest(d) == before


def test_a_zarr_named_as_an_input_is_never_replaced(tmp_path, image, capsys):
    d = tmp_path / "d"
    for name in ("v.zarr", "v_labels.zarr"):
        arr = zarr.open_array(str(d / name), mode="w", shape=image.shape, chunks=(8, 20, 20),
                              dtype=image.dtype)  # fmt: skip
        arr[:] = image
    before = digest(d)
    code = run(DEMO_MODEL_FILE, d / "v.zarr", d / "v_labels.zarr", "-o", d, "-q", "--overwrite",
               "--chunks", 8, 40, 40, *FLAGS)  # fmt: skip
    assert code == 2 and "would overwrite the input" in capsys.readouterr().err
    assert digest(d) == before


def test_pacseg_outputs_named_with_overwrite_are_not_replaced(tmp_path, image, capsys):
    """A shell-expanded pattern names pacseg's own outputs: they are skipped, and --overwrite
    does not replace them either (the input that would is failed, nothing is touched)."""
    np.save(tmp_path / "a.npy", image)
    assert run(DEMO_MODEL_FILE, tmp_path / "a.npy", "-o", tmp_path, "-q", *FLAGS) == 0
    capsys.readouterr()
    expanded = sorted(tmp_path.glob("*.npy"))
    before = digest(tmp_path)
    code = run(DEMO_MODEL_FILE, *expanded, "-o", tmp_path, "-q", "--overwrite", *FLAGS)
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out.count("skipped") == 2
    assert "was named as an input" in captured.err and "a_labels.npy" in captured.err
    assert digest(tmp_path) == before


def test_another_file_of_the_same_name_size_and_time_is_not_taken_for_done(
    tmp_path, image, capsys
):
    """Two files from one archive: the same name, size and modification time, other content."""
    first, second = tmp_path / "x1", tmp_path / "x2"
    first.mkdir()
    second.mkdir()
    np.save(first / "a.npy", image)
    np.save(second / "a.npy", image[::-1].copy())
    stat = (first / "a.npy").stat()
    os.utime(second / "a.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    out = tmp_path / "out"
    assert run(DEMO_MODEL_FILE, first / "a.npy", "-o", out, "-q", *FLAGS) == 0
    before = digest(out)
    capsys.readouterr()
    assert run(DEMO_MODEL_FILE, second / "a.npy", "-o", out, "-q", *FLAGS) == 1
    assert "not pacseg's record of this input" in capsys.readouterr().err
    assert digest(out) == before


def test_an_input_changed_in_place_is_redone(tmp_path, image, capsys):
    np.save(tmp_path / "a.npy", image)
    out = tmp_path / "out"
    assert run(DEMO_MODEL_FILE, tmp_path / "a.npy", "-o", out, "-q", *FLAGS) == 0
    first = np.load(out / "a_labels.npy")
    np.save(tmp_path / "a.npy", image[:, ::-1].copy())
    capsys.readouterr()
    assert run(DEMO_MODEL_FILE, tmp_path / "a.npy", "-o", out, "-q", *FLAGS) == 0
    assert capsys.readouterr().out.startswith("done")
    assert np.array_equal(np.load(out / "a_labels.npy"), first[:, ::-1])
    record = json.loads((out / "a_pacseg.json").read_text())
    assert record["input_digest"].startswith("sha256:")


def test_input_digest_of_large_files_and_folders(tmp_path, monkeypatch):
    from napari_pacseg.io import provenance

    monkeypatch.setattr(provenance, "WHOLE_HASH_BYTES", 1 << 12)
    monkeypatch.setattr(provenance, "END_BYTES", 1 << 10)
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 1 << 14, dtype=np.uint8).tobytes())
    (tmp_path / "big").write_bytes(bytes(data))
    base = provenance.input_digest(tmp_path / "big")
    data[-1] ^= 1  # the last MiB is read
    (tmp_path / "big").write_bytes(bytes(data))
    assert provenance.input_digest(tmp_path / "big") != base
    folder = tmp_path / "v.zarr"
    (folder / "0").mkdir(parents=True)
    (folder / "0" / "0.0").write_bytes(b"abc")
    (folder / ".zarray").write_text("{}")
    digest_a = provenance.input_digest(folder)
    (folder / "0" / "0.0").write_bytes(b"abd")
    assert provenance.input_digest(folder) != digest_a


def test_a_failed_overwrite_run_restores_the_record(tmp_path, image, capsys):
    """--overwrite on an input that then fails must not leave a record claiming the user's
    file, so a later run without --overwrite still refuses to replace it."""
    d = tmp_path / "d"
    d.mkdir()
    bad = image.astype(np.float32)
    bad[0, 0, 0] = np.nan
    np.save(d / "cells.npy", bad)
    np.save(d / "cells_labels.npy", np.ones(image.shape, np.uint16))  # the user's
    (d / "cells_pacseg.json").write_text('{"my": "own notes"}')
    before = digest(d)
    assert run(DEMO_MODEL_FILE, d / "cells.npy", "-o", d, "-q", "--overwrite") == 1
    assert digest(d) == before
    np.save(d / "cells.npy", image)
    before = digest(d)
    assert run(DEMO_MODEL_FILE, d / "cells.npy", "-o", d, "-q", "--iterations", 1) == 1
    assert "not pacseg's record" in capsys.readouterr().err
    assert digest(d) == before


def test_a_moved_project_still_resumes(tmp_path, image, capsys):
    project = tmp_path / "p"
    project.mkdir()
    np.save(project / "a.npy", image)
    assert (
        run(DEMO_MODEL_FILE, project / "a.npy", "-o", project / "out", "-q", "--iterations", 1) == 0
    )
    moved = tmp_path / "moved"
    project.rename(moved)
    capsys.readouterr()
    assert run(DEMO_MODEL_FILE, moved / "a.npy", "-o", moved / "out", "-q", "--iterations", 1) == 0
    assert capsys.readouterr().out.startswith("skipped")


def test_a_malformed_record_fails_its_input_only(tmp_path, image, capsys):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_pacseg.json").write_text(
        json.dumps({"format": "napari-pacseg-result", "input": "x", "outputs": {"labels": ["x"]}})
    )
    code = run(DEMO_MODEL_FILE, tmp_path / "a.npy", tmp_path / "b.npy", "-o", out, "-q",
               "--iterations", 1)  # fmt: skip
    assert code == 1
    assert "not pacseg's record" in capsys.readouterr().err
    assert (out / "b_pacseg.json").exists()


def test_output_folder_link_loops(tmp_path, image, capsys):
    np.save(tmp_path / "x.npy", image)
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for out in ("loop", "dangling"):
        assert run(DEMO_MODEL_FILE, tmp_path / "x.npy", "-o", tmp_path / out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "symbolic link" in err[0] and "Traceback" not in err[0]


# --- 4. temporaries of killed runs ---------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "v_labels.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    mine = temporary_sibling(target)
    stale = mine.with_name(mine.name.replace(f".{os.getpid()}-", f".{pid}-"))
    old_style = tmp_path / f".v_labels.zarr.{pid}-0123abcd.tmp"  # written before hosts were named
    other_host = tmp_path / f".v_labels.zarr.{pid}-0123abcd@elsewhere.tmp"
    other_name = tmp_path / f".other.zarr.{pid}-0123abcd.tmp"  # another output's, also dead
    not_ours = tmp_path / ".notes.tmp"
    for p in (mine, stale, old_style, other_host, other_name, not_ours):
        p.mkdir()
        (p / "chunk").write_bytes(b"x")
    removed = remove_stale_temporaries(target)
    assert sorted(removed) == sorted([stale, old_style, other_name])
    assert mine.exists() and other_host.exists() and not_ours.exists()
    assert remove_stale_temporaries(target) == []  # a folder is scanned once per process


def test_sigkilled_zarr_run_leaves_nothing_after_the_rerun(tmp_path, image):
    inp = tmp_path / "vol.zarr"
    zarr.open_array(str(inp), mode="w", shape=image.shape, chunks=(8, 20, 20), dtype=image.dtype)[
        :
    ] = image
    out = tmp_path / "out"
    script = (
        "import os, signal\n"
        "from napari_pacseg.batch import zarr_runs as batch_zarr\n"
        "def die(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "batch_zarr.segment_chunk = die\n"
        "from napari_pacseg.cli import main\n"
        f"main(['segment', {str(DEMO_MODEL_FILE)!r}, {str(inp)!r}, '-o', {str(out)!r}, '-q'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert proc.returncode == -9
    assert [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the killed run's folders
    assert run(DEMO_MODEL_FILE, inp, "-o", out, "-q", "--iterations", 1, "--chunks", 8, 40, 40) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["vol_labels.zarr", "vol_matte.zarr", "vol_pacseg.json"]


# --- 5 and 7. silent wrong results become errors --------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda im: im.astype(np.float64) * 1e37, "beyond the float32 range"),
        (lambda im: np.where(im > im.mean(), 3e38, -3e38).astype(np.float32), "float32 range"),
        (lambda im: im.astype(np.complex64), "complex dtype"),
        (lambda im: np.where(im > im.mean(), np.nan, 1.0), "NaN or infinite"),
        (lambda im: "image.tif", "must be an array"),
        (lambda im: im.astype(object), "numeric image"),
    ],
)
def test_images_that_would_give_nan_are_refused(image, model, make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        segment(make(image), model)


@pytest.mark.parametrize(
    ("refine", "message"),
    [
        ({"temperature": 1e-300}, "temperature must be a number in"),
        ({"guide_sigma": 1e-300}, "guide_sigma must be a number in"),
        ({"compat": 1e300}, "compat must be a number in"),
        ({"compat": -1e300}, "compat must be a number in"),
        ({"iterations": True}, "iterations must be an int"),
        ({"kernel_size": "5"}, "kernel_size must be an odd int"),
        ({"spatial_sigma": float("nan")}, "spatial_sigma must be None or a number"),
        ({"iterations": 50, "kernel_size": 15}, "refinement too costly"),
        ({"iterations": 40, "kernel_size": 3, "dilation": 8, "wide": True}, "limit 16x"),
        ({"bogus": 1}, "unknown parameters"),
    ],
)
def test_refinement_out_of_range_is_refused(image, model, refine, message):
    refine = dict(refine)
    if refine.pop("wide", False):  # wider than the default tiles, so the reach matters
        image = np.random.default_rng(0).normal(100, 10, (8, 600, 600)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        segment(image, model, refine=refine)


def test_long_reach_is_fine_when_the_tiles_hold_the_volume(image, model):
    # 50 iterations of a 3x5x5 window reach (50, 100, 100) voxels: one tile holds this volume
    result = segment(image, model, refine={"iterations": 50})
    assert np.isfinite(result.matte).all()


def test_refine_ranges_are_in_the_docstring_and_the_cli_help(capsys):
    doc = " ".join(RefineConfig.__doc__.split())
    assert main(["segment", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name, spec in refine_params_schema().items():
        low, high = spec.low, spec.high
        assert f"{name}" in doc and f"[{low:g}, {high:g}]" in doc, name
        assert f"({low:g}-{high:g}" in help_text, name


def test_huge_first_layer_weights_give_an_error_not_nan(image, model, tmp_path, capsys):
    broken = load_demo_model()
    with torch.no_grad():
        broken.head.layers[0].weight.fill_(3e38)
    with pytest.raises(ValueError, match="non-finite logits"):
        segment(image, broken, refine=FAST)
    np.save(tmp_path / "x.npy", image)
    save_model(broken, tmp_path / "m.safetensors")
    assert run(tmp_path / "m.safetensors", tmp_path / "x.npy", "-o", tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite logits" in err[0]
    assert not list((tmp_path / "out").glob("x_labels*"))


def scribbled(shape):
    marks = np.zeros(shape, np.uint8)
    marks[0, :4, :4] = 1
    marks[1, 10:14, 10:14] = 2
    return marks


def test_strings_where_numbers_are_meant(image, model):
    marks = scribbled(image.shape)
    with pytest.raises(ValueError, match="spacing must be 3"):
        segment(image, model, spacing="111")
    with pytest.raises(ValueError, match="hidden"):
        train(image, marks, hidden="64", steps=2)
    with pytest.raises(ValueError, match="class_names must be a list"):
        train(image, marks, class_names="ab", steps=2)
    with pytest.raises(ValueError, match="tile_shape"):
        segment(image, model, tile_shape=(8, "a", 8))
    with pytest.raises(ValueError, match="steps must be an integer"):
        train(image, marks, steps=2.5)


# --- 9. absurd scribble labels ---------------------------------------------------------------


@pytest.mark.parametrize("value", [10**9, 2**62, 10**7, 256])
def test_huge_scribble_labels_are_refused_briefly(image, value):
    marks = np.zeros(image.shape, np.int64)
    marks[0, :3, :3] = 1
    marks[1, :3, :3] = 2
    marks[2, 0, 0] = value
    with pytest.raises(ValueError, match="at most 255") as info:
        train(image, marks, steps=2)
    assert len(str(info.value)) < 300 and str(value) in str(info.value)


# --- 12 and 13. messages that used to leak internals ---------------------------------------------


def test_api_messages(image, model, tmp_path):
    ref = segment(image, model, refine=FAST)
    by_path = segment(image, str(DEMO_MODEL_FILE), refine=FAST)  # a path is accepted
    np.testing.assert_array_equal(by_path.labels, ref.labels)
    with pytest.raises(TypeError, match="PacSegModel or the path of a model file"):
        segment(image, 42)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            segment(image, model, device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        segment(image, model, device="gpu0")
    with pytest.raises(ValueError, match="channel_axis must be an integer in"):
        segment(image[None], model, channel_axis=7)
    with pytest.raises(ValueError) as info:
        segment(image, model, tile_shape=(10**300, 8, 8))
    assert len(str(info.value)) < 200


def test_negative_strides_are_accepted(image, model):
    flipped = np.flip(image.astype(np.float32), 0)
    ref = segment(np.ascontiguousarray(flipped), model, refine=FAST)
    got = segment(flipped, model, refine=FAST)
    np.testing.assert_array_equal(got.labels, ref.labels)
    marks = np.flip(scribbled(image.shape), 1)
    model_a = train(flipped, marks, steps=3)
    model_b = train(np.ascontiguousarray(flipped), np.ascontiguousarray(marks), steps=3)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def test_windows_deeper_than_the_volume(model):
    thin = np.ascontiguousarray(load_sample().image[30:32, :40, :40])  # 2 planes: z taps <= 1
    wide = segment(thin, model, spacing=(0.4, 0.4, 0.4), refine={"iterations": 2})
    assert np.isfinite(wide.matte).all() and wide.labels.shape == thin.shape


# --- readers: truncated and damaged files ----------------------------------------------------


def test_truncated_tiff_says_truncated(tmp_path, image):
    write_tiff(tmp_path / "a.tif", image, spacing=(1, 0.4, 0.4))
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated"):
        read_volume(tmp_path / "cut.tif")


def test_bad_ome_physical_size_needs_spacing_but_stays_readable(tmp_path, image, capsys):
    tifffile.imwrite(tmp_path / "o.ome.tif", image, metadata={"axes": "ZYX"}, ome=True)
    with tifffile.TiffFile(tmp_path / "o.ome.tif") as tif:
        xml = tif.ome_metadata
    xml = xml.replace("<Pixels ", '<Pixels PhysicalSizeX="abc" PhysicalSizeY="0.4" ', 1)
    tifffile.imwrite(tmp_path / "o.ome.tif", image, description=xml, metadata=None)
    vol = read_volume(tmp_path / "o.ome.tif")
    assert vol.spacing is None and "PhysicalSizeX='abc'" in vol.spacing_problem
    out = tmp_path / "out"
    assert run(DEMO_MODEL_FILE, tmp_path / "o.ome.tif", "-o", out, "-q") == 1
    assert "--spacing" in capsys.readouterr().err
    assert run(DEMO_MODEL_FILE, tmp_path / "o.ome.tif", "-o", out, "-q", "--iterations", 1,
               "--spacing", 1, 0.4, 0.4) == 0  # fmt: skip


def test_corrupt_zarr_chunk_is_named(tmp_path, image, model, capsys):
    inp = tmp_path / "vol.zarr"
    arr = zarr.open_array(str(inp), mode="w", shape=image.shape, chunks=(4, 20, 20), dtype="f4")
    arr[:] = image
    chunk = inp / "c" / "1" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[4:12] = b"\xff" * 8
    chunk.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match=r"chunk \(1, 0, 1\).*cannot be decoded"):
        segment_zarr(inp, model, tmp_path / "l.zarr", refine=False)
    assert run(DEMO_MODEL_FILE, inp, "-o", tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vol.zarr" in err[0] and "chunk (1, 0, 1)" in err[0]


# --- 11. the command: one line per user error, documented exit codes, nothing touched ------------


def test_cli_on_a_folder_of_mixed_inputs(tmp_path, image, capsys):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "good.npy", image)
    write_tiff(d / "good2.tif", image, spacing=(1, 0.4, 0.4))
    (d / "broken.tif").write_bytes(b"II*\0garbage")
    np.save(d / "flat.npy", np.zeros((4, 5)))
    np.save(d / "nan.npy", np.full(SHAPE, np.nan, np.float32))
    np.save(d / "complex.npy", image.astype(np.complex64))
    np.save(d / "objects.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    (d / "empty.npy").write_bytes(b"")
    big = zarr.open_array(str(d / "big.zarr"), mode="w", shape=SHAPE, chunks=SHAPE, dtype="f8")
    big[:] = image * 1e37
    os.symlink(d / "loop_b.npy", d / "loop_a.npy")
    os.symlink(d / "loop_a.npy", d / "loop_b.npy")
    os.symlink(d / "nowhere.npy", d / "dangling.npy")
    before = digest(d)
    out = tmp_path / "out"
    code = run(DEMO_MODEL_FILE, d, d / "loop_a.npy", "-o", out, "--iterations", 1, "-q")
    assert code == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and all(e.startswith("pacseg: failed: ") for e in err)
    failed = sorted(line.split(": ")[2].rsplit("/", 1)[-1] for line in err)
    assert failed == sorted(["broken.tif", "nan.npy", "complex.npy", "objects.npy",
                             "empty.npy", "loop_a.npy", "loop_b.npy", "dangling.npy",
                             "big.zarr"])  # fmt: skip
    # a 2D image found in the folder is not this volume model's input: skipped, said so
    assert any("skipped" in line and "flat.npy" in line for line in captured.out.splitlines())
    assert digest(d) == before
    done = sorted(p.name for p in out.glob("*_pacseg.json"))
    assert done == ["good2_pacseg.json", "good_pacseg.json"]
    for matte in (np.load(out / "good_matte.npy"), tifffile.imread(out / "good2_matte.tif")):
        assert np.isfinite(matte).all() and 0 <= matte.min() <= matte.max() <= 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{tmp}/afile/sub"], "cannot create the output folder"),
        (["-o", "{tmp}/afile"], "is a file"),
        (["-o", "{tmp}/o", "--iterations", "1" + "0" * 300], "expected a value in [0, 50]"),
        (["-o", "{tmp}/o", "--temperature", "1e-300"], "expected a value in [0.1, 100]"),
        (["-o", "{tmp}/o", "--spacing", "1", "nan", "1"], "expected a positive number"),
        (["-o", "{tmp}/o", "--device", "cuda:9"], "--device"),
    ],
)
def test_cli_usage_errors_are_one_line(tmp_path, image, capsys, args, message):
    np.save(tmp_path / "x.npy", image)
    (tmp_path / "afile").write_text("a file")
    args = [a.format(tmp=tmp_path) for a in args]
    code = run(DEMO_MODEL_FILE, tmp_path / "x.npy", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) in (1, 2) and message in err[-1], err  # argparse adds usage
    assert "Traceback" not in "".join(err) and len(err[-1]) < 300


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent(tmp_path, image, capsys):
    np.save(tmp_path / "x.npy", image)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run(DEMO_MODEL_FILE, tmp_path / "x.npy", "-o", ro / "out") == 2
        assert "cannot create the output folder" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_printed_text_cannot_drive_the_terminal():
    from napari_pacseg.cli import printable

    assert printable("a\x1b[31mred\x1b[0m\nb") == "a\\x1b[31mred\\x1b[0m\\nb"
    assert printable("\ud800x") == "\\ud800x" and printable("núcleo") == "núcleo"


def test_info_on_a_terminal_that_cannot_show_the_names(tmp_path):
    model = load_demo_model()
    names = [
        dataclasses.replace(c, name=n) for c, n in zip(model.config.classes, ["fond", "núcleo"])
    ]
    model.config = dataclasses.replace(model.config, classes=tuple(names))
    save_model(model, tmp_path / "m.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "napari_pacseg.cli", "info", str(tmp_path / "m.safetensors")],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2=n\\xfacleo" in proc.stdout


def test_cli_without_a_traceback_for_a_folder_as_model(tmp_path, image, capsys):
    np.save(tmp_path / "x.npy", image)
    code = main(["segment", str(tmp_path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_save_model_never_replaces_a_folder(tmp_path, model):
    folder = tmp_path / "m.safetensors"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "precious.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match="a file never replaces a folder"):
        save_model(model, folder)
    assert (folder / "sub" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_another_input_of_the_same_name_is_not_taken_for_done(tmp_path, image, capsys):
    for sub, data in (("a", image), ("b", image[:, ::-1].copy())):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "x.npy", data)
    out = tmp_path / "out"
    assert run(DEMO_MODEL_FILE, tmp_path / "a" / "x.npy", "-o", out, "-q", "--iterations", 1) == 0
    capsys.readouterr()
    before = digest(out)
    assert run(DEMO_MODEL_FILE, tmp_path / "b" / "x.npy", "-o", out, "-q", "--iterations", 1) == 1
    assert "not pacseg's record of this input" in capsys.readouterr().err
    assert digest(out) == before


def test_a_halo_beyond_the_blocks_is_refused_before_any_work(tmp_path, image, model):
    source = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=image.shape,
                             chunks=(8, 8, 8), dtype=image.dtype)  # fmt: skip
    source[:] = image
    # a budget that keeps the work blocks to single chunks of 8^3, each grown by the halo
    with pytest.raises(ValueError, match=r"work blocks would process.*larger memory budget"):
        segment_zarr(tmp_path / "v.zarr", model, tmp_path / "l.zarr", chunks=(8, 8, 8),
                     memory="1M",
                     refine={"iterations": 40, "kernel_size": 3, "dilation": 8})  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.zarr"]
