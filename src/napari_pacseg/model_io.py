"""The model file: ONE ``.safetensors`` file, the config as JSON in its metadata.

Layout (the safetensors format): 8 bytes little-endian header length, a JSON header mapping
tensor names to ``{"dtype", "shape", "data_offsets"}`` plus ``"__metadata__"``, then the raw
little-endian float32 data. Our metadata key ``"napari_pacseg"`` holds
``{"format": "napari-pacseg-model", "version": 1, "config": {...}}``.

Loading parses and checks everything (sizes, offsets, names, shapes, finiteness, the config)
before building anything, and never unpickles: the file is only bytes and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pacseg_kernels import VoxelMLP

from .features import FeatureSpec
from .model import ClassInfo, ContextConfig, HeadConfig, ModelConfig, PacSegModel, RefineConfig

FORMAT = "napari-pacseg-model"
FORMAT_VERSION = 1
META_KEY = "napari_pacseg"
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 30

DEFAULT_COLORS = [
    (0.0, 0.0, 0.0, 0.0),
    (1.0, 0.2, 0.2, 1.0),
    (0.2, 0.8, 0.2, 1.0),
    (0.3, 0.5, 1.0, 1.0),
    (1.0, 0.8, 0.1, 1.0),
    (0.8, 0.3, 1.0, 1.0),
    (0.1, 0.9, 0.9, 1.0),
]


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message says why and what to do."""


