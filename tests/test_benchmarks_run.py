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
