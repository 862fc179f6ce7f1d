"""The "PAC Segmentation" dock widget: model (load, save, train from scribbles), refinement and
output controls, live preview of the visible region, and full-volume runs in a worker thread.

The widget adds no maths of its own: it calls ``segment``, ``train``, ``load_model``,
``save_model`` and, for the live preview, ``regions.RegionSegmenter`` (the same computation on a
box of the volume).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from ._controls import refine_controls, refine_values, set_refine_controls
from ._layers import (
    METADATA_KEY,
    output_layers,
    scribble_class_names,
    scribble_styling,
    write_full,
    write_region,
)
from ._live import LiveRunner, Outcome, run_caught, visible_box
from .classes import labels_from_probabilities
from .features import FeatureSpec
from .model_io import ModelFileError, load_model, save_model
from .pipeline import SegmentationCancelled, segment
from .regions import RegionSegmenter
from .training import train

if TYPE_CHECKING:
    import napari

    from .model import PacSegModel

DEFAULT_CLASSES = "background, foreground"


def device_choices() -> list[tuple[str, str]]:
    """(label, device) pairs: "auto" (saying what it picks), each CUDA device, "cpu"."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [(f"cuda:{i} ({torch.cuda.get_device_name(i)})", f"cuda:{i}") for i in range(n)]
    auto = f"auto: {gpus[0][0]}" if gpus else "auto: cpu (no CUDA device detected)"
    return [(auto, "auto"), *gpus, ("cpu", "cpu")]


class _Relay(QObject):
    """Carries progress from worker threads to the main thread (queued signal)."""

    progressed = Signal(int, int, int)  # task id, done, total


@dataclass
class _Task:
    """A running full-volume segmentation or training."""

    kind: str
    ident: int
    cancel: threading.Event = field(default_factory=threading.Event)
    bar: progress | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _ImageInput:
    """What the computations need of the chosen image layer (snapshotted in the main thread)."""

    layer: Image
    data: object
    channel_axis: int | None
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    translate: tuple[float, float, float]


