"""A seeded corpus of damaged and hostile model files (issue 15, items 5, 8, 11, 12).

Every mutant of a small valid model file must either raise ``ModelFileError`` with one
printable ASCII line that names the file (no 300-digit numbers, no raw control characters),
or, when the mutation is benign (e.g. JSON whitespace), load a model equal to the original.
No other exception type may escape ``load_model``. Plus the checksum (what it covers, the
demo model has one, a version 1 file without one warns), ``save_model`` refusing non-finite
weights and ``import_torch_mlp`` refusing NaN and odd ``.pt`` files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from napari_pacseg import (
    ClassInfo,
    ContextConfig,
    FeatureSpec,
    HeadConfig,
    ModelConfig,
    ModelFileError,
    PacSegModel,
    RefineConfig,
    import_torch_mlp,
    load_model,
    save_model,
)
from napari_pacseg.io.model_file import META_KEY, ModelFileWarning, model_checksum
from napari_pacseg.sample import DEMO_MODEL_FILE

SEED = 15


@dataclass(frozen=True)
class Good:
    raw: bytes
    n: int
    header: dict
    meta: dict
    state: dict
    config: ModelConfig

    @property
    def data(self) -> bytes:
        return self.raw[8 + self.n :]

    def entry(self, name: str) -> dict:
        return self.header[name]


def _tiny_model() -> PacSegModel:
    torch.manual_seed(SEED)
    config = ModelConfig(
        in_channels=1,
        classes=(ClassInfo("background", (0, 0, 0, 0)), ClassInfo("cell", (1.0, 0.2, 0.2, 1.0))),
        features=FeatureSpec(kinds=("gaussian", "laplacian"), sigmas=(1.0, 2.5)),
        head=HeadConfig((6,)),
        context=ContextConfig((2,), kernel_size=1, pool=2),
        refine=RefineConfig(),
        spacing=(2.0, 0.5, 0.5),
        provenance={"made": "corpus"},
    )
    return PacSegModel(config).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    model = _tiny_model()
    path = save_model(model, tmp_path_factory.mktemp("good") / "good.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"][META_KEY])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return Good(raw, n, header, meta, state, model.config)


# --- building mutants ----------------------------------------------------------------------------

RAW = "@@RAW@@"  # a string value replaced by raw JSON text (what json.dumps cannot write)


def _pack(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _header_text(header: dict, raw_value: str | None = None) -> str:
    text = json.dumps(header)
    return text if raw_value is None else text.replace(json.dumps(RAW), raw_value, 1)


def header_edit(mutate, raw_value=None):
    """A mutant whose header (a deep copy) ``mutate`` changed."""

    def make(g: Good) -> bytes:
        header = copy.deepcopy(g.header)
        mutate(g, header)
        return _pack(_header_text(header, raw_value), g.data)

    return make


def header_text_edit(edit):
    def make(g: Good) -> bytes:
        return _pack(edit(g, json.dumps(g.header)), g.data)

    return make


def meta_edit(mutate, raw_value=None):
    """A mutant whose ``napari_pacseg`` metadata object (a deep copy) ``mutate`` changed; the
    stored checksum stays as it was."""

    def make(g: Good) -> bytes:
        meta = copy.deepcopy(g.meta)
        mutate(meta)
        text = json.dumps(meta)
        if raw_value is not None:
            text = text.replace(json.dumps(RAW), raw_value, 1)
        header = copy.deepcopy(g.header)
        header["__metadata__"][META_KEY] = text
        return _pack(json.dumps(header), g.data)

    return make


def meta_text_edit(edit):
    def make(g: Good) -> bytes:
        header = copy.deepcopy(g.header)
        header["__metadata__"][META_KEY] = edit(json.dumps(g.meta))
        return _pack(json.dumps(header), g.data)

    return make


def set_in(path, value):
    def mutate(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return mutate


def drop_in(path):
    def mutate(obj):
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return mutate


def config_set(path, value, raw_value=None):
    return meta_edit(set_in(("config", *path), value), raw_value)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


ANY = ".*"  # must raise ModelFileError, any reason
CASES: list[
    tuple[str, object, str | None]
] = []  # (id, make(good) -> bytes, regex or None: benign allowed)


def case(name, make, expect=ANY):
    CASES.append((name, make, expect))


rng = np.random.default_rng(SEED)

# A control: the same content re-serialised with other JSON spacing and key order is benign.
case("control-reserialised", meta_edit(lambda m: None), None)
case("control-header-reordered", header_text_edit(lambda g, t: json.dumps(dict(sorted(json.loads(t).items(), reverse=True)))), None)  # fmt: skip

# Random byte changes in the header (length prefix included) and in the tensor data.
for i in range(100):
    where, mask = rng.random(), int(rng.integers(1, 256))

    def flip_header(g, where=where, mask=mask):
        data = bytearray(g.raw)
        data[int(where * (8 + g.n))] ^= mask
        return bytes(data)

    case(f"header-byte-{i}", flip_header, None)
for i in range(60):
    where, mask = rng.random(), int(rng.integers(1, 256))

    def flip_data(g, where=where, mask=mask):
        data = bytearray(g.raw)
        data[8 + g.n + int(where * len(g.data))] ^= mask
        return bytes(data)

    case(f"data-byte-{i}", flip_data, "checksum mismatch")
for i in range(10):
    count = int(rng.integers(2, 40))
    seed = int(rng.integers(1 << 31))

    def flip_many(g, count=count, seed=seed):
        r = np.random.default_rng(seed)
        data = bytearray(g.raw)
        for pos in r.choice(len(g.raw), count, replace=False):
            data[pos] ^= int(r.integers(1, 256))
        return bytes(data)

    case(f"bytes-anywhere-{i}", flip_many)

# Truncations at many lengths, and bytes appended.
for i, frac in enumerate([*rng.random(30), 0.0]):
    case(
        f"truncated-random-{i}",
        lambda g, f=frac: g.raw[: int(f * len(g.raw))],
        "truncated|too short",
    )
for name, cut in {"1": 1, "7": 7, "8": 8, "9": 9}.items():
    case(f"truncated-to-{name}", lambda g, c=cut: g.raw[:c], "truncated|too short")
for name, cut in {"header-1": -1, "header": 0, "header+1": 1, "header+4": 4}.items():
    case(f"truncated-at-{name}", lambda g, c=cut: g.raw[: 8 + g.n + c], "truncated|not valid JSON")
for k in (1, 3, 4, 100):
    case(f"truncated-last-{k}", lambda g, k=k: g.raw[:-k], "truncated")
for name, tail in {"nul": b"\0", "space": b" ", "8 bytes": b"\0" * 8, "a float": b"\0\0\x80?", "json": b"{}"}.items():  # fmt: skip
    case(f"trailing-{name}", lambda g, t=tail: g.raw + t, "trailing bytes")

# Header-length lies.
for delta in (-64, -9, -8, -7, -1, 1, 7, 8, 9, 64, 4096):
    case(f"header-length{delta:+d}", lambda g, d=delta: struct.pack("<Q", g.n + d) + g.raw[8:])
for value in (0, 1, 2**20 + 1, 2**32, 2**63, 2**64 - 1):
    case(f"header-length={value}", lambda g, v=value: struct.pack("<Q", v) + g.raw[8:])

# JSON type, shape and offset lies in the tensor entries.
W, B = "head.layers.0.weight", "context.enc.0.bias"  # shapes (6, 7) and (2,)


def entry_set(tensor, key, value, raw_value=None):
    return header_edit(lambda g, h: h[tensor].__setitem__(key, value), raw_value)


def offsets(fn):
    """``data_offsets`` computed from the tensor's true ones."""
    return lambda g, h, t: h[t].__setitem__("data_offsets", fn(g, *g.entry(t)["data_offsets"]))


