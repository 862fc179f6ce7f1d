"""benchmarks/gpu_check.sh without CUDA: a clear message, exit status 2, nothing written.

The GPU path itself needs a GPU machine (run the script there); this checks the script parses
and fails cleanly and fast where it cannot run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RESULTS = ROOT / "benchmarks" / "results"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _results_state() -> dict[str, int]:
    if not RESULTS.exists():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()}


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_fails_cleanly_and_writes_nothing(tmp_path):
    before = _results_state()
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU "
        "machine after the README's install" in proc.stderr
    )
    assert _results_state() == before
    assert list(tmp_path.iterdir()) == []  # no log folder either


def test_bad_argument_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "unknown argument '--frobnicate'" in proc.stderr


def test_copy_to_a_folder_that_holds_files_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "gpu-check-cuda.md").write_text("the user's own")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--copy-to", str(mine)], capture_output=True, text=True,
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "is not empty; give an empty or new folder, or add --overwrite" in proc.stderr
    assert (mine / "gpu-check-cuda.md").read_text() == "the user's own"
    assert sorted(p.name for p in mine.iterdir()) == ["gpu-check-cuda.md"]
