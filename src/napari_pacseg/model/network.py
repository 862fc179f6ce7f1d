"""``PacSegModel``: the trained segmentation model, built only from a JSON-able config.

image -> intensity normalisation -> feature bank (+ optional context encoder/decoder that pools
with indices and unpools with ``max_unpool3d``) -> per-voxel MLP head (``voxel_mlp``) -> logits.
Refinement (``pac_crf3d``) defaults travel with the model in ``RefineConfig``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_pacseg.checks import as_tuple_field, is_int, is_real, short_repr, unprintable_chars
from napari_pacseg.model.classes import MAX_CLASSES, ClassInfo, check_distinct_names
from napari_pacseg.model.features import MIN_AXIS_SIGMA, FeatureSpec, compute_features
from napari_pacseg.model.normalise import Normalisation, apply_range, image_range
from pacseg_kernels import ACTIVATIONS, VoxelMLP, max_pool3d_with_indices, max_unpool3d

MAX_WIDTH = 1024
MAX_LAYERS = 8
MAX_CHANNELS = 64
MAX_PROVENANCE_CHARS = 10_000


@dataclass(frozen=True)
class ContextConfig:
    """A small 3D encoder/decoder whose output joins the features.

    Level ``l``: conv3d (``channels[l]``, ``kernel_size``) + ReLU, then max pooling by ``pool``
    with indices; back up: ``max_unpool3d`` to the level's size, add the level's activations,
    conv3d + ReLU to the channels of the level above (``channels[0]`` at the top).
    """

    channels: tuple[int, ...] = (8, 16)
    kernel_size: int = 3
    pool: int = 2

    def __post_init__(self) -> None:
        as_tuple_field(self, "channels")
        if (
            not isinstance(self.channels, tuple)
            or not 1 <= len(self.channels) <= 4
            or not all(is_int(c) and 1 <= c <= MAX_CHANNELS for c in self.channels)
        ):
            raise ValueError(
                f"ContextConfig: channels must be 1 to 4 ints in [1, {MAX_CHANNELS}], got {short_repr(self.channels)}"
            )
        if not is_int(self.kernel_size) or self.kernel_size not in (1, 3, 5):
            raise ValueError(
                f"ContextConfig: kernel_size must be the int 1, 3 or 5, got {short_repr(self.kernel_size)}"
            )
        if not is_int(self.pool) or self.pool not in (2, 3, 4):
            raise ValueError(
                f"ContextConfig: pool must be the int 2, 3 or 4, got {short_repr(self.pool)}"
            )


@dataclass(frozen=True)
class HeadConfig:
    """The per-voxel MLP: hidden widths and activation (between layers)."""

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"

    def __post_init__(self) -> None:
        as_tuple_field(self, "hidden")
        if (
            not isinstance(self.hidden, tuple)
            or len(self.hidden) > MAX_LAYERS - 1
            or not all(is_int(w) and 1 <= w <= MAX_WIDTH for w in self.hidden)
        ):
            raise ValueError(
                f"HeadConfig: hidden must be at most {MAX_LAYERS - 1} widths (ints) in [1, {MAX_WIDTH}], got {short_repr(self.hidden)}"
            )
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(
                f"HeadConfig: activation {short_repr(self.activation)} is not one of {ACTIVATIONS}"
            )


@dataclass(frozen=True)
class Param:
    """How a parameter is shown and bounded: the schema from which the widget's controls and
    the command's flags are made, so their ranges, steps and help cannot drift from the config.

    ``low``/``high``: the allowed range (inclusive); ``step``: the control's step; ``odd``: odd
    integers only; ``optional``: None is allowed (the widget's control has a value for it one
    step below the range, shown as the first words of ``off``; the command takes "none");
    ``off``: what None means, in the controls' and flags' help.
    """

    label: str
    help: str
    low: float
    high: float
    step: float = 1
    odd: bool = False
    optional: bool = False
    off: str = "off"

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int)


def _param(default, label: str, help: str, low, high, **kwargs):
    return field(default=default, metadata={"param": Param(label, help, low, high, **kwargs)})


# Ranges: wide enough for any sensible use, narrow enough that the mean field stays finite in
# float32 (logits / temperature, guide / guide_sigma, compat * (1 - message)) and bounded work.
@dataclass(frozen=True)
class RefineConfig:
    """Default ``pac_crf3d`` parameters.

    ``kernel_size``, ``dilation`` and ``spatial_sigma`` are in voxels of the finest axis; along
    coarser axes the window and the spatial falloff shrink to the same physical extent (see
    ``window``), so with a z spacing of 1 um and 0.4 um in y and x a kernel of 5 is 3 x 5 x 5.
    The guide is the normalised image divided by ``guide_sigma`` (smaller: only voxels of very
    similar intensity pass messages). The head's logits are divided by ``temperature`` first: a
    head trained on a few scribbles is overconfident, and a larger temperature lets the image's
    edges overrule it near boundaries, where it only extrapolates. ``fit_weight`` times the
    local intensity fit (``local_fit``: each voxel against the local mean of each class in a
    Gaussian window of ``fit_sigma`` voxels of the finest axis) is added to those logits first:
    it judges a dim object against its own surroundings, which the head, trained on absolute
    intensities, cannot under uneven light.

    Each field carries its ``Param`` (``refine_params_schema()``): label, help, range and step.
    Ranges (anything else is a ``ValueError``): iterations an int in [0, 50]; kernel_size an
    odd int in [1, 15]; dilation an int in [1, 8]; compat in [0, 100]; spatial_sigma None or
    in [0.1, 50]; guide_sigma in [0.01, 10]; temperature in [0.1, 100]; fit_weight in [0, 10];
    fit_sigma in [0.5, 32]. Within them every step
    is finite in float32. ``segment`` further bounds the work of the window at a given spacing
    (``engine.settle``).
    """

    iterations: int = _param(5, "Iterations", "mean-field iterations", 0, 50)
    kernel_size: int = _param(
        5, "Kernel size", "odd window size along the finest axis", 1, 15, step=2, odd=True
    )
    dilation: int = _param(1, "Dilation", "window dilation", 1, 8)
    compat: float = _param(
        10.0, "Compatibility", "Potts compatibility weight", 0.0, 100.0, step=0.5
    )
    spatial_sigma: float | None = _param(
        2.0, "Spatial sigma", "spatial falloff in voxels of the finest axis", 0.1, 50.0,
        step=0.5, optional=True,
    )  # fmt: skip
    guide_sigma: float = _param(
        0.1, "Guide sigma", "intensity similarity scale", 0.01, 10.0, step=0.01
    )
    temperature: float = _param(8.0, "Temperature", "logit temperature", 0.1, 100.0, step=0.5)
    # 0.75: of the weights 0.5, 0.75 and 1, the most the generator's unevenly lit volumes take
    # within 0.005 of mean boundary F (benchmarks/bench_quality.py with the weight forced: 0.844,
    # 0.841, 0.836; quality-cpu.md holds 0.75's run); on real dense nuclei it splits more
    # touching nuclei than 0.5 (benchmarks/results/realdata-cpu.md).
    fit_weight: float = _param(
        0.75, "Local fit", "weight of the local intensity fit (0: off; volumes in cells mode: "
        "the objects' Split fit unless 0)", 0.0, 10.0, step=0.1,
    )
    fit_sigma: float = _param(
        5.0, "Fit window", "local fit's window, voxels of the finest axis", 0.5, 32.0, step=0.5
    )

    def __post_init__(self) -> None:
        check_params(self)

    def window(
        self, spacing, ndim: int = 3
    ) -> tuple[tuple[int, int, int], tuple[float, float, float] | None]:
        """``(kernel_size, spatial_sigma)`` per axis (voxels) for a ``(z, y, x)`` spacing:
        ``kernel_size`` and ``spatial_sigma`` scaled by finest spacing / axis spacing, every
        axis keeping at least one neighbour on each side (so the refinement stays 3D); for a
        2D model (``ndim=2``) the window is one plane: ``1 x k x k``."""
        finest = min(spacing[3 - ndim :])
        radius = self.kernel_size // 2
        kernel = tuple(
            2 * (max(1, round(radius * finest / s)) if radius else 0) + 1 for s in spacing
        )
        if ndim == 2:
            kernel = (1, *kernel[1:])
        sigma = (
            None
            if self.spatial_sigma is None
            else tuple(float(self.spatial_sigma) * finest / s for s in spacing)
        )
        return kernel, sigma

    def fit_window(self, spacing, ndim: int = 3) -> tuple[float, float, float] | None:
        """The local fit's Gaussian per axis (voxels) for a ``(z, y, x)`` spacing:
        ``fit_sigma`` scaled by finest spacing / axis spacing (an axis below ``MIN_AXIS_SIGMA``
        voxels is left unsmoothed; z for a 2D model); None when ``fit_weight`` is 0."""
        if not self.fit_weight:
            return None
        finest = min(spacing[3 - ndim :])
        sig = [float(self.fit_sigma) * finest / s for s in spacing]
        if ndim == 2:
            sig[0] = 0.0
        return tuple(v if v >= MIN_AXIS_SIGMA else 0.0 for v in sig)


def plane_spacing(spacing) -> tuple[float, float, float]:
    """The ``(z, y, x)`` spacing under which a 2D image with in-plane spacing ``(y, x)`` is
    segmented as a one-plane volume: z is the coarser in-plane spacing (it only sets filter
    sizes along an axis of one plane, where every window is one plane wide)."""
    y, x = spacing
    return (max(y, x), y, x)


def refine_params_schema() -> dict[str, Param]:
    """``RefineConfig``'s fields and their ``Param``, in field order."""
    return params_schema(RefineConfig)