for tensor in (W, B):
    for name, value in {"F64": "F64", "f32": "f32", "null": None, "1": 1, "list": ["F32"]}.items():
        case(f"dtype-{name}-{tensor}", entry_set(tensor, "dtype", value), "dtype")
    shape = list(_tiny_model().state_dict()[tensor].shape)
    shape_lies = {
        "int 64": 64, "string": "64", "null": None, "empty": [], "object": {"0": 6},
        "negative": [-x for x in shape], "floats": [float(x) for x in shape],
        "bools": [True] * len(shape), "nested": [shape], "one more": [*shape, 1],
        "10^300": [10**300] * len(shape), "2^63": [2**63] * len(shape), "zero": [0] * len(shape),
        "transposed": shape[::-1] if len(shape) > 1 else [1, *shape],
    }  # fmt: skip
    for name, value in shape_lies.items():
        case(f"shape-{name}-{tensor}", entry_set(tensor, "shape", value), "shape")
    offset_lies = {
        "[256]": lambda g, a, b: [256], "[]": lambda g, a, b: [], "[start]": lambda g, a, b: [a],
        "3 items": lambda g, a, b: [a, b, b], "string": lambda g, a, b: f"{a},{b}",
        "null": lambda g, a, b: None, "object": lambda g, a, b: {"start": a, "end": b},
        "negative": lambda g, a, b: [a - b - 4, -4], "floats": lambda g, a, b: [a + 0.0, b + 0.0],
        "bools": lambda g, a, b: [False, True], "reversed": lambda g, a, b: [b, a],
        "shifted +4": lambda g, a, b: [a + 4, b + 4], "shifted -4": lambda g, a, b: [a - 4, b - 4],
        "past the end": lambda g, a, b: [len(g.data), len(g.data) + b - a],
        "10^300": lambda g, a, b: [10**300, 10**300 + b - a], "2^64": lambda g, a, b: [2**64, 2**64 + b - a],
        "too long": lambda g, a, b: [a, b + 4], "too short": lambda g, a, b: [a, b - 4],
        "at 0": lambda g, a, b: [0, b - a],
    }  # fmt: skip
    for name, fn in offset_lies.items():
        case(
            f"offsets-{name}-{tensor}",
            header_edit(lambda g, h, t=tensor, fn=fn: offsets(fn)(g, h, t)),
        )
    for name, value in {"a list": [], "a string": "F32", "null": None, "a number": 3}.items():
        case(f"entry-is-{name}-{tensor}", header_edit(lambda g, h, t=tensor, v=value: h.__setitem__(t, v)), "malformed")  # fmt: skip
    for key in ("dtype", "shape", "data_offsets"):
        case(f"entry-without-{key}-{tensor}", header_edit(lambda g, h, t=tensor, k=key: h[t].pop(k)), "malformed")  # fmt: skip
    case(f"entry-extra-key-{tensor}", header_edit(lambda g, h, t=tensor: h[t].update(crc=0)), "malformed")  # fmt: skip
    case(f"missing-tensor-{tensor}", header_edit(lambda g, h, t=tensor: h.pop(t)), "missing")
    case(f"offsets-NaN-{tensor}", entry_set(tensor, "data_offsets", RAW, "[NaN, 8]"), "NaN")
    case(f"shape-nested-5000-{tensor}", entry_set(tensor, "shape", RAW, nested(5000)), "nested")


