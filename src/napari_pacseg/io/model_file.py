"""The model file: ONE ``.safetensors`` file, the config as JSON in its metadata.

Layout (the safetensors format): 8 bytes little-endian header length ``n``, ``n`` bytes of a
UTF-8 JSON header mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` plus
``"__metadata__"``, then the raw little-endian float32 data: the tensors' byte ranges tile it
exactly (no gap, no overlap, nothing after the last one). Our metadata key ``"napari_pacseg"``
holds the JSON text of ``{"format": "napari-pacseg-model", "version": 2, "written_by": ...,
"config": {...}, "checksum": "sha256:<64 hex digits>"}`` (see ``model_checksum``).

Version 1 files (written before the checksum) still load, with a ``ModelFileWarning`` asking to
re-save them; a version 2, 3 or 4 file must have a checksum. Version 4 is written for models
with a ``"normalisation"`` in the config (every model trained now); files without one load
with each image scaled by its own range as before, and a ``ModelFileWarning`` saying so.
Version 3 is written for models of 2D images without it (``"ndim": 2`` in the config),
version 2 for volume models without it (no ``"ndim"``: 3).

Loading parses and checks everything (sizes, offsets, names, shapes, JSON types, finiteness,
the config, the checksum) before building anything, and never unpickles: the file is only
bytes and JSON. What the header decides (the size limits, the config, the tensors' offsets
against each other and against the file's size) is checked before the weights are read, so
a file refused for it costs no more than its header to read. Whatever the bytes,
``load_model`` raises only ``ModelFileError``, with one line naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_pacseg.checks import is_int, one_line, printable, short_repr
from napari_pacseg.io.provenance import LIBRARY
from napari_pacseg.io.volumes import write_bytes
from napari_pacseg.model.classes import class_infos
from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.model.network import (
    MAX_LAYERS,
    MAX_WIDTH,
    ClassInfo,
    ContextConfig,
    HeadConfig,
    InstanceConfig,
    ModelConfig,
    PacSegModel,
    RefineConfig,
)
from napari_pacseg.model.normalise import Normalisation
from pacseg_kernels import VoxelMLP

FORMAT = "napari-pacseg-model"
# 4: the config holds a "normalisation" (clip, training contrast); 3: a model of 2D images
# (``"ndim": 2`` in the config); 2: the metadata holds a checksum; 1: none (still read, with a
# warning). A model without a normalisation (loaded from an older file) is written in the
# version it came in, so older releases keep reading it; a newer model in an older release is
# refused as "upgrade napari-pacseg" rather than misread.
FORMAT_VERSION = 4
META_KEY = "napari_pacseg"
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 30
MAX_JSON_DEPTH = 32  # our header and config nest 5 deep at most
MAX_JSON_INT = 1 << 53  # larger integers in the config are refused as out of range
_CHECKSUM_RE = re.compile(r"sha256:[0-9a-f]{64}")


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message says why and what to do."""


class ModelFileWarning(UserWarning):
    """A model file that loads but lacks a safeguard (a version 1 file has no checksum)."""


# --- config <-> JSON ---------------------------------------------------------------------------


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-able dict of a config (tuples become lists); ``ndim`` only for a 2D model (its
    absence means 3, as in files written before 2D models existed)."""
    data = json.loads(json.dumps(dataclasses.asdict(config), allow_nan=False))
    if data["ndim"] == 3:
        del data["ndim"]
    if data["normalisation"] is None:  # a model from a file written before it: stays so
        del data["normalisation"]
    return data


def file_version(config: ModelConfig) -> int:
    """The format version a model file of ``config`` is written in: 4 with a normalisation,
    else 3 for a 2D model, else 2."""
    if config.normalisation is not None:
        return 4
    return 3 if config.ndim == 2 else 2


def _int(value, where):
    """A JSON integer: not a float (``3.0``), not a boolean, at most ``MAX_JSON_INT``."""
    if not is_int(value):
        raise ModelFileError(
            f"model config: {where} must be an integer, got {_kind(value)} {short_repr(value)}"
        )
    if abs(value) > MAX_JSON_INT:
        raise ModelFileError(f"model config: {where} = {short_repr(value)} is out of range")
    return value


def _float(value, where):
    """A JSON number (integer or not), finite, not a boolean; kept as written."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFileError(
            f"model config: {where} must be a number, got {_kind(value)} {short_repr(value)}"
        )
    if (is_int(value) and abs(value) > MAX_JSON_INT) or not math.isfinite(value):
        raise ModelFileError(
            f"model config: {where} = {short_repr(value)} is not a finite number in range"
        )
    return value


