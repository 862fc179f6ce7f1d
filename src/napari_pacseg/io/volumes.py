"""Volumes on disk: reading TIFF, NPY, zarr arrays and OME-Zarr images, writing NPY and TIFF.

Every reader returns an ``ImageFile``: the array in the file's own axis order (NPY memory-mapped,
zarr lazy), a ``Layout`` saying which axes are z, y, x and channels, and the voxel spacing from
the file's metadata when it has one. The writers go through ``atomic.write_atomically``: the
data under a temporary name in the target's folder, renamed into place, so a target path only
ever holds a complete file.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_pacseg.io.atomic import write_atomically

TIFF_SUFFIXES = (".tif", ".tiff")
NPY_SUFFIXES = (".npy",)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # 2D only: ``image_io``
ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json")
INSTALL_HINT = 'pip install "napari-pacseg[dask]"'

# Length units to micrometres (OME-Zarr names, OME-TIFF symbols, ImageJ spellings).
_TO_MICRONS = {
    "angstrom": 1e-4, "å": 1e-4, "nanometer": 1e-3, "nm": 1e-3, "micrometer": 1.0, "micron": 1.0,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "\\u00b5m": 1.0, "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
}  # fmt: skip


class VolumeError(ValueError):
    """A file that cannot be read as a volume; the message says why and what to do."""


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise VolumeError(f"reading this file needs {module}: {INSTALL_HINT}") from err


# --- layout: which raw axes are z, y, x and channels ---------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the z, y, x and channel axes of a raw array are.

    ``spatial`` : raw axis indices of (z, y, x); z is None for a 2D image (one plane), and the
    frame axis of a stack of 2D frames. ``channel`` : raw index of the channel axis or None.
    ``fixed`` : raw axes of length 1 that are dropped (a single time point, ...).
    """

    spatial: tuple[int | None, int, int]
    channel: int | None = None
    fixed: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """Dimensions of the raw array."""
        present = [a for a in self.spatial if a is not None]
        return len(present) + len(self.fixed) + (self.channel is not None)

    def shape(self, raw_shape) -> tuple[int, int, int, int]:
        """``(C, D, H, W)`` of the view (D is 1 for a 2D image)."""
        c = 1 if self.channel is None else raw_shape[self.channel]
        return (c, *(1 if a is None else raw_shape[a] for a in self.spatial))

    def selection(self, box) -> tuple:
        """Raw index selecting the spatial ``box`` ``((z0, z1), (y0, y1), (x0, x1))``."""
        sel: list = [slice(None)] * self.ndim
        for a in self.fixed:
            sel[a] = 0
        for a, (s, e) in zip(self.spatial, box):
            if a is not None:
                sel[a] = slice(s, e)
        return tuple(sel)

    def arrange(self, raw_region):
        """``(C, d, h, w)`` of what ``raw[self.selection(box)]`` returned (numpy or dask)."""
        kept = [a for a in range(self.ndim) if a not in self.fixed]
        spatial = [a for a in self.spatial if a is not None]
        order = ([kept.index(self.channel)] if self.channel is not None else []) + [
            kept.index(a) for a in spatial
        ]
        region = raw_region.transpose(order)
        region = region if self.channel is not None else region[None]
        return region[:, None] if self.spatial[0] is None else region

    def region(self, raw, box) -> np.ndarray:
        """The spatial ``box`` of ``raw`` as a numpy ``(C, d, h, w)`` array in its own dtype."""
        return np.asarray(self.arrange(raw[self.selection(box)]))

    def full(self, raw) -> np.ndarray:
        return self.region(raw, [(0, n) for n in self.shape(raw.shape)[1:]])