def params_schema(cls) -> dict[str, Param]:
    """A config class's numeric fields and their ``Param``, in field order (a field without a
    ``Param``, such as ``InstanceConfig.boundary``, has controls of its own)."""
    return {f.name: f.metadata["param"] for f in fields(cls) if "param" in f.metadata}


def check_params(config) -> None:
    """Check a frozen config's ``Param`` fields against their ranges (``ValueError`` naming the
    field and its range) and store numpy scalars as Python numbers, so it stays JSON-able."""
    for name, spec in params_schema(type(config)).items():
        value = getattr(config, name)
        if spec.optional and value is None:
            continue
        kind = numbers.Integral if spec.integer else numbers.Real
        ok = isinstance(value, kind) and not isinstance(value, (bool, np.bool_))
        ok = ok and (spec.integer or value == value) and spec.low <= value <= spec.high
        if spec.odd:
            ok = ok and value % 2 == 1
        if not ok:
            what = "an odd int" if spec.odd else "an int" if spec.integer else "a number"
            none = "None or " if spec.optional else ""
            raise ValueError(
                f"{type(config).__name__}: {name} must be {none}{what} in "
                f"[{spec.low:g}, {spec.high:g}], got {short_repr(value)}"
            )
        object.__setattr__(config, name, int(value) if spec.integer else float(value))


