"""``napari-pacseg-demo``: napari with the bundled sample, the PAC Segmentation widget docked,
the demo model loaded and the whole volume segmented.

``napari-pacseg-demo --headless [OUT_DIR]`` does the same without showing a window (under
Xvfb, started for it when there is no display and PyVirtualDisplay is installed) and writes
``OUT_DIR/labels.npy`` (uint8), ``OUT_DIR/matte.npy`` (float32), ``OUT_DIR/screenshot.png``
(OUT_DIR: ``pacseg-demo-output`` in the current folder unless given), prints the Dice score
against the sample's ground truth and the folder it wrote to.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

PLUGIN, WIDGET, SAMPLE = "napari-pacseg", "PAC Segmentation", "nuclei"
HEADLESS_OUT = Path("pacseg-demo-output")  # --headless without a folder: a name that says whose
OUTPUTS = ("labels.npy", "matte.npy", "screenshot.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-pacseg-demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--headless",
        metavar="OUT_DIR",
        type=Path,
        nargs="?",
        const=HEADLESS_OUT,
        help="write labels.npy, matte.npy and screenshot.png to OUT_DIR (default: "
        f"{HEADLESS_OUT}/ in the current folder) instead of opening a window",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="headless: replace those files in OUT_DIR"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="headless: seconds to wait for the result"
    )
    return parser


def open_demo(viewer, *, live: bool = True):
    """Open the sample in ``viewer``, dock the widget, load the demo model and start the
    full-volume run. Returns the widget."""
    from napari_pacseg.sample import DEMO_MODEL_FILE

    viewer.open_sample(PLUGIN, SAMPLE)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.live.value = live
    widget.image.value = viewer.layers[SAMPLE]
    widget.scribbles.value = viewer.layers[f"{SAMPLE} scribbles"]
    if not widget.load_model_file(DEMO_MODEL_FILE):
        raise RuntimeError(f"the demo model could not be loaded: {widget.status.value}")
    image = viewer.layers[SAMPLE]
    viewer.dims.set_current_step(0, image.data.shape[0] // 2)
    widget.run_full()
    return widget


def wait_for(widget, timeout: float) -> None:
    """Turn the Qt event loop until the widget's run has finished (or ``timeout`` seconds)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while widget.running or widget.live_runner.busy:
        if time.monotonic() > end:
            widget.cancel()
            raise TimeoutError(f"no result after {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()


def _ensure_display():
    """Start a virtual X display when there is none (returns it, to stop later)."""
    if sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        raise SystemExit(
            "napari-pacseg-demo --headless needs a display for its screenshot: run it under "
            "`xvfb-run`, or `pip install PyVirtualDisplay` and install Xvfb"
        ) from None
    display = Display(visible=False, size=(1600, 1000))
    display.start()
    return display


def run_headless(out_dir: Path, timeout: float) -> dict:
    """The demo without a window: results and a screenshot in ``out_dir``; returns a summary."""
    import napari

    from napari_pacseg.sample import load_sample

    out_dir.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=False)
    try:
        widget = open_demo(viewer, live=False)
        wait_for(widget, timeout)
        name = f"{SAMPLE} labels"
        labels_layer = viewer.layers[name] if name in viewer.layers else None
        if labels_layer is None or not labels_layer.metadata.get("pacseg", {}).get("complete"):
            raise RuntimeError(f"the demo run did not finish: {widget.status.value}")
        labels = np.asarray(labels_layer.data)
        matte = np.asarray(viewer.layers[f"{SAMPLE} matte"].data)
        np.save(out_dir / "labels.npy", labels)
        np.save(out_dir / "matte.npy", matte)
        viewer.window.resize(1366, 768)  # a laptop screen: the widget fits it
        viewer.screenshot(path=str(out_dir / "screenshot.png"), canvas_only=False)
        truth = load_sample().truth
        fg = labels > 0
        dice = 2 * np.count_nonzero(fg & truth) / max(1, fg.sum() + truth.sum())
        return {"status": widget.status.value, "dice": float(dice), "out_dir": str(out_dir)}
    finally:
        viewer.close()


def _preload_triton() -> None:
    """Import triton (when CUDA and triton are there) before Qt loads OpenGL: importing triton's
    LLVM after Mesa's software OpenGL has loaded its own crashes the process."""
    import torch

    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.headless is not None and not args.overwrite:
        there = [n for n in OUTPUTS if (args.headless / n).exists()]
        if there:
            parser.error(f"{args.headless} already holds {', '.join(there)}; pass --overwrite "
                         "or give another folder")  # fmt: skip
    _preload_triton()
    if args.headless is not None:
        display = _ensure_display()
        try:
            summary = run_headless(args.headless, args.timeout)
        finally:
            if display is not None:
                display.stop()
        print(f"{summary['status']}; Dice vs ground truth {summary['dice']:.3f}")
        print(f"wrote {', '.join(OUTPUTS)} to {Path(summary['out_dir']).resolve()}")
        return 0
    import napari

    viewer = napari.Viewer(title="napari-pacseg demo")
    open_demo(viewer, live=True)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
