"""The widget's state and work, without a GUI: the current image input, the model and where it
came from, the live preview's region segmenter (its plan and logit cache, under a lock), the
running task and its cancel flag, and the work of full runs, training and live previews as
functions of that state and the parameters.

Headless: no napari, Qt or magicgui; the dock widget (``_widget``) only lays out controls and
wires them to a ``Session``, and ``_workers`` runs the work in threads. Everything here can be
driven directly (``tests/napari_pacseg/test_session.py``)::

    session = Session()
    session.use_image(layer)  # anything with name, ndim, data, scale, translate (3D: axis 0 is z)
    session.set_model(load_model(path), "file model.safetensors")
    seg = session.full_run(RunParams())(progress=..., should_cancel=...)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_pacseg.describe import describe_model, model_headline
from napari_pacseg.engine.frames import painted_frames
from napari_pacseg.engine.plan import (
    Box,
    bound_preview,
    preview_budget,
    refine_params,
    seeding_fit,
)
from napari_pacseg.engine.preview import RegionSegmenter
from napari_pacseg.engine.request import SegmentRequest, objects_refine
from napari_pacseg.engine.segment import Segmentation, segment
from napari_pacseg.instances.cells import boundary_label, boundary_on_cells, image_sums
from napari_pacseg.instances.labels import instance_config, instance_labels, table_csv
from napari_pacseg.io.model_file import load_model, save_model
from napari_pacseg.model.classes import DEFAULT_THRESHOLD, labels_from_probabilities
from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.model.network import PacSegModel
from napari_pacseg.training.defaults import default_features
from napari_pacseg.training.fit import train
from napari_pacseg.training.scribble_checks import (
    coverage_warnings,
    intensity_warnings,
    sparsity_warnings,
)

DEFAULT_CLASSES = "background, foreground"
NO_MODEL = "none: load a model file or train one from scribbles"

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


def device_choices() -> list[tuple[str, str]]:
    """(label, device) pairs: "auto" (saying what it picks: the first CUDA device, else the
    CPU), each CUDA device with its name, "cpu"."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [(f"cuda:{i} ({torch.cuda.get_device_name(i)})", f"cuda:{i}") for i in range(n)]
    auto = f"auto: {gpus[0][1]}" if gpus else "auto: cpu"  # short: the dock is narrow
    return [(auto, "auto"), *gpus, ("cpu", "cpu")]


# --- inputs and parameters ------------------------------------------------------------------------


AXIS0_CHOICES = ("z", "frames", "channels")  # what axis 0 of a 3D layer is


@dataclass(frozen=True)
class ImageInput:
    """What the computations need of an image layer, snapshotted when an action starts: the
    layer itself (only its identity is used here), its data, channel axis (of ``data``; -1
    for RGB), the shape, scale and translate of its results (``(z, y, x)``, ``(y, x)`` for a
    2D image, ``(t, y, x)`` for a time-lapse), the frame axis (0 for a time-lapse, else None)
    and ``ndim``, the kind of image each frame is (2 or 3: the kind of model it needs)."""

    layer: object
    name: str
    data: object
    channel_axis: int | None
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    frame_axis: int | None = None
    ndim: int = 3

    @property
    def spacing(self) -> tuple[float, ...]:
        """The pixel or voxel size ``segment`` takes: the scale without the frame axis."""
        return self.scale[1:] if self.frame_axis is not None else self.scale

    @property
    def layer_channel_axis(self) -> int | None:
        """The channel axis among the layer's own axes (napari's ``ndim`` leaves RGB out)."""
        return None if getattr(self.layer, "rgb", False) else self.channel_axis

    @property
    def kind(self) -> str:
        """ "volume", "2D image" or "time-lapse of 2D frames"."""
        if self.frame_axis is not None:
            return "time-lapse of 2D frames"
        return "2D image" if self.ndim == 2 else "volume"

    def frame(self, t: int):
        """``(data, channel axis)`` of frame ``t`` of a time-lapse."""
        ca = self.channel_axis
        return self.data[t], (None if ca is None else (ca - 1 if ca > 0 else ca))