def swap_offsets(g, h, a, b):
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


case("offsets-swapped-same-size", header_edit(lambda g, h: swap_offsets(g, h, "context.enc.0.bias", "context.dec.0.bias")), "checksum mismatch")  # fmt: skip
case("offsets-swapped-other-size", header_edit(lambda g, h: swap_offsets(g, h, W, B)), "offsets|overlap|unused")  # fmt: skip
case("offsets-overlapping", header_edit(lambda g, h: h["head.layers.0.bias"].update(data_offsets=[g.entry("head.layers.1.weight")["data_offsets"][0], g.entry("head.layers.1.weight")["data_offsets"][0] + 24])), "overlap|unused")  # fmt: skip
case("extra-tensor", header_edit(lambda g, h: h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})), "unexpected")  # fmt: skip
case("header-is-a-list", header_text_edit(lambda g, t: "[" + t + "]"), "not an object")
case("header-is-a-string", header_text_edit(lambda g, t: json.dumps(t)), "not an object")
case("header-nested-5000", header_edit(lambda g, h: h.update(x=RAW), nested(5000)), "nested")
case("header-nested-100", header_edit(lambda g, h: h.update(x=RAW), nested(100)), "nested")
case("header-duplicate-tensor", header_text_edit(lambda g, t: "{" + json.dumps(W) + ":" + json.dumps(g.header[W]) + "," + t[1:]), "duplicate key")  # fmt: skip
case("header-duplicate-metadata", header_text_edit(lambda g, t: '{"__metadata__":{"a":"b"},' + t[1:]), "duplicate key")  # fmt: skip
case("header-not-utf8", header_text_edit(lambda g, t: t.replace("cell", "c\udcffll")), "not valid JSON")  # fmt: skip
case("header-bare-surrogate-escape", header_edit(lambda g, h: h.update(x=RAW), '"\\ud800"'), "unexpected")  # fmt: skip
case("header-huge-number", header_edit(lambda g, h: h.update(x=RAW), "9" * 5000), "not valid JSON")  # fmt: skip
case("metadata-missing", header_edit(lambda g, h: h.pop("__metadata__")), "without 'napari_pacseg'")  # fmt: skip
case("metadata-a-list", header_edit(lambda g, h: h.update(__metadata__=[])), "without 'napari_pacseg'")  # fmt: skip
case("metadata-value-not-string", header_edit(lambda g, h: h["__metadata__"].update(other=5)), "must be strings")  # fmt: skip
case("metadata-ours-not-string", header_edit(lambda g, h: h["__metadata__"].update({META_KEY: g.meta})), "must be strings")  # fmt: skip

