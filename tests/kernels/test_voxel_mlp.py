"""voxel_mlp (torch path) and VoxelMLP against the float64 reference."""

import itertools

import pytest
import torch
from torch import nn

import pacseg_kernels.mlp_torch as mlp_torch
from pacseg_kernels import ACTIVATIONS, VoxelMLP, voxel_mlp
from tests.kernels.reference import mlp_reference

# (N, C, spatial, hidden widths, K)
CASES = [
    (1, 1, (1, 1, 1), [1], 1),
    (2, 3, (5, 7, 3), [7], 2),
    (3, 16, (3, 5, 9), [64, 64], 4),
    (1, 64, (4, 3, 5), [256], 3),
    (2, 5, (9, 1, 11), [33, 17, 9], 6),
    (1, 8, (2, 2, 2), [], 5),
]


def _mlp(c, hidden, k, gen, dtype=torch.float32):
    widths = [c, *hidden, k]
    weights = [
        torch.randn(o, i, generator=gen, dtype=dtype) / i**0.5
        for i, o in itertools.pairwise(widths)
    ]
    biases = [torch.randn(o, generator=gen, dtype=dtype) * 0.1 for o in widths[1:]]
    return weights, biases


@pytest.fixture(params=["onednn", "addmm"])
def cpu_path(request, monkeypatch):
    """Run a test on both CPU paths: oneDNN fused linear (when this torch has it) and addmm."""
    if request.param == "addmm":
        monkeypatch.setattr(mlp_torch, "ONEDNN_ENABLED", False)
    elif mlp_torch._onednn_linear() is None:
        pytest.skip("this torch build has no working oneDNN linear op")
    else:
        monkeypatch.setattr(mlp_torch, "ONEDNN_MIN_WIDTH", 1)
    return request.param


