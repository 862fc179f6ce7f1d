"""The model file: ONE ``.safetensors`` file, the config as JSON in its metadata.

The container is the safetensors format (``container``): an 8-byte header length, a JSON
header naming each tensor's dtype, shape and byte range plus ``"__metadata__"``, then the raw
little-endian float32 weights, which tile the data exactly. The metadata key ``"napari_pacseg"``
holds the JSON text of ``{"format": "napari-pacseg-model", "version": ..., "written_by": ...,
"config": {...}, "checksum": "sha256:<64 hex digits>"}`` (``codec``: the config's JSON and
``model_checksum``).

Version 1 files (without a checksum) load with a ``ModelFileWarning`` asking to re-save them;
a version 2 to 6 file must have a checksum. Version 6 is written for models whose brightness
weight is on auto (``"brightness": null`` in the config's ``"instances"``: every model trained
now), so releases without it refuse them as newer rather than fail on the null. Version 5 is
written for models whose instance defaults name a boundary class (cells mode: ``"boundary"``
in the config's ``"instances"``), so releases without cells mode refuse them as newer rather
than misread them. Version 4 is written for models with a ``"normalisation"`` in the config
(every model trained now has one); files without one load with each image scaled by its own
range, and a ``ModelFileWarning`` saying so. Version 3 is written for models of 2D images
without it (``"ndim": 2`` in the config), version 2 for volume models without it (no
``"ndim"``: 3).

Loading parses and checks everything (sizes, offsets, names, shapes, JSON types, finiteness,
the config, the checksum) before building anything, and never unpickles: the file is only
bytes and JSON. What the header decides (the size limits, the config, the tensors' offsets
against each other and against the file's size) is checked before the weights are read, so
a file refused for it costs no more than its header to read. Whatever the bytes,
``load_model`` raises only ``ModelFileError``, with one line naming the file and what is wrong.

This module is the public face: loading and saving, a model as bytes for dask workers
(``ModelPayload``), ``weights_digest``; it re-exports the names of ``codec``, ``container`` and
``torch_import`` that callers use.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_pacseg.checks import one_line, printable, short_repr
from napari_pacseg.io.atomic import write_bytes
from napari_pacseg.io.codec import (
    FORMAT,
    FORMAT_VERSION,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    META_KEY,
    ModelFileError,
    ModelFileWarning,
    config_from_dict,
    config_to_dict,
    file_version,
    model_checksum,
    read_metadata,
)
from napari_pacseg.io.container import (
    MAX_FILE_BYTES,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    decode,
    encode,
    header_length,
    parse_header,
    tensor_ranges,
)
from napari_pacseg.io.provenance import LIBRARY
from napari_pacseg.io.torch_import import import_torch_mlp
from napari_pacseg.model.network import PacSegModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT",
    "MAX_TENSOR_BYTES",
    "META_KEY",
    "ModelFileError",
    "ModelFileWarning",
    "ModelPayload",
    "config_from_dict",
    "config_to_dict",
    "file_version",
    "import_torch_mlp",
    "load_model",
    "model_bytes",
    "model_checksum",
    "model_from_bytes",
    "save_model",
    "weights_digest",
]


# --- writing -----------------------------------------------------------------------------------


def save_model(model: PacSegModel, path) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically: a temporary file in the
    same folder, flushed, then renamed over the target. Returns the path.

    Raises ``ValueError`` (and writes nothing) when a weight is NaN or infinite (after the
    float32 conversion), or when the config would not load back. The metadata holds a
    ``model_checksum`` of the config and the weights."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model: the file name must end in .safetensors, got {path.name!r}")
    write_bytes(path, model_bytes(model, path.name), overwrite=True)
    return path


def model_bytes(model: PacSegModel, name: str = "the model") -> bytes:
    """The bytes of ``model``'s file (what ``save_model`` writes; ``model_from_bytes`` reads
    them back with every check of ``load_model``). ``ValueError`` as ``save_model``."""
    path = Path(name)
    if not isinstance(model, PacSegModel):
        raise ValueError(f"save_model: expected a PacSegModel, got {type(model).__name__}")
    arrays = {}
    for name, value in model.state_dict().items():
        t = value.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"save_model: weight {name!r} holds NaN or infinite values (in float32); the model "
                f"is broken (retrain it) and {path.name} was not written"
            )
        arrays[name] = t.numpy().astype("<f4", copy=False)
    config = config_to_dict(model.config)
    try:
        config_from_dict(json.loads(json.dumps(config)))
    except ModelFileError as err:
        raise ValueError(
            f"save_model: the config would not load back ({err}); {path.name} was not written"
        ) from err
    meta = {"format": FORMAT, "version": file_version(model.config), "written_by": LIBRARY,
            "config": config}  # fmt: skip
    meta["checksum"] = model_checksum(
        meta, [(name, "F32", a.shape, a.tobytes()) for name, a in arrays.items()]
    )
    return encode(arrays, {META_KEY: json.dumps(meta, allow_nan=False)})


@dataclass(frozen=True)
class ModelPayload:
    """A model as the bytes of its file (``model_bytes``): what travels to dask workers, which
    rebuild it with ``model_from_bytes``, i.e. every check of ``load_model``; no code is
    pickled. ``digest`` (sha256 of the bytes) tells models apart."""

    data: bytes
    digest: str

    @classmethod
    def of(cls, model: PacSegModel) -> ModelPayload:
        return cls(model_bytes(model), weights_digest(model))


def weights_digest(model: PacSegModel) -> str:
    """sha256 of a model's config and float32 weights: the same model gives the same digest
    in every release (unlike its file, which names the release that wrote it). What the
    records of ``segment_files`` hold as ``weights_sha256``."""
    h = hashlib.sha256(repr(sorted(config_to_dict(model.config).items())).encode())
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


# --- reading -----------------------------------------------------------------------------------


def _file_name(path: Path) -> str:
    """The file's name for a message (escaped when it would not print as it is)."""
    return printable(path.name or str(path))


