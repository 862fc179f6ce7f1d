"""The model file's container: the safetensors library writes exactly the bytes of the layout
``container.encode`` documents (so files stay byte-compatible across releases), the bundled
demo model re-saved is its own file, and a header the library would refuse after our checks
(a lone surrogate in ``__metadata__``) is refused by our checks, naming the file."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch

from napari_pacseg import ClassInfo, FeatureSpec, HeadConfig, ModelConfig, PacSegModel
from napari_pacseg.io.model_file import (
    META_KEY,
    ModelFileError,
    load_model,
    model_bytes,
    model_from_bytes,
)
from napari_pacseg.sample import DEMO_MODEL_FILE


def _model(ndim: int = 3) -> PacSegModel:
    torch.manual_seed(34)
    config = ModelConfig(
        in_channels=2,
        classes=(
            ClassInfo("background", (0, 0, 0, 0)),
            ClassInfo('Zellkern ü 核 "q" \\ /', (1.0, 0.2, 0.2, 1.0)),
            ClassInfo("x", (0, 1, 0, 1)),
        ),
        features=FeatureSpec(sigmas=(1.0, 2.0)),
        head=HeadConfig((8, 4)),
        spacing=(1.5, 0.25, 0.25),
        ndim=ndim,
        provenance={"k": 'v\u00e9 \\ quote"'},
    )
    return PacSegModel(config).eval()


def _documented_layout(raw: bytes) -> bytes:
    """``raw`` rebuilt by hand from its parts as ``container.encode`` documents the layout:
    compact JSON, ``__metadata__`` first, tensors in name order with their keys in the order
    dtype, shape, data_offsets, space padding to 8 bytes, the data in the same order."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    rebuilt: dict = {"__metadata__": header.pop("__metadata__")}
    parts, offset = [], 0
    for name in sorted(header):
        start, stop = header[name]["data_offsets"]
        rebuilt[name] = {
            "dtype": "F32",
            "shape": header[name]["shape"],
            "data_offsets": [offset, offset + stop - start],
        }
        parts.append(data[start:stop])
        offset += stop - start
    text = json.dumps(rebuilt, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(parts)


@pytest.mark.parametrize("ndim", [3, 2])
def test_the_library_writes_the_documented_layout(ndim):
    model = _model(ndim)
    raw = model_bytes(model)
    assert raw == _documented_layout(raw)
    loaded = model_from_bytes(raw)
    assert loaded.config == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_the_demo_model_resaved_is_its_own_file():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(DEMO_MODEL_FILE)
    assert model_bytes(model) == DEMO_MODEL_FILE.read_bytes()


def test_a_lone_surrogate_in_the_metadata_is_refused_by_our_checks():
    raw = model_bytes(_model())
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode().rstrip()
    text = text.replace('{"__metadata__":{', '{"__metadata__":{"other":"\\ud800",', 1)
    assert f'"{META_KEY}"' in text
    header = text.encode() + b" " * (-len(text) % 8)
    bad = struct.pack("<Q", len(header)) + header + raw[8 + n :]
    with pytest.raises(ModelFileError, match=r"^s\.safetensors: .*lone surrogate") as info:
        model_from_bytes(bad, "s.safetensors")
    assert "failed unexpectedly" not in str(info.value)