# The napari_pacseg metadata object.
meta_lies = {
    "version 0": set_in(("version",), 0), "version -1": set_in(("version",), -1),
    "version 2.0": set_in(("version",), 2.0), "version string": set_in(("version",), "2"),
    "version true": set_in(("version",), True), "version null": set_in(("version",), None),
    "version 3": set_in(("version",), 3), "version 10^300": set_in(("version",), 10**300),
    "version 1": set_in(("version",), 1), "no version": drop_in(("version",)),
    "format": set_in(("format",), "other"), "no format": drop_in(("format",)),
    "written_by number": set_in(("written_by",), 5), "written_by": set_in(("written_by",), "x"),
    "unknown key": set_in(("colour",), "red"), "no config": drop_in(("config",)),
    "config a list": set_in(("config",), []), "config null": set_in(("config",), None),
    "no checksum": drop_in(("checksum",)), "checksum null": set_in(("checksum",), None),
    "checksum number": set_in(("checksum",), 5), "checksum empty": set_in(("checksum",), ""),
    "checksum md5": set_in(("checksum",), "md5:" + "0" * 32),
}  # fmt: skip
for name, mutate in meta_lies.items():
    case(f"meta-{name}", meta_edit(mutate))
for i, pos in enumerate(rng.choice(64, 6, replace=False)):

    def other_digit(m, pos=int(pos)):
        digits = m["checksum"][7:]
        swap = "0" if digits[pos] != "0" else "1"
        m["checksum"] = "sha256:" + digits[:pos] + swap + digits[pos + 1 :]

    case(f"meta-checksum-digit-{i}", meta_edit(other_digit), "checksum mismatch")
case("meta-checksum-upper", meta_edit(lambda m: m.update(checksum=m["checksum"].upper())), "checksum")  # fmt: skip
case("meta-checksum-no-prefix", meta_edit(lambda m: m.update(checksum=m["checksum"][7:])), "checksum")  # fmt: skip
case("meta-not-json", meta_text_edit(lambda t: t[:-1]), "not valid JSON")
case("meta-a-list", meta_text_edit(lambda t: "[" + t + "]"), "format is not")
case("meta-duplicate-version", meta_text_edit(lambda t: '{"version": 1, ' + t[1:]), "duplicate key")
case("meta-duplicate-config-key", meta_text_edit(lambda t: t.replace('"in_channels": 1', '"in_channels": 1, "in_channels": 1', 1)), "duplicate key")  # fmt: skip
case("meta-nested-5000", config_set(("provenance",), RAW, nested(5000)), "nested")
case("meta-nested-100", config_set(("provenance",), RAW, nested(100)), "nested")
case("meta-nested-20", config_set(("head", "hidden"), RAW, nested(20, "6")), "integer")
case("meta-infinity", config_set(("refine", "compat"), RAW, "Infinity"), "not a JSON number")
case("meta-huge-number", config_set(("refine", "compat"), RAW, "1" * 5000), "too many digits")

