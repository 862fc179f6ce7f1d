"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_apt_packages_are_the_ci_ones():
    """The README's system packages for the GUI tests are exactly those ``.ci/run`` installs."""
    text = README.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("apt-get install"))
    readme = set(line.split()[3:])
    ci = (README.parent / ".ci" / "run").read_text()
    block = re.search(r"APT_PACKAGES=\(([^)]*)\)", ci).group(1)
    assert readme == set(block.split())
    assert "sudo" in text[text.index("apt-get install") - 120 :]  # said how without root


def test_all_extra_brings_a_qt_binding():
    import tomllib

    meta = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert any(d.startswith("napari[all]") for d in extras["all"])
    assert '"napari-pacseg[all]"' in README.read_text()
