"""Refinement controls that cannot reach a refused setting: the refinement visits iterations x
window taps per voxel, and ``engine.plan.settle`` refuses more than ``MAX_TAP_STEPS``. The
window depends on the spacing (``RefineConfig.window``), so the limits follow the image's
spacing and the model's kind (2D: a one-plane window)."""

from __future__ import annotations

import math

from napari_pacseg.engine.plan import MAX_TAP_STEPS
from napari_pacseg.model.network import RefineConfig, refine_params_schema


def window_taps(kernel_size: int, spacing, ndim: int) -> int:
    """The neighbours one refinement iteration visits per voxel with ``kernel_size`` at the
    ``(z, y, x)`` ``spacing`` (``ndim`` 2: one plane)."""
    kernel, _ = RefineConfig(kernel_size=kernel_size).window(spacing, ndim)
    return math.prod(kernel) - 1


def refine_limits(kernel_size: int, iterations: int, spacing, ndim: int) -> tuple[int, list[int]]:
    """``(most iterations at kernel_size, kernel sizes allowed at iterations)`` within
    ``MAX_TAP_STEPS``, inside the parameters' own ranges. The current pair is always allowed
    when it is within the limit itself."""
    schema = refine_params_schema()
    it_spec, k_spec = schema["iterations"], schema["kernel_size"]
    taps = window_taps(kernel_size, spacing, ndim)
    most = it_spec.high if taps == 0 else min(it_spec.high, MAX_TAP_STEPS // taps)
    sizes = [
        k
        for k in range(k_spec.low, k_spec.high + 1, 2)
        if iterations * window_taps(k, spacing, ndim) <= MAX_TAP_STEPS
    ]
    return max(it_spec.low, most), sizes


def limit_refine_controls(controls: dict, spacing, ndim: int) -> None:
    """Set the iterations control's maximum and the kernel-size control's choices so that no
    pair over ``MAX_TAP_STEPS`` can be picked at ``spacing``; a current value over the limit
    (a loaded model's) is lowered to it. Each control's tooltip says why its range is cut."""
    iterations, kernel = controls["iterations"], controls["kernel_size"]
    most, _ = refine_limits(int(kernel.value), 0, spacing, ndim)
    if iterations.value > most:
        iterations.value = most
    iterations.max = most
    _, sizes = refine_limits(int(kernel.value), int(iterations.value), spacing, ndim)
    if list(kernel.choices) != sizes:
        kernel.choices = sizes
    schema = refine_params_schema()
    for name, control in (("iterations", iterations), ("kernel_size", kernel)):
        spec = schema[name]
        control.tooltip = (
            f"{spec.help} ({spec.low:g}-{spec.high:g}); iterations x kernel window are kept "
            f"within {MAX_TAP_STEPS} neighbour visits per voxel at this spacing"
        )
