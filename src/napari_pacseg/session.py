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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .classes import DEFAULT_THRESHOLD, labels_from_probabilities
from .describe import describe_model
from .engine import Box, bound_preview, preview_budget
from .features import FeatureSpec
from .instances import instance_config, instance_labels, table_csv
from .model import PacSegModel
from .model_io import load_model, save_model
from .pipeline import Segmentation, segment
from .regions import RegionSegmenter
from .scribble_checks import coverage_warnings
from .training import train

DEFAULT_CLASSES = "background, foreground"
NO_MODEL = "none: load a model file or train one from scribbles"

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


def device_choices() -> list[tuple[str, str]]:
    """(label, device) pairs: "auto" (saying what it picks), each CUDA device, "cpu"."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [(f"cuda:{i} ({torch.cuda.get_device_name(i)})", f"cuda:{i}") for i in range(n)]
    auto = f"auto: {gpus[0][0]}" if gpus else "auto: cpu (no CUDA device detected)"
    return [(auto, "auto"), *gpus, ("cpu", "cpu")]


# --- inputs and parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """What the computations need of an image layer, snapshotted when an action starts: the
    layer itself (only its identity is used here), its data, channel axis, spatial shape,
    scale and translate (``(z, y, x)``)."""

    layer: object
    name: str
    data: object
    channel_axis: int | None
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    translate: tuple[float, float, float]


def image_input(layer, channel_axis: int | None = 0) -> ImageInput:
    """The ``ImageInput`` of an image layer (or anything with ``name``, ``ndim``, ``data``,
    ``scale`` and ``translate``): 3D, or 4D with the channel axis ``channel_axis`` first."""
    if layer is None:
        raise ValueError("no image: open a 3D image (or a 4D one with a channel axis) first")
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


def model_file_name(path) -> Path:
    """``path`` as a model file name: ``.safetensors`` added when missing."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_measurements(path, objects) -> Path:
    """Write a measurement table (``Segmentation.objects``) as CSV to ``path`` (``.csv`` added
    when it has no suffix), atomically (a temporary file renamed into place). ``path`` itself
    is replaced (a save dialog asked about it); a file at the name with ``.csv`` added, which
    nobody was asked about, is refused (``FileExistsError``)."""
    from .volume_io import write_bytes

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
    """``segment`` of the whole image with ``params``: call it (in any thread) for the
    ``Segmentation``; ``progress`` and ``should_cancel`` as in ``segment``."""

    image: ImageInput
    model: PacSegModel
    params: RunParams

    def __call__(
        self, progress: Progress | None = None, should_cancel: Cancel | None = None
    ) -> Segmentation:
        inp, p = self.image, self.params
        return segment(
            inp.data, self.model, spacing=inp.scale, channel_axis=inp.channel_axis,
            refine=p.refine, device=p.device, progress=progress, should_cancel=should_cancel,
            threshold=p.threshold, background=p.background,
            instances=False if p.instances is None else p.instances,
        )  # fmt: skip


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
    scribbles (``scribble_checks.coverage_warnings``)."""

    images: list[ImageInput]
    scribbles: list[np.ndarray]
    kwargs: dict
    source: str
    warnings: tuple[str, ...] = ()

    @property
    def image(self) -> ImageInput:
        return self.images[0]

    def __call__(
        self, progress: Progress | None = None, should_cancel: Cancel | None = None
    ) -> PacSegModel:
        one = len(self.images) == 1
        return train(
            self.images[0].data if one else [i.data for i in self.images],
            self.scribbles[0] if one else self.scribbles,
            spacing=self.images[0].scale if one else [i.scale for i in self.images],
            channel_axis=self.images[0].channel_axis,
            progress=progress, should_cancel=should_cancel, **self.kwargs,
        )  # fmt: skip


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
        return live_description(self.box)

    @property
    def preview(self) -> str:
        """The status while it runs: "previewing z 30-32"."""
        (z0, z1), _, _ = self.box
        return f"previewing z {z0}-{z1 - 1}"


def live_description(box: Box) -> str:
    """What a live result holds: "live preview of z 30-32, y 0-255, x 0-255"."""
    (z0, z1), (y0, y1), (x0, x1) = box
    return f"live preview of z {z0}-{z1 - 1}, y {y0}-{y1 - 1}, x {x0}-{x1 - 1}"


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

    def use_image(self, layer, channel_axis: int | None = 0) -> ImageInput:
        """Make ``image_input(layer, channel_axis)`` the current image and return it."""
        self.image = None
        self.image = image_input(layer, channel_axis)
        return self.image

    def require_image(self) -> ImageInput:
        if self.image is None:
            raise ValueError("no image: open a 3D image (or a 4D one with a channel axis) first")
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
        """Save the model to ``path`` (``.safetensors`` added when missing); the path written."""
        return save_model(self.require_model(), model_file_name(path))

    def describe(self) -> str:
        """The model box's text: ``describe.describe_model`` of the model and its source."""
        return NO_MODEL if self.model is None else describe_model(self.model, self.model_source)

    def spacing_text(self) -> str:
        """The image's spacing, and a warning when the model was trained at another."""
        spacing = self.require_image().scale
        text = ", ".join(f"{s:g}" for s in spacing) + " (layer scale)"
        if self.model is not None and not np.allclose(spacing, self.model.config.spacing):
            trained = ", ".join(f"{s:g}" for s in self.model.config.spacing)
            text += (
                f"; the model was trained at {trained}: set the layer's scale to the voxel size "
                "if this is wrong"
            )
        return text

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
        return FullRun(self.require_image(), self.require_model(), params)

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
        if len({p.image.channel_axis is None for p in pairs}) > 1:
            raise ValueError(
                "the training set mixes 3D images and images with a channel axis; train on "
                "images with the same channels"
            )
        stored = classes or next((p.classes for p in pairs if p.classes), None)
        names = list(stored or parse_class_names(params.classes))
        k = max((int(m.max()) if m.size else 0) for m in marks)
        names = (names + [f"class {v}" for v in range(len(names) + 1, k + 1)])[:k]
        sigmas = parse_scales(params.scales)
        kwargs = {
            "steps": int(params.steps), "features": FeatureSpec(sigmas=sigmas) if sigmas else None,
            "device": params.device, "class_names": names if k >= 2 else None,
            "context": True if params.context else None,
        }  # fmt: skip
        if len(pairs) == 1:
            source = f"trained from {pairs[0].name!r} on {pairs[0].image.name!r}"
        else:
            source = f"trained from {len(pairs)} images: " + ", ".join(p.label for p in pairs)
        warned = tuple(coverage_warnings(marks, names))
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
        seg_key = (id(inp.layer), id(inp.data), id(model), inp.scale, inp.channel_axis,
                   params.device)  # fmt: skip
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
        then the label rule. The refinement's work is bounded by ``engine.preview_budget``
        (``engine.bound_preview``: within it the result is the full run's). ``should_cancel``
        and ``progress(stage, done, total)`` as in ``RegionSegmenter.probabilities``."""
        start = time.perf_counter()
        with self._segmenter_lock:
            if self._segmenter_key != job.segmenter_key:
                inp = job.image
                self._segmenter = RegionSegmenter(
                    inp.data, job.model, spacing=inp.scale, channel_axis=inp.channel_axis,
                    device=job.params.device,
                )  # fmt: skip
                self._segmenter_key = job.segmenter_key
                self._segmenter_refs = (inp.layer, inp.data, job.model)
            seg = self._segmenter
        planes = seg.stats["logit_planes"]
        plan = seg.plan.with_refine(job.params.refine)
        bounded = bound_preview(plan, job.box, preview_budget(seg.device))
        reach = bounded.plan.settings.reach  # the refinement's own unless the bound cut it
        p = seg.probabilities(bounded.box, job.params.refine, should_cancel, progress, reach=reach)
        labels, matte = labels_from_probabilities(p, job.params.threshold, job.params.background)
        ids = None
        if job.params.instances is not None:
            config = instance_config(job.model.config.instances, job.params.instances)
            ids = instance_labels(labels, seg.plan.settings.spacing, config,
                                  should_cancel=should_cancel)  # fmt: skip
        new = seg.stats["logit_planes"] - planes
        seconds = time.perf_counter() - start
        return LiveResult(labels, matte, new, seconds, bounded.box, bounded.describe(), ids)

    def live_delivered(self, job: LiveJob) -> None:
        """The job's result is in the output layers: the same request again is not recomputed."""
        self._live_done = job.key