# --- config <-> JSON ---------------------------------------------------------------------------


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _obj(cls, data, where: str, convert=None) -> object:
    if not isinstance(data, dict):
        raise ModelFileError(
            f"model config: {where} must be a JSON object, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ModelFileError(f"model config: unknown keys in {where}: {unknown}")
    missing = [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in data
    ]  # fmt: skip
    if missing:
        raise ModelFileError(f"model config: {where} lacks required keys {missing}")
    kwargs = {k: (convert or {}).get(k, _plain)(v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"model config: {where}: {err}") from err


def _plain(value, where):
    if isinstance(value, list):
        return tuple(_plain(v, where) for v in value)
    if isinstance(value, dict):
        raise ModelFileError(f"model config: {where} must not be an object")
    return value


def _strict_types(value, kinds, where):
    """``value`` when it is one of ``kinds`` (bool is not an int here)."""
    if isinstance(value, bool) and bool not in kinds:
        raise ModelFileError(f"model config: {where} must be {kinds}, got a boolean")
    if not isinstance(value, kinds):
        raise ModelFileError(
            f"model config: {where} has type {type(value).__name__}, expected {kinds}"
        )
    return value


def _ints(value, where):
    return tuple(_strict_types(v, (int,), where) for v in _plain(value, where))


def config_from_dict(data) -> ModelConfig:
    """Rebuild a ``ModelConfig``, refusing unknown or missing keys and wrong types."""
    convert = {
        "in_channels": lambda v, w: _strict_types(v, (int,), w),
        "features": lambda v, w: _obj(
            FeatureSpec, v, w, {"include_raw": lambda x, ww: _strict_types(x, (bool,), ww)}
        ),
        "head": lambda v, w: _obj(HeadConfig, v, w, {"hidden": _ints}),
        "context": lambda v, w: (
            None if v is None else _obj(ContextConfig, v, w, {"channels": _ints})
        ),
        "refine": lambda v, w: _obj(RefineConfig, v, w),
        "classes": lambda v, w: tuple(
            _obj(ClassInfo, c, f"{w}[{i}]") for i, c in enumerate(_list(v, w))
        ),
        "provenance": lambda v, w: _provenance(v, w),
    }
    return _obj(ModelConfig, data, "config", convert)


def _list(value, where):
    if not isinstance(value, list):
        raise ModelFileError(f"model config: {where} must be a list, got {type(value).__name__}")
    return value


def _provenance(value, where):
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ModelFileError(f"model config: {where} must map strings to strings")
    return dict(value)


# --- writing -----------------------------------------------------------------------------------


def save_model(model: PacSegModel, path) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically: a temporary file in the
    same folder, flushed, then renamed over the target. Returns the path."""
    from . import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model: the file name must end in .safetensors, got {path.name!r}")
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "written_by": f"napari-pacseg {__version__}",
            "config": config_to_dict(model.config)}  # fmt: skip
    header: dict = {"__metadata__": {META_KEY: json.dumps(meta)}}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].numel() * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in sorted(tensors):
                f.write(tensors[name].numpy().astype("<f4", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --- reading -----------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict, int, int]:
    size = path.stat().st_size
    if size < 8:
        raise ModelFileError(
            f"{path.name}: {size} bytes is too short for a model file (empty or truncated)"
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise ModelFileError(
                f"{path.name}: declares a {n}-byte header, over the {MAX_HEADER_BYTES}-byte limit; "
                "it is not a napari-pacseg model, or it is corrupted"
            )
        if 8 + n > size:
            raise ModelFileError(
                f"{path.name}: the header needs {n} bytes but the file ends after {size - 8}: truncated"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path.name}: the header is not valid JSON ({err}); not a safetensors model file"
        ) from err
    if not isinstance(header, dict):
        raise ModelFileError(
            f"{path.name}: the header is JSON {type(header).__name__}, not an object"
        )
    return header, 8 + n, size


def _read_meta(path: Path, header: dict) -> ModelConfig:
    meta_block = header.get("__metadata__")
    if not isinstance(meta_block, dict) or META_KEY not in meta_block:
        raise ModelFileError(
            f"{path.name}: a safetensors file without '{META_KEY}' metadata: not a napari-pacseg model "
            "(a plain PyTorch MLP can be imported with import_torch_mlp)"
        )
    try:
        meta = json.loads(meta_block[META_KEY])
    except (TypeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path.name}: the '{META_KEY}' metadata is not valid JSON ({err})"
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path.name}: metadata format is not {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{path.name}: metadata version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name}: written in model format version {version} by {meta.get('written_by', 'a newer release')}; "
            f"this napari-pacseg reads up to version {FORMAT_VERSION}: upgrade napari-pacseg"
        )
    unknown = sorted(set(meta) - {"format", "version", "written_by", "config"})
    if unknown:
        raise ModelFileError(f"{path.name}: unknown metadata keys {unknown}")
    return config_from_dict(meta.get("config"))


def load_model(path, device="cpu") -> PacSegModel:
    """Load a model written by ``save_model``, checking everything before building it.

    Raises ``ModelFileError`` (a ``ValueError``) naming the problem: not a file of ours, newer
    format version, unknown or missing config keys, tensors missing, unexpected, misshapen,
    out of bounds or not finite, sizes over the limits. Nothing is ever unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    header, data_start, size = _read_header(path)
    config = _read_meta(path, header)
    model = PacSegModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    missing, unexpected = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path.name}: tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    total = 0
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFileError(f"{path.name}: tensor {name!r} has a malformed header entry")
        if entry["dtype"] != "F32":
            raise ModelFileError(
                f"{path.name}: tensor {name!r} has dtype {entry['dtype']!r}; F32 expected"
            )
        if tuple(entry["shape"]) != expected[name]:
            raise ModelFileError(
                f"{path.name}: tensor {name!r} has shape {tuple(entry['shape'])} but the config needs {expected[name]}"
            )
        start, stop = entry["data_offsets"]
        if stop - start != 4 * math.prod(expected[name]) or start < 0 or data_start + stop > size:
            raise ModelFileError(
                f"{path.name}: tensor {name!r} has bad data offsets {entry['data_offsets']} (truncated?)"
            )
        total += stop - start
    if total > MAX_TENSOR_BYTES:
        raise ModelFileError(
            f"{path.name}: {total} bytes of weights, over the {MAX_TENSOR_BYTES}-byte limit"
        )
    state = {}
    with open(path, "rb") as f:
        for name, entry in entries.items():
            start, stop = entry["data_offsets"]
            f.seek(data_start + start)
            arr = np.frombuffer(f.read(stop - start), dtype="<f4").reshape(expected[name])
            if not np.isfinite(arr).all():
                raise ModelFileError(f"{path.name}: tensor {name!r} holds NaN or infinite values")
            state[name] = torch.from_numpy(arr.astype(np.float32))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# --- importing a plain PyTorch MLP -------------------------------------------------------------


def _class_infos(classes) -> tuple[ClassInfo, ...]:
    infos = []
    for i, c in enumerate(classes):
        if isinstance(c, ClassInfo):
            infos.append(c)
        else:
            infos.append(
                ClassInfo(
                    str(c), DEFAULT_COLORS[i % len(DEFAULT_COLORS)] if i else DEFAULT_COLORS[0]
                )
            )
    return tuple(infos)


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
    """
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict)
        if path.suffix not in (".pt", ".pth"):
            raise ValueError(f"import_torch_mlp: expected a .pt or .pth file, got {path.name!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"import_torch_mlp: {path.name} could not be loaded as plain tensors "
                f"(torch.load with weights_only=True refused it: {str(err).splitlines()[0][:200]}); "
                "save the model with torch.save(model.state_dict(), path)"
            ) from err
    else:
        state = path_or_state_dict
    if not isinstance(state, Mapping):
        raise ValueError(
            f"import_torch_mlp: expected a state dict (name -> tensor), got {type(state).__name__}"
        )
    mlp = VoxelMLP.from_state_dict(state, activation=activation)
    infos = _class_infos(classes)
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
