"""What ``train`` uses when the caller does not say: steps, feature bank, refinement and object
defaults of the model it makes, and the noise added to the features while fitting."""

from __future__ import annotations

import dataclasses

from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.model.network import SPLIT_FIT_2D, InstanceConfig, RefineConfig

DEFAULT_STEPS = 400
# A 2D model's default steps: fewer, as early stopping: one plane's scribbles overfit sooner
# (benchmarks/results/quality-2d-cpu.md). Volumes keep 400.
DEFAULT_STEPS_2D = 100
# Std of the Gaussian noise added to the standardised features at every step. Scribbles are
# few and clustered, so without it the head fits them with huge logits and draws the boundary
# wherever the nearest scribble happens to be; with it, the decision boundary sits between the
# classes in feature space (measured in benchmarks/bench_quality.py).
INPUT_NOISE = 1.0
# The feature kinds of a 2D model when none are given: Gaussians only. From one plane's
# scribbles, the derivative features (gradient, Laplacian, Hessian) let the head learn "the
# centre of the one painted object" and miss dimmer ones (benchmarks/results/quality-2d-cpu.md);
# in 3D, where strokes span planes, every kind helps.
DEFAULT_KINDS_2D = ("gaussian",)


def default_steps(ndim: int) -> int:
    """The optimisation steps ``train`` makes when none are given: ``DEFAULT_STEPS`` for
    volumes, ``DEFAULT_STEPS_2D`` for 2D images."""
    return DEFAULT_STEPS if ndim == 3 else DEFAULT_STEPS_2D


# The local fit's weight in 2D models: a fifth of the volumes' (see default_refine).
FIT_WEIGHT_2D = 0.1


def default_refine(ndim: int) -> RefineConfig:
    """The refinement a model ``train`` makes carries: ``RefineConfig()`` for volumes; for 2D
    images the same with the local intensity fit at ``FIT_WEIGHT_2D``. In a plane, a dim
    out-of-focus object beside a bright one fits the object class better than the background,
    and a strong fit grows it; a weak one still helps unevenly lit planes
    (benchmarks/results/quality-2d-cpu.md). Volumes see the planes above and below, where the
    fit at its full weight helps (benchmarks/results/quality-cpu.md)."""
    return RefineConfig() if ndim == 3 else RefineConfig(fit_weight=FIT_WEIGHT_2D)


def default_instances(ndim: int) -> InstanceConfig:
    """The object defaults a model ``train`` makes carries: ``InstanceConfig()`` for volumes;
    for 2D images the same with the seeding fit at ``SPLIT_FIT_2D`` (as the refinement's fit is
    weaker in a plane: ``default_refine``)."""
    return InstanceConfig() if ndim == 3 else InstanceConfig(split_fit=SPLIT_FIT_2D)


def default_features(ndim: int, sigmas=None) -> FeatureSpec:
    """The feature bank ``train`` uses when none is given: every kind for volumes (``ndim``
    3), ``DEFAULT_KINDS_2D`` for 2D images; ``sigmas`` (physical units) or the default ones."""
    spec = FeatureSpec() if ndim == 3 else FeatureSpec(kinds=DEFAULT_KINDS_2D)
    return spec if sigmas is None else dataclasses.replace(spec, sigmas=tuple(sigmas))
