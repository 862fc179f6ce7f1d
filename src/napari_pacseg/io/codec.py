"""The JSON of a model file: the config as a JSON object and back, strict JSON parsing, the
``napari_pacseg`` metadata object and its checksum.

A model file's ``__metadata__`` holds, under ``META_KEY``, the JSON text of ``{"format":
"napari-pacseg-model", "version": ..., "written_by": ..., "config": {...}, "checksum":
"sha256:<64 hex digits>"}``. Reading it refuses anything that is not exactly what a config can
hold: unknown or missing keys, wrong JSON types (``3.0`` for an integer, ``true`` for a number),
non-finite or out-of-range numbers, duplicate keys, NaN, nesting deeper than ``MAX_JSON_DEPTH``.
Every refusal is a one-line ``ModelFileError``. Nothing here reads files or tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping

from napari_pacseg.checks import is_int, one_line, short_repr
from napari_pacseg.model.features import FeatureSpec
from napari_pacseg.model.network import (
    SPLIT_FIT_2D,
    ClassInfo,
    ContextConfig,
    HeadConfig,
    InstanceConfig,
    ModelConfig,
    RefineConfig,
)
from napari_pacseg.model.normalise import Normalisation

FORMAT = "napari-pacseg-model"
# 6: the config's "instances" hold "brightness": null (auto); 5: they name a boundary class
# (cells mode); 4: the config holds a "normalisation" (clip, training contrast); 3: a model of
# 2D images (``"ndim": 2`` in the config); 2: the metadata holds a checksum; 1: none (still
# read, with a warning). A model is written in the lowest version that holds it (without a
# normalisation: the version it came in; without a boundary class: no "boundary" key), so
# older releases keep reading it; a newer model in an older release is refused as "upgrade
# napari-pacseg" rather than misread.
FORMAT_VERSION = 6
META_KEY = "napari_pacseg"
MAX_JSON_DEPTH = 32  # our header and config nest 5 deep at most
MAX_JSON_INT = 1 << 53  # larger integers in the config are refused as out of range
_CHECKSUM_RE = re.compile(r"sha256:[0-9a-f]{64}")


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message says why and what to do."""


class ModelFileWarning(UserWarning):
    """A model file that loads but lacks a safeguard (a version 1 file has no checksum)."""


def json_kind(value) -> str:
    """How a message names the JSON type of ``value`` ("an object", "a list", "null", ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


# --- config <-> JSON ---------------------------------------------------------------------------


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-able dict of a config (tuples become lists); ``ndim`` only for a 2D model (its
    absence means 3, as in files written before 2D models existed)."""
    data = json.loads(json.dumps(dataclasses.asdict(config), allow_nan=False))
    if data["ndim"] == 3:
        del data["ndim"]
    if data["normalisation"] is None:  # a model from a file written before it: stays so
        del data["normalisation"]
    if data["instances"]["boundary"] is None:  # blobs mode: as written before cells mode
        del data["instances"]["boundary"]
    return data


def file_version(config: ModelConfig) -> int:
    """The format version a model file of ``config`` is written in: 6 with the brightness weight
    on auto (None), else 5 with a boundary class (cells mode), else 4 with a normalisation, else
    3 for a 2D model, else 2."""
    if config.instances.brightness is None:
        return 6
    if config.instances.boundary is not None:
        return 5
    if config.normalisation is not None:
        return 4
    return 3 if config.ndim == 2 else 2


def _int(value, where):
    """A JSON integer: not a float (``3.0``), not a boolean, at most ``MAX_JSON_INT``."""
    if not is_int(value):
        raise ModelFileError(
            f"model config: {where} must be an integer, got {json_kind(value)} {short_repr(value)}"
        )
    if abs(value) > MAX_JSON_INT:
        raise ModelFileError(f"model config: {where} = {short_repr(value)} is out of range")
    return value


def _float(value, where):
    """A JSON number (integer or not), finite, not a boolean; kept as written."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFileError(
            f"model config: {where} must be a number, got {json_kind(value)} {short_repr(value)}"
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
                f"model config: {where} must be {wanted}, got {json_kind(value)} {short_repr(value)}"
            )
        return value

    return check


_bool = _of_type(bool, "true or false")
_str = _of_type(str, "a string")
_list = _of_type(list, "a list")


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
            f"model config: {where} must be a JSON object, got {json_kind(data)} {short_repr(data)}"
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
    # A key a file lacks takes the field's default (a file written before the brightness
    # weight: auto), except the seeding fit of a 2D model, which takes the 2D one
    stored = data.get("instances")
    if config.ndim == 2 and not (isinstance(stored, dict) and "split_fit" in stored):
        # a 2D model written before the seeding fit takes up the one 2D models are made with
        config = dataclasses.replace(
            config, instances=dataclasses.replace(config.instances, split_fit=SPLIT_FIT_2D)
        )
    return config


def _provenance(value, where):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ModelFileError(f"model config: {where} must map strings to strings")
    return dict(value)


# --- strict JSON -------------------------------------------------------------------------------


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


def parse_json(raw, name: str, what: str):
    """``raw`` (bytes or str) as strict JSON: no duplicate keys, no NaN/Infinity, at most
    ``MAX_JSON_DEPTH`` deep. ``ModelFileError`` naming ``name`` (the file) and ``what`` (which
    JSON of it) otherwise."""
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


# --- the metadata and its checksum -------------------------------------------------------------


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
       float32, as in the file; any bytes-like object).

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


def read_metadata(name: str, header: dict) -> tuple[ModelConfig, dict]:
    """``(config, meta)`` from a model file's parsed ``header``: the ``napari_pacseg``
    metadata object (format, version, written_by, checksum, no other key) and the config it
    holds, checked; ``ModelFileError`` naming ``name`` (the file) otherwise. The checksum is
    only checked for its form here: it covers the weights, which are read later."""
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
    meta = parse_json(meta_block[META_KEY], name, f"the '{META_KEY}' metadata")
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
