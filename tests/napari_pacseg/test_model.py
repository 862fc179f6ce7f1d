"""PacSegModel, its config and the .safetensors model file (round trip and bad files)."""

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

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
from napari_pacseg.io.model_file import MAX_HEADER_BYTES, config_from_dict, config_to_dict
from napari_pacseg.model.normalise import apply_range, volume_intensity_range

CLASSES = (
    ClassInfo("background", (0, 0, 0, 0)),
    ClassInfo("nucleus", (1, 0, 0, 1)),
    ClassInfo("edge", (0, 1, 0, 1)),
)


def _model(context=True, in_channels=1):
    torch.manual_seed(0)
    cfg = ModelConfig(
        in_channels=in_channels,
        classes=CLASSES,
        features=FeatureSpec(sigmas=(1.0, 2.0)),
        head=HeadConfig((16, 8), "gelu"),
        context=ContextConfig((4, 6)) if context else None,
        spacing=(2.0, 0.5, 0.5),
        provenance={"trained": "test"},
    )
    return PacSegModel(cfg).eval()


@pytest.mark.parametrize("context", [False, True])
def test_forward_and_round_trip(tmp_path, context):
    model = _model(context, in_channels=2)
    image = torch.rand(1, 2, 9, 14, 13) * 1000
    with torch.no_grad():
        logits = model(image)
    assert logits.shape == (1, 3, 9, 14, 13) and logits.dtype == torch.float32
    path = save_model(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    loaded = load_model(path)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(image), logits)


def test_file_is_standard_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _model()
    path = save_model(model, tmp_path / "m.safetensors")
    tensors = safetensors.load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(tensors[name], value)


def test_config_dict_round_trip_and_strictness():
    cfg = _model().config
    data = config_to_dict(cfg)
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    bad = json.loads(json.dumps(data))
    bad["head"]["dropout"] = 0.5
    with pytest.raises(ModelFileError, match=r"unknown keys in config.head: \['dropout'\]"):
        config_from_dict(bad)
    bad = json.loads(json.dumps(data))
    del bad["classes"]
    with pytest.raises(ModelFileError, match=r"lacks required keys \['classes'\]"):
        config_from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["head"]["hidden"] = [16, 100000]
    with pytest.raises(ModelFileError, match="hidden must be at most"):
        config_from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["in_channels"] = True
    with pytest.raises(ModelFileError, match="boolean"):
        config_from_dict(bad)


# --- a corpus of bad files ---------------------------------------------------------------------


def _good_bytes(tmp_path):
    return save_model(_model(context=False), tmp_path / "good.safetensors").read_bytes()


def _with_header(raw: bytes, mutate) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


def _meta(mutate):
    def change(header):
        meta = json.loads(header["__metadata__"]["napari_pacseg"])
        mutate(meta)
        header["__metadata__"]["napari_pacseg"] = json.dumps(meta)

    return change


