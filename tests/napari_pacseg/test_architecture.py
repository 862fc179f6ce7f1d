"""Layering rule: pacseg_kernels never imports napari, Qt or napari_pacseg."""

import ast
from pathlib import Path

import pacseg_kernels

FORBIDDEN = ("napari", "napari_pacseg", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui")


def test_kernels_package_imports_no_gui():
    root = Path(pacseg_kernels.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
