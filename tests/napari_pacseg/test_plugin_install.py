"""The built wheel installs as napari's plugin manager installs plugins and npe2 lists it.

The wheel is built from this checkout (no build isolation: offline), installed with ``pip
install --no-deps --target`` into an empty directory, and a fresh interpreter that puts that
directory first on its path (napari, npe2 and torch come from the test environment, as they
come from the user's napari environment) must import the package from the wheel, discover its
manifest through npe2, validate it, and load the sample data from the wheel's package data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("npe2")

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import json, sys
import npe2
import napari_pacseg
from napari_pacseg._napari.sample_data import make_sample_data, make_sample_data_2d
pm = npe2.PluginManager.instance()
pm.discover()
manifest = pm.get_manifest("napari-pacseg")
layers = make_sample_data()
print(json.dumps({
    "package": napari_pacseg.__file__,
    "widgets": [w.display_name for w in manifest.contributions.widgets],
    "samples": [s.display_name for s in manifest.contributions.sample_data],
    "layers": [[kind, list(data.shape)] for data, _, kind in layers],
    "layers_2d": [[kind, list(data.shape)] for data, _, kind in make_sample_data_2d()],
}))
"""


def test_wheel_installs_as_a_napari_plugin(tmp_path):
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("napari_pacseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("napari_pacseg/napari.yaml", "napari_pacseg/data/nuclei.npz"):
        assert needed in names, f"{needed} is missing from the wheel"

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-c", CHECK], check=True, capture_output=True, text=True, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site), found["package"]
    assert found["widgets"] == ["PAC Segmentation"]
    assert found["samples"] == ["PAC-Seg nuclei (3D)", "PAC-Seg nuclei (2D)"]
    for key, shape in (("layers", [64, 256, 256]), ("layers_2d", [256, 256])):
        assert found[key] == [
            ["image", shape],
            ["labels", shape],
            ["labels", shape],
            ["labels", shape],
        ]
    validate = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-pacseg"], capture_output=True,
        text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert validate.returncode == 0, validate.stdout + validate.stderr
