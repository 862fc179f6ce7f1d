"""magicgui controls made from the parameter schemas (the ``Param`` fields of ``RefineConfig``
and ``InstanceConfig``), so the widget's ranges, steps, labels and defaults are the config's
own and cannot drift from it."""

from __future__ import annotations

from magicgui.widgets import ComboBox, FloatSpinBox, SpinBox

from napari_pacseg.model.network import (
    InstanceConfig,
    RefineConfig,
    instance_params_schema,
    refine_params_schema,
)


def _none_value(spec) -> float:
    """The value of an optional parameter's control that stands for None: one step below its
    range (so the range's own low end, e.g. 0, stays a value); any value below the range
    reads as None."""
    return spec.low - spec.step


def none_text(spec) -> str:
    """What an optional parameter's control shows for None: the first words of its ``off``
    ("auto", "off")."""
    return spec.off.split(",")[0].split(" (")[0]


def param_controls(schema: dict, defaults) -> dict:
    """One control per parameter of ``schema``, at ``defaults``' values: a choice of odd sizes
    for odd integers, a spin box otherwise; an optional parameter's spin box has one more
    value below its range for None, shown as ``none_text`` ("auto", "off")."""
    controls = {}
    for name, spec in schema.items():
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
            low = _none_value(spec) if spec.optional else spec.low
            control = FloatSpinBox(
                label=spec.label, min=low, max=spec.high, step=spec.step,
                value=low if value is None else value,
            )  # fmt: skip
            if spec.optional:
                control.native.setSpecialValueText(none_text(spec))
        off = f"; {none_text(spec)}: {spec.off}" if spec.optional else ""  # labels stay short
        control.tooltip = f"{spec.help} ({spec.low:g}-{spec.high:g}{off})"
        controls[name] = control
    return controls


def set_param_controls(controls: dict, schema: dict, config) -> None:
    """Show ``config``'s values in the controls."""
    for name, control in controls.items():
        value = getattr(config, name)
        control.value = shown_none(control) if schema[name].optional and value is None else value


def param_values(controls: dict, schema: dict) -> dict:
    """The controls' values as config fields (a dict of overrides)."""
    out = {}
    for name, control in controls.items():
        spec = schema[name]
        value = int(control.value) if spec.integer else float(control.value)
        out[name] = None if spec.optional and value < spec.low else value
    return out


def refine_controls() -> dict:
    """One control per refinement parameter, at ``RefineConfig()``'s defaults."""
    return param_controls(refine_params_schema(), RefineConfig())


def set_refine_controls(controls: dict, refine: RefineConfig) -> None:
    """Show ``refine``'s values in the controls."""
    set_param_controls(controls, refine_params_schema(), refine)


def refine_values(controls: dict) -> dict:
    """The controls' values as ``RefineConfig`` fields (a ``segment(refine=...)`` dict)."""
    return param_values(controls, refine_params_schema())


BLOBS = ("blobs (split each piece)", "")  # the boundary control's choice of blobs mode


def shown_none(control):
    """The value a control shows for a setting's None: an optional number's lowest value
    (``param_controls``), the boundary control's blobs."""
    return control.min if hasattr(control, "min") else BLOBS[1]


def instance_controls() -> dict:
    """One control per instance parameter, at ``InstanceConfig()``'s defaults, then
    ``"boundary"``: what the objects are, blobs or the cells a class encloses (its choices
    are the model's classes: ``set_instance_controls``)."""
    controls = param_controls(instance_params_schema(), InstanceConfig())
    controls["boundary"] = ComboBox(label="Objects are", choices=[BLOBS], value="")
    controls["boundary"].tooltip = (
        "blobs: each piece of a class, split where it narrows; cells inside a class: the "
        "regions a boundary class (membrane, cell wall) encloses, tiling the tissue, with the "
        "object radius as the cells' radius"
    )
    return controls


def set_instance_controls(controls: dict, config: InstanceConfig, classes=()) -> None:
    """Show ``config``'s values in the controls; ``classes`` (the model's class names) become
    the boundary control's choices."""
    numbers = {k: v for k, v in controls.items() if k != "boundary"}
    set_param_controls(numbers, instance_params_schema(), config)
    names = list(classes)
    if config.boundary is not None and config.boundary not in names:
        names.append(config.boundary)
    box = controls["boundary"]
    box.choices = [BLOBS, *((f"cells inside '{n}'", n) for n in names)]
    box.value = config.boundary or ""


def instance_values(controls: dict) -> dict:
    """The controls' values as ``InstanceConfig`` fields (a ``segment(instances=...)`` dict)."""
    numbers = {k: v for k, v in controls.items() if k != "boundary"}
    values = param_values(numbers, instance_params_schema())
    values["boundary"] = controls["boundary"].value or None
    return values