def check_kind(inp: ImageInput, model: PacSegModel) -> None:
    """``ValueError`` when the model is of the other kind (2D / 3D) than the image, saying what
    to do in the widget."""
    if model.config.ndim == inp.ndim:
        return
    if inp.ndim == 2:
        what = "train a 2D model on it, or load one"
    else:
        what = "train a volume model on it or load one, or, for a time-lapse, set Axis 0 is: time / frames"
    raise ValueError(
        f"the model is a {model.config.ndim}D model and {inp.name!r} is a {inp.kind}: {what}"
    )


def default_axis0(layer) -> str:
    """What axis 0 of a 3D layer is by its axis labels: "frames" for t/time/frame, "channels"
    for c/channel, else "z"."""
    labels = getattr(layer, "axis_labels", None) or ()
    first = str(labels[0]).strip().lower() if len(labels) else ""
    if first in ("t", "time", "frame", "frames", "timepoint"):
        return "frames"
    if first in ("c", "ch", "channel", "channels"):
        return "channels"
    return "z"


def image_input(layer, channel_axis: int | None = 0, axis0: str = "z") -> ImageInput:
    """The ``ImageInput`` of an image layer (or anything with ``name``, ``ndim``, ``data``,
    ``scale`` and ``translate``, and optionally ``rgb``): 2D (grey or RGB), 3D (axis 0 is z, a
    time-lapse's frames or channels, as ``axis0`` says), or 4D with the channel axis
    ``channel_axis`` first."""
    if layer is None:
        raise ValueError("no image: open an image (2D, RGB, a time-lapse or a volume) first")
    if axis0 not in AXIS0_CHOICES:
        raise ValueError(f"axis 0 must be one of {AXIS0_CHOICES}, got {axis0!r}")
    rgb = bool(getattr(layer, "rgb", False))
    nd = layer.ndim  # napari's: the RGB axis is not counted
    if rgb or nd == 2 or (nd == 3 and axis0 != "z"):
        return _flat_input(layer, nd, rgb, axis0)
    if layer.ndim == 3:
        axis, keep = None, [0, 1, 2]
    else:
        axis = int(channel_axis)
        if axis != 0:
            # napari lines a 3D result layer up with the last three axes of a 4D layer,
            # so only a leading channel axis gives outputs that overlay the image.
            raise ValueError(
                f"the channel axis of {layer.name!r} must be its first axis (it is {axis}): "
                "move it first (np.moveaxis(data, axis, 0)) or split the channels into "
                "layers (viewer.add_image(data, channel_axis=...)) and pick one"
            )
        keep = [1, 2, 3]
    shape = tuple(int(layer.data.shape[a]) for a in keep)
    scale = tuple(float(layer.scale[a]) for a in keep)
    translate = tuple(float(layer.translate[a]) for a in keep)
    return ImageInput(layer, layer.name, layer.data, axis, shape, scale, translate)


def _flat_input(layer, nd: int, rgb: bool, axis0: str) -> ImageInput:
    """A 2D grey or RGB image, a (C, H, W) image, or a time-lapse (T, H, W) / RGB (T, H, W, 3)."""
    if nd not in (2, 3) or (nd == 3 and rgb and axis0 == "channels"):
        what = "an RGB layer" if rgb else f"a {nd}D layer"
        raise ValueError(
            f"{layer.name!r} is {what}; segment a 2D image, an RGB image, a time-lapse (axis 0 "
            "= time / frames) or a volume"
        )
    frames = nd == 3 and axis0 == "frames"
    if rgb:
        channel = -1
    else:
        channel = 0 if nd == 3 and axis0 == "channels" else None
    keep = list(range(nd)) if channel is None or rgb else list(range(1, nd))
    shape = tuple(int(layer.data.shape[a]) for a in keep)
    scale = tuple(float(layer.scale[a]) for a in keep)
    translate = tuple(float(layer.translate[a]) for a in keep)
    return ImageInput(layer, layer.name, layer.data, channel, shape, scale, translate,
                      0 if frames else None, 2 if frames or nd == 2 or channel == 0 else 3)  # fmt: skip