def with_overrides(base, value, what: str):
    """A call's parameters from a config's defaults ``base`` (a frozen dataclass): ``base``
    (``value`` True), ``value`` itself (an instance of the same class), or ``base`` with the
    fields of a dict replaced (unknown names refused); anything else is a ``ValueError``
    naming ``what``. (False, "none", is the caller's to handle.)"""
    cls = type(base)
    if value is True:
        return base
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, value)) - known)
        if unknown:
            raise ValueError(
                f"{what}: unknown parameters {short_repr(unknown)}; known: {sorted(known)}"
            )
        return replace(base, **value)
    article = "an" if cls.__name__[0] in "AEIOU" else "a"
    raise ValueError(
        f"{what} must be True, False, {article} {cls.__name__} or a dict of {cls.__name__} "
        f"overrides, got {short_repr(value)}"
    )


# The seeding fit of 2D models (``InstanceConfig.split_fit``; volumes: its default). In a plane
# a strong fit also grows dim out-of-focus blobs beside bright objects (as the refinement's own
# fit: ``training.defaults.FIT_WEIGHT_2D``), which then seed objects of their own
# (benchmarks/results/realdata-cpu.md: 2D DSB nuclei).
SPLIT_FIT_2D = 1.0

# The brightness weight of blobs mode when ``InstanceConfig.brightness`` is None (auto): half a
# radius of distance for the image's full range (benchmarks/results/realdata-cpu.md, the dense
# nuclei's splits; benchmarks/results/instances-cpu.md, the generator's within 0.005).
AUTO_BRIGHTNESS = 0.5

