"""The README's and docs/*.md's Python examples run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_blocks(path: Path) -> None:
    """Each ```python block of ``path`` in order, in one namespace (a block may use what an
    earlier one of the same file defined)."""
    namespace = {"__name__": f"{path.stem}_example"}
    for block in python_blocks(path):
        exec(compile(block, str(path.relative_to(ROOT)), "exec"), namespace)


def test_readme_python_blocks_run():
    assert python_blocks(README), "README has no python examples"
    run_blocks(README)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_docs_python_blocks_run(doc):
    run_blocks(doc)


def test_docs_exist_and_readme_links_them():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README is for a newcomer: at most 250 lines"
    for name in ("api", "kernels", "cli", "safety", "benchmarks", "architecture"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
        assert f"(docs/{name}.md)" in text


def test_readme_apt_packages_are_the_ci_ones():
    """The README's system packages for the GUI tests are exactly those ``.ci/run`` installs."""
    text = README.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("apt-get install"))
    readme = set(line.split()[3:])
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"APT_PACKAGES=\(([^)]*)\)", ci).group(1)
    assert readme == set(block.split())
    assert "sudo" in text[text.index("apt-get install") - 120 :]  # said how without root


def test_readme_test_command_is_the_ci_one():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ruff check . && python -m pytest\n" in ci
    assert "\nruff check . && python -m pytest\n" in README.read_text()


def test_all_extra_brings_a_qt_binding():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert any(d.startswith("napari[all]") for d in extras["all"])
    assert '"napari-pacseg[all]"' in README.read_text()