def _of_type(kind: type, wanted: str):
    """A check that a JSON value is a ``kind`` (described as ``wanted``)."""

    def check(value, where):
        if not isinstance(value, kind):
            raise ModelFileError(
                f"model config: {where} must be {wanted}, got {_kind(value)} {short_repr(value)}"
            )
        return value

    return check


_bool = _of_type(bool, "true or false")
_str = _of_type(str, "a string")
_list = _of_type(list, "a list")


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _plain(value, where):
    """A JSON value for a field of unknown type: lists become tuples; the dataclass checks it."""
    if isinstance(value, list):
        return tuple(_plain(v, where) for v in value)
    if isinstance(value, dict):
        raise ModelFileError(f"model config: {where} must not be an object")
    return value


def _tuple_of(item, length=None):
    def convert(value, where):
        items = _list(value, where)
        if length is not None and len(items) != length:
            raise ModelFileError(
                f"model config: {where} must be a list of {length}, got {len(items)} items"
            )
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(items))

    return convert


def _optional(convert):
    return lambda value, where: None if value is None else convert(value, where)


_SCALARS = {"int": _int, "float": _float, "bool": _bool, "str": _str}


def _converter(annotation: str):
    """The JSON check of a dataclass field from its annotation (a string: the model modules
    use ``from __future__ import annotations``); ``_plain`` for anything else."""
    a = annotation.replace(" ", "")
    for none in ("|None", "None|"):
        if none in a:
            return _optional(_converter(a.replace(none, "")))
    if a in _SCALARS:
        return _SCALARS[a]
    m = re.fullmatch(r"tuple\[(\w+),\.\.\.\]", a)
    if m and m[1] in _SCALARS:
        return _tuple_of(_SCALARS[m[1]])
    m = re.fullmatch(r"tuple\[(\w+(?:,\w+)*)\]", a)
    if m and len(set(m[1].split(","))) == 1 and m[1].split(",")[0] in _SCALARS:
        return _tuple_of(_SCALARS[m[1].split(",")[0]], len(m[1].split(",")))
    return _plain


