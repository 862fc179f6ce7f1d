"""The "PAC Segmentation" dock widget: model (load, save, train from scribbles), refinement and
output controls, live preview of the visible region, and full-volume runs in a worker thread.

Layout and wiring only: the state and the work are a headless ``session.Session`` (image input,
model, live region segmenter, task and cancel), the threads are ``_workers``' runners, and the
layers are ``_layers``' helpers. The widget adds no maths of its own.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui import widgets as mw
from napari.utils.notifications import show_error, show_warning

from napari_pacseg._napari import layers as _layers
from napari_pacseg._napari.controls import (
    instance_controls,
    instance_values,
    refine_controls,
    refine_values,
    set_instance_controls,
    set_refine_controls,
    shown_none,
)
from napari_pacseg._napari.refine_limits import limit_refine_controls
from napari_pacseg._napari.session import (
    RunParams,
    Session,
    TrainParams,
    device_choices,
    live_description,
    model_file_name,
    save_measurements,
    spacing_note,
    without_objects,
)  # fmt: skip
from napari_pacseg._napari.workers import (
    LiveRunner,
    Outcome,
    TaskRunner,
    message,
    serial_numba_in_this_thread,
)
from napari_pacseg.io.model_file import ModelFileError
from napari_pacseg.model.classes import DEFAULT_THRESHOLD, scribble_values
from napari_pacseg.training.defaults import DEFAULT_STEPS, default_steps

if TYPE_CHECKING:
    import napari

    from napari_pacseg.model.network import PacSegModel


def confirm_replace(parent, path: Path) -> bool:
    """Ask whether to replace the file ``path`` (a name the save dialog did not ask about:
    the suffix was added after it); True to replace."""
    from qtpy.QtWidgets import QMessageBox

    buttons = QMessageBox.StandardButton
    answer = QMessageBox.question(
        parent, "Replace file?", f"{path.name} already exists in {path.parent}.\nReplace it?",
        buttons.Yes | buttons.No, buttons.No,
    )  # fmt: skip
    return answer == buttons.Yes


IDLE_BAR = "no task running"  # the progress bar's text between tasks
STATUS_LINES = 4  # the status box grows to this many lines of text, then scrolls
CONTROLS_WIDTH = 300  # px: the controls' least width; the dock is this plus its scroll bar


# The widget's own controls a session keeps (with the refinement and instance controls)
SESSION_CONTROLS = ("class_names", "feature_scales", "train_steps", "train_context",
                    "threshold", "background", "device", "instances", "live")  # fmt: skip


def _spacing_note(job) -> str:
    """A "; note: ..." for the status line when the job's image is at another spacing than
    its model was trained at (``session.spacing_note``), else ""."""
    note = spacing_note(job.image.spacing, job.model)
    return f"; note: {note}" if note else ""


class PacSegWidget(mw.Container):
    """Dock widget: pick an image, load or train a model, refine, preview live, run in full.

    Outputs go to the Labels layer ``"<image> labels"`` (class values as in the scribbles:
    background 0, class ``i`` is ``i + 1``; names and colours from the model) and the Image
    layer ``"<image> matte"`` (1 - P(background), magma, contrast 0..1, additive), and with
    *Instances* on the Labels layer ``"<image> instances"`` (one id per object; its
    ``features`` the measurement table after a full run), all with the image's scale and
    translate, reused and written in place by later runs.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        serial_numba_in_this_thread()  # the main thread: no OpenMP team beside the jobs' own
        self.viewer = napari_viewer
        self.session = Session()
        self._syncing = False
        self._auto_steps = DEFAULT_STEPS  # the steps the widget itself last put in the box
        self._build()
        self.tasks = TaskRunner(
            self.session, self._say, self._error, self._set_running, self._task_progress
        )
        self.live_runner = LiveRunner(
            self._prepare_live, self.session.compute_live, self._deliver_live, self._fail_live,
            progressed=self._live_progress, idle=self._live_idle,
        )  # fmt: skip
        self._live_said = ""  # the status line of the last delivered preview
        self._connect()
        self._on_image_changed()
        self._show_model_info()

    model = property(lambda self: self.session.model, doc="The current model (or None).")
    running = property(lambda self: self.session.running, doc="A full run or training runs.")

    # --- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        self._headings = []

        def heading(text):
            self._headings.append(mw.Label(value=f"<b>{text}</b>"))
            return self._headings[-1]

        viewer = self.viewer
        self.image = mw.ComboBox(label="Image", choices=lambda _: _layers.image_choices(viewer))
        self.channel_axis = mw.SpinBox(
            label="Channel axis", min=0, max=3, value=0, visible=False,
            tooltip="4D images: the channel axis must come first (napari overlays 3D results on the last three axes)",
        )  # fmt: skip
        self.axis0 = mw.ComboBox(
            label="Axis 0 is",
            choices=[("z (a volume)", "z"), ("time / frames (2D each)", "frames"),
                     ("channels (a 2D image)", "channels")],
            value="z", visible=False,
            tooltip="3D layers: a volume, a time-lapse of 2D frames (each segmented alone), or "
            "the channels of a 2D image; set from the layer's axis labels when they say",
        )  # fmt: skip
        self.spacing = mw.LineEdit(
            label="Spacing",
            tooltip="the pixel or voxel size (z, y, x; y, x for a 2D image or frames) in the "
            "image's units (um for the sample): the image layer's scale. Enter sets it on the "
            "image, its scribbles and its results",
        )  # fmt: skip
        self.spacing_info = mw.Label(value="(no image)")
        self.model_info = mw.Label(value="none loaded")
        self.model_details = mw.CheckBox(
            text="Show model details", value=False,
            tooltip="the full description: features, head, refinement and instance defaults, "
            "halo, provenance (pacseg info MODEL prints the same)",
        )  # fmt: skip
        self.load_button = mw.PushButton(text="Load model…")
        self.save_button = mw.PushButton(text="Save model…")
        self.restore_button = mw.PushButton(
            text="Restore session…",
            tooltip="bring back the scribbles, model and settings saved after each training "
            "(beside the image's file, or in napari-pacseg's user data folder)",
        )  # fmt: skip
        self.scribbles = mw.ComboBox(
            label="Scribbles", choices=lambda _: _layers.scribble_choices(viewer), nullable=True
        )
        self.class_names = mw.LineEdit(label="Classes", value=TrainParams().classes)
        self.new_scribbles_button = mw.PushButton(text="New scribbles layer")
        self.feature_scales = mw.LineEdit(label="Feature scales", value=TrainParams().scales)
        self.train_steps = mw.SpinBox(
            label="Training steps", min=10, max=5000, step=10, value=DEFAULT_STEPS
        )
        self.train_context = mw.CheckBox(
            text="Context net (slower)", value=False,
            tooltip="also train a small encoder/decoder that sees each voxel's surroundings "
            "(about 20 s more on a laptop CPU)",
        )  # fmt: skip
        self.add_pair_button = mw.PushButton(
            text="Add to training set",
            tooltip="keep this image and scribbles layer: Train uses every pair of the set",
        )
        self.training_set = mw.Select(
            label="Training set", visible=False,
            choices=lambda _: [(p.label, i) for i, p in enumerate(self.session.training_set)],
        )  # fmt: skip
        self.remove_pair_button = mw.PushButton(text="Remove selected", visible=False)
        self.train_button = mw.PushButton(text="Train from scribbles")
        self.refine_controls = refine_controls()
        for name, control in self.refine_controls.items():
            setattr(self, name, control)
        for name in ("iterations", "kernel_size"):
            self.refine_controls[name].changed.connect(self._limit_refine)
        self.reset_refine_button = mw.PushButton(text="Model defaults")
        self.threshold = mw.FloatSlider(
            label="Matte threshold", min=0.0, max=1.0, step=0.01, value=DEFAULT_THRESHOLD
        )
        self.instances = mw.CheckBox(
            text="Instances (separate the objects)", value=False,
            tooltip="one label per object in '<image> instances', measured after a full run",
        )  # fmt: skip
        self.instance_controls = instance_controls()
        for name, control in self.instance_controls.items():
            setattr(self, f"instance_{name}", control)
        self.save_objects_button = mw.PushButton(
            text="Save measurements…", enabled=False,
            tooltip="the last full run's objects as CSV (volume, centroid, bounding box, "
            "intensities, sphericity)",
        )  # fmt: skip
        self.objects = None  # the last full run's measurement table
        self.background = mw.ComboBox(label="Background class", choices=[("background", 0)])
        self.device = mw.ComboBox(
            label="Device", choices=device_choices(),
            tooltip="where segmenting and training run; auto: the first CUDA device, else the CPU",
        )  # fmt: skip
        self.live = mw.CheckBox(text="Live (visible region)", value=True)
        self.run_button = mw.PushButton(text="Run on full image")
        self.cancel_button = mw.PushButton(text="Cancel", enabled=False)
        self.progress = mw.ProgressBar(
            min=0, max=1, value=0, enabled=False,
            tooltip="the full run's tiles or the training's steps done",
        )  # fmt: skip
        self.status = mw.Label(label="Status", value="ready")
        # Everything but the run controls and the status scrolls, so the widget fits a laptop
        # screen (a magicgui container docked by napari never scrolls itself: napari docks its
        # inner widget); Run, Cancel and Status stay in sight below it.
        self.controls = mw.Container(labels=True, scrollable=True)
        self.controls.extend([
            self.image, self.axis0, self.channel_axis, self.spacing, self.spacing_info,
            heading("Model"), self.model_info, self.model_details, self.load_button,
            self.save_button, self.restore_button,
            heading("Training"), self.scribbles, self.class_names, self.new_scribbles_button,
            self.feature_scales, self.train_steps, self.train_context, self.add_pair_button, self.training_set,
            self.remove_pair_button, self.train_button,
            heading("Refinement"), *self.refine_controls.values(), self.reset_refine_button,
            heading("Objects"), self.instances, *self.instance_controls.values(),
            self.save_objects_button,
            heading("Output"), self.threshold, self.background, self.device,
        ])  # fmt: skip
        self.run_controls = mw.Container(
            labels=True,
            widgets=[self.live, self.run_button, self.cancel_button, self.progress, self.status],
        )
        layout = self.native.layout()  # Qt level: magicgui would insert the scroll area's content
        layout.addWidget(self.controls.root_native_widget)
        layout.addWidget(self.run_controls.native)
        # The bar is always there, greyed while no task runs: showing or hiding a widget asks
        # the window for a new layout (napari's main window animates every dock to it), whose
        # events pass napari's Python event filter and take the GIL from the run's thread as it
        # starts and ends.
        self._set_bar(0, 1, IDLE_BAR)
        self._fit_narrow_dock()
        self._box_status()

    def _fit_narrow_dock(self) -> None:
        """Make the controls fit a narrow dock (the dock opens at about 330 px at 1366 x 768):
        headings and the info lines span the whole row (no empty label column before them),
        texts wrap, drop-downs and number boxes may be narrower than their longest entry, and
        the scroll area scrolls sideways only as a last resort."""
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QAbstractSpinBox, QComboBox, QLineEdit, QSizePolicy

        full_row = [self.spacing_info, self.model_info, self.progress, *self._headings]
        for w in full_row:
            row = w._labeled_widget()
            if row is not None:  # magicgui puts an empty label column before each value widget
                row._label_widget.visible = False
        for w in (self.model_info, self.status, self.spacing_info):
            w.native.setWordWrap(True)
            policy = w.native.sizePolicy()  # wrapped text: any width, the height follows
            policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
            policy.setVerticalPolicy(QSizePolicy.Policy.Preferred)
            w.native.setSizePolicy(policy)
        for w in (*self.controls, *self.run_controls):
            native = w.native
            if isinstance(native, QComboBox):
                native.setSizeAdjustPolicy(
                    QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
                )
                native.setMinimumContentsLength(6)
            if isinstance(native, (QComboBox, QAbstractSpinBox, QLineEdit)):
                native.setMinimumWidth(72)
        # The dock opens at the widget's size hint and never narrower than its minimum: the
        # controls' width plus the vertical scroll bar, so nothing is cut.
        scroll = self.controls.root_native_widget
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        # Always there: a bar that comes and goes changes the width the wrapped texts' heights
        # were laid out for, and cuts their first and last lines.
        scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOn)
        content = scroll.widget()
        content.setMinimumWidth(CONTROLS_WIDTH)
        chrome = scroll.verticalScrollBar().sizeHint().width() + 2 * scroll.frameWidth()
        least = max(CONTROLS_WIDTH, content.minimumSizeHint().width())
        scroll.setMinimumWidth(least + chrome)

    def _box_status(self) -> None:
        """Put the status line in a scroll area of its own that only grows (up to
        ``STATUS_LINES`` lines, then it scrolls): a wrapped label's new text asks its parents
        for a new layout, and napari's main window then animates every dock, 3-4 times per
        live preview (its progress, then its result) while the preview needs the cores
        (docs/benchmarks.md, the live preview). In the box the request stops there."""
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy

        label = self.status.native
        row = label.parentWidget()
        box = QScrollArea(row)
        box.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        box.setFrameShape(QFrame.Shape.NoFrame)
        box.setWidgetResizable(True)
        box.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        box.viewport().setAutoFillBackground(False)
        row.layout().replaceWidget(label, box)
        box.setWidget(label)
        name = self.status._labeled_widget()._label_widget.native  # "Status", by the first line
        row.layout().setAlignment(name, Qt.AlignmentFlag.AlignTop)
        label.setAutoFillBackground(False)
        label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self._status_box = box
        self._fit_status()

    def _fit_status(self) -> None:
        """Grow the status box to its text (never shrink it: each change of height is one new
        layout of the window), at most ``STATUS_LINES`` lines."""
        label, box = self.status.native, self._status_box
        width = box.viewport().width() if box.isVisible() else box.width()
        lines = label.fontMetrics().lineSpacing()
        need = label.heightForWidth(max(width, 1)) if width > 0 else lines
        need = min(max(need, lines), STATUS_LINES * lines) + 2 * box.frameWidth()
        if need > box.minimumHeight():
            box.setFixedHeight(need)

    def _connect(self) -> None:
        self.image.changed.connect(self._on_image_changed)
        self.scribbles.changed.connect(self._on_scribbles_changed)
        self.channel_axis.changed.connect(self._on_image_changed)
        self.axis0.changed.connect(self._on_axis0_changed)
        self.spacing.native.editingFinished.connect(self._on_spacing_edited)
        self.model_details.changed.connect(self._show_model_info)
        self.load_button.clicked.connect(lambda: self._on_file_clicked(save=False))
        self.save_button.clicked.connect(lambda: self._on_file_clicked(save=True))
        self.restore_button.clicked.connect(self._on_restore_clicked)
        self.new_scribbles_button.clicked.connect(self.new_scribbles_layer)
        self.train_button.clicked.connect(self.start_training)
        self.add_pair_button.clicked.connect(self.add_to_training_set)
        self.remove_pair_button.clicked.connect(self.remove_from_training_set)
        self.reset_refine_button.clicked.connect(self._reset_refine)
        self.run_button.clicked.connect(self.run_full)
        self.save_objects_button.clicked.connect(self._on_save_objects_clicked)
        self.cancel_button.clicked.connect(self.cancel)
        outputs = (self.threshold, self.background, self.device, self.instances)
        for control in (*self.refine_controls.values(), *self.instance_controls.values(), *outputs):
            control.changed.connect(self._request_live)
        self.live.changed.connect(self._on_live_toggled)
        dims = self.viewer.dims.events
        layers = self.viewer.layers.events
        self._viewer_hooks = [
            (e, self._request_live) for e in (dims.current_step, dims.ndisplay, dims.order)
        ]
        self._viewer_hooks += [
            (e, self._on_layers_changed) for e in (layers.inserted, layers.removed)
        ]
        for event, callback in self._viewer_hooks:
            event.connect(callback)
        self.native.destroyed.connect(self._teardown)

    def _teardown(self, *_args) -> None:
        """The Qt widget is being destroyed: stop live updates, leave the viewer's events."""
        self.live_runner.close()
        self._watch_scale(None)
        for event, callback in self._viewer_hooks:
            event.disconnect(callback)
        self._viewer_hooks = []

    # --- image ----------------------------------------------------------------------------------

    def _input(self):
        """The chosen image layer, snapshotted as the session's current image."""
        return self.session.use_image(self.image.value, self.channel_axis.value, self.axis0.value)

    def reset_choices(self, *_args) -> None:
        """Refresh the dropdowns (the controls live in containers docked below this one)."""
        super().reset_choices()
        self.controls.reset_choices()
        self.run_controls.reset_choices()

    def _on_layers_changed(self, *_args) -> None:
        self.reset_choices()
        if self.scribbles.value is None:
            self._pick_scribbles()

    def _pick_scribbles(self) -> None:
        """Choose ``"<image> scribbles"`` (the name *New scribbles layer* and the sample use)
        when such a Labels layer exists."""
        image = self.image.value
        if image is None:
            return
        wanted = f"{image.name} scribbles"
        for name, layer in _layers.scribble_choices(self.viewer):
            if name == wanted:
                self.scribbles.value = layer
                return

    def _on_scribbles_changed(self, *_args) -> None:
        """A scribbles layer that names its classes sets the Classes field (unless a model is
        loaded: then its classes are what training extends)."""
        names = _layers.scribble_class_names(self.scribbles.value) if self.scribbles.value else None
        if names and self.model is None:
            self.class_names.value = ", ".join(names)

    def _on_image_changed(self, *_args) -> None:
        self._pick_scribbles()
        layer = self.image.value
        four_d = layer is not None and layer.ndim == 4
        if four_d and not self.channel_axis.visible:
            self.channel_axis.value = 0
        self.channel_axis.visible = four_d
        three_d = layer is not None and layer.ndim == 3
        if three_d and layer is not getattr(self, "_axis0_layer", None):
            from napari_pacseg._napari.session import default_axis0

            with self._synced():
                self.axis0.value = default_axis0(layer)
        self._axis0_layer = layer
        self.axis0.visible = three_d
        self._watch_scale(layer)
        self._update_spacing_info()
        self._request_live()

    def _on_axis0_changed(self, *_args) -> None:
        self._update_spacing_info()
        self._request_live()

    def _watch_scale(self, layer) -> None:
        """Follow ``layer``'s scale (set in the layer's console or by a script) in Spacing."""
        old, hook = getattr(self, "_scale_hook", (None, None))
        if old is layer:
            return
        if old is not None:
            old.events.scale.disconnect(hook)
        self._scale_hook = (None, None)
        if layer is not None:
            me = weakref.ref(self)  # the layer's event must not keep the widget alive

            def hook(*_args):
                widget = me()
                if widget is not None:
                    widget._on_scale_changed()

            layer.events.scale.connect(hook)
            self._scale_hook = (layer, hook)

    def _on_scale_changed(self, *_args) -> None:
        self._update_spacing_info()
        self._request_live()

    def _on_spacing_edited(self) -> None:
        if self.image.value is not None:
            self.set_spacing(self.spacing.value)

    def set_spacing(self, text: str) -> bool:
        """Set the image's pixel or voxel size from ``text`` ("1, 0.4, 0.4": z, y, x; y, x for a
        2D image or a time-lapse's frames): the scale of the image layer, its scribbles and its
        results, so napari draws it and segmenting uses it. True when set; an error (and
        Spacing back to the layer's) when ``text`` is not a spacing."""
        from napari_pacseg._napari.session import parse_spacing

        try:
            inp = self._input()
            spacing = parse_spacing(text, len(inp.spacing))
        except ValueError as err:
            self._update_spacing_info()
            self._error(str(err))
            return False
        if spacing != inp.spacing:
            changed = _layers.set_spacing(self.viewer, inp.layer, spacing, self.scribbles.value)
            self._update_spacing_info()
            shown = ", ".join(f"{v:g}" for v in spacing)
            self._say(f"spacing {shown} set on {', '.join(repr(n) for n in changed)}")
        return True

    def _update_spacing_info(self) -> None:
        spacing = ""
        try:
            inp = self._input()
            text = self.session.spacing_text()
            spacing = ", ".join(f"{v:g}" for v in inp.spacing)
        except ValueError as err:  # e.g. a 4D layer whose channel axis is not first
            text = "(no image)" if self.image.value is None else str(err)
        self.spacing_info.value = text
        self.spacing.value = spacing
        self.spacing.enabled = bool(spacing)
        kind = self.session.image.ndim if self.session.image is not None else 3
        if self.train_steps.value == self._auto_steps:  # still the widget's: not the user's own
            self.train_steps.value = self._auto_steps = default_steps(kind)
        self._limit_refine()

    def _limit_refine(self, *_args) -> None:
        """Keep the refinement controls within the work the engine accepts at the image's
        spacing (the model's when the image's does not fit it; isotropic without a model)."""
        model, spacing, ndim = self.model, (1.0, 1.0, 1.0), 3
        if model is not None:
            ndim = model.config.ndim
            try:
                spacing = model.config.volume_spacing(self._input().spacing)
            except ValueError:  # no image, or one of the other kind: the model's own spacing
                spacing = model.config.volume_spacing(None)
        limit_refine_controls(self.refine_controls, spacing, ndim)

    # --- model ----------------------------------------------------------------------------------

    def _on_file_clicked(self, save: bool) -> None:
        """Load or save the model through a file dialog."""
        from qtpy.QtWidgets import QFileDialog

        if save and self.model is None:
            return self._error("no model to save: load or train one first")
        ask = QFileDialog.getSaveFileName if save else QFileDialog.getOpenFileName
        title = "Save PAC-Seg model" if save else "Load PAC-Seg model"
        path, _ = ask(self.native, title, "", "PAC-Seg model (*.safetensors)")
        if path:
            (self.save_model_file if save else self.load_model_file)(path)

    def load_model_file(self, path) -> bool:
        """Load a ``.safetensors`` model; a bad file gives an error notification. True if loaded."""
        try:
            self.session.load(path)
        except (ModelFileError, OSError) as err:
            self._error(f"could not load the model from {path}: {err}")
            return False
        self._model_changed()
        self._say(f"loaded model {Path(path).name}")
        return True

    def save_model_file(self, path):
        """Save the current model (``.safetensors`` added when missing); the path written, or
        None. A file at the added name, which the save dialog did not ask about, is replaced
        only when the user says so (``confirm_replace``)."""
        try:
            try:
                written = self.session.save(path)
            except FileExistsError:
                target = model_file_name(path)
                if not confirm_replace(self.native, target):
                    self._say(f"not saved: {target.name} exists")
                    return None
                written = self.session.save(target)  # the name itself: replaced
        except (OSError, ValueError) as err:
            self._error(f"could not save the model to {path}: {err}")
            return None
        self._say(f"saved model to {written}")
        return written

    def set_model(self, model: PacSegModel, source: str) -> None:
        """Use ``model``: show its description, adopt its refinement defaults and classes."""
        self.session.set_model(model, source)
        self._model_changed()

    def _model_changed(self) -> None:
        cfg = self.model.config
        with self._synced():
            self.background.choices = [(c.name, i) for i, c in enumerate(cfg.classes)]
            self.background.value = 0
            self.class_names.value = ", ".join(c.name for c in cfg.classes)
            self.feature_scales.value = ", ".join(f"{s:g}" for s in cfg.features.sigmas)
            set_refine_controls(self.refine_controls, cfg.refine)
            set_instance_controls(self.instance_controls, cfg.instances,
                                  [c.name for c in cfg.classes])  # fmt: skip
        self._show_model_info()
        self._update_spacing_info()

    def _show_model_info(self, *_args) -> None:
        """The model box: one line (kind, classes, where it came from), or the full
        description with *Show model details*."""
        self.model_info.value = (
            self.session.describe() if self.model_details.value else self.session.summary()
        )

    def _reset_refine(self) -> None:
        if self.model is None:
            return self._error("no model loaded: its refinement defaults are not known yet")
        with self._synced():
            set_refine_controls(self.refine_controls, self.model.config.refine)

    @contextlib.contextmanager
    def _synced(self):
        """Set controls without a live request per control; one request at the end."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False
        self._request_live()

    def refine_overrides(self) -> dict:
        """The refinement controls as ``segment(refine=...)`` overrides."""
        return refine_values(self.refine_controls)

    def run_params(self) -> RunParams:
        """Refinement, label rule and device as the controls show them."""
        objects = instance_values(self.instance_controls) if self.instances.value else None
        return RunParams(self.refine_overrides(), float(self.threshold.value),
                         int(self.background.value), self.device.value, objects)  # fmt: skip

    # --- scribbles and training -----------------------------------------------------------------

    def new_scribbles_layer(self):
        """Add an empty uint8 Labels layer ``"<image> scribbles"`` with the image's spatial
        shape, scale and translate, whose values 1..K are named after the Classes field."""
        try:
            layer = _layers.add_scribbles(
                self.viewer, self._input(), *self.session.scribble_classes(self.class_names.value)
            )
        except ValueError as err:
            return self._error(str(err))
        self.scribbles.value = layer
        names = _layers.scribble_class_names(layer)
        pairs = [f"{v} = {n}" for v, n in zip(scribble_values(len(names)), names)]
        self._say(f"paint with label {', '.join(pairs)}; then Train")
        return layer

    def add_to_training_set(self) -> None:
        """Add the chosen image and scribbles layer to the training set (listed; Train uses
        every pair of it, plus the chosen pair when it is not in it)."""
        try:
            self._input()
            pair = self.session.add_to_training_set(*_layers.scribbles_of(self.scribbles.value))
        except ValueError as err:
            return self._error(str(err))
        self._show_training_set()
        self._say(f"added {pair.label} to the training set ({len(self.session.training_set)})")

    def remove_from_training_set(self) -> None:
        """Remove the selected entries of the training set."""
        for index in sorted(self.training_set.value, reverse=True):
            self.session.remove_from_training_set(index)
        self._show_training_set()

    def _show_training_set(self) -> None:
        pairs = self.session.training_set
        self.training_set.reset_choices()
        self.training_set.visible = self.remove_pair_button.visible = bool(pairs)
        n = len(pairs)
        self.train_button.text = (
            f"Train on the set (+ this pair) [{n}]" if n else "Train from scribbles"
        )

    def start_training(self) -> None:
        """Train a model from the chosen scribbles layer (and the training set) in a worker
        thread."""
        params = TrainParams(self.class_names.value, self.feature_scales.value,
                             int(self.train_steps.value), self.device.value,
                             self.train_context.value)  # fmt: skip
        try:
            self.session.check_idle()
            self._input()
            job = self.session.training(params, *_layers.scribbles_of(self.scribbles.value))
        except ValueError as err:
            return self._error(str(err))
        self.tasks.start("training", job, lambda model, _: self._trained(model, job))

    def _trained(self, model: PacSegModel, job) -> None:
        self.set_model(model, job.source)
        voxels = model.config.provenance.get("labelled_voxels", "?")
        then = "live preview follows" if self.live.value else "press Run on full image"
        warned = "".join(f"; warning: {w}" for w in job.warnings)
        self._say(f"trained ({voxels} labelled voxels); {then}{warned}")
        for w in job.warnings:
            show_warning(f"PAC Segmentation: {w}")
        self._autosave(model, job)

    # --- sessions (autosave) --------------------------------------------------------------------

    def settings(self) -> dict:
        """The widget's settings (control name to value; JSON-able), as a session keeps them."""
        out = {n: getattr(self, n).value for n in SESSION_CONTROLS}
        out["refine"] = self.refine_overrides()
        out["instance_controls"] = instance_values(self.instance_controls)
        return out

    def apply_settings(self, settings: dict) -> list[str]:
        """Show ``settings`` (``settings()``'s dict) in the controls; returns the names that
        could not be set (a value out of a control's range, a control of another version)."""
        skipped = []

        def put(control, name, value):
            try:
                control.value = value
            except (ValueError, TypeError):
                skipped.append(name)

        groups = {"refine": self.refine_controls, "instance_controls": self.instance_controls}
        with self._synced():
            for name, value in settings.items():
                if name in groups and isinstance(value, dict):
                    for key, v in value.items():
                        if key in groups[name]:
                            control = groups[name][key]
                            put(control, key, shown_none(control) if v is None else v)
                        else:
                            skipped.append(key)
                elif name in SESSION_CONTROLS:
                    put(getattr(self, name), name, value)
                else:
                    skipped.append(name)
        return skipped

    def _autosave(self, model: PacSegModel, job) -> None:
        """Save the session after a training: the scribbles it trained from, the model and
        the settings (``autosave``); a failure is said, never raised."""
        from napari_pacseg._napari.autosave import SessionScribbles, save_session, session_folder

        names = [c.name for c in model.config.classes]
        scribbles = [SessionScribbles(inp.name, np.asarray(marks), tuple(inp.scale), names)
                     for inp, marks in zip(job.images, job.scribbles)]  # fmt: skip
        layer = job.image.layer
        source = getattr(getattr(layer, "source", None), "path", None)
        try:
            folder = save_session(session_folder(job.image.name, source), model, scribbles,
                                  self.settings())  # fmt: skip
        except (OSError, ValueError) as err:
            self._say(f"{self.status.value}; session not saved: {err}")
            return
        self.session_folder = folder
        self.restore_button.tooltip = f"the last session was saved to {folder}"

    def _on_restore_clicked(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        from napari_pacseg._napari.autosave import session_folder, user_sessions_dir

        start = getattr(self, "session_folder", None)
        if start is None and self.image.value is not None:
            layer = self.image.value
            start = session_folder(layer.name, getattr(layer.source, "path", None))
        if start is None or not Path(start).exists():
            start = user_sessions_dir()
        folder = QFileDialog.getExistingDirectory(self.native, "Restore a PAC-Seg session",
                                                  str(start))  # fmt: skip
        if folder:
            self.restore_session(folder)

    def restore_session(self, folder) -> bool:
        """Bring back the session in ``folder`` (``autosave.read_session``): its model, the
        settings, and each image's scribbles as a Labels layer (``"<image> scribbles"``, or
        ``"<image> scribbles (restored)"`` when that name is taken) at the saved scale. True
        when restored; an error (nothing changed) when ``folder`` is not a session."""
        from napari_pacseg._napari.autosave import read_session

        try:
            self.session.check_idle()
            saved = read_session(folder)
        except ValueError as err:
            self._error(str(err))
            return False
        layers = []
        for s in saved.scribbles:
            name = f"{s.image} scribbles"
            if name in self.viewer.layers:
                name += " (restored)"
            layer = self.viewer.add_labels(
                s.data, name=name, scale=s.scale, **_layers.scribble_styling(s.classes)
            )
            layers.append(layer)
        self.set_model(saved.model, f"session {saved.folder} ({saved.saved})")
        skipped = self.apply_settings(saved.settings)
        if layers:
            self.scribbles.value = layers[0]
        self.session_folder = saved.folder
        note = f"; settings not restored: {', '.join(skipped)}" if skipped else ""
        self._say(f"restored the session of {saved.saved}: the model and "
                  f"{len(layers)} scribbles layer(s){note}")  # fmt: skip
        return True

    # --- full run -------------------------------------------------------------------------------

    def run_full(self) -> None:
        """Segment the whole image in a worker thread (progress bar, Cancel)."""
        try:
            self.session.check_idle()
            self._input()
            job = self.session.full_run(self.run_params())
        except ValueError as err:
            return self._error(str(err))
        self.tasks.start("segmentation", job, partial(self._full_done, job))

    def _full_done(self, job, seg, seconds: float) -> None:
        layers = self._outputs(job.image, job.model, job.params.background)
        if layers is not None:
            _layers.write_full(*layers, seg.labels, seg.matte, "full volume")
            objects = ""
            if seg.instances is not None:
                layer = self._instance_layer(job.image)
                if layer is not None:
                    _layers.write_instances(layer, seg.instances, seg.objects, "full volume")
                    self.objects = seg.objects
                    self.save_objects_button.enabled = True
                    objects = f", {int(seg.instances.max())} objects"
            self.session.full_run_written()
            self._say(f"full image done in {seconds:.1f} s{objects}{_spacing_note(job)}")

    def _on_save_objects_clicked(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save measurements", "objects.csv", "CSV (*.csv)"
        )
        if path:
            self.save_objects_file(path)

    def save_objects_file(self, path):
        """Save the last full run's measurement table as CSV; the path written, or None."""
        if self.objects is None:
            self._error("no measurements yet: turn Instances on and run on the full image")
            return None
        try:
            try:
                written = save_measurements(path, self.objects)
            except FileExistsError:
                target = Path(path).with_suffix(".csv")
                if not confirm_replace(self.native, target):
                    self._say(f"not saved: {target.name} exists")
                    return None
                written = save_measurements(target, self.objects)
        except OSError as err:
            self._error(f"could not save the measurements to {path}: {err}")
            return None
        self._say(f"saved {len(self.objects['id'])} objects' measurements to {written}")
        return written

    def cancel(self) -> None:
        """Cancel the running full segmentation or training (between tiles or steps)."""
        self.tasks.cancel()

    def _set_running(self, running: bool) -> None:
        for w in (self.run_button, self.train_button, self.load_button):
            w.enabled = not running
        self.cancel_button.enabled = running
        # the task's bar below Run and Cancel (``workers.TaskRunner``), greyed between tasks
        self.progress.enabled = running
        self._set_bar(0, 1, "starting…" if running else IDLE_BAR)

    def _task_progress(self, done: int, total: int, text: str) -> None:
        total = max(1, int(total))
        self._set_bar(min(int(done), total), total, text)

    def _set_bar(self, done: int, total: int, text: str) -> None:
        """The bar's range, value and text (its text: no new layout, unlike a status line's),
        drawn with the window's next paint. ``QProgressBar.setValue`` repaints at once, and on
        a display whose window is composited in software (Xvfb, a VM, a remote desktop) each
        immediate repaint redraws the whole napari window in the main thread while the run
        needs the cores (``benchmarks/results/live-cpu.md``, full-run rows)."""
        bar = self.progress.native
        bar.setUpdatesEnabled(False)
        try:
            bar.setMaximum(total)
            bar.setValue(done)
            bar.setFormat(text)
        finally:
            bar.setUpdatesEnabled(True)  # one deferred update instead

    # --- live preview ---------------------------------------------------------------------------

    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self._request_live()
        else:
            busy = self.live_runner.busy
            self.live_runner.stop()
            if busy:
                self._say("live preview off")

    def _live_wanted(self) -> bool:
        return bool(self.live.value) and self.model is not None and self.image.value is not None

    def _request_live(self, *_args) -> None:
        if not (self.live_runner.closed or self._syncing) and self._live_wanted():
            self.live_runner.request()

    def _prepare_live(self):
        """Main thread: snapshot what the live job needs, or None when nothing is to be done."""
        if not self._live_wanted():
            return None
        try:
            inp = self._input()
            box = _layers.visible_box(self.viewer, inp.layer, inp.layer_channel_axis, inp.shape,
                                      frames=inp.frame_axis is not None)  # fmt: skip
            names = _layers.output_names(inp.name)
            params = self.run_params()
            # A full run's objects and measurements stay until the next full run: a preview
            # of a slab would cut objects at its edges and leave no measurements.
            if self.instances.value and _layers.holds_full_run(self.viewer, inp.name):
                params = without_objects(self.model, params)  # the run's own refinement
            elif self.instances.value:
                names += (_layers.instance_name(inp.name),)
            redo = not all(n in self.viewer.layers for n in names)
            job = self.session.live_job(box, params, redo=redo)
        except ValueError as err:
            self._error(str(err))
            return None
        if job is not None:
            self._say(f"{job.preview}…")
        return job

    def _live_progress(self, job, done: int, total: int) -> None:
        self._say(f"{job.preview}: {100 * done // max(1, total)}%…")

    def _live_idle(self) -> None:
        """A preview was abandoned and none follows: say what the layers show."""
        self._say(self._live_said if self.live.value else "live preview off")

    def _deliver_live(self, job, result) -> None:
        if job.image.layer not in self.viewer.layers:
            return  # the image was removed while the job ran
        layers = self._outputs(job.image, job.model, job.params.background)
        if layers is not None:
            what = (
                job.description
                if result.box == job.box
                else live_description(result.box, job.image)
            )
            _layers.write_region(
                *layers, result.box, result.labels, result.matte, what, exact=not result.note
            )
            if result.instances is not None:
                layer = self._instance_layer(job.image)
                if layer is not None:
                    _layers.write_instances(layer, result.instances, None, what, result.box)
            self.session.live_delivered(job)
            note = f"; {result.note}" if result.note else ""
            if self.instances.value and job.params.instances is None:
                note += "; objects: the last full run's (Run on full image updates them)"
            note += _spacing_note(job)
            self._live_said = f"{what} in {result.seconds:.2f} s ({result.work}){note}"
            self._say(self._live_said)

    def _fail_live(self, job, outcome: Outcome) -> None:
        self._error(f"live preview failed: {message(outcome.error)}")

    # --- helpers --------------------------------------------------------------------------------

    def _outputs(self, image, model, background: int):
        try:
            return _layers.output_layers(self.viewer, image, model, background)
        except ValueError as err:
            self._error(str(err))
            return None

    def _instance_layer(self, image):
        try:
            return _layers.instance_layer(self.viewer, image)
        except ValueError as err:
            self._error(str(err))
            return None

    def _say(self, text: str) -> None:
        self.status.value = text
        self.status.native.setToolTip(text)  # the whole text where the box scrolls
        self._fit_status()

    def _error(self, text: str) -> None:
        self._say(f"error: {text}")
        show_error(f"PAC Segmentation: {text}")