@dataclass(frozen=True)
class _Layout:
    """What a model file's header says, checked against the file's size before its weights
    are read.

    model : built from the config, weights not loaded yet. meta : the ``napari_pacseg``
    metadata. shapes : each tensor's shape, as the config needs it. ranges : ``(start, stop,
    name)`` of each tensor's bytes within the data, sorted; they tile ``[0, data_bytes)``.
    data_start : where the data begins in the file (``8 + header length``); data_bytes : its
    length, which ends the file.
    """

    model: PacSegModel
    meta: dict
    shapes: dict[str, tuple[int, ...]]
    ranges: list[tuple[int, int, str]]
    data_start: int
    data_bytes: int


def _layout(raw: bytes, size: int, name: str) -> _Layout:
    """The checked ``_Layout`` of a file of ``size`` bytes whose JSON header is ``raw``: the
    metadata and config (``codec.read_metadata``), the model they build, and the tensors'
    names, dtypes, shapes and byte ranges against it and the file's size
    (``container.tensor_ranges``)."""
    header = parse_header(raw, name)
    config, meta = read_metadata(name, header)
    try:
        model = PacSegModel(config)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, MemoryError) as err:
        raise ModelFileError(
            f"{name}: the model cannot be built from its config ({one_line(err, 120)})"
        ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    data_start = 8 + len(raw)
    ranges, data_bytes = tensor_ranges(header, expected, size, name, data_start)
    return _Layout(model, meta, expected, ranges, data_start, data_bytes)


def _weights(layout: _Layout, file: bytes, name: str) -> tuple[PacSegModel, bool]:
    """The model of ``layout`` with its weights from ``file`` (the whole file, its layout
    checked) and whether the file has a checksum, after the finiteness and checksum checks.
    The tensors' bytes are cut out by the safetensors library (``container.decode``); the
    checksum covers exactly those bytes."""
    raw = decode(file, name)
    expected, meta = layout.shapes, layout.meta
    state, non_finite = {}, None
    for _, _, tensor in layout.ranges:
        arr = np.frombuffer(raw[tensor], dtype="<f4").reshape(expected[tensor])
        if non_finite is None and not np.isfinite(arr).all():
            non_finite = tensor
        state[tensor] = torch.from_numpy(arr.astype(np.float32))  # a copy, native order
    checksum = meta.get("checksum")
    intact = checksum is None or checksum == model_checksum(
        meta, [(t, "F32", expected[t], raw[t]) for _, _, t in layout.ranges]
    )
    if non_finite is not None:
        raise ModelFileError(
            f"{name}: tensor {short_repr(non_finite)} holds NaN or infinite values"
            + ("" if intact else " (file is corrupt: checksum mismatch)")
        )
    if not intact:
        raise ModelFileError(
            f"{name}: file is corrupt: checksum mismatch (the weights or the config changed "
            "after it was written); use an intact copy"
        )
    try:
        layout.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(
            f"{name}: the weights do not fit the model ({one_line(err, 120)})"
        ) from None
    return layout.model, checksum is not None


def _load(path: Path, name: str) -> tuple[PacSegModel, bool]:
    """The model in ``path`` and whether it has a checksum; ``ModelFileError`` otherwise.

    Reads the 8-byte header length and the JSON header, checks the config and the tensors'
    byte ranges against each other, the size limits and the file's size (``_layout``), and
    only then reads the weights: a file refused for its size or layout costs at most its
    header (``MAX_HEADER_BYTES``) in reading and memory. Each byte is read once."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{name}: is a folder, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{name}: is not a regular file (a pipe or device?), not a model file")
    if st.st_size > MAX_FILE_BYTES:
        raise ModelFileError(f"{name}: {st.st_size} bytes is over the size limit of a model file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = _read_exactly(f, min(8, size), size, name)
        raw = _read_exactly(f, header_length(first, size, name), size, name)
        layout = _layout(raw, size, name)
        data = _read_exactly(f, layout.data_bytes, size, name)
        if f.read(1):
            raise ModelFileError(
                f"{name}: the file grew while it was read (beyond its {size} bytes); load it "
                "again once it is written"
            )
    file = b"".join((first, raw, data))
    del data  # the weights are held once, in ``file``
    return _weights(layout, file, name)


def _read_exactly(f, count: int, size: int, name: str) -> bytes:
    """The next ``count`` bytes of ``f`` (a file of ``size`` bytes when it was opened, so
    ``count`` fits it); ``ModelFileError`` when it ends before them (it shrank meanwhile)."""
    data = f.read(count)
    if len(data) < count:
        raise ModelFileError(
            f"{name}: the file shrank while it was read (it had {size} bytes); load it again "
            "once it is written"
        )
    return data


def _from_bytes(file: bytes, name: str) -> tuple[PacSegModel, bool]:
    """The model in a file's bytes and whether it has a checksum; ``ModelFileError`` otherwise
    (the checks and messages of ``_load``, in the same order)."""
    size = len(file)
    n = header_length(file[:8], size, name)
    layout = _layout(file[8 : 8 + n], size, name)
    return _weights(layout, file, name)


def load_model(path, device="cpu") -> PacSegModel:
    """Load a model written by ``save_model``, checking everything before building it.

    Raises ``ModelFileError`` (a ``ValueError``), one line naming the file and the problem,
    for ANY content of the file: not a file (a folder, missing, unreadable), not a file of
    ours, a newer format version, malformed or duplicate-key JSON, unknown or missing config
    keys or wrong JSON types in it (``3.0`` for an int), values out of range, tensors
    missing, unexpected, misshapen, overlapping, with gaps or trailing bytes, out of bounds
    or not finite, sizes over the limits, a checksum mismatch. Nothing is ever unpickled.

    A version 1 file (no checksum) loads with a ``ModelFileWarning``: re-save it.
    """
    path = Path(path)
    name = _file_name(path)
    return _checked(_load, path, name, device)


def model_from_bytes(data: bytes, name: str = "model bytes", device="cpu") -> PacSegModel:
    """The model in ``data`` (``model_bytes`` or a model file's content), with every check
    and message of ``load_model`` (``name`` stands for the file in them)."""
    return _checked(_from_bytes, bytes(data), name, device)


def _checked(read, source, name: str, device) -> PacSegModel:
    """``read(source, name)`` with every failure a one-line ``ModelFileError`` naming ``name``."""
    try:
        model, has_checksum = read(source, name)
    except ModelFileError:
        raise
    except OSError as err:
        raise ModelFileError(
            f"{name}: cannot be read ({one_line(err.strerror or type(err).__name__, 80)})"
        ) from None
    except Exception as err:  # a check missed: still one line, never a traceback
        raise ModelFileError(
            f"{name}: not a valid model file (a check failed unexpectedly: {type(err).__name__}: {one_line(err, 80)})"
        ) from err
    if not has_checksum:
        warnings.warn(
            f"{name}: a version 1 model file without a checksum, so damage to it cannot be "
            "detected; re-save it (load_model, then save_model) to add one",
            ModelFileWarning,
            stacklevel=3,
        )
    if model.config.normalisation is None:
        warnings.warn(
            f"{name}: written before model files stored their training contrast, so each image "
            "is scaled by its own intensity range as before (an image without objects may come "
            "out as foreground, an outlier may shift labels nearby); retrain it to store one",
            ModelFileWarning,
            stacklevel=3,
        )
    return model.to(device).eval()