def _obj(cls, data, where: str, convert=None) -> object:
    if not isinstance(data, dict):
        raise ModelFileError(
            f"model config: {where} must be a JSON object, got {_kind(data)} {short_repr(data)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ModelFileError(f"model config: unknown keys in {where}: {short_repr(unknown, 80)}")
    missing = [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in data
    ]  # fmt: skip
    if missing:
        raise ModelFileError(f"model config: {where} lacks required keys {missing}")
    convert = convert or {}
    kwargs = {
        k: convert.get(k, _converter(str(fields[k].type)))(v, f"{where}.{k}")
        for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ModelFileError(f"model config: {where}: {one_line(err)}") from err


def config_from_dict(data) -> ModelConfig:
    """Rebuild a ``ModelConfig``, refusing unknown or missing keys and wrong JSON types: an int
    field takes only an integer (not ``3.0`` or ``true``), a float field only a finite number,
    a string field only a string. Raises ``ModelFileError``."""
    convert = {
        "features": lambda v, w: _obj(FeatureSpec, v, w),
        "head": lambda v, w: _obj(HeadConfig, v, w),
        "context": lambda v, w: None if v is None else _obj(ContextConfig, v, w),
        "refine": lambda v, w: _obj(RefineConfig, v, w),
        "instances": lambda v, w: _obj(InstanceConfig, v, w),
        "normalisation": lambda v, w: _obj(Normalisation, v, w),
        "classes": lambda v, w: tuple(
            _obj(ClassInfo, c, f"{w}[{i}]") for i, c in enumerate(_list(v, w))
        ),
        "provenance": _provenance,
    }
    config = _obj(ModelConfig, data, "config", convert)
    if "normalisation" not in data:  # written before it: each image by its own range, unclipped
        config = dataclasses.replace(config, normalisation=None)
    stored = data.get("refine")
    if config.ndim == 2 and not (isinstance(stored, dict) and "fit_weight" in stored):
        # a 2D model written before the local fit was made without it, and keeps its results;
        # volumes written before it take it up
        config = dataclasses.replace(
            config, refine=dataclasses.replace(config.refine, fit_weight=0.0)
        )
    return config


def _provenance(value, where):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ModelFileError(f"model config: {where} must map strings to strings")
    return dict(value)


# --- the checksum ------------------------------------------------------------------------------


def _canonical_json(value) -> bytes:
    """The canonical text of a JSON value: Python's ``json.dumps`` with sorted keys, no
    spaces, ASCII only (other characters as ``\\uXXXX``), NaN refused; floats as ``repr``."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def model_checksum(meta: Mapping, tensors: Iterable[tuple[str, str, tuple, bytes]]) -> str:
    """``"sha256:<hex>"`` of a model file's content, as stored in (and checked against) its
    metadata's ``"checksum"``.

    What is hashed, in this order, each item framed as its length (8 bytes, unsigned little
    endian) followed by its bytes:

    1. ``_canonical_json(meta)``: the ``napari_pacseg`` metadata object WITHOUT its
       ``"checksum"`` key (format, version, written_by and the whole config), re-serialised
       canonically (sorted keys, separators ``,`` and ``:``, ASCII), so the hash does not
       depend on the JSON's spacing or key order, but any changed value (a flipped digit of
       a sigma) changes it;
    2. for each tensor, in sorted order of the names: the name (UTF-8), the dtype (``F32``),
       the shape as compact JSON (``[64,19]``) and the tensor's raw bytes (little-endian
       float32, as in the file).

    The data offsets are not hashed: ``load_model`` checks separately that they tile the data
    exactly, and the bytes are hashed per name, so swapped offsets change the hash. The rest
    of the safetensors header (other ``__metadata__`` keys, padding) is not covered.
    """
    h = hashlib.sha256()

    def field(data) -> None:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    field(_canonical_json({k: v for k, v in meta.items() if k != "checksum"}))
    for name, dtype, shape, raw in sorted(tensors, key=lambda t: t[0]):
        field(name.encode("utf-8"))
        field(dtype.encode("ascii"))
        field(json.dumps([int(s) for s in shape], separators=(",", ":")).encode("ascii"))
        field(raw)
    return "sha256:" + h.hexdigest()


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
    tensors = {}
    for name, value in model.state_dict().items():
        t = value.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"save_model: weight {name!r} holds NaN or infinite values (in float32); the model "
                f"is broken (retrain it) and {path.name} was not written"
            )
        tensors[name] = t.numpy().astype("<f4", copy=False).tobytes()
    config = config_to_dict(model.config)
    try:
        config_from_dict(json.loads(json.dumps(config)))
    except ModelFileError as err:
        raise ValueError(
            f"save_model: the config would not load back ({err}); {path.name} was not written"
        ) from err
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    meta = {"format": FORMAT, "version": file_version(model.config), "written_by": LIBRARY,
            "config": config}  # fmt: skip
    meta["checksum"] = model_checksum(
        meta, [(name, "F32", shapes[name], tensors[name]) for name in tensors]
    )
    header: dict = {"__metadata__": {META_KEY: json.dumps(meta, allow_nan=False)}}
    offset = 0
    for name in sorted(tensors):
        size = len(tensors[name])
        header[name] = {
            "dtype": "F32",
            "shape": shapes[name],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw, *(tensors[n] for n in sorted(tensors))])


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


class _Refused(ValueError):
    """JSON that parses but is not allowed here (a duplicate key, NaN)."""


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {short_repr(key)}")
        obj[key] = value
    return obj


def _no_constant(name):
    raise _Refused(f"{name} is not a JSON number")


def _too_deep(value, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def _parse_json(raw, name: str, what: str):
    """``raw`` (bytes or str) as strict JSON: no duplicate keys, no NaN/Infinity, at most
    ``MAX_JSON_DEPTH`` deep."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise ModelFileError(f"{name}: {what} is not valid JSON (nested too deeply)") from None
    except _Refused as err:
        raise ModelFileError(f"{name}: {what} is not valid JSON ({err})") from None
    except (UnicodeError, ValueError) as err:  # JSONDecodeError, or a number of 4300+ digits
        reason = "a number with too many digits" if "digits" in str(err) else one_line(err, 120)
        raise ModelFileError(f"{name}: {what} is not valid JSON ({reason})") from None
    if _too_deep(value):
        raise ModelFileError(
            f"{name}: {what} is not valid JSON here (nested over {MAX_JSON_DEPTH} deep)"
        )
    return value


