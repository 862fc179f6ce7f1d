"""Every benchmark script still imports and parses its options (``--help``): they are run by
hand, not by the test suite, so a change to a module they import must not break them quietly."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(
    p.name for p in BENCHMARKS.glob("*.py") if p.name not in ("common.py", "apoc_worker.py")
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_parses_its_options(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()