def test_onednn_path_is_available_here():
    """The CPU wheel CI installs has the oneDNN op; if torch drops it, this says so."""
    assert mlp_torch._onednn_linear() is not None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference_channels_first(case, activation, cpu_path):
    n, c, spatial, hidden, k = case
    gen = torch.Generator().manual_seed(hash((case[1], tuple(hidden), activation)) % 2**31)
    x = torch.randn(n, c, *spatial, generator=gen)
    weights, biases = _mlp(c, hidden, k, gen)
    out = voxel_mlp(x, weights, biases, activation, backend="torch")
    assert out.shape == (n, k, *spatial) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(
        out.double(), mlp_reference(x, weights, biases, activation), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_channels_last(case, cpu_path):
    n, c, spatial, hidden, k = case
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*spatial, n, c, generator=gen)  # (X, Y, Z, n, C): leading dims of any count
    weights, biases = _mlp(c, hidden, k, gen)
    out = voxel_mlp(x, weights, biases, "gelu", channels_last=True)
    assert out.shape == (*spatial, n, k)
    ref = mlp_reference(x, weights, biases, "gelu", channels_last=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_channels_last_low_rank_shapes():
    gen = torch.Generator().manual_seed(3)
    weights, biases = _mlp(4, [8], 2, gen)
    for shape in [(4,), (7, 4), (3, 5, 4)]:
        x = torch.randn(*shape, generator=gen)
        out = voxel_mlp(x, weights, biases, channels_last=True)
        assert out.shape == (*shape[:-1], 2)
        ref = mlp_reference(x, weights, biases, "relu", channels_last=True)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _non_contiguous_inputs(gen):
    base = torch.randn(2, 9, 7, 6, 11, generator=gen)
    yield "permuted", base.permute(0, 4, 2, 3, 1)[:, :6]  # C from a spatial axis
    yield "strided", base[:, ::2, ::2, 1:, ::3]
    yield "channels_last_memory", base.contiguous(memory_format=torch.channels_last_3d)
    yield "expanded", torch.randn(1, 9, 1, 6, 1, generator=gen).expand(3, 9, 4, 6, 5)


@pytest.mark.parametrize("small_blocks", [False, True])
def test_non_contiguous_inputs(small_blocks, monkeypatch, cpu_path):
    if small_blocks:  # force many blocks, some spanning several batch items or planes
        monkeypatch.setattr(mlp_torch, "BUFFER_ELEMENTS", 64)
        monkeypatch.setattr(mlp_torch, "MIN_BLOCK", 7)
        monkeypatch.setattr(mlp_torch, "ONEDNN_BLOCK", 9)
    gen = torch.Generator().manual_seed(5)
    for name, x in _non_contiguous_inputs(gen):
        weights, biases = _mlp(x.shape[1], [12, 5], 3, gen)
        out = voxel_mlp(x, weights, biases, "silu")
        ref = mlp_reference(x, weights, biases, "silu")
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
        xl = x.movedim(1, -1)  # channels-last view of the same non-contiguous data
        out_l = voxel_mlp(xl, weights, biases, "silu", channels_last=True)
        torch.testing.assert_close(
            out_l.double(), ref.movedim(1, -1), rtol=1e-5, atol=1e-5, msg=name
        )


def test_equals_sequential_voxel_by_voxel():
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    seq = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    x = torch.randn(2, 16, 3, 4, 5, generator=gen)
    out = VoxelMLP.from_sequential(seq)(x)
    with torch.no_grad():
        for n in range(2):
            for d in range(3):
                for h in range(4):
                    for w in range(5):
                        torch.testing.assert_close(
                            out[n, :, d, h, w], seq(x[n, :, d, h, w]), rtol=1e-5, atol=1e-6
                        )


def test_float64_and_half_inputs(cpu_path):
    gen = torch.Generator().manual_seed(9)
    weights, biases = _mlp(6, [10], 3, gen)
    x = torch.randn(1, 6, 3, 4, 5, generator=gen)
    out64 = voxel_mlp(x.double(), weights, biases)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(
        out64, mlp_reference(x, weights, biases, "relu"), rtol=1e-12, atol=1e-12
    )
    for half in (torch.float16, torch.bfloat16):
        xh = x.to(half)
        out = voxel_mlp(xh, weights, biases)
        assert out.dtype == torch.float32
        torch.testing.assert_close(
            out.double(), mlp_reference(xh, weights, biases, "relu"), rtol=1e-5, atol=1e-5
        )


def test_empty_volume():
    # Issue 15 item 13: a dimension of size 0 is refused by every op, naming it (it used to
    # return an empty output here, and IndexError / ZeroDivisionError in pac_crf3d).
    weights, biases = _mlp(3, [4], 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 0, 4, 5\): D is 0 \(axis 2\)"):
        voxel_mlp(torch.empty(2, 3, 0, 4, 5), weights, biases)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(activation, channels_last, monkeypatch):
    monkeypatch.setattr(mlp_torch, "BUFFER_ELEMENTS", 32)
    monkeypatch.setattr(
        mlp_torch, "MIN_BLOCK", 5
    )  # several blocks, gradients accumulate across them
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 2, 3, 2, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.movedim(1, -1)
    x.requires_grad_(True)
    weights, biases = _mlp(3, [5, 4], 2, gen, dtype=torch.float64)
    params = [p.requires_grad_(True) for p in weights + biases]

    def f(x, *params):
        return voxel_mlp(x, params[:3], params[3:], activation, channels_last=channels_last)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradients_match_sequential_float32():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model = VoxelMLP.from_sequential(seq)
    x = torch.randn(2, 5, 4, 3, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    model(x).square().sum().backward()
    seq(x2.movedim(1, -1)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.parameters(), seq.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_peak_extra_memory_is_bounded(monkeypatch, cpu_path):
    """The torch paths allocate buffers of a fixed size, never a volume-sized intermediate."""
    sizes = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(mlp_torch.torch, "empty", spy)
    weights, biases = _mlp(16, [64, 64], 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        voxel_mlp(torch.randn(1, 16, 64, 64, 64), weights, biases)
    assert max(sizes) <= 2 * mlp_torch.BUFFER_ELEMENTS + 1024


# --- bad input ------------------------------------------------------------------------------


def _good():
    weights, biases = _mlp(4, [8], 2, torch.Generator().manual_seed(0))
    return torch.randn(1, 4, 3, 3, 3), weights, biases


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, w, b: (x[0], w, b, {}), r"\(N, C, D, H, W\), got shape \(4, 3, 3, 3\)"),
        (
            lambda x, w, b: (x[:, :3], w, b, {}),
            r"weights\[0\] has shape \(8, 4\) but x has 3 channels",
        ),
        (
            lambda x, w, b: (x, [w[0], w[1][:, :5]], b, {}),
            r"weights\[1\] has shape \(2, 5\) but weights\[0\]",
        ),
        (
            lambda x, w, b: (x, w, [b[0][:3], b[1]], {}),
            r"biases\[0\] has shape \(3,\), expected \(8,\)",
        ),
        (lambda x, w, b: (x.to(torch.int32), w, b, {}), r"x has dtype torch.int32"),
        (lambda x, w, b: (x, [w[0].long(), w[1]], b, {}), r"weights\[0\] has dtype torch.int64"),
        (lambda x, w, b: (x, w, b, {"activation": "swish"}), r"unknown activation 'swish'"),
        (lambda x, w, b: (x, w, b[:1], {}), r"2 weight matrices but 1 bias vectors"),
        (lambda x, w, b: (x, [], [], {}), r"weights is empty"),
        (
            lambda x, w, b: (x, [w[0][None], w[1]], b, {}),
            r"must be \(out, in\), got shape \(1, 8, 4\)",
        ),
        (lambda x, w, b: (x, w, b, {"backend": "cuda"}), r"backend must be one of"),
    ],
)
def test_bad_input(mutate, message):
    x, w, b, kwargs = mutate(*_good())
    with pytest.raises(ValueError, match=message):
        voxel_mlp(x, w, b, **kwargs)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = _good()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        voxel_mlp(x, w, b, backend="triton")


# --- module constructors --------------------------------------------------------------------


def test_from_state_dict_roundtrip():
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(6, 9), nn.SiLU(), nn.Linear(9, 9), nn.SiLU(), nn.Linear(9, 2))
    model = VoxelMLP.from_state_dict(seq.state_dict(), activation="silu")
    x = torch.randn(1, 6, 2, 3, 4)
    torch.testing.assert_close(model(x), seq(x.movedim(1, -1)).movedim(-1, 1), rtol=1e-5, atol=1e-6)
    again = VoxelMLP(6, [9, 9], 2, "silu")
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), model(x))