def _file_name(path: Path) -> str:
    """The file's name for a message (escaped when it would not print as it is)."""
    return printable(path.name or str(path))


def _read_meta(name: str, header: dict) -> tuple[ModelConfig, dict]:
    meta_block = header.get("__metadata__")
    if not isinstance(meta_block, dict) or META_KEY not in meta_block:
        raise ModelFileError(
            f"{name}: a safetensors file without '{META_KEY}' metadata: not a napari-pacseg model "
            "(a plain PyTorch MLP can be imported with import_torch_mlp)"
        )
    if not all(isinstance(v, str) for v in meta_block.values()):
        raise ModelFileError(
            f"{name}: the __metadata__ values must be strings (safetensors format): corrupt"
        )
    meta = _parse_json(meta_block[META_KEY], name, f"the '{META_KEY}' metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{name}: metadata format is not {FORMAT!r}")
    version = meta.get("version")
    if not is_int(version) or version < 1:
        raise ModelFileError(
            f"{name}: metadata version {short_repr(version)} is not a positive integer"
        )
    written_by = meta.get("written_by", "a newer release")
    if not isinstance(written_by, str):
        raise ModelFileError(f"{name}: metadata written_by is not a string")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{name}: written in model format version {short_repr(version)} by {short_repr(written_by, 60)}; "
            f"this napari-pacseg reads up to version {FORMAT_VERSION}: upgrade napari-pacseg"
        )
    unknown = sorted(set(meta) - {"format", "version", "written_by", "config", "checksum"})
    if unknown:
        raise ModelFileError(f"{name}: unknown metadata keys {short_repr(unknown, 80)}")
    checksum = meta.get("checksum")
    if checksum is None and version >= 2:
        raise ModelFileError(
            f"{name}: file is corrupt: no checksum in a version {version} file (it was edited or damaged)"
        )
    if checksum is not None and not (
        isinstance(checksum, str) and _CHECKSUM_RE.fullmatch(checksum)
    ):
        raise ModelFileError(
            f"{name}: file is corrupt: the checksum {short_repr(checksum)} is not 'sha256:' and 64 hex digits"
        )
    try:
        config = config_from_dict(meta.get("config"))
    except ModelFileError as err:
        raise ModelFileError(f"{name}: {err}") from None
    return config, meta


def _is_uint(value) -> bool:
    return is_int(value) and value >= 0


