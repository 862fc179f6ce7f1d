"""The ``pacseg`` command: ``segment`` files and zarr volumes, ``train`` a model, ``info`` on one.

Exit codes: 0 all done; 1 an input failed (one line per failed input on stderr, the other inputs
still processed); 2 the command cannot run as given (bad options, unreadable model for
``segment``, output names that clash or would overwrite an input); 130 interrupted (Ctrl-C:
finished outputs are kept, partial ones removed, so the same command resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

USAGE_ERROR, FAILED, INTERRUPTED = 2, 1, 130
COMMANDS = {  # the commands and their one-line help
    "segment": "segment volumes with a model",
    "train": "train a model from scribbles",
    "demo": "write the bundled sample and the demo model, to try",
    "info": "show a model's configuration",
}


# napari_pacseg.checks imports torch (seconds): these load it on first use, so that `pacseg`
# and `pacseg --help` answer at once
def one_line(err) -> str:
    from napari_pacseg.checks import one_line as impl

    return impl(err)


def printable(text: str) -> str:
    from napari_pacseg.checks import printable as impl

    return impl(text)


def short_repr(value) -> str:
    from napari_pacseg.checks import short_repr as impl

    return impl(value)


class UsageError(Exception):
    """The command cannot run as given (exit 2)."""


# --- progress -------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line text progress bar on ``stream`` (stderr). On a terminal it redraws in place;
    in a log (not a terminal) it prints a line at each quarter; ``quiet`` shows no progress.
    Past the first second it shows the rate (units per second since ``done == 0``) and the
    time left at that rate; large counts in k and M (voxels of zarr runs)."""

    def __init__(self, stream=None, quiet: bool = False, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.quiet, self.width = quiet, width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = 0
        self.last_draw = 0.0
        self.last_quarter = -1
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started, self.last_quarter = time.perf_counter(), -1

    def update(self, label: str, done: int, total: int, unit: str) -> None:
        if self.quiet:
            return
        if done == 0:
            self.start()
        now = time.perf_counter()
        frac = done / total if total else 0.0
        filled = round(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = now - self.started
        of = self.count(total) if total else "?"
        text = f"{label} |{bar}| {self.count(done)}/{of} {unit} {elapsed:.0f} s"
        if 0 < done < total and elapsed >= 1:
            rate = done / elapsed
            text += f", {self.count(rate)} {unit}/s, {self.duration((total - done) / rate)} left"
        if self.tty:
            if done not in (0, total) and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            self.stream.write("\r" + text.ljust(self.shown))
            self.shown = len(text)
            self.stream.flush()
        elif total and int(4 * frac) > self.last_quarter:
            self.last_quarter = int(4 * frac)
            print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0

    def print(self, text: str, err: bool = False) -> None:
        """A line of its own (the bar is cleared first)."""
        self.clear()
        print(printable(text), file=sys.stderr if err else sys.stdout, flush=True)

    @staticmethod
    def count(n: float) -> str:
        """A count for the bar: as is below 10 000, else in k or M (3 digits)."""
        if n < 10_000:
            return f"{n:.0f}" if n >= 10 or float(n).is_integer() else f"{n:.2g}"
        return f"{n / 1e3:.3g}k" if n < 1e6 else f"{n / 1e6:.3g}M"

    @staticmethod
    def duration(seconds: float) -> str:
        """``seconds`` as "42 s", "3 min 5 s" or "2 h 10 min"."""
        s = round(seconds)
        if s < 60:
            return f"{s} s"
        if s < 3600:
            return f"{s // 60} min {s % 60} s"
        return f"{s // 3600} h {s % 3600 // 60} min"


# --- argument parsing -----------------------------------------------------------------------------


def _ranged(integer: bool, low, high, *, what: str = "", odd=False, optional=False, name=None):
    """An argparse type: an int or float in ``[low, high]`` (``low`` excluded when ``what`` says
    "positive"), odd if asked, or "none" for None if ``optional``; its messages say
    "expected <what>, got <text>"."""
    what = what or f"{'an odd integer' if odd else 'a value'} in [{low:g}, {high:g}]"
    positive = "positive" in what

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {short_repr(text)}") from None
        ok = (low < value if positive else low <= value) and value <= high
        if not ok or not math.isfinite(value) or (odd and value % 2 == 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {short_repr(text)}")
        return value

    parse.__name__ = name or ("int" if integer else "float")  # argparse names it in messages
    return parse


_positive_int = _ranged(True, 0, 1 << 31, what="a positive integer")
_positive_float = _ranged(False, 0.0, 1e12, what="a positive number")
_fraction = _ranged(False, 0.0, 1.0, what="a number in [0, 1]")
_seed = _ranged(True, 0, 2**63 - 1, what="an integer in [0, 2**63 - 1]")


def _in_range(name: str, spec):
    """argparse type of the refinement option ``name``: a value allowed by its ``Param``."""
    return _ranged(spec.integer, spec.low, spec.high, odd=spec.odd, optional=spec.optional,
                   name=name)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (with where to find the usage)."""

    def error(self, message: str):
        self.exit(
            USAGE_ERROR, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n"
        )


def build_parser(commands_only: bool = False) -> argparse.ArgumentParser:
    """The ``pacseg`` parser; ``commands_only``: the commands without their options (enough
    when no command is named: ``pacseg --help``, ``--version``), which need no torch import."""
    parser = _Parser(
        prog="pacseg",
        description="napari-pacseg without napari: segment folders of volumes and zarr volumes "
        "larger than memory (optionally on a dask cluster), train a model, inspect one.",
    )
    from napari_pacseg._version import __version__

    parser.add_argument("--version", action="version", version=f"napari-pacseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if commands_only:
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
        return parser
    from napari_pacseg.model.classes import DEFAULT_THRESHOLD
    from napari_pacseg.training.defaults import DEFAULT_STEPS, DEFAULT_STEPS_2D

    seg = sub.add_parser(
        "segment",
        help=COMMANDS["segment"],
        description="Segment TIFF, NPY, zarr and OME-Zarr volumes, or with a 2D model 2D images "
        "(PNG, JPEG, 2D TIFF, NPY; --frames for stacks of frames). Per input, OUTDIR gets "
        "<stem>_labels.<ext> (uint8 classes, 0 = background), <stem>_matte.<ext> (float32 "
        "foreground probability) and, last, <stem>_pacseg.json (model, parameters, versions, "
        "timings); ext follows the input (.tif, .npy, .zarr; .tif for PNG and JPEG). Inputs "
        "whose JSON record exists "
        "are skipped unless --overwrite, so rerunning resumes an interrupted run.",
    )
    seg.add_argument("model", type=Path, help="model file (.safetensors)")
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="files, zarr folders, folders of volumes or images, or glob patterns")  # fmt: skip
    seg.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                     help="output folder (created)")  # fmt: skip
    ref = seg.add_argument_group("refinement (defaults: the model's; see pacseg info MODEL)")
    ref.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                     help="PAC-CRF refinement (default: on)")  # fmt: skip
    from napari_pacseg.model.network import refine_params_schema

    for name, spec in refine_params_schema().items():
        ref.add_argument(
            "--" + name.replace("_", "-"),
            type=_in_range(name, spec),
            default=argparse.SUPPRESS,
            metavar="N" if spec.integer else "X",
            help=f"{spec.help} ({spec.low:g}-{spec.high:g}"
            + (f", or none: {spec.off})" if spec.optional else ")"),
        )
    obj = seg.add_argument_group("objects (defaults: the model's; see pacseg info MODEL)")
    obj.add_argument("--instances", action="store_true",
                     help="also separate the objects: <stem>_instances.<ext> (one id per "
                     "object) and <stem>_objects.csv (volume, centroid, bounding box, "
                     "intensities, sphericity per object); any input: volumes, zarr, 2D images, frames")  # fmt: skip
    from napari_pacseg.model.network import instance_params_schema

    for name, spec in instance_params_schema().items():
        obj.add_argument(
            "--" + name.replace("_", "-"),
            type=_in_range(name, spec),
            default=argparse.SUPPRESS,
            metavar="X",
            help=f"with --instances: {spec.help} ({spec.low:g}-{spec.high:g}"
            + (f", or none: {spec.off})" if spec.optional else ")"),
        )
    obj.add_argument(
        "--boundary-class", dest="boundary", type=_boundary_class, default=argparse.SUPPRESS,
        metavar="NAME",
        help="with --instances: objects are the cells this class (a membrane, a cell wall) "
        "encloses, tiling the tissue; --radius is the cells' radius; 'none' for blobs",
    )  # fmt: skip
    out = seg.add_argument_group("labels")
    out.add_argument("--threshold", type=_fraction, default=DEFAULT_THRESHOLD, metavar="X",
                     help="foreground where the matte (1 - P(background)) is >= X, then the most "
                     f"probable other class (0-1, default {DEFAULT_THRESHOLD:g})")  # fmt: skip
    run = seg.add_argument_group("how to run")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    run.add_argument("--precision", choices=("auto", "float32"), default="auto",
                     help="auto (default): the head's products in bfloat16 on CPUs with AMX "
                     "matrix units; float32: float32 everywhere")  # fmt: skip
    run.add_argument("--tile", type=_positive_int, nargs="+", metavar="N",
                     help="tile size of segment(): Z Y X (a 2D model: Y X; default: its own)")  # fmt: skip
    run.add_argument("--spacing", type=_positive_float, nargs="+", metavar="S",
                     help="voxel size Z Y X in the model's units (a 2D model: Y X; default: "
                     "the file's metadata, else the model's training spacing)")  # fmt: skip
    run.add_argument("--frames", action="store_true",
                     help="2D models: each input is a stack of 2D frames (a time-lapse: TIFF "
                     "T or Z axis, or NPY axis 0), segmented frame by frame (without it: TIFFs "
                     "whose axes say T)")  # fmt: skip
    run.add_argument("--channel-axis", type=int, metavar="AXIS",
                     help="axis of the channels in the files (default: from metadata)")  # fmt: skip
    run.add_argument("--chunks", type=_positive_int, nargs=3, metavar=("Z", "Y", "X"),
                     help="zarr inputs: storage chunk of the outputs (default 64 256 256)")  # fmt: skip
    run.add_argument("--memory", metavar="SIZE",
                     help="zarr inputs: memory per task, e.g. 4G or 512M (default: half the "
                     "available memory, shared by the tasks at once)")  # fmt: skip
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="zarr inputs: run on this dask.distributed scheduler (tcp://host:8786)")  # fmt: skip
    where.add_argument("--workers", type=_positive_int, metavar="N",
                       help="zarr inputs: start a local cluster of N worker processes")  # fmt: skip
    run.add_argument("--overwrite", action="store_true",
                     help="redo inputs already done, and replace files at output paths that "
                     "pacseg did not write (never an input)")  # fmt: skip
    run.add_argument("-q", "--quiet", action="store_true", help="one line per input, no bars")
    seg.set_defaults(handler=_cmd_segment)

    tr = sub.add_parser("train", help=COMMANDS["train"],
                        description="Train a model from images and their scribbles (0 "
                        "unlabelled, 1 background, 2.. the classes) and save it: pacseg train "
                        "IMG1 SCR1 [IMG2 SCR2 ...] -o MODEL trains one model from all the "
                        "pairs, each image normalised by its own intensity range.")  # fmt: skip
    tr.add_argument("pairs", type=Path, nargs="+", metavar="IMAGE SCRIBBLES",
                    help="image (TIFF, NPY, zarr volume; or a 2D image: PNG, JPEG, 2D TIFF or "
                    "NPY, which trains a 2D model), then its scribbles (an integer label image "
                    "of the image's shape); repeat for more images")  # fmt: skip
    tr.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL",
                    help="model file to write (.safetensors)")  # fmt: skip
    tr.add_argument("--sigmas", type=_positive_float, nargs="+",
                    help="feature scales in physical units (default 1 2 4)")  # fmt: skip
    tr.add_argument("--kinds", nargs="+", metavar="KIND",
                    help="feature kinds (default for volumes: all of gaussian "
                    "gradient_magnitude laplacian hessian_eigenvalues; for 2D images: gaussian)")  # fmt: skip
    tr.add_argument("--hidden", type=_positive_int, nargs="+", help="MLP widths (default 64 64)")
    tr.add_argument(
        "--steps",
        type=_positive_int,
        help=f"optimisation steps (default {DEFAULT_STEPS}; {DEFAULT_STEPS_2D} for 2D images)",
    )
    tr.add_argument("--context", action="store_true",
                    help="also train a context encoder/decoder (learns each voxel's "
                    "surroundings; slower: about 20 s more on the sample on a 2-core CPU)")  # fmt: skip
    tr.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    tr.add_argument("--class-names", nargs="+", metavar="NAME",
                    help="one name per class, background first")  # fmt: skip
    tr.add_argument("--spacing", type=_positive_float, nargs="+", metavar="S",
                    help="voxel size Z Y X (2D images: Y X; default: the image's metadata, "
                    "else 1)")  # fmt: skip
    tr.add_argument("--frames", action="store_true",
                    help="each image is a stack of 2D frames (a time-lapse) with scribbles on "
                    "some of them: trains a 2D model on the painted frames (without it: TIFFs "
                    "whose axes say T)")  # fmt: skip
    tr.add_argument("--channel-axis", type=int, metavar="AXIS", help="channel axis of the image")
    tr.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(handler=_cmd_train)

    demo = sub.add_parser("demo", help=COMMANDS["demo"],
                          description="Write the bundled sample (nuclei.tif, its scribbles and "
                          "ground truth as TIFFs with the voxel size) and the demo model "
                          "(nuclei_demo.safetensors) into OUTDIR, then print the commands "
                          "that segment and retrain it.")  # fmt: skip
    demo.add_argument("outdir", type=Path, metavar="OUTDIR", help="folder (created)")
    demo.add_argument("--overwrite", action="store_true", help="replace files already there")
    demo.set_defaults(handler=_cmd_demo)

    info = sub.add_parser("info", help=COMMANDS["info"],
                          description="Classes, features, head, refinement defaults, spacing, "
                          "receptive field and provenance of a model file.")  # fmt: skip
    info.add_argument("model", type=Path, help="model file (.safetensors)")
    info.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv=None) -> int:
    """Run ``pacseg`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # names a terminal cannot show are escaped, not fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(commands_only=not any(a in COMMANDS for a in argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2), --help and --version (0)
        return int(exit_.code or 0)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.handler(args)
    except UsageError as err:
        print(f"pacseg {args.command}: error: {printable(str(err))}", file=sys.stderr)
        return USAGE_ERROR
    except (ValueError, TypeError, OSError) as err:  # a user error no handler anticipated
        print(f"pacseg {args.command}: error: {printable(one_line(err))}", file=sys.stderr)
        return FAILED
    except MemoryError:
        print(
            f"pacseg {args.command}: error: out of memory; use smaller --tile or --chunks, or "
            "convert the volume to zarr",
            file=sys.stderr,
        )
        return FAILED
    except KeyboardInterrupt:
        print(
            f"\npacseg {args.command}: interrupted; finished outputs are kept and the partial one "
            "removed: run the same command again to resume",
            file=sys.stderr,
        )
        return INTERRUPTED


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (an old model file without a checksum, ...) as one line, not Python's format."""
    print(f"pacseg: warning: {printable(one_line(message))}", file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------


def _check_device(device: str) -> None:
    from napari_pacseg.checks import resolve_device

    try:
        resolve_device(device)
    except ValueError as err:
        raise UsageError(f"--device: {err}") from None


def _refine_option(args):
    from napari_pacseg.model.network import refine_params_schema

    given = {n: getattr(args, n) for n in refine_params_schema() if hasattr(args, n)}  # given only
    if not args.refine:
        if given:
            opts = ", ".join("--" + n.replace("_", "-") for n in given)
            raise UsageError(f"{opts} given with --no-refine; drop them or drop --no-refine")
        return False
    return given or True


def _boundary_class(text: str) -> str | None:
    """``--boundary-class``: a class name, or ``none`` for blobs (the model file's may name one)."""
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError("give a class name of the model (or 'none' for blobs)")
    return None if name.lower() == "none" else name


def _instances_option(args):
    from napari_pacseg.model.network import instance_params_schema

    names = [*instance_params_schema(), "boundary"]
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if given and not args.instances:
        flags = {"boundary": "--boundary-class"}
        opts = ", ".join(flags.get(n, "--" + n.replace("_", "-")) for n in given)
        raise UsageError(f"{opts} given without --instances; add --instances or drop them")
    return (given or True) if args.instances else False


def _cmd_segment(args) -> int:
    from napari_pacseg.batch import iter_segment_files
    from napari_pacseg.io.volumes import volume_kind

    _check_device(args.device)
    refine = _refine_option(args)
    instances = _instances_option(args)
    for opt, values in (("--spacing", args.spacing), ("--tile", args.tile)):
        if values is not None and len(values) not in (2, 3):
            raise UsageError(f"{opt} takes 3 numbers (Z Y X), or 2 (Y X) for a 2D model")
    bar = ProgressBar(quiet=args.quiet)

    def show(done: int, total: int) -> None:
        index, path = results.current
        unit = "voxels" if volume_kind(path) == "zarr" else "tiles"
        bar.update(f"[{index + 1}/{results.count}] {path.name}", done, total, unit)

    try:
        results = iter_segment_files(
            args.inputs, args.model, args.output, spacing=args.spacing,
            channel_axis=args.channel_axis, refine=refine, device=args.device,
            tile_shape=args.tile, chunks=args.chunks, memory=args.memory,
            scheduler=args.scheduler, workers=args.workers, overwrite=args.overwrite,
            threshold=args.threshold, instances=instances, frames=args.frames, progress=show,
            precision=args.precision,
        )  # fmt: skip
    except ValueError as err:  # raised before any input is touched (clashing outputs, ...)
        raise UsageError(str(err)) from None
    counts = {"done": 0, "skipped": 0, "failed": 0}
    start, zarr_inputs = time.perf_counter(), 0
    try:
        for res in results:
            counts[res.status] += 1
            zarr_inputs += volume_kind(res.input) == "zarr"
            if res.status == "failed":
                bar.print(f"pacseg: failed: {res.input}: {res.message}", err=True)
            elif res.status == "skipped":
                bar.print(f"skipped {res.input}: {res.message}")
            else:
                outs = ", ".join(str(p) for p in res.outputs)
                assumed = _assumed_spacing(res.record)
                axes = "(y, x)" if assumed.count(",") == 1 else "(z, y, x)"
                note = (
                    f"; no voxel size in its metadata: assumed the model's spacing {axes} "
                    f"{assumed}, pass --spacing {axes[1:-1].replace(',', '').upper()} if wrong"
                    if assumed else ""
                )  # fmt: skip
                bar.print(f"done {res.input} -> {outs} ({res.seconds:.1f} s){note}")
    except ValueError as err:  # a run-wide option found wrong at its first use (--scheduler)
        raise UsageError(str(err)) from None
    finally:
        bar.clear()
    if (args.workers or args.scheduler) and not zarr_inputs and not args.quiet:
        print(
            "pacseg segment: note: --workers/--scheduler apply to zarr inputs only; "
            "TIFF and NPY inputs ran in this process",
            file=sys.stderr,
        )
    if not args.quiet:
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        print(f"pacseg segment: {sum(counts.values())} input(s): {summary} ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr)  # fmt: skip
    return FAILED if counts["failed"] else 0


def _cmd_train(args) -> int:
    from napari_pacseg.engine.frames import painted_frames
    from napari_pacseg.io.images import is_2d_file, is_time_lapse, picture_kind, read_picture
    from napari_pacseg.io.model_file import save_model
    from napari_pacseg.io.spacing import resolve_spacing
    from napari_pacseg.io.volumes import (
        VolumeError,
        check_not_input,
        check_output_folder,
        read_volume,
    )
    from napari_pacseg.model.classes import check_distinct_names
    from napari_pacseg.model.features import FeatureSpec
    from napari_pacseg.training.defaults import default_features
    from napari_pacseg.training.fit import train

    _check_device(args.device)
    if args.output.suffix != ".safetensors":
        raise UsageError(f"-o {args.output}: the model file name must end in .safetensors")
    if args.output.is_dir():
        raise UsageError(
            f"-o {args.output} is a folder; give the model file's name (a folder is never "
            "replaced by a file)"
        )
    if args.output.exists() and not args.overwrite:
        raise UsageError(f"{args.output} exists; pass --overwrite to replace it")
    try:  # before training, not after it
        check_output_folder(args.output.parent, "folder of -o")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if len(args.pairs) % 2:
        raise UsageError(
            f"pacseg train takes IMAGE SCRIBBLES pairs; {len(args.pairs)} paths were given "
            f"(the last, {args.pairs[-1]}, has no partner)"
        )
    try:
        check_not_input(args.output, args.pairs)
        if args.class_names:
            check_distinct_names(args.class_names, "--class-names")
        overrides = {
            **({"sigmas": tuple(args.sigmas)} if args.sigmas else {}),
            **({"kinds": tuple(args.kinds)} if args.kinds else {}),
        }
        dataclasses.replace(FeatureSpec(), **overrides)  # checked before any file is read
    except ValueError as err:
        raise UsageError(str(err)) from None
    bar = ProgressBar(quiet=args.quiet)
    if args.spacing is not None and len(args.spacing) not in (2, 3):
        raise UsageError("--spacing takes 3 numbers (Z Y X), or 2 (Y X) for 2D images")
    try:
        images, marks, spacings, kinds = [], [], [], []
        for path, scribbles in zip(args.pairs[::2], args.pairs[1::2]):
            # a TIFF whose axes say T (and no Z) is a stack of frames without --frames
            frames = args.frames or is_time_lapse(path, args.channel_axis)
            flat = frames or is_2d_file(path, args.channel_axis)
            kinds.append(flat)
            if flat:
                if picture_kind(scribbles) == "jpeg":
                    raise VolumeError(
                        f"{scribbles}: JPEG scribbles are refused: its lossy compression changes "
                        "label values at the strokes' edges; save them as PNG or TIFF"
                    )
                image = read_picture(path, args.channel_axis, frames)
                mark = read_picture(scribbles, None, frames).picture()
                if mark.shape[-3] != 1:
                    raise VolumeError(
                        f"{scribbles}: {SCRIBBLES_ONE_CHANNEL}, got {mark.shape[-3]} channels"
                    )
                mark = mark[:, 0] if frames else mark[0]
            else:
                image = read_volume(path, args.channel_axis)
                mark = _read_scribble_volume(scribbles)
            spacing, _ = resolve_spacing(args.spacing, image, None, 2 if flat else 3)
            if frames:  # the painted frames, each a 2D image of its own
                if not mark.any():
                    raise VolumeError(f"{scribbles}: no frame holds scribbles")
                painted, frame_marks, _ = painted_frames(image.picture(), mark, 0, 1, str(path))
                images += painted
                marks += frame_marks
                spacings += [spacing] * len(painted)
                continue
            images.append(image.picture() if flat else image.load())
            marks.append(mark)
            spacings.append(spacing)
        if len(set(kinds)) > 1:
            raise VolumeError(
                "the images mix 2D images and volumes; a model is of one kind: train one of each"
            )
        many = len(images) > 1
        if many and all(sp is None for sp in spacings):
            spacings = None
        elif many:
            spacings = [sp or (1.0,) * (2 if kinds[0] else 3) for sp in spacings]
        # the kind's default bank (train's), with the options given
        spec = dataclasses.replace(default_features(2 if kinds[0] else 3), **overrides)
        model = train(
            images if many else images[0], marks if many else marks[0],
            spacing=spacings if many else spacings[0], channel_axis=0, features=spec,
            hidden=tuple(args.hidden) if args.hidden else (64, 64), steps=args.steps,
            device=args.device, seed=args.seed, class_names=args.class_names,
            context=True if args.context else None,
            progress=lambda done, total: bar.update("training", done, total, "steps"),
        )  # fmt: skip
        save_model(model, args.output)
    except (VolumeError, ValueError, OSError) as err:
        bar.print(f"pacseg train: failed: {' '.join(str(err).split())}", err=True)
        return FAILED
    bar.print(
        f"saved {args.output}: a {model.config.ndim}D model, classes "
        f"{[c.name for c in model.config.classes]}, spacing {model.config.in_plane_spacing}, "
        f"{int(model.config.provenance.get('labelled_voxels', 0))} labelled voxels"
        + (f" in {len(images)} images" if len(images) > 1 else "")
    )
    return 0


SCRIBBLES_ONE_CHANNEL = (
    "scribbles must be one channel of integer labels (0 unlabelled, 1 background, 2.. classes)"
)


def _read_scribble_volume(path):
    """The ``(D, H, W)`` scribbles of a volume file; ``VolumeError`` for more than one channel
    (an RGB painting: its channels are no labels)."""
    from napari_pacseg.io.volumes import VolumeError, load_npy, read_volume, volume_kind

    if volume_kind(path) == "npy" and Path(path).is_file():
        shape = load_npy(path).shape  # memory-mapped: only the header is read
        if len(shape) == 4:
            raise VolumeError(f"{path}: {SCRIBBLES_ONE_CHANNEL}, got a 4D array of shape {shape}")
    volume = read_volume(path)
    if volume.shape[0] != 1:
        raise VolumeError(f"{path}: {SCRIBBLES_ONE_CHANNEL}, got {volume.shape[0]} channels")
    return volume.load()[0]


def _assumed_spacing(record) -> str:
    """The spacing a run took from the model (no metadata, no --spacing), as text, else ''."""
    try:
        params = json.loads(Path(record).read_text())["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if params.get("spacing_source") != "model":
        return ""
    return "(" + ", ".join(f"{v:g}" for v in params["spacing"]) + ")"


def _cmd_demo(args) -> int:
    import numpy as np

    from napari_pacseg.io.atomic import write_bytes
    from napari_pacseg.io.volumes import write_tiff
    from napari_pacseg.sample import DEMO_MODEL_FILE, load_sample

    out = args.outdir
    names = {"image": "nuclei.tif", "scribbles": "nuclei_scribbles.tif",
             "truth": "nuclei_truth.tif", "model": "nuclei_demo.safetensors"}  # fmt: skip
    there = [n for n in names.values() if (out / n).exists()]
    if there and not args.overwrite:
        raise UsageError(
            f"{out} already holds {', '.join(there)}; pass --overwrite or choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    sample = load_sample()
    write_tiff(out / names["image"], sample.image.astype(np.uint16), sample.spacing, True)
    write_tiff(out / names["scribbles"], sample.scribbles, sample.spacing, True)
    write_tiff(out / names["truth"], sample.truth.astype(np.uint8), sample.spacing, True)
    write_bytes(out / names["model"], DEMO_MODEL_FILE.read_bytes())
    print(f"wrote {', '.join(names.values())} to {out}")
    print("segment it:")
    print(f"  pacseg segment {out / names['model']} {out / names['image']} -o {out / 'out'}")
    print("retrain from the scribbles (1 background, 2 nucleus):")
    print(
        f"  pacseg train {out / names['image']} {out / names['scribbles']} -o {out / 'mine.safetensors'}"
        " --class-names background nucleus"
    )
    return 0


def _cmd_info(args) -> int:
    from napari_pacseg.describe import model_lines, model_summary
    from napari_pacseg.io.model_file import ModelFileError, load_model

    try:
        model = load_model(args.model)
    except ModelFileError as err:
        print(f"pacseg info: failed: {printable(str(err))}", file=sys.stderr)
        return FAILED
    info = model_summary(model, args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("\n".join(printable(line) for line in model_lines(model, info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