def test_from_named_layers_and_bias_free():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 5, bias=False)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, v):
            return self.fc2(torch.relu(self.fc1(v)))

    net = Net()
    model = VoxelMLP.from_state_dict(net.state_dict())
    x = torch.randn(2, 3, 2, 2, 2)
    torch.testing.assert_close(model(x), net(x.movedim(1, -1)).movedim(-1, 1), rtol=1e-5, atol=1e-6)
    seq_model = VoxelMLP.from_sequential(nn.Sequential(net.fc1, nn.ReLU(), net.fc2))
    torch.testing.assert_close(seq_model(x), model(x))


@pytest.mark.parametrize(
    ("seq", "message"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "BatchNorm1d"),
        (
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)),
            r"weight \(2, 5\) but layer 0",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)),
            "mixed",
        ),
        (nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), "second Linear in a row"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "expected Linear, activation"),
        (
            nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 1)),
            "approximate",
        ),
    ],
)
def test_from_sequential_refuses(seq, message):
    with pytest.raises(ValueError, match=message):
        VoxelMLP.from_sequential(seq)


def test_from_state_dict_refuses_other_layers():
    sd = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()
    with pytest.raises(ValueError, match=r"1.weight. has shape \(4,\); only Linear"):
        VoxelMLP.from_state_dict(sd)
    with pytest.raises(ValueError, match=r"Conv|2-D"):
        VoxelMLP.from_state_dict(nn.Conv3d(2, 3, 1).state_dict())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_bfloat16_matmuls_match_reference_within_their_rounding(case, activation, cpu_path):
    if cpu_path == "onednn" and not mlp_torch._onednn_bfloat16():
        pytest.skip("oneDNN has no bfloat16 linear on this CPU (no AVX-512): addmm runs it")
    n, c, spatial, hidden, k = case
    gen = torch.Generator().manual_seed(hash((case[1], tuple(hidden), activation, "bf16")) % 2**31)
    x = torch.randn(n, c, *spatial, generator=gen)
    weights, biases = _mlp(c, hidden, k, gen)
    with torch.no_grad():
        out = voxel_mlp(x, weights, biases, activation, matmul_dtype=torch.bfloat16)
    assert out.shape == (n, k, *spatial) and out.dtype == torch.float32
    ref = mlp_reference(x, weights, biases, activation)
    # bfloat16 keeps 8 significant bits: ~0.4% per rounding, a few roundings per layer
    torch.testing.assert_close(out.double(), ref, rtol=4e-2, atol=4e-2 * (len(hidden) + 1))
    if x.numel() * k > 200:  # the products did run in bfloat16: not float32's result
        assert not torch.equal(out, voxel_mlp(x, weights, biases, activation))


def test_bfloat16_matmuls_run_where_onednn_has_none(monkeypatch):
    """A CPU whose oneDNN has no bfloat16 linear runs bfloat16 layers on the addmm path: the
    same result as that path, no error."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 6, 4, 5, 6, generator=gen)
    weights, biases = _mlp(6, [40], 3, gen)
    monkeypatch.setattr(mlp_torch, "_onednn_bfloat16", lambda: False)
    assert mlp_torch.use_onednn(x, weights) == (mlp_torch._onednn_linear() is not None)
    assert not mlp_torch.use_onednn(x, weights, torch.bfloat16)
    with torch.no_grad():
        out = voxel_mlp(x, weights, biases, "relu", matmul_dtype=torch.bfloat16)
        monkeypatch.setattr(mlp_torch, "ONEDNN_ENABLED", False)
        addmm = voxel_mlp(x, weights, biases, "relu", matmul_dtype=torch.bfloat16)
    torch.testing.assert_close(out, addmm, rtol=0, atol=0)


def test_bfloat16_matmuls_are_for_inference_on_the_torch_path():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 3, 3, 3, generator=gen)
    weights, biases = _mlp(4, [8], 2, gen)
    bf16 = torch.bfloat16
    with pytest.raises(ValueError, match="for inference"):
        voxel_mlp(x, [w.requires_grad_() for w in weights], biases, matmul_dtype=bf16)
    with pytest.raises(ValueError, match="torch path only"):
        voxel_mlp(x, weights, biases, backend="triton", matmul_dtype=bf16)
    with pytest.raises(ValueError, match="float32 inputs"):
        voxel_mlp(x.double(), weights, biases, matmul_dtype=bf16)
    with pytest.raises(ValueError, match=r"None or torch\.bfloat16"):
        voxel_mlp(x, weights, biases, matmul_dtype=torch.float16)
    with torch.no_grad():  # the module passes it on
        mlp = VoxelMLP(4, [8], 2)
        torch.testing.assert_close(mlp(x, matmul_dtype=bf16), mlp(x), rtol=4e-2, atol=4e-2)