def _load(path: Path, name: str) -> tuple[PacSegModel, bool]:
    """The model in ``path`` and whether it has a checksum; ``ModelFileError`` otherwise.

    Reads the 8-byte header length and the JSON header, checks the config and the tensors'
    byte ranges against each other, the size limits and the file's size (``_layout``), and
    only then reads the weights: a file refused for its size or layout costs at most its
    header (``MAX_HEADER_BYTES``) in reading and memory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{name}: is a folder, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{name}: is not a regular file (a pipe or device?), not a model file")
    if st.st_size > 8 + MAX_HEADER_BYTES + MAX_TENSOR_BYTES:
        raise ModelFileError(f"{name}: {st.st_size} bytes is over the size limit of a model file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = _header_length(_read_exactly(f, min(8, size), size, name), size, name)
        layout = _layout(_read_exactly(f, n, size, name), size, name)
        data = _read_exactly(f, layout.data_bytes, size, name)
        if f.read(1):
            raise ModelFileError(
                f"{name}: the file grew while it was read (beyond its {size} bytes); load it "
                "again once it is written"
            )
    return _weights(layout, memoryview(data), name)


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
    n = _header_length(file[:8], size, name)
    layout = _layout(file[8 : 8 + n], size, name)
    start = layout.data_start
    return _weights(layout, memoryview(file)[start : start + layout.data_bytes], name)


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


def _header_length(first: bytes, size: int, name: str) -> int:
    """The header length ``n`` from a file's first 8 bytes ``first`` (the whole file when
    shorter), checked against the file's ``size`` and the limits."""
    if size < 8:
        raise ModelFileError(
            f"{name}: {size} bytes is too short for a model file (empty or truncated)"
        )
    if size > 8 + MAX_HEADER_BYTES + MAX_TENSOR_BYTES:
        raise ModelFileError(f"{name}: {size} bytes is over the size limit of a model file")
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER_BYTES:
        raise ModelFileError(
            f"{name}: declares a {n}-byte header, over the {MAX_HEADER_BYTES}-byte limit; "
            "it is not a napari-pacseg model, or it is corrupted"
        )
    if 8 + n > size:
        raise ModelFileError(
            f"{name}: the header needs {n} bytes but the file ends after {size - 8}: truncated"
        )
    return n


def _layout(raw: bytes, size: int, name: str) -> _Layout:
    """The checked ``_Layout`` of a file of ``size`` bytes whose JSON header is ``raw``: the
    metadata and config, the tensors' names, dtypes, shapes and byte ranges (no overlap, no
    gap, within ``MAX_TENSOR_BYTES``), and a data section that ends exactly at the file's end
    (neither truncated nor followed by trailing bytes)."""
    header = _parse_json(raw, name, "the header")
    if not isinstance(header, dict):
        raise ModelFileError(f"{name}: the header is JSON {_kind(header)}, not an object")
    config, meta = _read_meta(name, header)
    try:
        model = PacSegModel(config)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, MemoryError) as err:
        raise ModelFileError(
            f"{name}: the model cannot be built from its config ({one_line(err, 120)})"
        ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{name}: tensors do not match the config: missing {short_repr(missing, 80)}, "
            f"unexpected {short_repr(unexpected, 80)}"
        )
    layout = []
    for tensor in sorted(entries):
        entry, shown = entries[tensor], short_repr(tensor)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFileError(
                f"{name}: tensor {shown} has a malformed header entry (it needs exactly "
                "dtype, shape and data_offsets)"
            )
        if entry["dtype"] != "F32":
            raise ModelFileError(
                f"{name}: tensor {shown} has dtype {short_repr(entry['dtype'])}; F32 expected"
            )
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise ModelFileError(
                f"{name}: tensor {shown} has shape {short_repr(shape)}: not a list of "
                "non-negative integers"
            )
        if tuple(shape) != expected[tensor]:
            raise ModelFileError(
                f"{name}: tensor {shown} has shape {short_repr(tuple(shape))} but the config needs {expected[tensor]}"
            )
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
            raise ModelFileError(
                f"{name}: tensor {shown} has data_offsets {short_repr(offsets)}: not a list "
                "of 2 non-negative integers [start, end]"
            )
        start, stop = offsets
        need = 4 * math.prod(expected[tensor])
        if stop - start != need:
            raise ModelFileError(
                f"{name}: tensor {shown} has bad data offsets {short_repr(offsets)}: its "
                f"shape needs {need} bytes"
            )
        layout.append((start, stop, tensor))
    layout.sort()
    end = 0
    for start, stop, tensor in layout:
        if start < end:
            raise ModelFileError(
                f"{name}: tensor {short_repr(tensor)} overlaps the tensor before it (data "
                f"offset {start} < {end}): corrupt"
            )
        if start > end:
            raise ModelFileError(
                f"{name}: {start - end} unused bytes before tensor {short_repr(tensor)} "
                "(a gap in the data): corrupt"
            )
        end = stop
    data_start = 8 + len(raw)
    if end > MAX_TENSOR_BYTES:
        raise ModelFileError(
            f"{name}: {end} bytes of weights, over the {MAX_TENSOR_BYTES}-byte limit"
        )
    if data_start + end > size:
        raise ModelFileError(
            f"{name}: the tensors need {end} bytes but the file holds {size - data_start} "
            "after the header: truncated"
        )
    if data_start + end < size:
        raise ModelFileError(
            f"{name}: {size - data_start - end} trailing bytes after the last tensor: corrupt "
            "(or not a file written by save_model)"
        )
    return _Layout(model, meta, expected, layout, data_start, end)