def layout_from_axes(axes: str, shape, channel_axis: int | None = None, what: str = "") -> Layout:
    """Layout of an array whose axes are named by ``axes`` (one letter per axis: ``z y x`` space,
    ``c`` channels, ``t`` time, ``?`` unknown). ``channel_axis`` (raw index) overrides the names."""
    ndim = len(shape)
    names = list(axes.lower()) if axes else ["?"] * ndim
    where = f"{what}: " if what else ""
    if len(names) != ndim:
        raise VolumeError(f"{where}axes {axes!r} do not match the array's {ndim} dimensions")
    if channel_axis is not None:
        if not -ndim <= channel_axis < ndim:
            raise VolumeError(
                f"{where}channel axis {channel_axis} is out of range for a {ndim}D array of shape {tuple(shape)}"
            )
        channel_axis %= ndim
        names = [("?" if n == "c" else n) for n in names]
        names[channel_axis] = "c"
    if names.count("c") > 1:
        raise VolumeError(
            f"{where}{names.count('c')} channel axes (axes {axes!r}); pass the channel axis to use"
        )
    unknown = [i for i, n in enumerate(names) if n == "?"]
    missing = [a for a in "zyx" if a not in names]
    if not axes or all(n in "?c" for n in names):  # no names: the last three non-channel axes
        while len(unknown) > 3 and shape[unknown[0]] == 1:
            unknown.pop(0)  # a leading axis of length 1 (stays "?": dropped below)
        if len(unknown) != 3:
            hint = (
                "; a 4D array needs its channel axis (channel_axis / --channel-axis)"
                if len(unknown) == 4 and "c" not in names
                else ""
            )
            raise VolumeError(
                f"{where}expected a 3D (z, y, x) array or a 4D one with a channel axis, got shape {tuple(shape)}{hint}"
            )
        for i, a in zip(unknown, "zyx"):
            names[i] = a
    elif len(missing) == 1 and len(unknown) >= 1 and missing == ["z"]:
        big = [i for i in unknown if shape[i] > 1] or unknown[:1]
        names[big[0]] = "z"  # e.g. tifffile's 'QYX' for a plain 3D TIFF
    fixed = []
    for i, n in enumerate(names):
        if n in "zyxc":
            continue
        if shape[i] != 1:
            label = {"t": "a time axis"}.get(n, f"an extra axis {n!r}")
            raise VolumeError(
                f"{where}the array has {label} of length {shape[i]} (shape {tuple(shape)}, axes {axes!r}); "
                "segment one 3D volume at a time (save each time point as its own file)"
            )
        fixed.append(i)
    if any(a not in names for a in "zyx"):
        raise VolumeError(
            f"{where}needs z, y and x axes; got shape {tuple(shape)} with axes {axes!r} (a 2D image? "
            "add a z axis of length 1)"
        )
    return Layout(
        spatial=tuple(names.index(a) for a in "zyx"),
        channel=names.index("c") if "c" in names else None,
        fixed=tuple(fixed),
    )


# --- volumes ------------------------------------------------------------------------------------


