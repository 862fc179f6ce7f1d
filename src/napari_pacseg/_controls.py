"""magicgui controls made from the parameter schema (``RefineConfig``'s ``Param`` fields), so the
widget's ranges, steps, labels and defaults are the config's own and cannot drift from it."""

from __future__ import annotations

from magicgui.widgets import ComboBox, FloatSpinBox, SpinBox

from .model import RefineConfig, refine_params_schema


def refine_controls() -> dict:
    """One control per refinement parameter, at ``RefineConfig()``'s defaults: a choice of odd
    sizes for odd integers, a spin box otherwise; an optional parameter's control reads 0 for
    None ("off")."""
    defaults = RefineConfig()
    controls = {}
    for name, spec in refine_params_schema().items():
        value = getattr(defaults, name)
        if spec.odd:
            control = ComboBox(
                label=spec.label, choices=list(range(spec.low, spec.high + 1, 2)), value=value
            )
        elif spec.integer:
            control = SpinBox(
                label=spec.label, min=spec.low, max=spec.high, step=spec.step, value=value
            )
        else:
            low, label = (
                (0.0, f"{spec.label} (0: off)") if spec.optional else (spec.low, spec.label)
            )
            control = FloatSpinBox(
                label=label, min=low, max=spec.high, step=spec.step, value=value or 0.0
            )
        control.tooltip = f"{spec.help} ({spec.low:g}-{spec.high:g})"
        controls[name] = control
    return controls


def set_refine_controls(controls: dict, refine: RefineConfig) -> None:
    """Show ``refine``'s values in the controls."""
    schema = refine_params_schema()
    for name, control in controls.items():
        value = getattr(refine, name)
        control.value = 0.0 if schema[name].optional and value is None else value


def refine_values(controls: dict) -> dict:
    """The controls' values as ``RefineConfig`` fields (a ``segment(refine=...)`` dict)."""
    schema = refine_params_schema()
    out = {}
    for name, control in controls.items():
        spec = schema[name]
        value = int(control.value) if spec.integer else float(control.value)
        out[name] = None if spec.optional and value <= 0 else value
    return out
