"""The widget as a newcomer meets it: it fits a 1366 x 768 screen, the voxel size is in reach
(editable Spacing, TIFFs opened at their voxel size), progress with units, a model saved
again under its name after asking."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from qtpy.QtWidgets import QApplication, QScrollArea, QWidget  # noqa: E402

from napari_pacseg._napari.widget import IDLE_BAR, STATUS_LINES  # noqa: E402
from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample  # noqa: E402

SCREEN = (1366, 768)
WAIT_MS = 60_000

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample():
    return load_sample()


def _settle(qtbot, ms: int = 200) -> None:
    qtbot.wait(ms)
    QApplication.processEvents()


@contextlib.contextmanager
def _layout_requests(*targets):
    """Record, while the block runs, every LayoutRequest event posted to one of ``targets``
    (Qt objects): yields the list they are appended to."""
    from qtpy.QtCore import QEvent, QObject

    seen: list = []

    class Layouts(QObject):
        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.LayoutRequest and any(obj is t for t in targets):
                seen.append(obj)
            return False

    layouts, app = Layouts(), QApplication.instance()
    app.installEventFilter(layouts)
    try:
        yield seen
    finally:
        app.removeEventFilter(layouts)


@pytest.fixture
def laptop(make_napari_viewer, qtbot):
    """napari at 1366 x 768 with the 3D sample and the widget docked (live off)."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-pacseg", "nuclei")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*SCREEN)
    _settle(qtbot)
    yield viewer, dock, widget
    widget.live_runner.stop()
    qtbot.waitUntil(
        lambda: not widget.running and widget.live_runner._worker is None, timeout=WAIT_MS
    )


def _cut_off(widget) -> list[str]:
    """The visible controls that end right of the scroll area's view (cut off on screen)."""
    scroll = widget.controls.root_native_widget
    assert isinstance(scroll, QScrollArea)
    view = scroll.viewport()
    cut = []
    for child in scroll.widget().findChildren(QWidget):
        if not child.isVisibleTo(view) or child.width() == 0:
            continue
        right = child.mapTo(view, child.rect().topRight()).x()
        if right >= view.width():
            cut.append(f"{type(child).__name__} {getattr(child, 'text', lambda: '')()!r}: {right}")
    return cut


@pytest.mark.parametrize("details", [False, True], ids=["summary", "model details"])
def test_the_widget_fits_its_dock_at_1366x768(laptop, qtbot, details):
    viewer, dock, widget = laptop
    assert widget.load_model_file(DEMO_MODEL_FILE)
    widget.model_details.value = details
    _settle(qtbot)
    window = viewer.window._qt_window
    assert (window.width(), window.height()) == SCREEN
    scroll = widget.controls.root_native_widget
    content = scroll.widget()
    # nothing needs the horizontal scroll bar: the content's least width fits the view
    assert content.minimumSizeHint().width() <= scroll.viewport().width()
    assert scroll.horizontalScrollBar().maximum() == 0
    assert widget.native.sizeHint().width() <= dock.width()
    assert _cut_off(widget) == []
    # the dock leaves the canvas most of the screen
    assert dock.width() <= 0.3 * SCREEN[0]
    # the wrapped texts are as tall as their lines need (none cut at the top or bottom)
    for label in (widget.model_info, widget.spacing_info, widget.status):
        native = label.native
        assert native.height() >= native.heightForWidth(native.width())
    # headings span the row (no empty label column before them), their text whole
    for heading in widget._headings:
        row = heading.native.parentWidget()
        assert row.mapTo(content, row.rect().topLeft()).x() < 20
        assert heading.native.width() >= heading.native.sizeHint().width()


# --- the voxel size in reach ---------------------------------------------------------------------

CROP = (slice(32, 40), slice(64, 128), slice(64, 128))  # 8 planes of the sample, a few nuclei