def _weights(layout: _Layout, view: memoryview, name: str) -> tuple[PacSegModel, bool]:
    """The model of ``layout`` with its weights from ``view`` (the data section, as long as
    ``layout.data_bytes``) and whether the file has a checksum, after the finiteness and
    checksum checks."""
    expected, meta = layout.shapes, layout.meta
    state, non_finite = {}, None
    for start, stop, tensor in layout.ranges:
        arr = np.frombuffer(view[start:stop], dtype="<f4").reshape(expected[tensor])
        if non_finite is None and not np.isfinite(arr).all():
            non_finite = tensor
        state[tensor] = torch.from_numpy(arr.astype(np.float32))  # a copy, native order
    checksum = meta.get("checksum")
    intact = checksum is None or checksum == model_checksum(
        meta, [(t, "F32", expected[t], view[a:b]) for a, b, t in layout.ranges]
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


# --- importing a plain PyTorch MLP -------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return one_line(lines[0], 200) if lines else type(err).__name__


def _checked_state(state, source: str) -> dict[str, torch.Tensor]:
    """``state`` as float32 CPU tensors, refusing what ``VoxelMLP.from_state_dict`` cannot
    take or should not: non-string keys, non-tensors, non-float or sparse tensors, empty or
    over-wide dimensions, too many layers, NaN/inf (after the float32 conversion)."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"import_torch_mlp: expected a state dict (name -> tensor), got {type(state).__name__}"
        )
    if not state:
        raise ValueError(
            f"import_torch_mlp: {source} holds an empty state dict (no Linear layers); save the "
            "model with torch.save(model.state_dict(), path)"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(
                f"import_torch_mlp: {source} has the key {short_repr(key)}, not a string; expected "
                "the state dict of stacked nn.Linear layers"
            )
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} in {source} is a {type(value).__name__}, not a "
                "tensor (a checkpoint? pass its model state dict, e.g. checkpoint['state_dict'])"
            )
        if value.layout != torch.strided or value.is_complex() or not value.is_floating_point():
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} is a {value.dtype} {value.layout} tensor; "
                "dense floating-point weights expected"
            )
        if value.device.type == "meta":
            raise ValueError(f"import_torch_mlp: {short_repr(key)} is a meta tensor (no data)")
        if value.ndim not in (1, 2) or not all(1 <= s <= MAX_WIDTH for s in value.shape):
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} has shape {tuple(value.shape)}; Linear weights "
                f"(2-D) and biases (1-D) of 1 to {MAX_WIDTH} features expected"
            )
        t = value.detach().to("cpu", torch.float32).clone()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"import_torch_mlp: {short_repr(key)} holds NaN or infinite values (in float32)"
            )
        out[key] = t
    layers = sum(t.ndim == 2 for t in out.values())
    if layers > MAX_LAYERS:
        raise ValueError(
            f"import_torch_mlp: {layers} Linear layers; at most {MAX_LAYERS} are supported"
        )
    return out


def import_torch_mlp(
    path_or_state_dict,
    *,
    features: FeatureSpec,
    classes,
    activation: str = "relu",
    in_channels: int = 1,
    spacing=(1.0, 1.0, 1.0),
    refine: RefineConfig | None = None,
) -> PacSegModel:
    """Turn a state dict of stacked ``nn.Linear`` layers into a ``PacSegModel``.

    Parameters
    ----------
    path_or_state_dict : str, Path or mapping
        A ``.pt``/``.pth`` file, read with ``torch.load(..., weights_only=True)`` only (a pickle
        that would run code is refused, never executed), or the state dict itself.
    features : FeatureSpec
        The features the MLP was trained on, in ``FeatureSpec.names()`` order per channel.
    classes : names or ``ClassInfo`` of the MLP's outputs, background first.

    Raises ``ValueError`` with a one-line reason for anything else: an empty or unreadable
    file, an empty state dict, entries that are not Linear weights, NaN/inf weights.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        source = _file_name(path)
        if path.suffix not in (".pt", ".pth"):
            raise ValueError(f"import_torch_mlp: expected a .pt or .pth file, got {source}")
        if path.is_dir():
            raise ValueError(f"import_torch_mlp: {source} is a folder, not a .pt file")
        if not path.is_file():
            raise ValueError(f"import_torch_mlp: {path}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"import_torch_mlp: {source} is empty (0 bytes)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"import_torch_mlp: {source} could not be loaded as plain tensors "
                f"(torch.load with weights_only=True refused it: {_first_line(err)}); "
                "save the model with torch.save(model.state_dict(), path)"
            ) from err
    else:
        state, source = path_or_state_dict, "the state dict"
    state = _checked_state(state, source)
    try:
        mlp = VoxelMLP.from_state_dict(state, activation=activation)
    except (ValueError, TypeError, RuntimeError, IndexError, KeyError) as err:
        reason = re.sub(r"^VoxelMLP(\.from_state_dict)?: ", "", _first_line(err))
        raise ValueError(f"import_torch_mlp: {reason}") from None
    infos = class_infos(classes, "import_torch_mlp")
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Iterable):
        raise ValueError(
            f"import_torch_mlp: spacing must be 3 numbers (z, y, x), got {short_repr(spacing)}"
        )
    spacing = tuple(spacing)
    if not all(
        isinstance(s, numbers.Real) and not isinstance(s, (bool, np.bool_)) for s in spacing
    ):
        raise ValueError(
            f"import_torch_mlp: spacing must be 3 numbers (z, y, x), got {short_repr(spacing)}"
        )
    widths = [mlp.layers[0].in_features] + [layer.out_features for layer in mlp.layers]
    config = ModelConfig(
        in_channels=in_channels,
        classes=infos,
        features=features,
        head=HeadConfig(tuple(widths[1:-1]), activation),
        refine=refine or RefineConfig(),
        spacing=tuple(float(s) for s in spacing),
        provenance={"source": "import_torch_mlp"},
    )
    if widths[0] != config.n_features:
        raise ValueError(
            f"import_torch_mlp: the MLP takes {widths[0]} inputs but the feature spec gives {config.n_features} "
            f"features per voxel ({in_channels} channel(s) x {features.names()})"
        )
    if widths[-1] != len(infos):
        raise ValueError(
            f"import_torch_mlp: the MLP has {widths[-1]} outputs but {len(infos)} classes were given"
        )
    model = PacSegModel(config)
    model.head.load_state_dict(mlp.state_dict())
    return model.eval()