class PacSegWidget(Container):
    """Dock widget: pick an image, load or train a model, refine, preview live, run in full.

    Outputs go to the Labels layer ``"<image> labels"`` (class values as in the scribbles:
    background 0, class ``i`` is ``i + 1``; names and colours from the model) and the Image
    layer ``"<image> matte"`` (1 - P(background), magma, contrast 0..1, additive), both with the
    image's scale and translate, reused and written in place by later runs.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.model: PacSegModel | None = None
        self.model_source = ""
        self._task: _Task | None = None
        self._task_count = 0
        self._worker = None
        self._segmenter: RegionSegmenter | None = None
        self._segmenter_key = None
        self._segmenter_lock = threading.Lock()
        self._live_done_key = None
        self._syncing = False
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._build()
        self.live_runner = LiveRunner(
            self._prepare_live, self._compute_live, self._deliver_live, self._fail_live
        )
        self._connect()
        self._on_image_changed()
        self._update_model_info()

    # --- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        heading = lambda text: Label(value=f"<b>{text}</b>")  # noqa: E731
        self.image = ComboBox(label="Image", choices=self._image_choices)
        self.channel_axis = SpinBox(
            label="Channel axis",
            min=0,
            max=3,
            value=0,
            visible=False,
            tooltip="4D images: the channel axis must come first (napari overlays 3D results on the last three axes)",
        )
        self.spacing_info = Label(label="Spacing (z, y, x)")
        self.model_info = Label(label="Model", value="none loaded")
        self.load_button = PushButton(text="Load model…")
        self.save_button = PushButton(text="Save model…")
        self.scribbles = ComboBox(label="Scribbles", choices=self._scribble_choices, nullable=True)
        self.class_names = LineEdit(label="Classes", value=DEFAULT_CLASSES)
        self.new_scribbles_button = PushButton(text="New scribbles layer")
        self.feature_scales = LineEdit(
            label="Feature scales", value=", ".join(f"{s:g}" for s in FeatureSpec().sigmas)
        )
        self.train_steps = SpinBox(label="Training steps", min=10, max=5000, step=10, value=400)
        self.train_button = PushButton(text="Train from scribbles")
        self.refine_controls = refine_controls()
        for name, control in self.refine_controls.items():
            setattr(self, name, control)
        self.reset_refine_button = PushButton(text="Model defaults")
        self.threshold = FloatSlider(
            label="Matte threshold", min=0.0, max=1.0, step=0.01, value=0.5
        )
        self.background = ComboBox(label="Background class", choices=[("background", 0)])
        self.device = ComboBox(label="Device", choices=device_choices())
        self.live = CheckBox(text="Live (visible region)", value=True)
        self.run_button = PushButton(text="Run on full volume")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(label="Status", value="ready")
        self.extend(
            [
                self.image, self.channel_axis, self.spacing_info,
                heading("Model"), self.model_info, self.load_button, self.save_button,
                heading("Training"), self.scribbles, self.class_names, self.new_scribbles_button,
                self.feature_scales, self.train_steps, self.train_button,
                heading("Refinement"), *self.refine_controls.values(), self.reset_refine_button,
                heading("Output"), self.threshold, self.background, self.device,
                self.live, self.run_button, self.cancel_button, self.status,
            ]
        )  # fmt: skip
        for w in (self.model_info, self.status, self.spacing_info):
            w.native.setWordWrap(True)

    def _connect(self) -> None:
        self.image.changed.connect(self._on_image_changed)
        self.channel_axis.changed.connect(self._on_image_changed)
        self.load_button.clicked.connect(self._on_load_clicked)
        self.save_button.clicked.connect(self._on_save_clicked)
        self.new_scribbles_button.clicked.connect(self.new_scribbles_layer)
        self.train_button.clicked.connect(self.start_training)
        self.reset_refine_button.clicked.connect(self._reset_refine)
        self.run_button.clicked.connect(self.run_full)
        self.cancel_button.clicked.connect(self.cancel)
        for control in (
            *self.refine_controls.values(),
            self.threshold,
            self.background,
            self.device,
        ):
            control.changed.connect(self._request_live)
        self.live.changed.connect(self._on_live_toggled)
        dims = self.viewer.dims.events
        self._viewer_hooks = [
            (dims.current_step, self._request_live),
            (dims.ndisplay, self._request_live),
            (dims.order, self._request_live),
            (self.viewer.layers.events.inserted, self.reset_choices),
            (self.viewer.layers.events.removed, self.reset_choices),
        ]
        for event, callback in self._viewer_hooks:
            event.connect(callback)
        self.native.destroyed.connect(self._teardown)

    def _teardown(self, *_args) -> None:
        """The Qt widget is being destroyed: stop live updates, leave the viewer's events."""
        self.live_runner.close()
        for event, callback in self._viewer_hooks:
            event.disconnect(callback)
        self._viewer_hooks = []

    # --- layer choices --------------------------------------------------------------------------

    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and layer.ndim in (3, 4)
            and not layer.rgb
            and METADATA_KEY not in layer.metadata
        ]

    def _scribble_choices(self, _widget=None) -> list[tuple[str, Labels]]:
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and METADATA_KEY not in layer.metadata
        ]

    def _image_input(self) -> _ImageInput:
        """The chosen image layer's data, channel axis, spatial shape, scale and translate."""
        layer = self.image.value
        if layer is None:
            raise ValueError("no image: open a 3D image (or a 4D one with a channel axis) first")
        if layer.ndim == 3:
            axis, keep = None, [0, 1, 2]
        else:
            axis = int(self.channel_axis.value)
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
        return _ImageInput(layer, layer.data, axis, shape, scale, translate)

    def _on_image_changed(self, *_args) -> None:
        layer = self.image.value
        four_d = layer is not None and layer.ndim == 4
        if four_d and not self.channel_axis.visible:
            self.channel_axis.value = 0
        self.channel_axis.visible = four_d
        self._update_spacing_info()
        self._request_live()

    def _update_spacing_info(self) -> None:
        if self.image.value is None:
            self.spacing_info.value = "(no image)"
            return
        try:
            spacing = self._image_input().scale
        except ValueError as err:  # e.g. a 4D layer whose channel axis is not first
            self.spacing_info.value = str(err)
            return
        text = ", ".join(f"{s:g}" for s in spacing) + " (layer scale)"
        if self.model is not None and not np.allclose(spacing, self.model.config.spacing):
            trained = ", ".join(f"{s:g}" for s in self.model.config.spacing)
            text += (
                f"; the model was trained at {trained}: set the layer's scale to the voxel size "
                "if this is wrong"
            )
        self.spacing_info.value = text

    # --- model ----------------------------------------------------------------------------------

    def _ask_path(self, save: bool) -> str | None:
        """A file name from a dialog (None when cancelled)."""
        from qtpy.QtWidgets import QFileDialog

        ask = QFileDialog.getSaveFileName if save else QFileDialog.getOpenFileName
        title = "Save PAC-Seg model" if save else "Load PAC-Seg model"
        path, _ = ask(self.native, title, "", "PAC-Seg model (*.safetensors)")
        return path or None

    def _on_load_clicked(self) -> None:
        path = self._ask_path(save=False)
        if path:
            self.load_model_file(path)

    def _on_save_clicked(self) -> None:
        if self.model is None:
            self._error("no model to save: load or train one first")
            return
        path = self._ask_path(save=True)
        if path:
            self.save_model_file(path)

    def load_model_file(self, path) -> bool:
        """Load a ``.safetensors`` model; a bad file gives an error notification. True if loaded."""
        try:
            model = load_model(path)
        except (ModelFileError, OSError) as err:
            self._error(f"could not load the model from {path}: {err}")
            return False
        self.set_model(model, f"file {Path(path).name}")
        self.status.value = f"loaded model {Path(path).name}"
        return True

    def save_model_file(self, path) -> Path | None:
        """Save the current model (``.safetensors`` added when missing)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        try:
            written = save_model(self.model, path)
        except (OSError, ValueError) as err:
            self._error(f"could not save the model to {path}: {err}")
            return None
        self.status.value = f"saved model to {written}"
        return written

    def set_model(self, model: PacSegModel, source: str) -> None:
        """Use ``model``: show its description, adopt its refinement defaults and classes."""
        self.model, self.model_source = model, source
        cfg = model.config
        self._syncing = True
        try:
            self.background.choices = [(c.name, i) for i, c in enumerate(cfg.classes)]
            self.background.value = 0
            self.class_names.value = ", ".join(c.name for c in cfg.classes)
            self.feature_scales.value = ", ".join(f"{s:g}" for s in cfg.features.sigmas)
            self._set_refine_controls()
        finally:
            self._syncing = False
        self._update_model_info()
        self._update_spacing_info()
        self._request_live()

    def _set_refine_controls(self) -> None:
        set_refine_controls(self.refine_controls, self.model.config.refine)

    def _reset_refine(self) -> None:
        if self.model is None:
            self._error("no model loaded: its refinement defaults are not known yet")
            return
        self._syncing = True
        try:
            self._set_refine_controls()
        finally:
            self._syncing = False
        self._request_live()

    def _update_model_info(self) -> None:
        if self.model is None:
            self.model_info.value = "none: load a model file or train one from scribbles"
            return
        self.model_info.value = describe_model(self.model, self.model_source)

    def refine_overrides(self) -> dict:
        """The refinement controls as ``segment(refine=...)`` overrides."""
        return refine_values(self.refine_controls)

    # --- scribbles and training -------------------------------------------------------------------

    def _class_names(self) -> list[str]:
        names = [n.strip() for n in str(self.class_names.value).split(",") if n.strip()]
        if len(names) < 2:
            raise ValueError(
                "Classes: give at least two comma-separated names, the first being the "
                "background, e.g. 'background, nucleus'"
            )
        return names

    def new_scribbles_layer(self) -> Labels | None:
        """Add an empty uint8 Labels layer ``"<image> scribbles"`` with the image's spatial
        shape, scale and translate, whose values 1..K are named after the Classes field."""
        try:
            inp = self._image_input()
            names = self._class_names()
        except ValueError as err:
            self._error(str(err))
            return None
        colors = (
            [c.color for c in self.model.config.classes] if self._model_matches(names) else None
        )
        layer = self.viewer.add_labels(
            np.zeros(inp.shape, np.uint8), name=f"{inp.layer.name} scribbles", scale=inp.scale,
            translate=inp.translate, **scribble_styling(names, colors),
        )  # fmt: skip
        layer.mode = "paint"
        layer.selected_label = 1
        self.scribbles.value = layer
        self.status.value = (
            f"paint with label 1 = {names[0]}, "
            + ", ".join(f"{i + 1} = {n}" for i, n in enumerate(names) if i)
            + "; then Train"
        )
        return layer

    def _model_matches(self, names) -> bool:
        return self.model is not None and [c.name for c in self.model.config.classes] == names

    def start_training(self) -> None:
        """Train a model from the chosen scribbles layer in a worker thread."""
        if self._busy():
            return
        try:
            inp = self._image_input()
            layer = self.scribbles.value
            if layer is None:
                raise ValueError(
                    "no scribbles layer: press 'New scribbles layer', paint, then Train"
                )
            marks = np.array(layer.data)  # a copy: painting may go on while training
            if marks.shape != inp.shape:
                raise ValueError(
                    f"the scribbles layer {layer.name!r} has shape {marks.shape} but the image's "
                    f"spatial shape is {inp.shape}"
                )
            names = scribble_class_names(layer) or self._class_names()
            k = int(marks.max()) if marks.size else 0
            names = (names + [f"class {v}" for v in range(len(names) + 1, k + 1)])[:k]
            sigmas = _parse_scales(self.feature_scales.value)
        except ValueError as err:
            self._error(str(err))
            return
        kwargs = {
            "spacing": inp.scale, "channel_axis": inp.channel_axis, "steps": int(self.train_steps.value),
            "features": FeatureSpec(sigmas=sigmas) if sigmas else None,
            "device": self.device.value, "class_names": names if k >= 2 else None,
        }  # fmt: skip
        source = f"trained from {layer.name!r} on {inp.layer.name!r}"
        self._start_task(
            "training", train, (inp.data, marks), kwargs, lambda m: self._trained(m, source)
        )

    def _trained(self, model: PacSegModel, source: str) -> None:
        self.set_model(model, source)
        self.status.value = (
            f"trained ({model.config.provenance.get('labelled_voxels', '?')} labelled voxels); "
            + ("live preview follows" if self.live.value else "press Run on full volume")
        )

    # --- full run -----------------------------------------------------------------------------------

    def run_full(self) -> None:
        """Segment the whole image in a worker thread (progress bar, Cancel)."""
        if self._busy():
            return
        try:
            inp = self._image_input()
            model = self._require_model()
            refine = self.refine_overrides()
        except ValueError as err:
            self._error(str(err))
            return
        background, threshold = int(self.background.value), float(self.threshold.value)

        def work(progress=None, should_cancel=None):
            seg = segment(
                inp.data, model, spacing=inp.scale, channel_axis=inp.channel_axis, refine=refine,
                device=self.device.value, progress=progress, should_cancel=should_cancel,
                threshold=threshold, background=background,
            )  # fmt: skip
            return seg.labels, seg.matte

        def done(result):
            labels, matte = result
            layers = self._outputs(inp, model, background)
            if layers is not None:
                write_full(*layers, labels, matte, "full volume")
                self._live_done_key = None
                self.status.value = (
                    f"full volume done in {time.perf_counter() - self._task_started:.1f} s"
                )

        self._start_task("segmentation", work, (), {}, done)

    def cancel(self) -> None:
        """Cancel the running full segmentation or training (between tiles or steps)."""
        if self._task is not None:
            self._task.cancel.set()
            self.status.value = f"cancelling the {self._task.kind}…"

    def _start_task(self, kind, fn, args, kwargs, on_result) -> None:
        from napari.qt.threading import create_worker

        self._task_count += 1
        task = _Task(kind, self._task_count)
        task.bar = progress(total=0, desc=f"PAC {kind}")
        self._task, self._task_started = task, task.started
        emit = self._relay.progressed.emit
        kwargs = dict(
            kwargs, progress=lambda done, total: emit(task.ident, done, total),
            should_cancel=task.cancel.is_set,
        )  # fmt: skip
        worker = create_worker(run_caught, fn, *args, _start_thread=False, **kwargs)
        worker.returned.connect(lambda outcome: self._task_returned(task, outcome, on_result))
        worker.finished.connect(self._task_finished)
        self._worker = worker
        self._set_running(True)
        self.status.value = f"{kind} running…"
        worker.start()

    def _on_progress(self, ident: int, done: int, total: int) -> None:
        task = self._task
        if task is None or task.ident != ident:
            return  # queued from a task that has ended
        bar = task.bar
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)
            self.status.value = f"{task.kind}: {done}/{total}"

    def _task_returned(self, task: _Task, outcome: Outcome, on_result) -> None:
        if task.bar is not None:
            task.bar.close()
            task.bar = None
        if isinstance(outcome.error, SegmentationCancelled):
            self.status.value = f"{task.kind} cancelled; the layers were not changed"
            show_info(f"PAC {task.kind} cancelled; nothing was written")
        elif outcome.error is not None:
            self._error(f"{task.kind} failed: {_message(outcome.error)}")
        else:
            try:
                on_result(outcome.result)
            except ValueError as err:
                self._error(str(err))

    def _task_finished(self) -> None:
        self._task = None
        self._worker = None
        self._set_running(False)

    def _busy(self) -> bool:
        if self._task is not None:
            self._error(f"the {self._task.kind} is still running: wait or press Cancel")
            return True
        return False

    def _set_running(self, running: bool) -> None:
        for w in (self.run_button, self.train_button, self.load_button):
            w.enabled = not running
        self.cancel_button.enabled = running

    @property
    def running(self) -> bool:
        """True while a full segmentation or a training runs."""
        return self._task is not None

    # --- live preview ---------------------------------------------------------------------------

    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self._request_live()
        else:
            self.live_runner.stop()

    def _request_live(self, *_args) -> None:
        if self.live_runner.closed or self._syncing or not self.live.value or self.model is None:
            return
        if self.image.value is None:
            return
        self.live_runner.request()

    def _prepare_live(self):
        """Main thread: snapshot what the live job needs, or None when nothing is to be done."""
        if not self.live.value or self.model is None or self.image.value is None:
            return None
        try:
            inp = self._image_input()
            box = visible_box(self.viewer, inp.layer, inp.channel_axis, inp.shape)
            refine = self.refine_overrides()
        except ValueError as err:
            self._error(str(err))
            return None
        seg_key = (
            id(inp.layer),
            id(inp.data),
            id(self.model),
            inp.scale,
            inp.channel_axis,
            self.device.value,
        )
        out = (float(self.threshold.value), int(self.background.value))
        key = (seg_key, box, tuple(sorted(refine.items())), out)
        names = (f"{inp.layer.name} labels", f"{inp.layer.name} matte")
        if key == self._live_done_key and all(n in self.viewer.layers for n in names):
            return None
        return {"inp": inp, "model": self.model, "box": box, "refine": refine, "out": out,
                "device": self.device.value, "seg_key": seg_key, "key": key}  # fmt: skip

    def _compute_live(self, job, should_cancel):
        """Worker thread: probabilities of the box (cached logits), then labels and matte."""
        start = time.perf_counter()
        with self._segmenter_lock:
            if self._segmenter_key != job["seg_key"]:
                inp = job["inp"]
                self._segmenter = RegionSegmenter(
                    inp.data, job["model"], spacing=inp.scale, channel_axis=inp.channel_axis,
                    device=job["device"],
                )  # fmt: skip
                self._segmenter_key = job["seg_key"]
            seg = self._segmenter
        planes = seg.stats["logit_planes"]
        p = seg.probabilities(job["box"], job["refine"], should_cancel)
        labels, matte = labels_from_probabilities(p, *job["out"])
        new = seg.stats["logit_planes"] - planes
        return labels, matte, new, time.perf_counter() - start

    def _deliver_live(self, job, result) -> None:
        labels, matte, new_planes, seconds = result
        inp = job["inp"]
        if inp.layer not in self.viewer.layers:
            return
        layers = self._outputs(inp, job["model"], job["out"][1])
        if layers is None:
            return
        (z0, z1), (y0, y1), (x0, x1) = job["box"]
        what = f"live preview of z {z0}-{z1 - 1}, y {y0}-{y1 - 1}, x {x0}-{x1 - 1}"
        write_region(*layers, job["box"], labels, matte, what)
        self._live_done_key = job["key"]
        how = f"{new_planes} new plane(s) of logits" if new_planes else "refinement only"
        self.status.value = f"{what} in {seconds:.2f} s ({how})"

    def _fail_live(self, job, outcome: Outcome) -> None:
        self._error(f"live preview failed: {_message(outcome.error)}")

    # --- helpers ----------------------------------------------------------------------------------

    def _outputs(self, inp: _ImageInput, model, background: int):
        try:
            return output_layers(
                self.viewer, inp.layer.name, inp.shape, inp.scale, inp.translate, model, background
            )
        except ValueError as err:
            self._error(str(err))
            return None

    def _require_model(self) -> PacSegModel:
        if self.model is None:
            raise ValueError("no model: load a .safetensors model or train one from scribbles")
        return self.model

    def _error(self, message: str) -> None:
        self.status.value = f"error: {message}"
        show_error(f"PAC Segmentation: {message}")


def _message(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if not isinstance(err, ValueError):
        text = f"{type(err).__name__}: {text}"
    return text


def _parse_scales(text: str) -> tuple[float, ...]:
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


def describe_model(model: PacSegModel, source: str = "") -> str:
    """A few lines for a person: classes, feature bank, training spacing, provenance."""
    cfg = model.config
    classes = ", ".join(f"{c.name} ({i + 1})" for i, c in enumerate(cfg.classes))
    feats = cfg.features
    lines = [
        f"classes (scribble value): {classes}",
        f"features: {', '.join(feats.kinds)}"
        + (" + raw" if feats.include_raw else "")
        + f" at sigma {', '.join(f'{s:g}' for s in feats.sigmas)} ({cfg.n_features} per voxel)",
        f"head: MLP {cfg.n_features}-{'-'.join(map(str, cfg.head.hidden))}-{cfg.n_classes}"
        + (", context net" if cfg.context else ""),
        f"trained at spacing {', '.join(f'{s:g}' for s in cfg.spacing)}",
    ]
    if source:
        lines.append(f"source: {source}")
    lines += [f"{k}: {v}" for k, v in cfg.provenance.items()]
    return "\n".join(lines)