def model_file_name(path) -> Path:
    """``path`` as a model file name: ``.safetensors`` added when missing."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_measurements(path, objects) -> Path:
    """Write a measurement table (``Segmentation.objects``) as CSV to ``path`` (``.csv`` added
    when it has no suffix), atomically (a temporary file renamed into place). ``path`` itself
    is replaced (a save dialog asked about it); a file at the name with ``.csv`` added, which
    nobody was asked about, is refused (``FileExistsError``)."""
    from napari_pacseg.io.atomic import write_bytes

    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".csv")
        if path.exists():
            raise FileExistsError(f"{path} exists; choose that name to replace it, or another")
    return write_bytes(path, table_csv(objects).encode("utf-8"))


def parse_class_names(text: str) -> list[str]:
    """Comma-separated class names, background first (at least two), or ValueError."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError(
            "Classes: give at least two comma-separated names, the first being the "
            "background, e.g. 'background, nucleus'"
        )
    return names


def parse_scales(text: str) -> tuple[float, ...]:
    """Comma-separated positive feature scales (physical units), or ValueError."""
    try:
        values = tuple(float(v) for v in str(text).replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"Feature scales: {text!r} is not a list of numbers; write e.g. '1, 2, 4'"
        ) from None
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Feature scales must be positive numbers, e.g. '1, 2, 4'; got {text!r}")
    return values


def parse_spacing(text: str, n: int) -> tuple[float, ...]:
    """``n`` positive numbers (the pixel or voxel size, ``(z, y, x)`` or ``(y, x)``) from text
    such as "1, 0.4, 0.4" or "1 x 0.4 x 0.4"; one number is the same on every axis. Else
    ValueError."""
    words = str(text).replace(",", " ").replace(";", " ").replace("x", " ").replace("\u00d7", " ")
    axes = "z, y, x" if n == 3 else "y, x"
    try:
        values = tuple(float(v) for v in words.split())
    except ValueError:
        raise ValueError(
            f"Spacing: {text!r} is not a list of numbers; write {n} ({axes})"
        ) from None
    if len(values) == 1:
        values = values * n
    if len(values) != n or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Spacing: give {n} positive numbers ({axes}), e.g. "
                         f"{', '.join(['1'] + ['0.4'] * (n - 1))}; got {text!r}")  # fmt: skip
    return values


SPACING_TOLERANCE = 0.2  # a model applied at a spacing this far (relative) from its own: a note


def spacing_note(spacing, model: PacSegModel) -> str:
    """A note when ``spacing`` differs from the model's training spacing by more than
    ``SPACING_TOLERANCE`` on an axis (its features then see objects at another size than it
    learnt them), else "". Both as ``(z, y, x)`` or ``(y, x)``."""
    trained = tuple(model.config.in_plane_spacing)
    if len(trained) != len(spacing):
        return ""
    if all(abs(s - t) <= SPACING_TOLERANCE * t for s, t in zip(spacing, trained)):
        return ""
    axes = "y, x" if len(trained) == 2 else "z, y, x"
    show = lambda values: ", ".join(f"{v:g}" for v in values)  # noqa: E731
    return (
        f"the model was trained at {show(trained)} ({axes}), this image is at "
        f"{show(spacing)}: set Spacing if that is wrong, or train a model at this spacing"
    )


@dataclass(frozen=True)
class RunParams:
    """The parameters of a full run or a live preview: ``refine`` (``segment(refine=...)``
    overrides), the label rule (``threshold``, ``background`` class index), the device, and
    ``instances``: None (no objects) or ``segment(instances=...)`` overrides (a dict)."""

    refine: dict = field(default_factory=dict)
    threshold: float = DEFAULT_THRESHOLD
    background: int = 0
    device: str = "auto"
    instances: dict | None = None


def without_objects(model: PacSegModel, params: RunParams) -> RunParams:
    """``params`` without objects, refining as the run with them does (cells mode:
    ``engine.request.objects_refine``'s fit): a preview beside a full run's objects."""
    refine = dict(params.refine)
    if params.instances is not None:
        config = instance_config(model.config.instances, params.instances)
        own = refine_params(model, refine)
        resolved = objects_refine(own, config, model.config.ndim)
        if resolved is not None and resolved.fit_weight != own.fit_weight:
            refine["fit_weight"] = resolved.fit_weight
    return dataclasses.replace(params, refine=refine, instances=None)