@dataclass
class ImageFile:
    """An image on disk: a volume, a 2D image, or a stack of 2D frames (a time-lapse).

    data : the raw array in the file's axis order: numpy (TIFF, PNG, JPEG), ``np.memmap``
        (NPY) or ``zarr.Array`` (zarr, OME-Zarr level 0); the volume readers never load it whole.
    layout : where the axes are: ``layout.full(data)`` is ``(C, D, H, W)``, D the planes of a
        volume, the frames of a stack, 1 for a 2D image.
    kind : "tiff", "npy", "zarr", "ome-zarr", "png" or "jpeg".
    spacing : the voxel size in micrometres from the file's metadata, ``(z, y, x)`` for a
        volume, ``(y, x)`` for 2D images and stacks of frames; or None.
    spacing_source : where ``spacing`` came from ("" when None).
    spacing_problem : why metadata that should give the spacing could not be read ("" when
        none): the caller then needs a spacing of its own (``--spacing``) rather than a guess.
    planar : a 2D image or a stack of 2D frames (what a 2D model segments).
    frames : a stack of 2D frames (D is the frame axis).
    """

    path: Path
    kind: str
    data: object
    layout: Layout
    spacing: tuple[float, ...] | None = None
    spacing_source: str = ""
    spacing_problem: str = ""
    planar: bool = False
    frames: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(C, D, H, W)``."""
        return self.layout.shape(self.data.shape)

    @property
    def result_shape(self) -> tuple[int, ...]:
        """The spatial shape of its results: ``(D, H, W)`` of a volume or a stack of frames,
        ``(H, W)`` of a 2D image."""
        _, d, h, w = self.shape
        return (h, w) if self.planar and not self.frames else (d, h, w)

    def load(self) -> np.ndarray:
        """The whole image as a numpy ``(C, D, H, W)`` array in its own dtype."""
        return self.layout.full(self.data)

    def picture(self) -> np.ndarray:
        """What a 2D model segments, loaded and contiguous: ``(C, H, W)`` for a 2D image,
        ``(T, C, H, W)`` for a stack of frames (``segment(frame_axis=0, channel_axis=1)``)."""
        full = self.load()
        arr = full.transpose(1, 0, 2, 3) if self.frames else full[:, 0]
        return np.ascontiguousarray(arr)


def is_zarr_path(path) -> bool:
    """True for a folder that is a zarr array or group (v2 or v3), or named ``*.zarr``."""
    path = Path(path)
    return path.is_dir() and (
        path.suffix == ".zarr" or any((path / m).exists() for m in ZARR_MARKERS)
    )


def volume_kind(path) -> str | None:
    """ "tiff", "npy", "zarr", or "png" / "jpeg" (2D images, read by ``image_io``) by name and
    type; None for anything else."""
    path = Path(path)
    if is_zarr_path(path):
        return "zarr"
    suffix = path.suffix.lower()
    if suffix in PICTURE_SUFFIXES:
        return "jpeg" if suffix != ".png" else "png"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in NPY_SUFFIXES:
        return "npy"
    return None


def stem(path) -> str:
    """File name without its format suffixes (``a.ome.tif`` -> ``a``, ``b.zarr`` -> ``b``)."""
    name = Path(path).name
    for suffix in (*TIFF_SUFFIXES, *NPY_SUFFIXES, *PICTURE_SUFFIXES, ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-4] if name.lower().endswith(".ome") else name


def read_volume(path, channel_axis: int | None = None) -> ImageFile:
    """Open ``path`` (TIFF, NPY, zarr array, OME-Zarr image) without loading zarr data.

    ``channel_axis`` is the raw index of the channel axis, overriding the file's metadata.
    Raises ``VolumeError`` for missing, unknown or unreadable files.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    kind = volume_kind(path)
    if kind in ("tiff", "npy") and not path.is_file():
        raise VolumeError(f"{path}: not a regular file (a folder, a pipe or a device?)")
    if kind == "tiff":
        return read_tiff(path, channel_axis)
    if kind == "npy":
        return read_npy(path, channel_axis)
    if kind == "zarr":
        return open_zarr(path, channel_axis)
    if kind in ("png", "jpeg"):
        raise VolumeError(
            f"{path}: a {kind.upper()} is a 2D image, and volumes are read here: segment it with a "
            "2D model (train one on 2D images; pacseg train IMAGE.png SCRIBBLES.png)"
        )
    raise VolumeError(
        f"{path}: unknown format; use a TIFF (.tif, .tiff), NumPy (.npy) or zarr / OME-Zarr folder"
    )


def read_npy(path, channel_axis: int | None = None) -> ImageFile:
    """An NPY file, memory-mapped (no axis metadata: 3D, or 4D with ``channel_axis``)."""
    path = Path(path)
    data = load_npy(path)
    return ImageFile(path, "npy", data, layout_from_axes("", data.shape, channel_axis, str(path)))


def load_npy(path) -> np.ndarray:
    """An NPY file's array, memory-mapped; never unpickled (``VolumeError`` otherwise)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        # numpy's own message for object arrays suggests allow_pickle; we never unpickle.
        raise VolumeError(
            f"{path}: not a readable .npy array of numbers (damaged, not an .npy file, or "
            "holding Python objects, which are never loaded)"
        ) from err


def read_tiff(path, channel_axis: int | None = None) -> ImageFile:
    """The first series of a TIFF, with its axes and, from ImageJ or OME metadata, its spacing."""
    path = Path(path)
    data, tiff_axes, spacing, source, problem = read_tiff_raw(path)
    axes = tiff_axis_names(tiff_axes)
    layout = layout_from_axes(axes, data.shape, channel_axis, str(path))
    return ImageFile(path, "tiff", data, layout, spacing, source, problem)


TIFF_AXES = {"Z": "z", "Y": "y", "X": "x", "C": "c", "S": "c", "T": "t"}  # others: "?"


def tiff_axis_names(tiff_axes: str) -> str:
    """tifffile's axis letters as ours: ``z y x``, ``c`` (channels, samples), ``t``, ``?``."""
    return "".join(TIFF_AXES.get(a, "?") for a in tiff_axes)