@pytest.fixture
def docked(make_napari_viewer, qtbot):
    """A viewer and the widget docked (live off)."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-pacseg", "PAC Segmentation")
    widget.live.value = False
    yield viewer, widget
    widget.live_runner.stop()
    qtbot.waitUntil(
        lambda: not widget.running and widget.live_runner._worker is None, timeout=WAIT_MS
    )


def test_spacing_is_editable_and_is_the_layers_scale(docked, sample, errors):
    viewer, widget = docked
    # a TIFF opened by napari's builtins: scale 1
    image = viewer.add_image(sample.image[CROP], name="crop")
    scribbles = viewer.add_labels(sample.scribbles[CROP], name="crop scribbles")
    widget.image.value = image
    assert widget.load_model_file(DEMO_MODEL_FILE)
    assert widget.spacing.value == "1, 1, 1" and widget.spacing.enabled
    assert "the model was trained at 1, 0.4, 0.4 (z, y, x), this image is at 1, 1, 1" in (
        widget.spacing_info.value
    )
    # typed and confirmed (Enter / leaving the field)
    widget.spacing.value = "1 x 0.4 x 0.4"
    widget.spacing.native.editingFinished.emit()
    assert tuple(image.scale) == tuple(scribbles.scale) == (1.0, 0.4, 0.4)
    assert widget.spacing.value == "1, 0.4, 0.4"
    assert widget.spacing_info.value == "volume: 1, 0.4, 0.4 (z, y, x; layer scale)"
    assert widget.session.image.spacing == (1.0, 0.4, 0.4)
    assert errors == []
    # a wrong spacing: an error, the layer as it was, the field shows the layer's again
    for bad in ("0.4, 0.4", "1, 0, 0.4", "a, b, c"):
        assert not widget.set_spacing(bad)
        assert tuple(image.scale) == (1.0, 0.4, 0.4) and widget.spacing.value == "1, 0.4, 0.4"
    assert len(errors) == 3 and "Spacing" in errors[0]
    # one number: the same on every axis; the image's results follow the image
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="crop labels")
    assert widget.set_spacing("0.5")
    assert tuple(image.scale) == tuple(labels.scale) == tuple(scribbles.scale) == (0.5,) * 3
    # the layer's scale set elsewhere (console, script) shows in the field
    image.scale = (2.0, 0.4, 0.4)
    assert widget.spacing.value == "2, 0.4, 0.4"
    assert "the model was trained at" in widget.spacing_info.value


def test_refinement_controls_cannot_reach_a_refused_setting(docked, sample, errors):
    from napari_pacseg import segment
    from napari_pacseg.engine.plan import MAX_TAP_STEPS
    from napari_pacseg.io.model_file import load_model

    viewer, widget = docked
    image = viewer.add_image(sample.image[CROP], name="crop", scale=(1.0, 0.4, 0.4))
    widget.image.value = image
    assert widget.load_model_file(DEMO_MODEL_FILE)
    iterations, kernel = widget.iterations, widget.kernel_size
    # at 1 x 0.4 x 0.4 a kernel of 15 is 7 x 15 x 15 voxels: 1574 neighbours per iteration
    kernel.value = 15
    assert iterations.max == MAX_TAP_STEPS // 1574 == 6
    iterations.native.setValue(50)  # typed past the maximum: Qt holds it at the maximum
    assert iterations.value == 6
    kernel.value = 5
    iterations.value = 50  # 3 x 5 x 5 - 1 = 74 neighbours: 50 iterations are allowed
    assert iterations.value == 50 and list(kernel.choices) == [1, 3, 5, 7]
    # every pair the controls allow is one the engine takes
    model = load_model(DEMO_MODEL_FILE)
    segment(sample.image[:4, :16, :16], model, refine=widget.refine_overrides())
    # an isotropic image allows less: the limits follow the spacing
    widget.set_spacing("1, 1, 1")
    assert iterations.value == 50  # 5**3 - 1 = 124 neighbours x 50: within the limit
    assert list(kernel.choices) == [1, 3, 5]  # 7**3 - 1 = 342 neighbours x 50: over it
    assert "neighbour visits" in iterations.tooltip
    assert errors == []


def test_a_full_run_segments_at_the_spacing_set(docked, sample, qtbot, errors):
    from napari_pacseg import segment

    viewer, widget = docked
    image = viewer.add_image(sample.image[CROP], name="crop")
    widget.image.value = image
    assert widget.load_model_file(DEMO_MODEL_FILE)
    assert widget.set_spacing("1, 0.4, 0.4")
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors == [] and widget.status.value.startswith("full image done")
    assert "note" not in widget.status.value
    labels = viewer.layers["crop labels"]
    assert tuple(labels.scale) == (1.0, 0.4, 0.4)
    want = segment(sample.image[CROP], widget.model, spacing=(1.0, 0.4, 0.4)).labels
    np.testing.assert_array_equal(labels.data, want)


def test_a_2d_model_at_another_pixel_size_says_so(docked, qtbot, errors):
    from napari_pacseg import train
    from napari_pacseg.sample import load_sample_2d

    viewer, widget = docked
    s = load_sample_2d()
    model = train(s.image, s.scribbles, spacing=(1.0, 1.0), steps=20, device="cpu")
    image = viewer.add_image(s.image[64:192, 64:192], name="plane", scale=s.spacing)
    widget.image.value = image
    widget.set_model(model, "trained at 1 um")
    note = "the model was trained at 1, 1 (y, x), this image is at 0.4, 0.4"
    assert note in widget.spacing_info.value
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors == []
    assert widget.status.value.startswith("full image done") and f"note: {note}" in (
        widget.status.value
    )
    # within 20 % of the model's spacing: no note
    assert widget.set_spacing("1.1, 0.9")
    assert "trained at" not in widget.spacing_info.value


# --- the reader: TIFFs at their voxel size -------------------------------------------------------


def test_the_reader_opens_the_demo_tiffs_at_their_voxel_size(docked, tmp_path, qtbot):
    from napari_pacseg._napari.reader import get_reader, read_tiff
    from napari_pacseg.cli import main

    assert main(["demo", str(tmp_path)]) == 0
    viewer, widget = docked
    assert get_reader(str(tmp_path / "nuclei.tif")) is read_tiff
    assert get_reader(str(tmp_path / "nuclei_demo.safetensors")) is None
    for name in ("nuclei.tif", "nuclei_scribbles.tif", "nuclei_truth.tif"):
        viewer.open(str(tmp_path / name), plugin="napari-pacseg")
    image, scribbles, truth = (
        viewer.layers[n] for n in ("nuclei", "nuclei scribbles", "nuclei_truth")
    )
    assert isinstance(image, napari.layers.Image) and image.data.shape == (64, 256, 256)
    assert isinstance(scribbles, napari.layers.Labels) and isinstance(truth, napari.layers.Labels)
    for layer in (image, scribbles, truth):
        assert tuple(layer.scale) == (1.0, 0.4, 0.4)
        assert tuple(layer.axis_labels) == ("z", "y", "x")
    widget.image.value = image
    assert widget.scribbles.value is scribbles  # "<image> scribbles": picked for the image
    assert widget.spacing.value == "1, 0.4, 0.4"


def test_the_reader_gives_axes_channels_and_rgb(docked, tmp_path):
    import tifffile

    viewer, widget = docked
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 1000, (5, 32, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "movie.tif", stack, imagej=True, resolution=(2.5, 2.5),
                     metadata={"axes": "TYX", "unit": "um"})  # fmt: skip
    (movie,) = viewer.open(str(tmp_path / "movie.tif"), plugin="napari-pacseg")
    assert tuple(movie.axis_labels) == ("t", "y", "x") and tuple(movie.scale) == (1.0, 0.4, 0.4)
    widget.image.value = movie
    assert widget.axis0.value == "frames"  # a time-lapse, from the file's axes
    assert widget.spacing.value == "0.4, 0.4"
    # ImageJ hyperstacks put the channels after z: the layer has them first
    zcyx = rng.integers(0, 1000, (6, 2, 16, 20), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", zcyx, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZCYX", "spacing": 1.5, "unit": "um"})  # fmt: skip
    (two,) = viewer.open(str(tmp_path / "two.tif"), plugin="napari-pacseg")
    np.testing.assert_array_equal(two.data, np.moveaxis(zcyx, 1, 0))
    assert tuple(two.axis_labels) == ("c", "z", "y", "x")
    assert tuple(two.scale) == (1.0, 1.5, 0.5, 0.5)
    widget.image.value = two
    assert widget.channel_axis.visible and widget.spacing.value == "1.5, 0.5, 0.5"
    # RGB; a TIFF without metadata keeps scale 1
    rgb = rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "photo.tif", rgb, photometric="rgb")
    (photo,) = viewer.open(str(tmp_path / "photo.tif"), plugin="napari-pacseg")
    assert photo.rgb and photo.data.shape == (24, 30, 3) and tuple(photo.scale) == (1.0, 1.0)


# --- progress with units, in sight; saving again under one name ----------------------------------


def test_progress_text_has_units_percent_and_time_left():
    from napari_pacseg._napari.workers import progress_text

    assert progress_text("segmentation", 5, 12, 5.0) == "tiles 5/12 (41%, ~7 s left)"
    assert progress_text("training", 0, 400, 0.0) == "steps 0/400 (0%)"
    assert progress_text("training", 400, 400, 3.0) == "steps 400/400 (100%)"


def test_a_job_runs_in_a_thread_that_ends_with_it(qtbot):
    """Each widget job has a thread of its own that ends with the job (its OpenMP team goes
    with it); the result and the end reach the main thread, in that order."""
    import threading

    from napari_pacseg._napari import workers

    seen, threads = [], []

    def work(x):
        threads.append(threading.current_thread())
        return x * 2

    job = workers._worker(
        work, 21, returned=lambda out: seen.append(("returned", out.result, out.error)),
        finished=lambda: seen.append(("finished", threading.current_thread())),
    )  # fmt: skip
    job.start()
    qtbot.waitUntil(lambda: len(seen) == 2, timeout=5000)
    assert seen == [("returned", 42, None), ("finished", threading.main_thread())]
    assert threads[0] is not threading.main_thread()
    threads[0].join(timeout=5)
    assert not threads[0].is_alive()


def test_the_widget_keeps_numba_serial_in_the_main_thread_only(make_napari_viewer):
    """napari's label colouring (numba) must not give the main thread an OpenMP team."""
    import threading

    numba = pytest.importorskip("numba")
    from napari_pacseg._napari.widget import PacSegWidget

    PacSegWidget(make_napari_viewer())
    assert numba.get_num_threads() == 1
    other = []
    thread = threading.Thread(target=lambda: other.append(numba.get_num_threads()))
    thread.start()
    thread.join()
    assert other == [numba.config.NUMBA_NUM_THREADS]