@dataclass(frozen=True)
class TrainParams:
    """The parameters of a training: class names (comma-separated text, used when the
    scribbles layer does not name its classes), feature scales (text), steps, device and
    whether to train a context encoder/decoder too (``train(context=True)``)."""

    classes: str = DEFAULT_CLASSES
    scales: str = ", ".join(f"{s:g}" for s in FeatureSpec().sigmas)
    steps: int = 400
    device: str = "auto"
    context: bool = False


# --- work ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FullRun:
    """``segment`` of the whole image as ``request`` asks (built from the widget's ``params``
    when the run starts): call it (in any thread) for the ``Segmentation``; ``progress`` and
    ``should_cancel`` as in ``segment``."""

    image: ImageInput
    request: SegmentRequest
    params: RunParams

    @property
    def model(self) -> PacSegModel:
        return self.request.model

    def __call__(
        self, progress: Progress | None = None, should_cancel: Cancel | None = None
    ) -> Segmentation:
        return segment(self.image.data, self.request, progress=progress,
                       should_cancel=should_cancel)  # fmt: skip


@dataclass(frozen=True, eq=False)
class TrainingPair:
    """An image and its scribbles in the training set: ``scribbles`` is the layer's data (a
    live reference: painting goes on; ``Session.training`` copies it), ``name`` the layer's,
    ``classes`` the class names the layer stores (or None)."""

    image: ImageInput
    scribbles: object
    name: str
    classes: list | None = None

    @property
    def label(self) -> str:
        return f"{self.name!r} on {self.image.name!r}"


@dataclass(frozen=True, eq=False)
class Training:
    """``train`` from copies of the scribbles of one image or several: call it (in any thread)
    for the model; ``source`` says where it came from, ``warnings`` what looks amiss in the
    scribbles: ``scribble_checks.coverage_warnings`` and ``sparsity_warnings`` when made, then
    the call adds ``intensity_warnings`` (it reads the images, so it runs in the call's
    thread)."""

    images: list[ImageInput]
    scribbles: list[np.ndarray]
    kwargs: dict
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def image(self) -> ImageInput:
        return self.images[0]

    def __call__(
        self, progress: Progress | None = None, should_cancel: Cancel | None = None
    ) -> PacSegModel:
        images, marks, spacings = training_arrays(self.images, self.scribbles)
        names = self.kwargs.get("class_names") or []
        self.warnings.extend(w for w in intensity_warnings(images, marks, names)
                             if w not in self.warnings)  # fmt: skip
        one = len(images) == 1
        return train(
            images[0] if one else images, marks[0] if one else marks,
            spacing=spacings[0] if one else spacings, channel_axis=0,
            progress=progress, should_cancel=should_cancel, **self.kwargs,
        )  # fmt: skip


def training_arrays(images: list[ImageInput], scribbles: list[np.ndarray]):
    """``(images, scribbles, spacings)`` for ``train``: each image channel first ``(C, ...)``
    (``channel_axis=0``), a time-lapse as its painted frames, each a 2D image of its own."""
    out_images, out_marks, spacings = [], [], []
    for inp, marks in zip(images, scribbles):
        pieces = [(inp.data, inp.channel_axis, marks)]
        if inp.frame_axis is not None:
            if not np.any(marks):
                raise ValueError(f"no frame of {inp.name!r} holds scribbles: paint some first")
            frames, frame_marks, ca = painted_frames(
                inp.data, marks, inp.frame_axis, inp.channel_axis, inp.name
            )
            pieces = [(data, ca, m) for data, m in zip(frames, frame_marks)]
        for data, ca, m in pieces:
            arr = np.asarray(data)
            out_images.append(arr[None] if ca is None else np.moveaxis(arr, ca, 0))
            out_marks.append(m)
            spacings.append(inp.spacing)
    return out_images, out_marks, spacings