def read_tiff_raw(path, load: bool = True):
    """``(data, axes, spacing, source, problem)`` of a TIFF's first series: the array (None
    when not ``load``: then ``data`` is only its shape), tifffile's axis letters, and the
    ``(z, y, x)`` spacing from ImageJ or OME metadata (``_tiff_spacing``)."""
    tifffile = _need("tifffile")
    path = Path(path)
    quiet = logging.getLogger("tifffile")  # it logs damage itself; we report it in one line
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            _check_complete(tif, series, path.stat().st_size)
            data = series.asarray() if load else tuple(series.shape)
            spacing, source, problem = _tiff_spacing(tif)
            return data, series.axes, spacing, source, problem
    except VolumeError as err:
        raise VolumeError(f"{path}: {err}") from None
    except (tifffile.TiffFileError, OSError, IndexError, ValueError, KeyError) as err:
        raise VolumeError(f"{path}: not a readable TIFF ({err})") from err
    finally:
        quiet.setLevel(level)


def _check_complete(tif, series, size: int) -> None:
    """``VolumeError`` when the file ends before the data its header declares (truncated)."""
    declared = (tif.imagej_metadata or {}).get("images")
    planes = math.prod(n for n, a in zip(series.shape, series.axes) if a not in "YXS")
    if isinstance(declared, int) and declared > planes:
        raise VolumeError(
            f"truncated or damaged: its ImageJ header declares {declared} images but only "
            f"{planes} can be read; copy the file again from its source"
        )
    offset = getattr(series, "dataoffset", None)
    if offset is not None and offset + series.nbytes > size:
        raise VolumeError(
            f"truncated: the image data needs {offset + series.nbytes} bytes but the file has "
            f"{size}; copy the file again from its source"
        )
    for page in tif.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise VolumeError(
                f"truncated: page {page.index} needs {max(ends)} bytes but the file has {size}; "
                "copy the file again from its source"
            )


def _tiff_spacing(tif) -> tuple[tuple[float, float, float] | None, str, str]:
    """``(spacing, source, problem)`` from OME or ImageJ metadata; ``problem`` says why
    metadata that is there could not be used."""
    if tif.is_ome and tif.ome_metadata:
        try:
            pixels = next(
                e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")
            )
        except (ET.ParseError, StopIteration):
            pixels = None
        if pixels is not None and pixels.get("PhysicalSizeX"):
            sizes = []
            for a in "ZYX":
                text = pixels.get(f"PhysicalSize{a}", "1")
                try:
                    value = float(text)
                except ValueError:
                    return (
                        None,
                        "",
                        f"its OME metadata has PhysicalSize{a}={text[:40]!r}, not a number",
                    )
                sizes.append(
                    value * _TO_MICRONS.get(pixels.get(f"PhysicalSize{a}Unit", "µm").lower(), 1.0)
                )
            spacing = _positive(sizes)
            problem = "" if spacing else f"its OME metadata gives the voxel size {sizes}"
            return spacing, "OME-TIFF metadata" if spacing else "", problem
    meta = tif.imagej_metadata
    if meta and ("spacing" in meta or "unit" in meta):
        page = tif.pages[0]
        res = [page.tags.get(t) for t in ("YResolution", "XResolution")]
        if all(r is not None for r in res):
            try:
                yx = [den / num if num else 1.0 for num, den in (r.value for r in res)]
                scale = _TO_MICRONS.get(str(meta.get("unit", "um")).lower(), 1.0)
                sizes = [float(meta.get("spacing", 1.0)) * scale, yx[0] * scale, yx[1] * scale]
            except (TypeError, ValueError):
                return None, "", "its ImageJ metadata has a voxel size that is not a number"
            spacing = _positive(sizes)
            problem = "" if spacing else f"its ImageJ metadata gives the voxel size {sizes}"
            return spacing, "ImageJ metadata" if spacing else "", problem
    return None, "", ""


