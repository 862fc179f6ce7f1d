"""The ``pacseg`` command end to end on a folder of small TIFF, NPY and zarr volumes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")

from napari_pacseg import ContextConfig, load_model, receptive_field, segment  # noqa: E402
from napari_pacseg.batch import files as batch_module  # noqa: E402
from napari_pacseg.cli import ProgressBar, main  # noqa: E402
from napari_pacseg.io.provenance import sha256_file  # noqa: E402
from napari_pacseg.io.volumes import read_volume, write_tiff  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample  # noqa: E402

SHAPE = (16, 48, 48)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image():
    return np.ascontiguousarray(load_sample().image[32 : 32 + SHAPE[0], 64:112, 64:112])  # 2 nuclei


@pytest.fixture
def folder(tmp_path, image):
    """in/a.tif (ImageJ, with spacing), in/b.npy, in/c.zarr, and model.safetensors."""
    inp = tmp_path / "in"
    inp.mkdir()
    write_tiff(inp / "a.tif", image, spacing=(1.0, 0.4, 0.4))
    np.save(inp / "b.npy", image[:, ::-1].copy())
    z = zarr.open_array(str(inp / "c.zarr"), mode="w", shape=SHAPE, chunks=(8, 24, 24), dtype="u2")
    z[:] = image[::-1]
    shutil.copy(DEMO_MODEL_FILE, tmp_path / "model.safetensors")
    return tmp_path


def run(folder, *args):
    return main(["segment", str(folder / "model.safetensors"), *map(str, args)])


def test_segment_a_folder(folder, image, capsys):
    assert run(folder, folder / "in", "-o", folder / "out", "--chunks", 8, 24, 24) == 0
    out = folder / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{s}_{k}" for s, ext in [("a", ".tif"), ("b", ".npy"), ("c", ".zarr")]
                           for k in ("labels" + ext, "matte" + ext, "pacseg.json"))  # fmt: skip
    model = load_model(DEMO_MODEL_FILE)
    ref = segment(image, model)
    labels = read_volume(out / "a_labels.tif")
    np.testing.assert_array_equal(labels.load()[0], ref.labels)
    np.testing.assert_allclose(labels.spacing, (1.0, 0.4, 0.4), rtol=1e-6)
    np.testing.assert_allclose(tifffile.imread(out / "a_matte.tif"), ref.matte, atol=1e-6)
    np.testing.assert_array_equal(
        np.load(out / "b_labels.npy"), segment(image[:, ::-1], model).labels
    )
    zref = segment(image[::-1], model)
    np.testing.assert_array_equal(zarr.open_array(str(out / "c_labels.zarr"))[:], zref.labels)
    np.testing.assert_allclose(zarr.open_array(str(out / "c_matte.zarr"))[:], zref.matte, atol=1e-5)
    record = json.loads((out / "a_pacseg.json").read_text())
    assert record["model"]["sha256"] == sha256_file(DEMO_MODEL_FILE)
    assert record["parameters"]["spacing_source"] == "ImageJ metadata"
    assert record["parameters"]["refine"]["iterations"] == model.config.refine.iterations
    assert set(record["versions"]) >= {"napari-pacseg", "torch", "numpy"}
    assert record["timings"]["total"] > 0 and record["outputs"]["labels"] == "a_labels.tif"
    zrec = json.loads((out / "c_pacseg.json").read_text())
    assert (
        zrec["parameters"]["chunks"] == [8, 24, 24]
        and zrec["parameters"]["spacing_source"] == "model"
    )
    captured = capsys.readouterr()
    assert captured.out.count("done ") == 3 and "3 done, 0 skipped, 0 failed" in captured.err


def test_file_run_says_which_input_it_counts(folder):
    from napari_pacseg.batch import iter_segment_files

    seen = []
    results = iter_segment_files(
        folder / "in", folder / "model.safetensors", folder / "out", chunks=(8, 24, 24),
        progress=lambda done, total: seen.append((results.current, done, total)),
    )  # fmt: skip
    assert results.count == 3 and results.current is None and seen == []  # nothing ran yet
    assert [r.status for r in results] == ["done"] * 3
    assert results.current is None
    starts = list(dict.fromkeys((i, path.name) for (i, path), done, _ in seen if done == 0))
    assert starts == [(0, "a.tif"), (1, "b.npy"), (2, "c.zarr")]
    for index in range(3):  # each input's count ends complete
        done, total = [(d, t) for (i, _), d, t in seen if i == index][-1]
        assert done == total > 0


def test_resume_and_overwrite(folder, capsys):
    out = folder / "out"
    assert run(folder, folder / "in" / "a.tif", folder / "in" / "b.npy", "-o", out, "-q") == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    # A crash after the labels of b were written: its record says "incomplete", so b is redone.
    record = json.loads((out / "b_pacseg.json").read_text())
    (out / "b_pacseg.json").write_text(json.dumps({**record, "status": "incomplete"}))
    assert run(folder, folder / "in" / "*.tif", folder / "in" / "b.npy", "-o", out, "-q") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("skipped") and lines[1].startswith("done")
    now = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert (
        now["a_labels.tif"] == first["a_labels.tif"]
        and now["b_labels.npy"] != first["b_labels.npy"]
    )
    # Other parameters: still skipped (the record marks a complete output), with a hint.
    assert run(folder, folder / "in" / "a.tif", "-o", out, "--iterations", "2") == 0
    assert "--overwrite" in capsys.readouterr().out
    assert run(folder, folder / "in" / "a.tif", "-o", out, "--iterations", "2", "--overwrite") == 0
    record = json.loads((out / "a_pacseg.json").read_text())
    assert record["parameters"]["refine"]["iterations"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_inputs_among_good_ones(folder, capsys):
    (folder / "in" / "broken.tif").write_bytes(b"not a tiff at all")
    np.save(folder / "in" / "flat.npy", np.zeros((4, 5)))
    code = run(folder, folder / "in", folder / "missing.tif", "-o", folder / "out", "-q")
    assert code == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("pacseg: failed: ") for line in err)
    assert any("broken.tif" in line and "not a readable TIFF" in line for line in err)
    assert any("missing.tif" in line and "no such file" in line for line in err)
    # a 2D array that the folder holds is of the other kind than the model's: skipped, said
    assert f"skipped {folder / 'in' / 'flat.npy'}: a 2D image" in captured.out
    assert sorted(p.name for p in (folder / "out").glob("*.json")) == [
        "a_pacseg.json", "b_pacseg.json", "c_pacseg.json"
    ]  # fmt: skip


def test_output_equal_to_an_input_is_refused(folder, capsys):
    inp = folder / "in"
    shutil.copy(inp / "a.tif", inp / "a_labels.tif")  # a user's file named like our output
    before = sorted(p.name for p in inp.iterdir())
    # a_labels.tif is named, so it is an input (whatever its name looks like): a.tif's labels
    # output would overwrite it, so the run is refused before any work. Nothing is touched.
    assert run(folder, inp / "a.tif", inp / "a_labels.tif", "-o", inp, "--overwrite") == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert sorted(p.name for p in inp.iterdir()) == before
    # Found by the folder, it is taken for a.tif's output: a.tif fails, as its output path
    # holds a file that pacseg did not write.
    mine = (inp / "a_labels.tif").read_bytes()
    assert run(folder, inp, "-o", inp) == 1
    assert "was not written by pacseg" in capsys.readouterr().err
    assert (inp / "a_labels.tif").read_bytes() == mine and not (inp / "a_pacseg.json").exists()
    assert run(folder, inp / "a.tif", "-o", inp / "a.tif") == 2  # OUTDIR is a file
    assert run(folder, inp / "c.zarr", "-o", inp / "c.zarr" / "out") == 2  # inside an input
    assert "would overwrite the input" in capsys.readouterr().err
    shutil.copy(inp / "b.npy", folder / "b.npy")
    assert run(folder, inp / "b.npy", folder / "b.npy", "-o", folder / "out") == 2
    assert "would both write b_labels.npy" in capsys.readouterr().err


def test_usage_errors(folder, capsys):
    out = folder / "out"
    assert run(folder, folder / "in", "-o", out, "--no-refine", "--iterations", "3") == 2
    assert "--iterations given with --no-refine" in capsys.readouterr().err
    assert run(folder, folder / "in", "-o", out, "--kernel-size", "4") == 2
    assert "expected an odd integer in [1, 15]" in capsys.readouterr().err
    assert run(folder, folder / "in", "-o", out, "--workers", "0") == 2
    assert run(folder, folder / "in", "-o", out, "--workers", "2", "--scheduler", "tcp://x:1") == 2
    (folder / "bad.safetensors").write_bytes(b"\0" * 4)
    assert (
        main(["segment", str(folder / "bad.safetensors"), str(folder / "in"), "-o", str(out)]) == 2
    )
    assert "too short for a model file" in capsys.readouterr().err
    assert main(["segment"]) == 2 and main([]) == 2
    assert not out.exists()


def test_ctrl_c_leaves_no_partial_output(folder, monkeypatch, capsys):
    real = batch_module.write_tiff
    calls = []

    def interrupted_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # after a_labels.tif, while writing a_matte.tif
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(batch_module, "write_tiff", interrupted_write)
    out = folder / "out"
    assert run(folder, folder / "in" / "b.npy", folder / "in" / "a.tif", "-o", out, "-q") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "a_labels.tif",
        "a_pacseg.json",
        "b_labels.npy",
        "b_matte.npy",
        "b_pacseg.json",
    ]  # fmt: skip (a's record says incomplete: redone by the next run)
    assert json.loads((out / "a_pacseg.json").read_text())["status"] == "incomplete"
    monkeypatch.setattr(batch_module, "write_tiff", real)
    assert run(folder, folder / "in" / "b.npy", folder / "in" / "a.tif", "-o", out, "-q") == 0
    assert (out / "a_pacseg.json").exists() and "skipped" in capsys.readouterr().out


def test_entry_point_subprocess(folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [shutil.which("pacseg") or "pacseg", "segment", str(folder / "model.safetensors"),
         str(folder / "in" / "b.npy"), "-o", str(folder / "out"), "--no-refine", "--quiet"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("done ") and proc.stderr == ""
    assert (
        json.loads((folder / "out" / "b_pacseg.json").read_text())["parameters"]["refine"] is False
    )


def test_info(folder, capsys):
    assert main(["info", str(folder / "model.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "0=background, 2=nucleus" in text and "provenance" in text and "halo" in text
    assert main(["info", str(folder / "model.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["classes"][1]["name"] == "nucleus"
    assert info["receptive_field"]["refined"] == list(receptive_field(load_model(DEMO_MODEL_FILE)))
    (folder / "bad.safetensors").write_bytes(b"nonsense" * 4)
    assert main(["info", str(folder / "bad.safetensors")]) == 1
    assert "pacseg info: failed" in capsys.readouterr().err


def test_train_then_segment(tmp_path, capsys):
    sample = load_sample()
    box = (slice(16, 48), slice(128, 256), slice(0, 256))  # holds both classes' scribbles
    write_tiff(tmp_path / "img.tif", sample.image[box], spacing=sample.spacing)
    np.save(tmp_path / "marks.npy", sample.scribbles[box])
    model_file = tmp_path / "m.safetensors"
    args = ["train", str(tmp_path / "img.tif"), str(tmp_path / "marks.npy"), "-o", str(model_file),
            "--sigmas", "1", "2", "--hidden", "8", "--steps", "30", "--class-names", "bg", "nuc",
            "-q"]  # fmt: skip
    assert main(args) == 0
    model = load_model(model_file)
    assert [c.name for c in model.config.classes] == ["bg", "nuc"]
    assert model.config.features.sigmas == (1.0, 2.0) and model.config.spacing == sample.spacing
    assert "saved" in capsys.readouterr().out
    assert main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "img.tif"), "--overwrite"]) == 2  # not .safetensors
    np.save(tmp_path / "one_class.npy", np.ones_like(sample.scribbles[box]))
    assert main(["train", str(tmp_path / "img.tif"), str(tmp_path / "one_class.npy"), "-o",
                 str(tmp_path / "n.safetensors"), "--steps", "5", "-q"]) == 1  # fmt: skip
    assert "only one class" in capsys.readouterr().err


def test_train_with_context(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("napari_pacseg.training.fit.CONTEXT_STEPS", 5)  # the option, not the fit
    sample = load_sample()
    box = (slice(16, 48), slice(128, 256), slice(0, 256))
    np.save(tmp_path / "img.npy", sample.image[box])
    np.save(tmp_path / "marks.npy", sample.scribbles[box])
    out = tmp_path / "m.safetensors"
    assert main(["train", str(tmp_path / "img.npy"), str(tmp_path / "marks.npy"), "-o", str(out),
                 "--sigmas", "1", "--hidden", "8", "--steps", "10", "--context", "-q"]) == 0  # fmt: skip
    assert load_model(out).config.context == ContextConfig()
    assert main(["info", str(out)]) == 0
    assert "context      {'channels': (8, 16)" in capsys.readouterr().out


def test_progress_bar_in_a_log():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for done in range(11):
        bar.update("[1/1] a.tif", done, 10, "tiles")
    lines = stream.getvalue().splitlines()
    assert [line.split("| ")[1].split()[0] for line in lines] == [
        "0/10",
        "3/10",
        "5/10",
        "8/10",
        "10/10",
    ]
    quiet = io.StringIO()
    ProgressBar(quiet, quiet=True).update("x", 1, 2, "tiles")
    assert quiet.getvalue() == ""


def test_progress_bar_rate_and_time_left():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar.update("[1/1] c.zarr", 0, 16_777_216, "voxels")
    bar.started -= 10  # ten seconds in
    bar.update("[1/1] c.zarr", 4_194_304, 16_777_216, "voxels")
    assert "| 4.19M/16.8M voxels 10 s, 419k voxels/s, 30 s left" in stream.getvalue()


def test_memory_option(folder, capsys):
    out = folder / "out"
    assert run(folder, folder / "in" / "c.zarr", "-o", out, "--memory", "lots") == 2
    assert "memory must be a size such as 4G" in capsys.readouterr().err and not out.exists()
    assert run(folder, folder / "in" / "c.zarr", "-o", out, "--memory", "1G", "-q") == 0
    record = json.loads((out / "c_pacseg.json").read_text())
    assert record["parameters"]["memory"] == 1 << 30 and record["parameters"]["blocks"]


def test_train_from_several_pairs(tmp_path, capsys):
    sample = load_sample()
    halves = [(slice(16, 48), slice(0, 256), slice(0, 128)),
              (slice(16, 48), slice(0, 256), slice(128, 256))]  # fmt: skip
    paths = []
    for i, box in enumerate(halves):
        write_tiff(tmp_path / f"img{i}.tif", sample.image[box], spacing=sample.spacing)
        np.save(tmp_path / f"marks{i}.npy", sample.scribbles[box])
        paths += [str(tmp_path / f"img{i}.tif"), str(tmp_path / f"marks{i}.npy")]
    out = tmp_path / "m.safetensors"
    assert main(["train", *paths, "-o", str(out), "--sigmas", "1", "--hidden", "8", "--steps",
                 "20", "-q"]) == 0  # fmt: skip
    assert "in 2 images" in capsys.readouterr().out
    model = load_model(out)
    assert model.config.provenance["images"] == "2"
    assert model.config.spacing == sample.spacing
    labelled = sum(np.count_nonzero(sample.scribbles[box]) for box in halves)
    assert int(model.config.provenance["labelled_voxels"]) == labelled
    assert main(["train", *paths[:3], "-o", str(tmp_path / "x.safetensors"), "-q"]) == 2
    assert "IMAGE SCRIBBLES pairs; 3 paths" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_segment_with_instances(folder, image, capsys):
    out = folder / "out"
    args = (folder / "in" / "a.tif", folder / "in" / "b.npy", "-o", out, "--instances", "-q")
    assert run(folder, *args, "--min-volume", "5") == 0
    model = load_model(DEMO_MODEL_FILE)
    ref = segment(image, model, instances={"min_volume": 5.0})
    ids = read_volume(out / "a_instances.tif")
    assert ids.data.dtype == np.uint16
    np.testing.assert_array_equal(ids.load()[0], ref.instances)
    np.testing.assert_allclose(ids.spacing, (1.0, 0.4, 0.4), rtol=1e-6)
    np.testing.assert_array_equal(
        np.load(out / "b_instances.npy"),
        segment(image[:, ::-1], model, instances={"min_volume": 5.0}).instances,
    )
    rows = (out / "a_objects.csv").read_text().splitlines()
    assert rows[0].startswith("id,class,class_name,volume,centroid_z")
    assert len(rows) == 1 + ref.instances.max() and ref.instances.max() >= 1
    assert rows[1].split(",")[:3] == ["1", "1", "nucleus"]
    record = json.loads((out / "a_pacseg.json").read_text())
    assert record["objects"] == int(ref.instances.max())
    assert record["outputs"]["instances"] == "a_instances.tif"
    assert record["outputs"]["objects"] == "a_objects.csv"
    assert record["parameters"]["instances"]["min_volume"] == 5.0
    # the same run again: skipped; a CSV of someone else's at an output path: left alone
    assert run(folder, *args, "--min-volume", "5") == 0
    assert capsys.readouterr().out.count("skipped") == 2
    other = folder / "out2"
    other.mkdir()
    (other / "a_objects.csv").write_text("mine\n")
    assert run(folder, folder / "in" / "a.tif", "-o", other, "--instances") == 1
    assert "a_objects.csv exists and was not written by pacseg" in capsys.readouterr().err
    assert (other / "a_objects.csv").read_text() == "mine\n"
    assert sorted(p.name for p in other.iterdir()) == ["a_objects.csv"]
    # zarr inputs: the ids and the table chunk by chunk (the same as in memory)
    out3 = folder / "out3"
    assert (
        run(folder, folder / "in" / "c.zarr", "-o", out3, "--instances", "--chunks", 8, 24, 24) == 0
    )
    zids = zarr.open_array(str(out3 / "c_instances.zarr"), mode="r")[:]
    np.testing.assert_array_equal(zids, segment(image[::-1], model, instances=True).instances)
    assert sorted(p.name for p in out3.iterdir()) == [
        "c_instances.zarr",
        "c_labels.zarr",
        "c_matte.zarr",
        "c_objects.csv",
        "c_pacseg.json",
    ]
    assert len((out3 / "c_objects.csv").read_text().splitlines()) == 1 + int(zids.max())
    assert json.loads((out3 / "c_pacseg.json").read_text())["objects"] == int(zids.max())


def test_instance_options_need_instances(folder, capsys):
    assert run(folder, folder / "in" / "a.tif", "-o", folder / "out", "--radius", "4") == 2
    assert "--radius given without --instances" in capsys.readouterr().err
    assert (
        run(
            folder, folder / "in" / "a.tif", "-o", folder / "o", "--instances", "--sensitivity", "2"
        )
        == 2
    )
    assert "sensitivity" in capsys.readouterr().err


def test_demo_writes_the_sample_and_model_and_the_next_commands_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(out)]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "nuclei.tif",
        "nuclei_demo.safetensors",
        "nuclei_scribbles.tif",
        "nuclei_truth.tif",
    ]
    assert (out / "nuclei_demo.safetensors").read_bytes() == DEMO_MODEL_FILE.read_bytes()
    image = read_volume(out / "nuclei.tif")
    np.testing.assert_allclose(image.spacing, (1.0, 0.4, 0.4), rtol=1e-6)
    np.testing.assert_array_equal(image.load()[0], load_sample().image)
    assert f"pacseg segment {out / 'nuclei_demo.safetensors'} {out / 'nuclei.tif'}" in printed
    # a second time: refused without --overwrite, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["demo", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["demo", str(out), "--overwrite"]) == 0


def test_assumed_spacing_is_said(folder, capsys):
    assert run(folder, folder / "in" / "a.tif", folder / "in" / "b.npy", "-o", folder / "out") == 0
    a, b = capsys.readouterr().out.splitlines()
    assert "no voxel size in its metadata: assumed the model's spacing (z, y, x) (1, 0.4, 0.4)" in b
    assert "b.npy" in b and "a.tif" in a and "no voxel size" not in a
