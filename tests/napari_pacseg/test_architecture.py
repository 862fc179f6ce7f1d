"""Layering rules: pacseg_kernels never imports napari, Qt or napari_pacseg; the headless core of
napari_pacseg (everything but the GUI face) never imports napari, Qt or magicgui, not even in a
fresh interpreter that imports all of it; no module imports another's private names."""

import ast
import subprocess
import sys
from pathlib import Path

import napari_pacseg
import pacseg_kernels

GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui")
# The GUI face: the only modules that may import napari, Qt or magicgui.
GUI_MODULES = {"_widget", "_controls", "_layers", "_workers", "_reader", "_sample_data",
               "demo"}  # fmt: skip


def imports(path: Path):
    """``(module, names)`` of every import in ``path``: absolute ones as written, relative ones
    as ``"."``-prefixed."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            yield module, [a.name for a in node.names]


def test_kernels_package_imports_no_gui():
    root = Path(pacseg_kernels.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for module, _ in imports(path):
            if module.split(".")[0] in (*GUI, "napari_pacseg"):
                offenders.append(f"{path.name}: {module}")
    assert not offenders, offenders


def core_modules():
    root = Path(napari_pacseg.__file__).parent
    return [p for p in sorted(root.glob("*.py")) if p.stem not in GUI_MODULES]


def test_headless_core_imports_no_gui():
    offenders = []
    for path in core_modules():
        for module, _ in imports(path):
            if module.split(".")[0] in GUI:
                offenders.append(f"{path.name}: {module}")
    assert not offenders, offenders
    names = ", ".join(f"napari_pacseg.{p.stem}" for p in core_modules() if p.stem != "__init__")
    code = (
        f"import importlib, sys\nfor m in '{names}'.split(', '):\n    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI!r})\nprint(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_imports_private_names_of_another():
    root = Path(napari_pacseg.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for module, names in imports(path):
            if not module.startswith(".") or module == ".":
                continue  # third-party privates are not ours to judge; `from . import _x` is a module
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            offenders += [f"{path.name}: from {module} import {n}" for n in private]
    assert not offenders, offenders