# Objects the image's border cuts are kept (auto size rule, blobs mode) from this share of the
# smallest whole object up: a ball of a quarter of ``radius``, the smallest cell of cells mode. A
# crop of dense nuclei holds many such pieces, most of them nuclei partly in view
# (benchmarks/results/realdata-cpu.md counts the reference objects under either size).
BORDER_SHARE = 0.125


@dataclass(frozen=True)
class InstanceConfig:
    """How ``segment(..., instances=True)`` separates objects (``napari_pacseg.instances.labels``).

    Lengths are in the units of the voxel spacing (um for the sample). Two modes:

    * blobs (``boundary`` None, the default): each connected piece of a non-background class is
      split by a watershed of its distance transform (in physical units) from seeds where the
      distance rises more than ``(1 - sensitivity) * radius`` above the saddles around it (0.3 at
      the defaults): two touching objects of about ``radius`` or more split, the bumps of one
      smooth object do not; objects several times ``radius`` with rough surfaces can split, so
      set ``radius`` to the size of the objects. ``brightness`` adds the image's own evidence:
      the seeds and the watershed follow the distance in units of ``radius`` plus
      ``brightness`` times the image smoothed at a quarter of ``radius`` (in the segmentation's
      normalised units, clipped to 0..1), so two bright objects with a dim gap split even where
      the foreground fused them; None (the default, auto) weighs it ``AUTO_BRIGHTNESS`` (half a
      radius of distance for the full range of brightness), 0 uses the mask's shape alone
      (``brightness_weight``). ``split_fit`` seeds the objects from a second refinement whose
      local intensity fit weighs ``split_fit`` (``RefineConfig.fit_weight``; 2.0 by default,
      1.0 in the 2D models ``train`` makes, ``SPLIT_FIT_2D``; stronger than the labels' own):
      the fit judges each voxel against its local surroundings, so the dim gap between
      touching objects drops out of that foreground and its pieces, split as above, are the
      seeds; the objects then grow over the labels' foreground from them, so the labels keep
      their shape. A piece with fewer seeds there than its own shape gives, or that foreground
      shaves by less than the smallest object, is split by its own shape. There are no such
      seeds with ``split_fit`` 0, without refinement or its local fit (``fit_weight`` 0),
      where the refinement's fit weighs ``split_fit`` already, and in cells mode.
    * cells (``boundary`` the name of a class, e.g. ``"membrane"``): objects are the regions
      that class encloses, and they tile the tissue (``napari_pacseg.instances.cells``). Each
      connected piece of the other non-background classes (the cells' interiors) is split as
      above, its elevation the distance to the boundary in units of ``radius`` plus ``1 +
      brightness`` (None counts as 0) times the image's boundary contrast turned into a valley
      (the smoothed image, oriented so the boundary's stain is high); then every boundary
      voxel joins the cell it reaches most cheaply, a step across the stain costing more; and
      the labels draw the boundary class where the cells meet (the rest of a cell takes its
      class: ``cells.boundary_on_cells``); in volumes the refinement's own fit then weighs
      ``split_fit`` (a user's ``fit_weight`` other than 0 included; ``split_fit`` 0 keeps it:
      ``engine.request.objects_refine``). ``radius`` is the cells' radius. Naming the
      background class means the whole image is tissue (a crop inside it).

    Pieces and fragments under ``min_volume`` are dropped (fragments of a split first join
    their neighbour; in cells mode a dropped piece joins the cells around it); its default,
    None, keeps objects from a ball of half ``radius`` up (``smallest``), so the one size a
    user gives sets both, and in blobs mode objects the image's border cuts from
    ``BORDER_SHARE`` of that up (a ball of a quarter of ``radius``). The
    defaults were chosen on ``benchmarks/bench_instances.py`` (nuclei of 3-6.5 um radius) and
    ``benchmarks/bench_realdata.py``."""

    radius: float = _param(
        3.0, "Object radius", "expected radius of the smallest objects (spacing units)",
        0.01, 1e4, step=0.5,
    )  # fmt: skip
    sensitivity: float = _param(
        0.9, "Split sensitivity", "higher splits touching objects more readily", 0.0, 0.95,
        step=0.05,
    )  # fmt: skip
    min_volume: float | None = _param(
        None, "Min volume", "smallest object kept (spacing units cubed; a 2D image's: squared)",
        0.0, 1e12, step=5.0, optional=True,
        off="auto, a ball of half the radius (cut by the image's border: an eighth of that; "
        "cells: a ball of a quarter of the radius)",
    )  # fmt: skip
    brightness: float | None = _param(
        None, "Brightness weight", "how much dim gaps split bright objects",
        0.0, 10.0, step=0.25, optional=True,
        off=f"auto, {AUTO_BRIGHTNESS:g} (cells: the boundary's contrast weighs 1)",
    )  # fmt: skip
    split_fit: float = _param(
        2.0, "Split fit", "local fit weight of the refinement that seeds the objects (cells: "
        "of the refinement; 0: the labels' own shapes)", 0.0, 10.0, step=0.25,
    )  # fmt: skip
    boundary: str | None = None

    def __post_init__(self) -> None:
        check_params(self)
        b = self.boundary
        if b is not None and (
            not isinstance(b, str) or not 0 < len(b) <= 100 or not b.strip() or unprintable_chars(b)
        ):
            raise ValueError(
                "InstanceConfig: boundary must be None (blobs) or the name of a class (printable "
                f"text of 1-100 characters), got {short_repr(b)}"
            )

    def smallest(self, planar: bool = False, cut: bool = False) -> float:
        """The smallest object kept: ``min_volume``, or when it is None (auto) a ball of half
        ``radius`` (``planar``, a 2D image: a disc, an area). In cells mode a smaller piece is
        not dropped but joins the cells around it, merging a real small cell with its
        neighbour, so auto there takes only fragments far smaller than a cell: a ball of a
        quarter of ``radius``. ``cut``: the object touches the image's border, which may have
        cut it to any size: auto keeps it from ``BORDER_SHARE`` of the ball up (blobs mode;
        a given ``min_volume`` holds everywhere)."""
        if self.min_volume is not None:
            return self.min_volume
        r = self.radius / (4 if self.boundary is not None else 2)
        ball = math.pi * r * r if planar else 4 / 3 * math.pi * r**3
        return ball * BORDER_SHARE if cut and self.boundary is None else ball

    @property
    def h(self) -> float:
        """The seeds' least height above the saddles, in units of ``radius`` (the elevation's
        unit: ``split_piece``)."""
        return 1.0 - self.sensitivity

    @property
    def brightness_weight(self) -> float:
        """The weight of the image's brightness in blobs mode's elevation: ``brightness``, or
        ``AUTO_BRIGHTNESS`` when it is None (auto)."""
        return AUTO_BRIGHTNESS if self.brightness is None else self.brightness

    @property
    def smoothing(self) -> float:
        """The Gaussian sigma of the brightness evidence, in spacing units."""
        return 0.25 * self.radius


