"""Layering rules, by folder (docs/architecture.md):

- pacseg_kernels never imports napari, Qt, magicgui or napari_pacseg;
- the headless core of napari_pacseg (everything but ``_napari/``) never imports napari, Qt or
  magicgui, not even in a fresh interpreter that imports all of it;
- each layer imports only the layers below it (``RANK``), never one above or beside it;
- no import cycles between modules, counting imports inside functions;
- no module imports another's private names.

Each rule is a function of an import graph, and the tests also plant a violation of each in a
copy of the real graph to show the rule catches it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import napari_pacseg
import pacseg_kernels

GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui")
ROOT = Path(napari_pacseg.__file__).parent
KERNELS = Path(pacseg_kernels.__file__).parent
# The layers of napari_pacseg, by top-level module or folder: a module may import its own
# folder and the layers of lower rank.
RANK = {
    "_version": 0, "checks": 0, "progress": 0,
    "model": 1,
    "io": 2, "refine": 2,
    "instances": 3,
    "engine": 4,
    "training": 5,
    "batch": 6, "describe": 6, "sample": 6,
    "__init__": 7,
    "cli": 8, "_napari": 8,
}  # fmt: skip


def imports(path: Path):
    """``(module, names)`` of every import in ``path`` (inside functions too): absolute ones
    as written, relative ones resolved against ``path``'s package."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = base + ("." + node.module if node.module else "")
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names]


def module_name(path: Path) -> str:
    """``napari_pacseg.engine.plan`` of ``.../napari_pacseg/engine/plan.py``."""
    root = ROOT if ROOT in path.parents else KERNELS
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def graph(root: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """Module name -> its imports, for every module under ``root``."""
    return {module_name(p): list(imports(p)) for p in sorted(root.rglob("*.py"))}


def layer(module: str) -> str:
    """The layer of a napari_pacseg module: its top-level module or folder."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_gui_face(module: str) -> bool:
    return layer(module) == "_napari"


def gui_imports(modules) -> list[str]:
    """Imports of napari, Qt or magicgui by modules outside the GUI face."""
    return [
        f"{name}: {target}"
        for name, found in modules.items()
        if not is_gui_face(name)
        for target, _ in found
        if target.split(".")[0] in GUI
    ]


def upward_imports(modules) -> list[str]:
    """Imports of a napari_pacseg layer of the same or a higher rank than the importer's own
    (its own folder excepted)."""
    bad = []
    for name, found in modules.items():
        own = layer(name)
        for target, names in found:
            if target.split(".")[0] != "napari_pacseg":
                continue
            targets = [target] if target != "napari_pacseg" else [f"napari_pacseg.{n}" for n in names]
            for t in targets:
                other = layer(t) if layer(t) in RANK else "__init__"
                if other != own and RANK[other] >= RANK[own]:
                    bad.append(f"{name} ({own}, rank {RANK[own]}) imports {t} (rank {RANK[other]})")
    return bad


def cycles(modules) -> list[list[str]]:
    """The import cycles between the modules of ``modules`` (each as a list of names)."""
    edges = {name: set() for name in modules}
    for name, found in modules.items():
        for target, names in found:
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in edges]
            for t in submodules or [target]:  # `from pkg import mod` imports mod, not pkg
                if t in edges and t != name:
                    edges[name].add(t)
    found_cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found_cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found_cycles


def private_imports(modules) -> list[str]:
    """``from napari_pacseg.x import _name`` between modules of the package."""
    return [
        f"{name}: from {target} import {n}"
        for name, found in modules.items()
        for target, names in found
        if target.startswith("napari_pacseg")
        for n in names
        if n.startswith("_") and n not in ("__version__", "_napari")
    ]


def test_kernels_package_imports_no_gui():
    offenders = [
        f"{name}: {target}"
        for name, found in graph(KERNELS).items()
        for target, _ in found
        if target.split(".")[0] in (*GUI, "napari_pacseg")
    ]
    assert not offenders, offenders


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in graph(ROOT)} <= set(RANK)


def test_headless_core_imports_no_gui():
    modules = graph(ROOT)
    assert not gui_imports(modules)
    core = sorted(m for m in modules if not is_gui_face(m) and m != "napari_pacseg")
    code = (
        f"import importlib, sys\nfor m in {core!r}:\n    importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GUI!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_layers_import_only_lower_layers():
    assert not upward_imports(graph(ROOT))


def test_no_import_cycles():
    assert not cycles(graph(ROOT))
    assert not cycles(graph(KERNELS))


def test_no_module_imports_private_names_of_another():
    assert not private_imports(graph(ROOT))


def test_the_rules_catch_planted_violations():
    modules = graph(ROOT)
    planted = dict(modules)
    planted["napari_pacseg.model.planted"] = [("qtpy.QtWidgets", ["QWidget"])]
    assert gui_imports(planted) == ["napari_pacseg.model.planted: qtpy.QtWidgets"]
    planted = dict(modules)
    planted["napari_pacseg.model.planted"] = [("napari_pacseg.engine.plan", ["prepare"])]
    assert len(upward_imports(planted)) == 1
    planted = dict(modules)
    planted["napari_pacseg.refine.guide"] = [
        *modules["napari_pacseg.refine.guide"], ("napari_pacseg.io", ["provenance"])
    ]
    assert upward_imports(planted)  # a layer beside it
    planted = dict(modules)
    planted["napari_pacseg.model.features"] = [
        *modules["napari_pacseg.model.features"], ("napari_pacseg.model.network", ["PacSegModel"])
    ]
    assert any("napari_pacseg.model.features" in c for c in cycles(planted))
    planted = dict(modules)
    planted["napari_pacseg.cli"] = [("napari_pacseg.engine.plan", ["_check_tiles"])]
    assert private_imports(planted) == [
        "napari_pacseg.cli: from napari_pacseg.engine.plan import _check_tiles"
    ]