def _nan_weights(raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    data = bytearray(raw)
    data[8 + n : 8 + n + 4] = np.array([np.nan], dtype="<f4").tobytes()
    return bytes(data)


BAD_FILES = {
    "empty": (lambda raw: b"", "too short"),
    "truncated": (lambda raw: raw[: len(raw) // 2], "truncated|bad data offsets"),
    "random bytes": (
        lambda raw: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "header|JSON|too short",
    ),
    "huge header": (
        lambda raw: struct.pack("<Q", 2**40) + raw[8:],
        f"over the {MAX_HEADER_BYTES}-byte limit",
    ),
    "header not object": (
        lambda raw: struct.pack("<Q", 8) + b"[1,2,3] " + raw[8:],
        "not an object",
    ),
    "not json": (lambda raw: struct.pack("<Q", 8) + b"\xff\xfe{{{{ " + raw[8:], "not valid JSON"),
    "no metadata": (
        lambda raw: _with_header(raw, lambda h: h.pop("__metadata__")),
        "not a napari-pacseg model",
    ),
    "newer version": (
        lambda raw: _with_header(raw, _meta(lambda m: m.update(version=99))),
        "upgrade napari-pacseg",
    ),
    "wrong format": (
        lambda raw: _with_header(raw, _meta(lambda m: m.update(format="other"))),
        "format is not",
    ),
    "unknown config key": (
        lambda raw: _with_header(raw, _meta(lambda m: m["config"].update(colour="red"))),
        r"unknown keys in config: \['colour'\]",
    ),
    "shape mismatch": (
        lambda raw: _with_header(raw, _meta(lambda m: m["config"]["head"].update(hidden=[17, 8]))),
        "has shape .* but the config needs",
    ),
    "missing tensor": (
        lambda raw: _with_header(raw, lambda h: h.pop("head.layers.2.bias")),
        r"missing \['head.layers.2.bias'\]",
    ),
    "nan weights": (_nan_weights, "NaN or infinite"),
    "bad dtype": (
        lambda raw: _with_header(raw, lambda h: h["head.layers.0.bias"].update(dtype="F64")),
        "dtype 'F64'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_refused_with_a_reason(tmp_path, case):
    make, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(_good_bytes(tmp_path)))
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_missing_file_and_bad_name(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=r"must end in .safetensors"):
        save_model(_model(False), tmp_path / "m.pt")


# --- importing a plain PyTorch MLP -------------------------------------------------------------


def _trained_mlp(n_in, n_out=2):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(n_in, 12), nn.ReLU(), nn.Linear(12, n_out))


def test_import_torch_mlp_from_state_dict_and_file(tmp_path):
    spec = FeatureSpec(kinds=("gaussian", "laplacian"), sigmas=(1.0,))
    mlp = _trained_mlp(spec.channels_per_image_channel())
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    for source in (mlp.state_dict(), tmp_path / "mlp.pt", str(tmp_path / "mlp.pt")):
        model = import_torch_mlp(source, features=spec, classes=["background", "cell"])
        image = torch.rand(1, 1, 6, 7, 8)
        with torch.no_grad():
            lo, hi = volume_intensity_range(image[0])
            feats = model.crop_features(apply_range(image, lo, hi))
            expected = mlp(feats.movedim(1, -1)).movedim(-1, 1)
            torch.testing.assert_close(model(image), expected, rtol=1e-5, atol=1e-5)
    assert model.config.classes[1].name == "cell"
    save_model(model, tmp_path / "imported.safetensors")
    assert load_model(tmp_path / "imported.safetensors").config == model.config


def test_import_torch_mlp_refuses_mismatches(tmp_path):
    spec = FeatureSpec(kinds=("gaussian",), sigmas=(1.0,))
    with pytest.raises(ValueError, match="the MLP takes 5 inputs but the feature spec gives 2"):
        import_torch_mlp(_trained_mlp(5).state_dict(), features=spec, classes=["bg", "fg"])
    with pytest.raises(ValueError, match="3 outputs but 2 classes"):
        import_torch_mlp(_trained_mlp(2, 3).state_dict(), features=spec, classes=["bg", "fg"])


class _Exploit:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(2, 2), "payload": _Exploit(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True refused it"):
        import_torch_mlp(
            evil, features=FeatureSpec(kinds=("gaussian",), sigmas=(1.0,)), classes=["a", "b"]
        )
    assert not marker.exists()


@pytest.mark.parametrize(
    ("config", "spacing", "kernel", "sigma"),
    [
        (
            RefineConfig(kernel_size=5, spatial_sigma=2.0),
            (1.0, 1.0, 1.0),
            (5, 5, 5),
            (2.0, 2.0, 2.0),
        ),
        (
            RefineConfig(kernel_size=5, spatial_sigma=2.0),
            (1.0, 0.4, 0.4),
            (3, 5, 5),
            (0.8, 2.0, 2.0),
        ),
        (RefineConfig(kernel_size=7, spatial_sigma=None), (0.3, 0.3, 2.0), (7, 7, 3), None),
        (RefineConfig(kernel_size=1), (1.0, 0.4, 0.4), (1, 1, 1), (0.8, 2.0, 2.0)),
    ],
)
def test_refine_window_follows_the_spacing(config, spacing, kernel, sigma):
    got_kernel, got_sigma = config.window(spacing)
    assert got_kernel == kernel
    if sigma is None:
        assert got_sigma is None
    else:
        assert got_sigma == pytest.approx(sigma)


@pytest.mark.parametrize("field", ["temperature", "guide_sigma"])
def test_refine_config_refuses_non_positive(field):
    with pytest.raises(ValueError, match=f"{field} must be a number in"):
        RefineConfig(**{field: 0.0})