def instance_params_schema() -> dict[str, Param]:
    """``InstanceConfig``'s fields and their ``Param``, in field order."""
    return params_schema(InstanceConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a ``PacSegModel`` (JSON-able; see ``config_to_dict``).

    ``classes[0]`` is the background. ``spacing`` is the (z, y, x) voxel size the model was
    trained at, in the units of ``features.sigmas``. ``ndim``: 3 for a model of volumes, 2 for
    a model of 2D images (trained on 2D images; its ``spacing`` is ``plane_spacing`` of the
    in-plane one, and its windows are one plane: ``in_plane_spacing`` gives ``(y, x)``).
    ``instances``: how objects are separated
    (``segment(..., instances=True)``). ``provenance`` records how it was made.
    """

    in_channels: int
    classes: tuple[ClassInfo, ...]
    features: FeatureSpec = field(default_factory=FeatureSpec)
    head: HeadConfig = field(default_factory=HeadConfig)
    context: ContextConfig | None = None
    refine: RefineConfig = field(default_factory=RefineConfig)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    instances: InstanceConfig = field(default_factory=InstanceConfig)
    provenance: dict[str, str] = field(default_factory=dict)
    ndim: int = 3
    normalisation: Normalisation | None = field(default_factory=Normalisation)

    def __post_init__(self) -> None:
        from napari_pacseg.model.features import MAX_SIGMA_VOXELS

        if not is_int(self.ndim) or self.ndim not in (2, 3):
            raise ValueError(
                f"ModelConfig: ndim must be the int 2 (a model of 2D images) or 3 (of volumes), got {short_repr(self.ndim)}"
            )
        if not (is_int(self.in_channels) and 1 <= self.in_channels <= MAX_CHANNELS):
            raise ValueError(
                f"ModelConfig: in_channels must be an int in [1, {MAX_CHANNELS}], got {short_repr(self.in_channels)}"
            )
        as_tuple_field(self, "classes")
        if not isinstance(self.classes, tuple) or not all(
            isinstance(c, ClassInfo) for c in self.classes
        ):
            raise ValueError("ModelConfig: classes must be a tuple of ClassInfo")
        if not 2 <= len(self.classes) <= MAX_CLASSES:
            raise ValueError(
                f"ModelConfig: need 2 to {MAX_CLASSES} classes (class 0 = background), got {len(self.classes)}"
            )
        check_distinct_names([c.name for c in self.classes], "ModelConfig: classes")
        for name, kind in (
            ("features", FeatureSpec),
            ("head", HeadConfig),
            ("refine", RefineConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(
                    f"ModelConfig: {name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}"
                )
        if self.context is not None and not isinstance(self.context, ContextConfig):
            raise ValueError(
                f"ModelConfig: context must be None or a ContextConfig, got {type(self.context).__name__}"
            )
        norm = self.normalisation
        if norm is not None and not isinstance(norm, Normalisation):
            raise ValueError(
                f"ModelConfig: normalisation must be None or a Normalisation, got {type(norm).__name__}"
            )
        if norm is not None and norm.min_contrast is not None:
            if len(norm.min_contrast) != self.in_channels:
                raise ValueError(
                    f"ModelConfig: normalisation.min_contrast has {len(norm.min_contrast)} values for {self.in_channels} channel(s)"
                )
        as_tuple_field(self, "spacing")
        if (
            not isinstance(self.spacing, tuple)
            or len(self.spacing) != 3
            or not all(is_real(s) and s > 0 for s in self.spacing)
        ):
            raise ValueError(
                f"ModelConfig: spacing must be 3 positive finite numbers (z, y, x), got {short_repr(self.spacing)}"
            )
        if not isinstance(self.provenance, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.provenance.items()
        ):
            raise ValueError("ModelConfig: provenance must map strings to strings")
        for k, v in self.provenance.items():
            if not 0 < len(k) <= 100 or len(v) > MAX_PROVENANCE_CHARS or unprintable_chars(k + v):
                raise ValueError(
                    f"ModelConfig: provenance entry {short_repr(k)} must be a key of 1 to 100 and a value of at most "
                    f"{MAX_PROVENANCE_CHARS} printable characters (no control characters)"
                )
        spec = self.features
        if spec.kinds and spec.sigmas:
            widest = max(spec.sigmas) / min(self.spacing[3 - self.ndim :])
            if not widest <= MAX_SIGMA_VOXELS:
                raise ValueError(
                    f"ModelConfig: sigma {max(spec.sigmas):.4g} is {widest:.4g} voxels at spacing "
                    f"({', '.join(f'{s:.4g}' for s in self.spacing)}); at most {MAX_SIGMA_VOXELS:g} "
                    "are supported (check the spacing units)"
                )
        if self.n_features > MAX_WIDTH:
            raise ValueError(
                f"ModelConfig: {self.n_features} features per voxel; at most {MAX_WIDTH} are supported"
            )

    @property
    def in_plane_spacing(self) -> tuple[float, ...]:
        """The spacing as users give it: ``(y, x)`` for a 2D model, ``(z, y, x)`` for a 3D one."""
        return tuple(self.spacing[3 - self.ndim :])

    def volume_spacing(self, spacing=None) -> tuple[float, float, float]:
        """The checked ``(z, y, x)`` spacing the engine runs at for a user's ``spacing``
        (default: the training spacing). A 3D model takes 3 numbers; a 2D model ``(y, x)``, or
        3 numbers for a one-plane volume (z is then not used)."""
        from napari_pacseg.checks import check_spacing

        if self.ndim == 3 or spacing is None:
            checked = check_spacing(spacing, self.spacing)
        else:
            n = 3 if hasattr(spacing, "__len__") and len(spacing) == 3 else 2
            checked = plane_spacing(check_spacing(spacing, None, n)[-2:])
        if spacing is not None:
            self._check_feature_reach(checked)
        return checked

    def _check_feature_reach(self, spacing) -> None:
        """``ValueError`` when the widest feature at ``spacing`` spans more voxels than the
        features support: a spacing in other units than the model's, caught before any work."""
        from napari_pacseg.model.features import MAX_SIGMA_VOXELS

        spec = self.features
        if not (spec.kinds and spec.sigmas):
            return
        widest = max(spec.sigmas) / min(spacing[3 - self.ndim :])
        if not widest <= MAX_SIGMA_VOXELS:
            shown = ", ".join(f"{s:.4g}" for s in spacing[3 - self.ndim :])
            trained = ", ".join(f"{s:.4g}" for s in self.in_plane_spacing)
            raise ValueError(
                f"spacing ({shown}): the model's widest feature (sigma {max(spec.sigmas):.4g}) "
                f"would span {widest:.4g} voxels, and at most {MAX_SIGMA_VOXELS:g} are supported; "
                f"give the spacing in the model's units (it was trained at ({trained}))"
            )

    @property
    def n_features(self) -> int:
        """Width of the head's input: the feature bank (+ the context decoder's channels)."""
        n = self.in_channels * self.features.channels_per_image_channel()
        return n + (self.context.channels[0] if self.context else 0)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


class _Context(nn.Module):
    """The ``ContextConfig`` net; for a 2D model (``ndim=2``) its windows and pooling are one
    plane (``1 x k x k``, ``1 x p x p``)."""

    def __init__(self, cfg: ContextConfig, in_channels: int, ndim: int = 3) -> None:
        super().__init__()
        ch, k = cfg.channels, cfg.kernel_size
        kernel, pad = ((1, k, k), (0, k // 2, k // 2)) if ndim == 2 else (k, k // 2)
        self.pool = (1, cfg.pool, cfg.pool) if ndim == 2 else cfg.pool
        self.enc = nn.ModuleList(
            nn.Conv3d(in_channels if i == 0 else ch[i - 1], c, kernel, padding=pad)
            for i, c in enumerate(ch)
        )
        self.dec = nn.ModuleList(
            nn.Conv3d(c, ch[max(i - 1, 0)], kernel, padding=pad) for i, c in enumerate(ch)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, pooled = [], []
        for conv in self.enc:
            h = F.relu(conv(x))
            skips.append(h)
            x, idx = max_pool3d_with_indices(h, self.pool)
            pooled.append(idx)
        for level in reversed(range(len(self.enc))):
            size = skips[level].shape
            x = max_unpool3d(x, pooled[level], self.pool, output_size=size) + skips[level]
            x = F.relu(self.dec[level](x))
        return x


def _no_watch(stage: str):
    return contextlib.nullcontext()


class PacSegModel(nn.Module):
    """Features -> (context) -> MLP head -> class logits, rebuilt from a ``ModelConfig``.

    ``forward(image)``: ``(N, C, D, H, W)`` float image (raw intensities; normalised inside)
    -> logits ``(N, K, D, H, W)`` float32. ``spacing`` (z, y, x) defaults to the training spacing.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.context = (
            _Context(config.context, config.in_channels, config.ndim) if config.context else None
        )
        self.head = VoxelMLP(
            config.n_features, config.head.hidden, config.n_classes, config.head.activation
        )

    def halo(self, spacing=None) -> tuple[int, int, int]:
        """Voxels per axis beyond which the logits of a voxel do not depend on the image
        (features and context encoder/decoder), for tiling."""
        spacing = spacing or self.config.spacing
        halo = tuple(max(h, self.context_reach) for h in self.config.features.radius(spacing))
        return (0, *halo[1:]) if self.config.ndim == 2 else halo

    @property
    def clip(self) -> tuple[float, float] | None:
        """The clip of normalised intensities (None for a model file from before it)."""
        norm = self.config.normalisation
        return None if norm is None else norm.clip

    @property
    def context_reach(self) -> int:
        """Voxels (any axis) beyond which the context net's output at a voxel does not depend on
        its input (0 without one): each level's two convolutions at that level's scale, plus
        the pooling window of the coarsest level."""
        ctx = self.config.context
        if ctx is None:
            return 0
        levels = len(ctx.channels)
        convs = sum(ctx.pool**lv * (ctx.kernel_size // 2) * 2 for lv in range(levels))
        return convs + ctx.pool**levels

    @property
    def grid(self) -> int:
        """Tile origins must be multiples of this (the context net's pooling grid)."""
        ctx = self.config.context
        return ctx.pool ** len(ctx.channels) if ctx is not None else 1

    def crop_features(self, normalized: torch.Tensor, spacing=None, crop=None, watch=_no_watch):
        """Head input ``(N, n_features, *crop)`` float32 of ``crop`` (3 slices; default: all)
        of a normalised image ``(N, C, D, H, W)``: the feature bank and the context net see the
        whole image (a tile's halo is their support) and only the crop is kept. ``watch(stage)``
        gives a context manager that times "features" and "context"."""
        spacing = spacing or self.config.spacing
        with watch("features"):
            feats = compute_features(normalized, self.config.features, spacing, crop=crop)
        if self.context is not None:
            with watch("context"):
                ctx = self.context(normalized)
                if crop is not None:
                    ctx = ctx[(slice(None), slice(None), *crop)]
                feats = torch.cat([feats, ctx], dim=1)
        return feats

    def crop_logits(
        self, normalized: torch.Tensor, spacing=None, crop=None, watch=_no_watch,
        matmul_dtype: torch.dtype | None = None,
    ):  # fmt: skip
        """Class logits ``(N, K, *crop)`` float32 of ``crop`` of a normalised image: features ->
        context -> head, what ``segment`` runs on every tile (its "head" stage timed by
        ``watch``; its products in ``matmul_dtype``, as ``voxel_mlp`` takes it)."""
        feats = self.crop_features(normalized, spacing, crop, watch)
        with watch("head"):
            return self.head(feats, matmul_dtype=matmul_dtype)

    def forward(self, image: torch.Tensor, spacing=None, intensity_range=None) -> torch.Tensor:
        """Unrefined class logits ``(N, K, D, H, W)`` float32 of raw images ``(N, C, D, H, W)``.

        Each image is normalised by ``intensity_range`` (``(lo, hi)`` tensors broadcasting to
        ``(N, C, 1, 1, 1)``), by default by its own ``normalise.image_range``, as ``segment``
        does (then clipped to the model's ``normalisation.clip``); the logits are then
        ``segment``'s before refinement (up to float rounding of the tiling). ``spacing`` (z, y, x) defaults to the training spacing.
        """
        if image.ndim != 5 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"PacSegModel: expected an image (N, {self.config.in_channels}, D, H, W), got shape {tuple(image.shape)}"
            )
        if intensity_range is None:
            norm = self.config.normalisation
            ranges = [image_range(im.detach().cpu(), norm) for im in image]
            lo = torch.cat([r[0] for r in ranges]).to(image.device)
            hi = torch.cat([r[1] for r in ranges]).to(image.device)
        else:
            lo, hi = (
                torch.as_tensor(v, dtype=torch.float32, device=image.device)
                for v in intensity_range
            )
        return self.crop_logits(apply_range(image, lo, hi, self.clip), spacing)