def _positive(sizes) -> tuple[float, float, float] | None:
    sizes = tuple(float(s) for s in sizes)
    return sizes if all(math.isfinite(s) and s > 0 for s in sizes) else None


def open_zarr(path, channel_axis: int | None = None) -> ImageFile:
    """A zarr array, or an OME-Zarr image (level 0, spacing from its ``multiscales`` scale).

    Nothing is loaded: ``ImageFile.data`` is the ``zarr.Array``.
    """
    zarr = _need("zarr")
    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several kinds for a folder that is not a store
        raise VolumeError(f"{path}: not a readable zarr array or group ({err})") from err
    if isinstance(node, zarr.Array):
        return ImageFile(path, "zarr", node, layout_from_axes("", node.shape, channel_axis, str(path)))
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in node.arrays())
        raise VolumeError(
            f"{path}: a zarr group without OME-Zarr 'multiscales' metadata; give the path of one "
            f"of its arrays instead ({', '.join(arrays[:5]) or 'it holds no arrays'})"
        )
    try:
        ms = multiscales[0]
        dataset = ms["datasets"][0]
        data = node[dataset["path"]]
        axes, units = _ome_axes(ms.get("axes"), data.ndim)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise VolumeError(f"{path}: malformed OME-Zarr multiscales metadata ({err!r})") from err
    layout = layout_from_axes(axes, data.shape, channel_axis, str(path))
    spacing, problem = None, ""
    try:  # a bad scale costs only the spacing: the data stays readable with spacing given
        scale = _ome_scale(dataset, ms, data.ndim)
        if scale is not None:
            sizes = [
                scale[a] * _TO_MICRONS.get(str(units[a] or "micrometer").lower(), 1.0)
                for a in layout.spatial
            ]
            spacing = _positive(sizes)
            problem = "" if spacing else f"its OME-Zarr scale gives the voxel size {sizes}"
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        problem = f"its OME-Zarr scale metadata cannot be read ({str(err)[:80]})"
    source = "OME-Zarr metadata" if spacing else ""
    return ImageFile(path, "ome-zarr", data, layout, spacing, source, problem)


def _ome_axes(axes, ndim) -> tuple[str, list]:
    if axes is None:  # OME-Zarr 0.1/0.2: always tczyx
        axes = list("tczyx")[-ndim:]
    letters, units = [], []
    for a in axes:
        name, kind, unit = (
            (a, None, None) if isinstance(a, str) else (a.get("name"), a.get("type"), a.get("unit"))
        )
        name = str(name).lower()
        letters.append(
            name
            if name in "zyxct" and len(name) == 1
            else {"space": "?", "channel": "c", "time": "t"}.get(kind, "?")
        )
        units.append(unit)
    return "".join(letters), units


def _ome_scale(dataset, ms, ndim) -> list[float] | None:
    scale = None
    for transforms in (
        dataset.get("coordinateTransformations"),
        ms.get("coordinateTransformations"),
    ):
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t:
                s = [float(v) for v in t["scale"]]
                if len(s) != ndim:
                    raise ValueError(f"a scale of {len(s)} values for {ndim} axes")
                scale = s if scale is None else [a * b for a, b in zip(scale, s)]
    return scale


def read_region(raw, layout: Layout, box, where) -> np.ndarray:
    """``layout.region(raw, box)``, with a ``VolumeError`` naming ``where`` (the file) and the
    damaged chunk when the store cannot decode it (a raw codec error names neither)."""
    try:
        return layout.region(raw, box)
    except (MemoryError, KeyboardInterrupt, VolumeError):
        raise
    except Exception as err:
        raise VolumeError(
            f"{where}: {describe_bad_chunk(raw, layout.selection(box), err)}"
        ) from err


