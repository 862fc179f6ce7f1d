"""benchmarks/gpu_configs.py, which a lent GPU runs: checked here on CPU tensors in Triton's
interpreter (small volumes), including that it notices a launcher and the AOT enumeration
drifting apart."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def gpu_configs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_configs
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_configs


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_subset_launches_exactly_what_was_compiled(gpu_configs):
    rows = gpu_configs.run(_device(), size=5, repeats=0, subset=True)
    names = {n for r in rows for n in r["names"]}
    assert "crf step K=2 F=1" in names and "gather fp32" in names and len(rows) >= 8
    for r in rows:
        assert not r["problems"], r
        assert r["launches"] >= 1 and r["error"] < 1e-4, r


def test_drift_is_reported(gpu_configs, monkeypatch):
    """A launcher choosing a block the enumeration does not list fails the row."""
    from pacseg_kernels import pac_triton

    real = pac_triton.launch_meta
    monkeypatch.setattr(pac_triton, "launch_meta", lambda *a: real(*a) | {"BLOCK_V": 64})
    case = next(c for c in gpu_configs.triton_aot.cases(subset=True) if c.name == "conv C=4->4 F=3")
    case.meta = real(4, 4, 3, False, False, False, False)  # what was compiled
    fn, _ = gpu_configs.build(case.call, 4, _device())
    log = []
    with gpu_configs.recording(log):
        fn("triton")
    problems = gpu_configs._drift([case], [case], log)
    assert any("not compiled ahead of time" in p for p in problems)
    assert any("never launched" in p for p in problems)