# Config values: JSON type lies and absurd values for every int and float field.
INT_FIELDS = [("in_channels",), ("head", "hidden", 0), ("context", "channels", 0),
              ("context", "kernel_size"), ("context", "pool"), ("refine", "iterations"),
              ("refine", "kernel_size"), ("refine", "dilation")]  # fmt: skip
FLOAT_FIELDS = [("features", "sigmas", 0), ("spacing", 1), ("refine", "compat"),
                ("refine", "guide_sigma"), ("refine", "temperature"), ("refine", "spatial_sigma"),
                ("classes", 1, "color", 0)]  # fmt: skip
INT_LIES = {"3.0": 3.0, "true": True, "string": "3", "null": None, "10^300": 10**300, "-1": -1,
            "0": 0, "list": [3], "object": {"a": 1}, "2^62": 2**62}  # fmt: skip
FLOAT_LIES = {"string": "1", "true": True, "null": None, "-1": -1.0, "0": 0, "10^300": 10**300,
              "1e300": 1e300, "list": [1.0], "object": {}, "1e999": RAW, "NaN": RAW,
              "-1e-300": -1e-300}  # fmt: skip
RAW_TEXT = {"1e999": "1e999", "NaN": "NaN"}
for path in INT_FIELDS:
    for name, value in INT_LIES.items():
        case(f"config-{'.'.join(map(str, path))}={name}", config_set(path, value))
for path in FLOAT_FIELDS:
    for name, value in FLOAT_LIES.items():
        case(f"config-{'.'.join(map(str, path))}={name}", config_set(path, value, RAW_TEXT.get(name)))  # fmt: skip

config_lies = {
    "hidden 0": (("head", "hidden"), 0, "must be a list"),
    "hidden string": (("head", "hidden"), "64", "must be a list"),
    "hidden nested": (("head", "hidden"), [[64]], "integer"),
    "hidden huge": (("head", "hidden"), [100000], "hidden must be"),
    "hidden 20 layers": (("head", "hidden"), [4] * 20, "hidden must be"),
    "hidden empty": (("head", "hidden"), [], "tensors do not match"),
    "kernel_size 3.0": (("context", "kernel_size"), 3.0, "must be an integer"),
    "kernel_size 3": (("context", "kernel_size"), 3, "has shape"),
    "context null": (("context",), None, "tensors do not match|checksum mismatch"),
    "context a list": (("context",), [], "JSON object"),
    "refine null": (("refine",), None, "JSON object"),
    "activation": (("head", "activation"), "evil", "activation"),
    "activation number": (("head", "activation"), 5, "string"),
    "kinds unknown": (("features", "kinds"), ["bogus"], "unknown feature kinds"),
    "kinds a string": (("features", "kinds"), "gaussian", "must be a list"),
    "kinds numbers": (("features", "kinds"), [1], "string"),
    "include_raw 1": (("features", "include_raw"), 1, "true or false"),
    "include_raw string": (("features", "include_raw"), "yes", "true or false"),
    "sigmas empty": (("features", "sigmas"), [], "sigma"),
    "sigma 1000 voxels": (("features", "sigmas"), [1.0, 500.0], "voxels"),
    "spacing 2": (("spacing",), [1.0, 1.0], "list of 3"),
    "spacing string": (("spacing",), "111", "must be a list"),
    "spacing zero": (("spacing",), [0, 1, 1], "spacing"),
    "spacing tiny": (("spacing",), [1e-300, 1, 1], "voxels"),
    "spacing huge": (("spacing",), [10**300, 1, 1], "range"),
    "classes empty": (("classes",), [], "classes"),
    "classes one": (("classes",), [{"name": "bg", "color": [0, 0, 0, 0]}], "classes"),
    "classes 300": (("classes",), [{"name": f"c{i}", "color": [0, 0, 0, 0]} for i in range(300)], "classes"),
    "classes a dict": (("classes",), {"name": "bg"}, "must be a list"),
    "class a string": (("classes", 1), "cell", "JSON object"),
    "name surrogate": (("classes", 1, "name"), "\ud800", "control or invisible"),
    "name ansi": (("classes", 1, "name"), "\x1b[31mred\x1b[0m", "control or invisible"),
    "name newline": (("classes", 1, "name"), "two\nlines", "control or invisible"),
    "name bidi": (("classes", 1, "name"), "\u202eevil", "control or invisible"),
    "name empty": (("classes", 1, "name"), "", "name must be"),
    "name long": (("classes", 1, "name"), "n" * 101, "name must be"),
    "name number": (("classes", 1, "name"), 7, "string"),
    "name changed": (("classes", 1, "name"), "cells", "checksum mismatch"),
    "color 2": (("classes", 1, "color"), [2, 0, 0, 1], "color"),
    "color 3": (("classes", 1, "color"), [0, 0, 0], "list of 4"),
    "color string": (("classes", 1, "color"), "red", "must be a list"),
    "provenance list": (("provenance",), [], "strings to strings"),
    "provenance number": (("provenance",), {"a": 1}, "strings to strings"),
    "provenance ansi": (("provenance",), {"a": "\x1b[2J"}, "printable"),
    "provenance changed": (("provenance", "made"), "elsewhere", "checksum mismatch"),
    "unknown key": (("colour",), "red", r"unknown keys in config: \['colour'\]"),
    "unknown head key": (("head", "dropout"), 0.5, "unknown keys in config.head"),
    "guide_sigma in range": (("refine", "guide_sigma"), 0.2, "checksum mismatch"),
    "iterations in range": (("refine", "iterations"), 6, "checksum mismatch"),
}  # fmt: skip
for name, (path, value, expect) in config_lies.items():
    case(f"config-{name}", config_set(path, value), expect)