@dataclass(frozen=True, eq=False)
class LiveJob:
    """A live preview of ``box`` of the image: ``segmenter_key`` says which region segmenter
    (image, model, spacing, channel axis, device) serves it, ``key`` the whole request."""

    image: ImageInput
    model: PacSegModel
    box: Box
    params: RunParams
    segmenter_key: tuple
    key: tuple

    @property
    def description(self) -> str:
        return live_description(self.box, self.image)

    @property
    def preview(self) -> str:
        """The status while it runs: "previewing z 30-32" ("frame 3", "y 0-255, x 0-255")."""
        return "previewing " + _ranges(self.box, self.image, short=True)


def _ranges(box, image: ImageInput | None, short: bool = False) -> str:
    names = "zyx" if len(box) == 3 else "yx"
    if image is not None and image.frame_axis is not None:
        names = "tyx"
    parts = []
    for n, (a, b) in zip(names, box):
        label = "frame" if n == "t" else n
        parts.append(f"{label} {a}" if n == "t" and b == a + 1 else f"{label} {a}-{b - 1}")
    if short and len(box) == 3:
        return parts[0]
    return ", ".join(parts)


def live_description(box: Box, image: ImageInput | None = None) -> str:
    """What a live result holds: "live preview of z 30-32, y 0-255, x 0-255" (for a
    time-lapse "frame 3, y ..., x ..."; for a 2D image "y ..., x ...")."""
    return "live preview of " + _ranges(box, image)


@dataclass(frozen=True, eq=False)
class LiveResult:
    """Labels and matte of the box a live job computed (the job's, or a window of it when
    the preview was bounded), the planes of logits it computed (0: refinement only), the
    seconds it took, what the bound changed ('' when exact: ``engine.Bounded.describe``) and,
    when the job asked for them, the objects of the box alone (``instances``, int32 ids)."""

    labels: np.ndarray
    matte: np.ndarray
    new_planes: int
    seconds: float
    box: Box
    note: str = ""
    instances: np.ndarray | None = None

    @property
    def work(self) -> str:
        """What it computed: new planes of logits, or only the refinement."""
        return f"{self.new_planes} new plane(s) of logits" if self.new_planes else "refinement only"