def describe_bad_chunk(raw, selection, err) -> str:
    """The first chunk of ``raw`` inside ``selection`` that fails to read, as a message."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    chunks = getattr(raw, "chunks", None)
    if not chunks or len(chunks) != len(raw.shape) or not isinstance(chunks[0], int):
        return f"cannot read the data ({reason}); the file may be damaged"
    ranges = []
    for sel, n, c in zip(selection, raw.shape, chunks):
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(n)
        else:
            start, stop = int(sel), int(sel) + 1
        ranges.append(range(start // c, max(start // c + 1, -(-stop // c))))
    for index in itertools.product(*ranges):
        part = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, raw.shape))
        try:
            raw[part]
        except Exception:
            voxels = ", ".join(f"{s.start}:{s.stop}" for s in part)
            return (
                f"chunk {index} (array index [{voxels}]) cannot be decoded ({reason}); the file is "
                "damaged: restore or rewrite that chunk"
            )
    return f"cannot read the data ({reason}); the file may be damaged"


# --- outputs that must not be inputs ------------------------------------------------------------


def resolved(path) -> Path:
    """``path.resolve()``, with a ``ValueError`` for a symbolic link loop."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        raise ValueError(f"{path}: a symbolic link loop; remove or fix the link") from None


class InputGuard:
    """Tells whether an output would be, contain or lie inside one of ``inputs`` (resolved once:
    a check costs the depth of the output's path, not the number of inputs)."""

    def __init__(self, inputs) -> None:
        self.given = {}  # resolved path -> the path as given (named in messages)
        for p in inputs:
            self.given.setdefault(resolved(p), p)
        self.inputs = set(self.given)
        self.ancestors = {a for p in self.inputs for a in p.parents}

    def check(self, output) -> None:
        out = resolved(output)
        if out in self.inputs:
            where, how = out, "the same path"
        elif out in self.ancestors:
            where = next(p for p in self.inputs if out in p.parents)
            how = "a folder holding the input"
        else:
            where = next((a for a in out.parents if a in self.inputs), None)
            how = "a path inside the input"
        if where is not None:
            raise ValueError(
                f"{self.given[where]} is an input, and the output {output} would overwrite the "
                f"input ({how}); choose another output folder"
            )


def check_output_folder(folder, what: str = "output folder") -> None:
    """``ValueError`` unless ``folder`` is an existing folder this process can write into,
    checked before any long work (training, segmenting) rather than at its end."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"the {what} {folder} does not exist; create it or choose another")
    if not folder.is_dir():
        raise ValueError(f"the {what} {folder} is a file, not a folder; choose another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"the {what} {folder} is not writable (read-only, or not yours); choose a folder you "
            "can write to"
        )


def check_not_input(output, inputs) -> None:
    """``ValueError`` when ``output`` is, contains or lies inside one of ``inputs``."""
    InputGuard(inputs).check(output)


# --- writing ------------------------------------------------------------------------------------


def write_npy(path, array, overwrite: bool = False) -> Path:
    """Write ``array`` as an ``.npy`` file atomically (``write_atomically``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    return write_atomically(path, write, overwrite)


def write_tiff(path, array, spacing=None, overwrite: bool = False, axes: str | None = None) -> Path:
    """Write a ``(D, H, W)`` uint8, uint16 or float32 ``array`` as an ImageJ-compatible TIFF
    atomically, with ``spacing`` ``(z, y, x)`` in micrometres (read back by ``read_tiff``) when
    given; other dtypes (uint32 object ids) as a plain TIFF, which ImageJ cannot describe.
    A 2D ``array`` ``(H, W)`` (``axes`` "YX"), or a stack of frames with ``axes="TYX"``, takes
    a ``(y, x)`` spacing."""
    tifffile = _need("tifffile")
    imagej = np.dtype(array.dtype) in (np.uint8, np.uint16, np.float32)
    axes = axes or ("YX" if array.ndim == 2 else "ZYX")
    kwargs: dict = {"imagej": imagej, "photometric": "minisblack", "metadata": {"axes": axes}}
    if spacing is not None:
        *z, y, x = (float(s) for s in spacing)
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        kwargs["metadata"].update(**({"spacing": z[0]} if z else {}), unit="um")
    return write_atomically(
        path, lambda tmp: tifffile.imwrite(tmp, np.ascontiguousarray(array), **kwargs), overwrite
    )