for key in ("in_channels", "classes"):
    case(f"config-without-{key}", meta_edit(drop_in(("config", key))), "lacks required keys")


# A flipped digit of a sigma or of the spacing in the JSON text: a valid config, another model.
def digit_flip(pattern: str, index: int, digit: str):
    def edit(text: str) -> str:
        match = re.search(pattern, text)
        pos = match.start(1) + index
        return text[:pos] + digit + text[pos + 1 :]

    return meta_text_edit(edit)


for label, pattern in {"sigma": r'"sigmas": \[(1\.0, 2\.5)\]', "spacing": r'"spacing": \[(2\.0, 0\.5, 0\.5)\]'}.items():  # fmt: skip
    for index in (0, 2, 5, 7) if label == "sigma" else (0, 5, 10):
        for digit in "0123456789":
            case(f"{label}-digit-{index}-{digit}", digit_flip(pattern, index, digit), None)


def test_corpus_size():
    assert len(CASES) >= 300
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mutant_is_refused_or_harmless(good, tmp_path, make, expect):
    data = make(good)
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(data)
    try:
        model = load_model(path)
    except ModelFileError as err:
        message = str(err)
        assert path.name in message, message
        assert message.isascii() and message.isprintable(), ascii(message)
        assert len(message) < 400 and not re.search(r"\d{41,}", message), message
        assert "failed unexpectedly" not in message, message  # load_model's last-resort net
        if expect is not None:
            assert re.search(expect, message), message
        return
    # Loaded: only a harmless change (the same content; a digit flipped to itself) may load.
    assert expect is None, f"loaded although {expect!r} was expected"
    assert model.config == good.config
    loaded = model.state_dict()
    assert set(loaded) == set(good.state)
    for name, value in good.state.items():
        assert torch.equal(loaded[name], value), name


# --- the checksum --------------------------------------------------------------------------------