def test_progress_reaches_the_main_thread_a_few_times_a_second(monkeypatch):
    """A full run reports every tile and refinement slab; the main thread repaints for the
    first report, the last, and at most one per PROGRESS_S between them."""
    from napari_pacseg._napari import workers

    clock = [100.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    sent = []
    relay = workers._Throttled(lambda *args: sent.append(args), 7)
    for done in range(1, 101):  # 100 reports over 1 s
        relay(done, 100)
        clock[0] += 0.01
    assert sent[0] == (7, 1, 100) and sent[-1] == (7, 100, 100)
    assert 4 <= len(sent) <= 2 + 1.0 / workers.PROGRESS_S
    assert [d for _, d, _ in sent] == sorted(d for _, d, _ in sent)


def test_the_progress_bar_is_drawn_with_the_next_paint_not_at_once(docked, qtbot):
    """``QProgressBar.setValue`` repaints at once; the widget's bar waits for the window's next
    paint, so a progress report costs no immediate redraw of the window (``_set_bar``)."""
    from qtpy.QtCore import QEvent, QObject

    _, widget = docked
    bar = widget.progress.native
    widget._set_running(True)
    qtbot.waitUntil(lambda: bar.isVisible(), timeout=WAIT_MS)
    qtbot.wait(100)  # its first paint is done

    class Paints(QObject):
        count = 0

        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Paint:
                Paints.count += 1
            return False

    paints = Paints()
    bar.installEventFilter(paints)
    try:
        for done in range(1, 6):
            widget._task_progress(done, 12, f"tiles {done}/12")
        assert Paints.count == 0  # nothing drawn during the calls
        assert (bar.value(), bar.maximum(), bar.format()) == (5, 12, "tiles 5/12")
        assert bar.updatesEnabled()
        qtbot.waitUntil(lambda: Paints.count >= 1, timeout=WAIT_MS)  # drawn afterwards
    finally:
        bar.removeEventFilter(paints)
        widget._set_running(False)
    assert bar.isVisible() and not bar.isEnabled()
    assert (bar.value(), bar.format()) == (0, IDLE_BAR)


def test_a_task_starting_and_ending_asks_for_no_new_layout(docked, qtbot):
    """The bar is always there, greyed between tasks: a task's start and end move nothing (the
    run buttons, the status line and the scrolled controls keep their places and sizes) and
    post no layout request to the dock or the main window (showing or hiding a widget would:
    napari's main window then animates every dock while the run needs the cores)."""
    _, widget = docked
    bar = widget.progress.native
    watched = (widget.run_button.native, widget.cancel_button.native, widget.status.native,
               widget.controls.root_native_widget)  # fmt: skip
    window = widget.native.window()
    dock = widget.native.parentWidget()
    while dock is not None and dock.parentWidget() is not window:
        dock = dock.parentWidget()

    def places():
        return [(w.mapTo(widget.native, w.rect().topLeft()).y(), w.height()) for w in watched]

    qtbot.waitUntil(lambda: widget.status.native.isVisible(), timeout=WAIT_MS)
    qtbot.wait(100)  # laid out
    before = places()
    assert bar.isVisible() and not bar.isEnabled() and bar.format() == IDLE_BAR
    with _layout_requests(window, dock) as seen:
        widget._set_running(True)
        qtbot.wait(100)  # any new layout done
        assert bar.isVisible() and bar.isEnabled() and places() == before
        widget._set_running(False)
        qtbot.wait(100)
    assert places() == before and bar.isVisible() and not bar.isEnabled()
    assert seen == []


def test_the_status_line_asks_for_no_new_layout_once_grown(docked, qtbot):
    """A wrapped label's new text asks the window for a new layout (napari's main window then
    animates every dock); the status line sits in a box of its own that only grows, up to
    ``STATUS_LINES`` lines, so once grown a new status re-lays out nothing outside it. The
    whole text is its tooltip."""
    _, widget = docked
    window = widget.native.window()
    box, label = widget._status_box, widget.status.native
    long = "approximate preview: " + "the refinement's reach cut to stay in budget; " * 12
    qtbot.waitUntil(lambda: label.isVisible(), timeout=WAIT_MS)
    widget._say(long)
    qtbot.wait(100)  # grown and laid out
    lines = label.fontMetrics().lineSpacing()
    assert lines < box.height() <= STATUS_LINES * lines + 2 * box.frameWidth()
    assert box.verticalScrollBar().maximum() > 0  # the rest scrolls
    height = box.height()
    with _layout_requests(window) as seen:
        for text in ("segmentation running…", "full image done in 3.1 s", long[:90], "ready"):
            widget._say(text)
            qtbot.wait(50)
            assert label.text() == widget.status.value == label.toolTip() == text
    assert seen == [] and box.height() == height


def test_a_full_run_and_training_show_progress_in_the_widget(docked, sample, qtbot, errors):
    viewer, widget = docked
    crop = (slice(24, 40), slice(160, 256), slice(0, 96))  # scribbles of both classes
    image = viewer.add_image(sample.image[crop], name="crop", scale=sample.spacing)
    viewer.add_labels(sample.scribbles[crop], name="crop scribbles")
    widget.image.value = image
    seen, lines = [], []
    say, show = widget.tasks.status, widget.tasks.progressed

    def progressed(done, total, text):  # the bar's text, and whether the bar is active
        show(done, total, text)
        seen.append((widget.progress.native.text(), widget.progress.enabled))

    def status(text):
        lines.append(text)
        say(text)

    widget.tasks.progressed, widget.tasks.status = progressed, status
    assert not widget.progress.enabled
    widget.train_steps.value = 30
    widget.start_training()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors == [] and widget.model is not None
    steps = [(t, shown) for t, shown in seen if t.startswith("steps ")]
    assert steps and all(shown for _, shown in steps), seen
    assert any("/30 (" in t and "%" in t for t, _ in steps)
    seen.clear()
    lines.clear()
    widget.run_full()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors == [] and widget.status.value.startswith("full image done")
    tiles = [(t, shown) for t, shown in seen if t.startswith("tiles ")]
    assert tiles and all(shown for _, shown in tiles), seen
    # the task's status line says it started (the widget's own, that it is done); the progress
    # goes to the bar alone (a new status line re-lays out the window: workers.TaskRunner)
    assert lines == ["segmentation running…"], lines
    assert not widget.progress.enabled  # greyed between tasks
    assert widget.progress.native.format() == IDLE_BAR


def test_saving_a_model_again_under_its_name_asks_to_replace(docked, tmp_path, errors, monkeypatch):
    from napari_pacseg.io.model_file import load_model

    _, widget = docked
    assert widget.load_model_file(DEMO_MODEL_FILE)
    first = widget.save_model_file(tmp_path / "mine")  # the dialog gives no suffix
    assert first == tmp_path / "mine.safetensors"
    asked = []

    def answer(reply):
        def confirm(parent, path):
            asked.append(path)
            return reply

        return confirm

    first.write_bytes(b"an older model")
    monkeypatch.setattr("napari_pacseg._napari.widget.confirm_replace", answer(False))
    assert widget.save_model_file(tmp_path / "mine") is None
    assert asked == [first] and first.read_bytes() == b"an older model"
    assert widget.status.value == "not saved: mine.safetensors exists"
    monkeypatch.setattr("napari_pacseg._napari.widget.confirm_replace", answer(True))
    assert widget.save_model_file(tmp_path / "mine") == first
    assert asked == [first, first] and errors == []
    assert load_model(first).config == widget.model.config


TRAIN_CROP = (slice(28, 36), slice(160, 256), slice(0, 96))  # scribbles of both classes at z 32


def test_a_session_is_saved_after_training_and_restored(docked, sample, qtbot, errors,
                                                         user_data_home, tmp_path):  # fmt: skip
    from napari_pacseg._napari.autosave import RECORD, read_session, user_sessions_dir
    from napari_pacseg.io.model_file import model_bytes

    viewer, widget = docked
    image = viewer.add_image(sample.image[TRAIN_CROP], name="crop", scale=sample.spacing)
    painted = viewer.add_labels(sample.scribbles[TRAIN_CROP], name="crop scribbles",
                                scale=sample.spacing)  # fmt: skip
    widget.image.value, widget.scribbles.value = image, painted
    widget.class_names.value = "background, nucleus"
    widget.train_steps.value = 20
    widget.start_training()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.model is not None, widget.status.value
    # saved in the user data folder (the image is not read from a file): a complete session
    folder = user_sessions_dir() / "crop"
    assert str(folder).startswith(str(user_data_home)) and (folder / RECORD).is_file()
    assert widget.session_folder == folder
    trained = model_bytes(widget.model)

    # settings changed after it, the scribbles layer gone: a restart, as far as they go
    widget.threshold.value = 0.7
    widget.iterations.value = 2
    viewer.layers.remove(painted)
    assert widget.restore_session(folder)
    restored = viewer.layers["crop scribbles"]
    np.testing.assert_array_equal(restored.data, sample.scribbles[TRAIN_CROP])
    assert tuple(restored.scale) == tuple(sample.spacing)
    assert model_bytes(widget.model) == trained
    assert widget.threshold.value == 0.5 and widget.iterations.value == 5
    assert widget.class_names.value == "background, nucleus" and widget.train_steps.value == 20
    assert widget.status.value.startswith("restored the session of")
    assert errors == []

    # a second training replaces pacseg's own session files, nothing else in the folder
    mine = folder / "notes.txt"
    mine.write_text("the user's")
    widget.start_training()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert mine.read_text() == "the user's" and read_session(folder).settings["train_steps"] == 20

    # a folder that is not a session: an error, nothing changed; a user's folder of the
    # session's name is never written into
    model = widget.model
    assert not widget.restore_session(tmp_path)
    assert "holds no pacseg session" in errors[-1] and widget.model is model
    theirs = user_sessions_dir() / "other"
    theirs.mkdir()
    (theirs / "session.json").write_text("{}")
    from napari_pacseg._napari.autosave import session_folder

    assert session_folder("other") == user_sessions_dir() / "other-2"
    assert (theirs / "session.json").read_text() == "{}"


def test_a_file_backed_image_keeps_its_session_beside_it(tmp_path):
    from napari_pacseg._napari.autosave import session_folder, user_sessions_dir

    source = tmp_path / "embryo.tif"
    source.write_bytes(b"")
    assert session_folder("embryo", source) == tmp_path / "embryo.pacseg-session"
    # a user's own folder of that name is left alone: the user data folder instead
    (tmp_path / "embryo.pacseg-session").mkdir()
    assert session_folder("embryo", source) == user_sessions_dir() / "embryo"
    zarr_folder = tmp_path / "big.zarr"
    zarr_folder.mkdir()
    assert session_folder("big", zarr_folder) == tmp_path / "big.zarr.pacseg-session"
