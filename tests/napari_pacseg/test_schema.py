"""One parameter schema: the widget's controls and the command's flags are made from
``RefineConfig``'s fields, so their defaults and ranges are the config's."""

from __future__ import annotations

import dataclasses

import pytest

from napari_pacseg.cli import build_parser
from napari_pacseg.model.network import RefineConfig, refine_params_schema


def test_widget_controls_are_the_config(qtbot):
    from napari_pacseg._napari.controls import refine_controls, refine_values, set_refine_controls

    controls = refine_controls()
    assert list(controls) == [f.name for f in dataclasses.fields(RefineConfig)]
    assert refine_values(controls) == dataclasses.asdict(RefineConfig())
    for name, spec in refine_params_schema().items():
        control = controls[name]
        if spec.odd:
            values = [v for v in control.choices]
            assert min(values) == spec.low and max(values) == spec.high
            assert all(v % 2 for v in values)
        else:
            assert control.max == spec.high
            assert control.min == (spec.low - spec.step if spec.optional else spec.low)
    other = RefineConfig(iterations=3, kernel_size=7, spatial_sigma=None, guide_sigma=0.25)
    set_refine_controls(controls, other)
    assert RefineConfig(**refine_values(controls)) == other


def parse(*flags):
    return build_parser().parse_args(["segment", "m.safetensors", "x.npy", "-o", "o", *flags])


def test_cli_flags_are_the_config(capsys):
    for name, spec in refine_params_schema().items():
        flag = "--" + name.replace("_", "-")
        for ok in (spec.low, spec.high):
            assert getattr(parse(flag, str(ok)), name) == ok
        for bad in (spec.low - spec.step, spec.high + spec.step):
            with pytest.raises(SystemExit):
                parse(flag, str(bad))
        assert f"[{spec.low:g}, {spec.high:g}]" in capsys.readouterr().err
        if spec.optional:
            assert getattr(parse(flag, "none"), name) is None
    args = parse()
    assert not any(hasattr(args, name) for name in refine_params_schema())  # model defaults