def _file_parts(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")[META_KEY])
    return meta, header, raw[8 + n :]


def _sha256_by_hand(meta, header, data) -> str:
    """The hashing scheme of ``model_checksum``'s docstring, written out independently."""

    def framed(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    rest = {k: v for k, v in meta.items() if k != "checksum"}
    stream = framed(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("ascii"))
    for name in sorted(header):
        start, stop = header[name]["data_offsets"]
        shape = json.dumps(header[name]["shape"], separators=(",", ":"))
        stream += framed(name.encode()) + framed(b"F32") + framed(shape.encode())
        stream += framed(data[start:stop])
    return "sha256:" + hashlib.sha256(stream).hexdigest()


def test_demo_model_loads_without_warning_and_has_a_checksum():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(DEMO_MODEL_FILE)
    meta, header, data = _file_parts(DEMO_MODEL_FILE)
    assert meta["version"] == 4 and "normalisation" in meta["config"]
    assert meta["checksum"] == _sha256_by_hand(meta, header, data)
    assert set(header) == set(model.state_dict())


def test_checksum_is_the_documented_one(good):
    header = {k: v for k, v in good.header.items() if k != "__metadata__"}
    assert good.meta["checksum"] == _sha256_by_hand(good.meta, header, good.data)
    tensors = [(k, "F32", tuple(v.shape), v.numpy().tobytes()) for k, v in good.state.items()]
    assert model_checksum(good.meta, tensors) == good.meta["checksum"]


def test_version_1_file_without_checksum_warns_but_loads(good, tmp_path):
    path = tmp_path / "old.safetensors"
    path.write_bytes(meta_edit(lambda m: (m.pop("checksum"), m.update(version=1)))(good))
    with pytest.warns(ModelFileWarning, match="old.safetensors: .*without a checksum.*re-save it"):
        model = load_model(path)
    assert model.config == good.config
    for name, value in good.state.items():
        assert torch.equal(model.state_dict()[name], value)
    save_model(model, path)  # re-saved: it has one now
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(path)
    assert _file_parts(path)[0]["checksum"] == good.meta["checksum"]


def test_version_2_file_without_checksum_is_refused(good, tmp_path):
    path = tmp_path / "stripped.safetensors"
    path.write_bytes(meta_edit(lambda m: m.pop("checksum"))(good))
    with pytest.raises(
        ModelFileError, match=r"stripped\.safetensors: file is corrupt: no checksum"
    ):
        load_model(path)


def test_39_flipped_weight_bytes_are_detected(good, tmp_path):
    """The issue's case: flips that keep every weight finite (low mantissa bytes) loaded as a
    valid model before the checksum."""
    data = bytearray(good.raw)
    start = 8 + good.n
    r = np.random.default_rng(SEED)
    for word in r.choice(len(good.data) // 4, 39, replace=False):
        data[start + 4 * int(word)] ^= int(r.integers(1, 256))  # the lowest mantissa byte
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"flipped\.safetensors: file is corrupt: checksum mismatch"):  # fmt: skip
        load_model(path)


def test_a_flipped_sigma_digit_is_detected(good, tmp_path):
    path = tmp_path / "sigma.safetensors"
    path.write_bytes(digit_flip(r'"sigmas": \[(1\.0, 2\.5)\]', 5, "3")(good))  # 2.5 -> 3.5
    assert b"3.5" in path.read_bytes()
    with pytest.raises(ModelFileError, match=r"sigma\.safetensors: file is corrupt: checksum mismatch"):  # fmt: skip
        load_model(path)


def test_the_issue_cases_give_their_reason(good, tmp_path):
    cases = {
        "offsets": (entry_set(W, "data_offsets", [256]), "data_offsets \\[256\\]: not a list of 2"),
        "shape": (entry_set(W, "shape", 64), "has shape 64: not a list"),
        "hidden": (config_set(("head", "hidden"), 0), "config.head.hidden must be a list"),
        "nested": (config_set(("provenance",), RAW, nested(5000)), "nested too deeply"),
        "kernel": (config_set(("context", "kernel_size"), 3.0), "kernel_size must be an integer, got a number 3.0"),
        "surrogate": (config_set(("classes", 1, "name"), "\ud800"), r"name '\\ud800' holds control"),
        "ansi": (config_set(("classes", 1, "name"), "\x1b[31m"), r"name '\\x1b\[31m' holds control"),
        "huge": (config_set(("in_channels",), 10**300), "in_channels = <an integer of about 301 digits> is out of range"),
    }  # fmt: skip
    for name, (make, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(make(good))
        with pytest.raises(ModelFileError, match=f"^{name}.safetensors: .*{message}"):
            load_model(path)


def test_paths_that_are_not_model_files(tmp_path):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(ModelFileError, match=r"model\.safetensors: is a folder, not a model file"):
        load_model(folder)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(ModelFileError, match=r"loop\.safetensors"):
        load_model(loop)


def test_class_names_must_be_printable():
    for name in ("\ud800", "\x1b[31m", "a\nb", "\u2028", "\u202e"):
        with pytest.raises(ValueError, match="control or invisible") as info:
            ClassInfo(name, (0, 0, 0, 0))
        assert str(info.value).isascii()
    assert ClassInfo("Zellkern ü 核", (0, 0, 0, 0)).name == "Zellkern ü 核"


# --- writing and importing refuse non-finite weights ------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_model_refuses_non_finite_weights(tmp_path, bad):
    model = _tiny_model()
    with torch.no_grad():
        model.head.layers[0].weight[0, 0] = bad
    path = tmp_path / "broken.safetensors"
    with pytest.raises(ValueError, match=r"head\.layers\.0\.weight.*NaN or infinite.*not written"):
        save_model(model, path)
    assert list(tmp_path.iterdir()) == []


def _mlp_state(n_in=3):
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(n_in, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).state_dict()  # fmt: skip


SPEC = FeatureSpec(kinds=("gaussian",), sigmas=(1.0, 2.0))  # 3 features with raw


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 3e39], ids=["nan", "inf", "beyond-float32"]
)
def test_import_torch_mlp_refuses_non_finite(value):
    state = {k: v.double() for k, v in _mlp_state().items()}
    state["2.weight"][1, 1] = value
    with pytest.raises(ValueError, match=r"'2.weight' holds NaN or infinite"):
        import_torch_mlp(state, features=SPEC, classes=["bg", "fg"])


def test_import_torch_mlp_still_imports():
    model = import_torch_mlp(_mlp_state(), features=SPEC, classes=["bg", "fg"])
    assert model.config.head.hidden == (4,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"not a pickle at all", "could not be loaded as plain tensors"),
        ({}, "empty state dict"),
        ([], "expected a state dict"),
        (7, "expected a state dict"),
        (torch.zeros(3), "expected a state dict"),
        ({1: torch.zeros(2, 2)}, "not a string"),
        ({"net": {"0.weight": torch.zeros(2, 2)}}, "not a tensor"),
        ({"0.weight": torch.zeros(4, 3, dtype=torch.int64)}, "floating-point"),
        ({"0.weight": torch.zeros(4, 0)}, "has shape"),
        ({"0.weight": torch.zeros(4, 3, 2)}, "has shape"),
        ({"0.running_mean": torch.zeros(3)}, "unexpected key"),
        ({"0.bias": torch.zeros(3)}, "no '<layer>.weight'"),
    ],
    ids=[
        "empty file",
        "garbage",
        "empty dict",
        "list",
        "int",
        "tensor",
        "int key",
        "nested",
        "int tensor",
        "zero width",
        "3-d",
        "batchnorm",
        "bias only",
    ],
)
def test_import_torch_mlp_odd_pt_files(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message) as info:
        import_torch_mlp(path, features=SPEC, classes=["bg", "fg"])
    assert type(info.value) is ValueError and "\n" not in str(info.value)


def test_import_torch_mlp_refuses_a_folder_and_a_string_spacing(tmp_path):
    (tmp_path / "m.pt").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        import_torch_mlp(tmp_path / "m.pt", features=SPEC, classes=["bg", "fg"])
    with pytest.raises(ValueError, match="spacing must be 3 numbers"):
        import_torch_mlp(_mlp_state(), features=SPEC, classes=["bg", "fg"], spacing="111")


def test_the_command_shows_the_warning_as_one_line(good, tmp_path, capsys):
    from napari_pacseg.cli import main

    path = tmp_path / "old.safetensors"
    path.write_bytes(meta_edit(lambda m: (m.pop("checksum"), m.update(version=1)))(good))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pacseg: warning: old.safetensors")