@dataclass
class Task:
    """A running full run or training: its kind, number, cancel flag and start time."""

    kind: str
    ident: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)

    def should_cancel(self) -> bool:
        return self.cancelled.is_set()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class Session:
    """The widget's state: image input, model (and its source), the live region segmenter,
    the running task. Methods raise ``ValueError`` with a message for a person."""

    def __init__(self) -> None:
        self.image: ImageInput | None = None
        self.model: PacSegModel | None = None
        self.model_source = ""
        self.task: Task | None = None
        self._tasks = 0
        self._segmenter: RegionSegmenter | None = None
        self._segmenter_key = None
        self._segmenter_refs = None  # image data and model, so the ids in the key stay theirs
        self._segmenter_lock = threading.Lock()
        self._live_done = None
        self.training_set: list[TrainingPair] = []

    # --- image and model ------------------------------------------------------------------------

    def use_image(self, layer, channel_axis: int | None = 0, axis0: str = "z") -> ImageInput:
        """Make ``image_input(layer, channel_axis, axis0)`` the current image and return it."""
        self.image = None
        self.image = image_input(layer, channel_axis, axis0)
        return self.image

    def require_image(self) -> ImageInput:
        if self.image is None:
            raise ValueError("no image: open an image (2D, RGB, a time-lapse or a volume) first")
        return self.image

    def require_model(self) -> PacSegModel:
        if self.model is None:
            raise ValueError("no model: load a .safetensors model or train one from scribbles")
        return self.model

    def set_model(self, model: PacSegModel, source: str) -> None:
        self.model, self.model_source = model, source

    def load(self, path) -> PacSegModel:
        """Load and use a model file (``ModelFileError`` or ``OSError`` when it cannot)."""
        model = load_model(path)
        self.set_model(model, f"file {Path(path).name}")
        return model

    def save(self, path) -> Path:
        """Save the model to ``path`` (``.safetensors`` added when missing); the path written.
        ``path`` itself is replaced (a save dialog asked about it); a file at the name with
        ``.safetensors`` added, which nobody was asked about, is refused (``FileExistsError``)."""
        target = model_file_name(path)
        if target != Path(path) and target.exists():
            raise FileExistsError(f"{target} exists; choose that name to replace it, or another")
        return save_model(self.require_model(), target)

    def describe(self) -> str:
        """The model box's text: ``describe.describe_model`` of the model and its source."""
        return NO_MODEL if self.model is None else describe_model(self.model, self.model_source)

    def summary(self) -> str:
        """The model box's compact text: ``describe.model_headline`` of the model."""
        return NO_MODEL if self.model is None else model_headline(self.model, self.model_source)

    def spacing_text(self) -> str:
        """The image's kind and spacing, and a warning when the model was trained at another
        spacing or is of the other kind (2D / 3D)."""
        inp = self.require_image()
        spacing = inp.spacing
        axes = "y, x" if len(spacing) == 2 else "z, y, x"
        text = f"{inp.kind}: " + ", ".join(f"{s:g}" for s in spacing) + f" ({axes}; layer scale)"
        if self.model is None:
            return text
        cfg = self.model.config
        if cfg.ndim != inp.ndim:
            need = "a 2D model (train one on it)" if inp.ndim == 2 else "a volume model"
            return text + f"; the model is a {cfg.ndim}D model: this {inp.kind} needs {need}"
        note = spacing_note(spacing, self.model)
        return text + (f"; {note}" if note else "")

    def spacing_note(self) -> str:
        """``spacing_note`` of the current image and model ("" without either)."""
        if self.image is None or self.model is None:
            return ""
        return spacing_note(self.image.spacing, self.model)

    def scribble_classes(self, text: str) -> tuple[list[str], list | None]:
        """Class names of a new scribbles layer (``parse_class_names(text)``) and their colours:
        the model's when its classes have these names, else None (the default palette)."""
        names = parse_class_names(text)
        if self.model is None or [c.name for c in self.model.config.classes] != names:
            return names, None
        return names, [c.color for c in self.model.config.classes]

    # --- tasks (full runs, training) --------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a full run or a training runs."""
        return self.task is not None

    def check_idle(self) -> None:
        if self.task is not None:
            raise ValueError(f"the {self.task.kind} is still running: wait or press Cancel")

    def begin(self, kind: str) -> Task:
        """Start a task of ``kind`` ("segmentation", "training"); one at a time."""
        self.check_idle()
        self._tasks += 1
        self.task = Task(kind, self._tasks)
        return self.task

    def cancel(self) -> Task | None:
        """Ask the running task to stop (its ``should_cancel()`` becomes True); it, or None."""
        if self.task is not None:
            self.task.cancelled.set()
        return self.task

    def end(self, task: Task) -> None:
        if self.task is task:
            self.task = None

    def full_run(self, params: RunParams) -> FullRun:
        """The work of a full run of the current image and model."""
        inp, model = self.require_image(), self.require_model()
        check_kind(inp, model)
        p = params
        request = SegmentRequest.build(
            model, spacing=inp.spacing, channel_axis=inp.channel_axis, frame_axis=inp.frame_axis,
            refine=p.refine, device=p.device, threshold=p.threshold, background=p.background,
            instances=False if p.instances is None else p.instances,
        )  # fmt: skip
        return FullRun(inp, request, params)

    def full_run_written(self) -> None:
        """A full run replaced the output layers: the next live request recomputes."""
        self._live_done = None

    def _pair(self, scribbles, name: str, classes) -> TrainingPair:
        inp = self.require_image()
        if scribbles is None:
            raise ValueError("no scribbles layer: press 'New scribbles layer', paint, then Train")
        shape = tuple(np.shape(scribbles))
        if shape != inp.shape:
            raise ValueError(
                f"the scribbles layer {name!r} has shape {shape} but the image's spatial shape "
                f"is {inp.shape}"
            )
        return TrainingPair(inp, scribbles, name, list(classes) if classes else None)

    def _in_set(self, pair: TrainingPair) -> bool:
        return any(
            p.image.layer is pair.image.layer and p.scribbles is pair.scribbles
            for p in self.training_set
        )

    def add_to_training_set(self, scribbles, name: str = "scribbles", classes=None) -> TrainingPair:
        """Add the current image and ``scribbles`` (a layer's data, kept by reference) to the
        training set; ``ValueError`` when that pair is there already."""
        pair = self._pair(scribbles, name, classes)
        if self._in_set(pair):
            raise ValueError(f"{pair.label} is in the training set already")
        self.training_set.append(pair)
        return pair

    def remove_from_training_set(self, index: int) -> TrainingPair:
        if not 0 <= index < len(self.training_set):
            raise ValueError(f"the training set has no entry {index}")
        return self.training_set.pop(index)

    def training(
        self, params: TrainParams, scribbles, scribbles_name: str = "scribbles", classes=None
    ) -> Training:
        """The work of training from the training set and the current image with ``scribbles``
        (when that pair is not in the set already; None: the set alone, when it has entries),
        each copied now (painting may go on). Class names: ``classes`` (those the scribbles
        layer stores), else the first stored by a pair of the set, else ``params.classes``, cut
        or extended ("class 3", ...) to the values painted."""
        pairs = list(self.training_set)
        if scribbles is not None or not pairs:
            current = self._pair(scribbles, scribbles_name, classes)
            if not self._in_set(current):
                pairs.append(current)
        marks = [np.array(p.scribbles) for p in pairs]
        for p, m in zip(pairs, marks):
            if m.shape != p.image.shape:
                raise ValueError(
                    f"the scribbles layer {p.name!r} now has shape {m.shape} but its image "
                    f"{p.image.name!r} has {p.image.shape}; remove it from the training set"
                )
        if len({p.image.ndim for p in pairs}) > 1:
            raise ValueError(
                "the training set mixes 2D images and volumes; a model is of one kind: train "
                "one of each"
            )
        stored = classes or next((p.classes for p in pairs if p.classes), None)
        names = list(stored or parse_class_names(params.classes))
        k = max((int(m.max()) if m.size else 0) for m in marks)
        names = (names + [f"class {v}" for v in range(len(names) + 1, k + 1)])[:k]
        sigmas = parse_scales(params.scales)
        kwargs = {
            "steps": int(params.steps),
            "features": default_features(pairs[0].image.ndim, sigmas) if sigmas else None,
            "device": params.device, "class_names": names if k >= 2 else None,
            "context": True if params.context else None,
        }  # fmt: skip
        if len(pairs) == 1:
            source = f"trained from {pairs[0].name!r} on {pairs[0].image.name!r}"
        else:
            source = f"trained from {len(pairs)} images: " + ", ".join(p.label for p in pairs)
        warned = coverage_warnings(marks, names) + sparsity_warnings(marks, names)
        return Training([p.image for p in pairs], marks, kwargs, source, warned)

    # --- live preview -----------------------------------------------------------------------------

    @property
    def segmenter(self) -> RegionSegmenter | None:
        """The region segmenter of the last live job (None before the first)."""
        return self._segmenter

    def live_job(self, box: Box, params: RunParams, *, redo: bool = False) -> LiveJob | None:
        """A live preview of ``box`` of the current image, or None when the last one delivered
        was the same request (unless ``redo``: e.g. its output layers are gone)."""
        inp, model = self.require_image(), self.require_model()
        box = tuple((int(a), int(b)) for a, b in box)
        if len(box) != len(inp.shape):
            raise ValueError(f"a live box of {inp.name!r} needs {len(inp.shape)} ranges, got {box}")
        check_kind(inp, model)
        frame = box[0][0] if inp.frame_axis is not None else None  # a time-lapse: one frame
        seg_key = (id(inp.layer), id(inp.data), id(model), inp.scale, inp.channel_axis,
                   params.device, frame)  # fmt: skip
        out = (float(params.threshold), int(params.background))
        objects = None if params.instances is None else tuple(sorted(params.instances.items()))
        key = (seg_key, box, tuple(sorted(params.refine.items())), out, objects)
        if key == self._live_done and not redo:
            return None
        return LiveJob(inp, model, box, params, seg_key, key)

    def compute_live(
        self, job: LiveJob, should_cancel: Cancel | None = None, progress=None
    ) -> LiveResult:
        """Labels and matte of the job's box (any thread): probabilities from the region
        segmenter (made anew when image, model, spacing or device changed; cached logits),
        then the label rule. The refinement's work is bounded by ``engine.preview_budget`` (at
        the rate the segmenter's recent refinements ran; ``engine.bound_preview``: within it
        the labels are the full run's). Objects are made on the box alone (in cells mode the
        labels are drawn on the box's cells, so they equal the full run's where the box is the
        whole image). ``should_cancel`` and ``progress(done, total)`` as in
        ``RegionSegmenter.probabilities``."""
        start = time.perf_counter()
        inp = job.image
        data, axis = inp.data, inp.channel_axis
        if inp.frame_axis is not None:
            data, axis = inp.frame(job.box[0][0])
        # the segmenter's box: a 2D image or a frame is a one-plane volume
        box = job.box if inp.ndim == 3 else ((0, 1), *job.box[-2:])
        with self._segmenter_lock:
            if self._segmenter_key != job.segmenter_key:
                self._segmenter = RegionSegmenter(
                    data, job.model, spacing=inp.spacing, channel_axis=axis,
                    device=job.params.device,
                )  # fmt: skip
                self._segmenter_key = job.segmenter_key
                self._segmenter_refs = (inp.layer, inp.data, job.model)
            seg = self._segmenter
        planes = seg.stats["logit_planes"]
        config = None
        if job.params.instances is not None:
            config = instance_config(job.model.config.instances, job.params.instances)
        # the refinement segment() runs for these objects (cells mode: its fit, objects_refine)
        refine = objects_refine(refine_params(job.model, job.params.refine), config,
                                job.model.config.ndim)
        plan = seg.plan.with_refine(refine)
        split_fit = seeding_fit(config, plan.settings)  # the objects seeded as segment() seeds them
        budget = preview_budget(seg.device, rate=seg.rate)  # the rate: this machine's now
        bounded = bound_preview(plan, box, budget, split_fit is not None)
        reach = bounded.plan.settings.reach  # the refinement's own unless the bound cut it
        p = seg.probabilities(bounded.box, refine, should_cancel, progress, reach=reach,
                              split_fit=split_fit)  # fmt: skip
        seeds = None
        if split_fit is not None:
            p, seed_p = p
            seeds = labels_from_probabilities(seed_p, job.params.threshold, job.params.background)[0]
        labels, matte = labels_from_probabilities(p, job.params.threshold, job.params.background)
        done = bounded.box
        spacing = seg.plan.settings.spacing
        if inp.ndim == 2:  # back to the image's axes: (h, w), or (1, h, w) for a frame
            labels, matte, spacing, done = labels[0], matte[0], spacing[1:], bounded.box[1:]
            seeds = None if seeds is None else seeds[0]
        ids = None
        if config is not None:
            classes = [c.name for c in job.model.config.classes]  # a boundary class's name
            boundary = boundary_label(config, classes, job.params.background)
            planar = inp.ndim == 2
            evidence = None  # the image's brightness, as segment() reads it (on the box)
            if config.brightness_weight != 0 or boundary is not None:
                evidence = seg.smoothed(bounded.box, config.smoothing, planar)
            sums = None  # cells mode: the stain sums the cells and the drawing read
            if boundary is not None:
                sums = image_sums(evidence, labels, boundary)
            ids = instance_labels(labels, spacing, config, should_cancel=should_cancel,
                                  evidence=evidence, classes=classes, stain=sums,
                                  background=job.params.background, seeds=seeds)  # fmt: skip
            if boundary is not None:  # the boundary class where the box's cells meet
                labels = boundary_on_cells(labels, ids, boundary, evidence, sums=sums)
        if inp.frame_axis is not None:
            labels, matte = labels[None], matte[None]
            ids = None if ids is None else ids[None]
            done = (job.box[0], *done)
        new = seg.stats["logit_planes"] - planes
        seconds = time.perf_counter() - start
        return LiveResult(labels, matte, new, seconds, done, bounded.describe(), ids)

    def live_delivered(self, job: LiveJob) -> None:
        """The job's result is in the output layers: the same request again is not recomputed."""
        self._live_done = job.key
