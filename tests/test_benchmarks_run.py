"""Every benchmark script still imports and parses its options (``--help``): they are run by
hand, not by the test suite, so a change to a module they import must not break them quietly."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(
    p.name
    for p in BENCHMARKS.glob("*.py")
    if p.name not in ("common.py", "apoc_worker.py", "robustness.py")  # modules, not scripts
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_parses_its_options(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_robustness_scribbles_and_crops(monkeypatch):
    """bench_quality's robustness helpers: user-like scribbles from reference labels (both
    classes, well under 1% of the voxels) and crops that hold no object."""
    import numpy as np

    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    import robustness

    labels = np.zeros((20, 64, 64), np.uint16)
    labels[5:15, 10:30, 10:30] = 1
    labels[5:15, 35:55, 35:55] = 2
    scribbles = robustness.user_scribbles(labels, (8, 10, 12))
    assert set(np.unique(scribbles)) == {0, 1, 2}
    assert np.count_nonzero(scribbles) < 0.01 * scribbles.size
    assert (labels[scribbles == 2] > 0).all() and (labels[scribbles == 1] == 0).all()
    boxes = robustness.background_crops(labels > 0, (4, 8, 8), 3)
    assert len(boxes) == 3 and all(not labels[b].any() for b in boxes)


def test_realdata_strokes_and_object_scores(monkeypatch):
    """bench_realdata's helpers: strokes on a tiling of cells (membrane class 1 on the membrane
    band, class 2 inside cells, well under 1% of the voxels) and the object scores."""
    import numpy as np

    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    import bench_realdata

    cells = np.zeros((20, 64, 64), np.uint16)  # four cells tiling the volume
    cells[:, :32, :32], cells[:, :32, 32:], cells[:, 32:, :32], cells[:, 32:, 32:] = 1, 2, 3, 4
    band = bench_realdata.membrane_band(cells)
    assert band[:, 31:33, :].all() and band[:, :, 31:33].all() and not band[:, 5:27, 5:27].any()
    strokes = bench_realdata.cell_scribbles(cells, (5, 10, 15), seed=1)
    assert set(np.unique(strokes)) == {0, 1, 2}
    assert np.count_nonzero(strokes) < 0.01 * strokes.size
    near = np.zeros_like(band)
    near[:, 30:34, :] = near[:, :, 30:34] = True
    assert near[strokes == 1].all() and not near[strokes == 2].any()

    truth = np.zeros((10, 10), np.int32)
    truth[1:4, 1:4], truth[6:9, 6:9] = 1, 2
    pred = truth.copy()
    pred[6:9, 8] = 3  # object 2 split in two: its larger part still matches (IoU 6/9)
    scores = bench_realdata.match(truth, pred)
    assert scores["F1"] == 2 * 2 / (2 + 3) and scores["objects"] == 3
    assert scores["over"] == 1 and scores["under"] == 0
    merged = np.where(truth > 0, 1, 0)
    assert bench_realdata.match(truth, merged)["under"] == 1


def test_realdata_face_ridges_tell_stained_faces_from_bare_ones(monkeypatch):
    """``face_ridges``: a face drawn in the image (a bright membrane) has a contrast of about the
    membrane's brightness, a face the image does not show one near 0 (noise reads it a little
    above); ``merged_faces`` gives the contrasts of the faces a prediction draws no face across."""
    import numpy as np

    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    import bench_realdata as br

    labels = np.zeros((16, 40, 40), np.uint16)  # four cells; the image stains two faces only
    labels[:, :20, :20], labels[:, :20, 20:], labels[:, 20:, :20], labels[:, 20:, 20:] = 1, 2, 3, 4
    pixels = np.full(labels.shape, 10.0) + np.random.default_rng(0).normal(0, 0.2, labels.shape)
    pixels[:, :, 19:21] += 20  # the membrane between 1 | 2 and 3 | 4, along y
    image = br.RealImage("tiles", "cells", (1.0, 1.0, 1.0), (4, 8, 12), 8.0)
    band = br.membrane_band(labels)
    case = br.Case(image, pixels, labels, np.where(band, 0, labels), band, (1.0, 1.0, 1.0), 8.0)
    ridges = br.face_ridges(case)
    assert set(ridges) == {(1, 2), (3, 4), (1, 3), (2, 4)}
    assert ridges[(1, 2)] > 10 and ridges[(3, 4)] > 10
    assert abs(ridges[(1, 3)]) < 0.1 and abs(ridges[(2, 4)]) < 0.1
    pred = np.where(labels > 2, labels - 2, labels)  # 1 with 3 and 2 with 4: the bare faces
    assert sorted(br.merged_faces(case, pred, ridges)) == sorted([ridges[(1, 3)], ridges[(2, 4)]])
    assert br.merged_faces(case, labels, ridges) == []


def test_realdata_halves_are_cases_of_their_own(monkeypatch):
    """``bench_realdata --halves``: a 3D image splits along y, a 2D one along x, each half with
    its own pixels, labels, truth and ignore mask, named after the half."""
    import numpy as np

    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    import bench_realdata as br

    pixels = np.arange(4 * 6 * 8).reshape(4, 6, 8)
    image = br.RealImage("cells3d", "cells", (1.0, 1.0, 1.0), (1, 2), 3.0)
    case = br.Case(image, pixels, pixels + 1, pixels + 2, pixels % 2 == 0, image.spacing, 3.0)
    lo, hi = br.halves(case)
    assert (lo.image.stem, hi.image.stem) == ("cells3d, y 0-3", "cells3d, y 3-6")
    np.testing.assert_array_equal(np.concatenate([lo.pixels, hi.pixels], axis=1), pixels)
    np.testing.assert_array_equal(hi.truth, pixels[:, 3:] + 2)
    np.testing.assert_array_equal(hi.ignore, pixels[:, 3:] % 2 == 0)
    assert lo.image.planes == (1, 2) and lo.radius == 3.0
    flat = br.RealImage("dsb", "nuclei", (1.0, 1.0), (None,), 4.0)
    two = br.Case(flat, pixels[0], pixels[0], pixels[0], None, flat.spacing, 4.0)
    left, right = br.halves(two)
    assert right.image.stem == "dsb, x 4-8" and right.pixels.shape == (6, 4)
    assert left.ignore is None
