"""Kernel-argument corpus of issue 15: bad arguments, absurd sizes, non-finite values, strides.

Every bad call raises ``ValueError`` with a message naming the op and what is wrong (the table
below); absurd sizes fail at once with little memory (measured in a fresh process); NaN and inf
are never turned silently into finite results; any strides are accepted.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pacseg_kernels.crf as crf
import pacseg_kernels.crf_numba as crf_numba
import pacseg_kernels.crf_torch as crf_torch
import pacseg_kernels.mlp_torch as mlp_torch
from pacseg_kernels import (
    ACTIVATIONS,
    MaxUnpool3d,
    PacConv3d,
    PacCRF3d,
    VoxelMLP,
    max_pool3d_with_indices,
    max_unpool3d,
    pac3d,
    pac_crf3d,
    voxel_mlp,
)
from tests.kernels.reference import _unfold, crf_reference

NAN, INF = float("nan"), float("inf")
BIG = 10**300  # a 300-digit int: messages must stay short

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
# Without CUDA the Triton tests run in the interpreter (tests/conftest.py), on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _mlp(widths):
    ws = [_r(o, i) / i**0.5 for i, o in itertools.pairwise(widths)]
    return ws, [_r(o) * 0.1 for o in widths[1:]]


W3, B3 = _mlp([3, 4, 2])
X = _r(1, 3, 2, 3, 4)
U, G = _r(1, 2, 4, 4, 4), _r(1, 1, 4, 4, 4)
PV, PI = max_pool3d_with_indices(_r(1, 2, 4, 4, 4), 2)
LONG = torch.long

# (name, call, message regex): every call must raise ValueError matching the regex.
CASES = [
    # --- voxel_mlp ---
    ("mlp 4-d", lambda: voxel_mlp(X[0], W3, B3), r"voxel_mlp: x must be \(N, C, D, H, W\)"),
    ("mlp int x", lambda: voxel_mlp(X.long(), W3, B3), r"x has dtype torch.int64"),
    ("mlp bool x", lambda: voxel_mlp(X > 0, W3, B3), r"x has dtype torch.bool"),
    ("mlp numpy x", lambda: voxel_mlp(X.numpy(), W3, B3), r"x must be a torch.Tensor"),
    ("mlp N=0", lambda: voxel_mlp(_r(0, 3, 2, 2, 2), W3, B3), r"N \(batch\) is 0 \(axis 0\)"),
    ("mlp C=0", lambda: voxel_mlp(_r(1, 0, 2, 2, 2), [_r(4, 0)], [_r(4)]), r"C \(channels\) is 0"),
    ("mlp W=0", lambda: voxel_mlp(_r(1, 3, 2, 2, 0), W3, B3), r"shape \(1, 3, 2, 2, 0\): W is 0"),
    (
        "mlp last 0",
        lambda: voxel_mlp(_r(5, 0, 3), W3, B3, channels_last=True),
        r"x has shape \(5, 0, 3\): axis 1 is 0",
    ),
    (
        "mlp 0 units",
        lambda: voxel_mlp(X, [_r(0, 3), _r(2, 0)], [_r(0), _r(2)]),
        r"weights\[0\] has shape \(0, 3\): a layer of 0 units",
    ),
    ("mlp no layers", lambda: voxel_mlp(X, [], []), r"weights is empty"),
    ("mlp tensor weights", lambda: voxel_mlp(X, W3[0], B3[0]), r"must be lists of tensors"),
    (
        "mlp in mismatch",
        lambda: voxel_mlp(X, W3[1:], B3[1:]),
        r"x has 3 channels; weights\[0\] needs 3 input columns",
    ),
    ("mlp int weight", lambda: voxel_mlp(X, [W3[0].long(), W3[1]], B3), r"weights\[0\] has dtype"),
    ("mlp bias shape", lambda: voxel_mlp(X, W3, [B3[0][:2], B3[1]]), r"biases\[0\] has shape"),
    ("mlp activation", lambda: voxel_mlp(X, W3, B3, "elu"), r"unknown activation 'elu'"),
    ("mlp activation None", lambda: voxel_mlp(X, W3, B3, None), r"unknown activation None"),
    (
        "mlp channels_last str",
        lambda: voxel_mlp(X, W3, B3, channels_last="yes"),
        r"channels_last must be True or False",
    ),
    ("mlp backend", lambda: voxel_mlp(X, W3, B3, backend="cuda"), r"backend must be one of"),
    # --- pac3d ---
    ("pac 4-d", lambda: pac3d(U[0], G[0], kernel_size=3), r"input must be \(N, C, D, H, W\)"),
    ("pac int", lambda: pac3d(U.int(), G, kernel_size=3), r"input has dtype torch.int32"),
    ("pac N=0", lambda: pac3d(_r(0, 2, 4, 4, 4), _r(0, 1, 4, 4, 4), kernel_size=3), r"N \(batch\)"),
    ("pac C=0", lambda: pac3d(_r(1, 0, 4, 4, 4), G, kernel_size=3), r"input has shape .*C \("),
    (
        "pac F=0",
        lambda: pac3d(U, _r(1, 0, 4, 4, 4), kernel_size=3),
        r"pac3d: guide has shape \(1, 0, 4, 4, 4\): C \(channels\) is 0.*at least one guide",
    ),
    ("pac H=0", lambda: pac3d(_r(1, 2, 4, 0, 4), _r(1, 1, 4, 0, 4), kernel_size=1), r"H is 0"),
    (
        "pac C_out=0",
        lambda: pac3d(U, G, _r(0, 2, 3, 3, 3)),
        r"weight has shape \(0, 2, 3, 3, 3\): C_out is 0",
    ),
    ("pac even", lambda: pac3d(U, G, kernel_size=2), r"kernel sizes must be odd"),
    (
        "pac 8e9 taps",
        lambda: pac3d(_r(1, 1, 2, 2, 2), _r(1, 1, 2, 2, 2), kernel_size=2001, padding=1000),
        r"kernel_size \(2001, 2001, 2001\) has 8012006001 taps; at most 32768",
    ),
    ("pac 33^3 taps", lambda: pac3d(U, G, kernel_size=33, padding=16), r"at most 32768"),
    ("pac bool kernel", lambda: pac3d(U, G, kernel_size=True), r"kernel_size must be an int"),
    ("pac bool tuple", lambda: pac3d(U, G, kernel_size=(True, 1, 1)), r"kernel_size must be an"),
    ("pac str kernel", lambda: pac3d(U, G, kernel_size="3"), r"kernel_size must be an int"),
    ("pac float kernel", lambda: pac3d(U, G, kernel_size=3.0), r"kernel_size must be an int"),
    ("pac 2 kernel", lambda: pac3d(U, G, kernel_size=(3, 3)), r"tuple of 3 ints"),
    ("pac stride 0", lambda: pac3d(U, G, kernel_size=3, stride=0), r"stride must be >= 1"),
    ("pac padding -1", lambda: pac3d(U, G, kernel_size=3, padding=-1), r"padding must be >= 0"),
    (
        "pac padding 1e6",
        lambda: pac3d(U, G, kernel_size=1, padding=10**6),
        r"makes a padded input of \d+ voxels; at most 16777216 .*less padding",
    ),
    (
        "pac dilation 1e9",
        lambda: pac3d(U, G, kernel_size=3, padding=10**9, dilation=10**9),
        r"padded input of",
    ),
    ("pac dilation no pad", lambda: pac3d(U, G, kernel_size=3, dilation=10**9), r"too small"),
    ("pac dilation 0", lambda: pac3d(U, G, kernel_size=3, dilation=0), r"dilation must be >= 1"),
    ("pac groups bool", lambda: pac3d(U, G, _r(2, 2, 1, 1, 1), groups=True), r"groups must be"),
    ("pac groups 0", lambda: pac3d(U, G, _r(2, 2, 1, 1, 1), groups=0), r"groups must be a pos"),
    ("pac groups float", lambda: pac3d(U, G, _r(2, 1, 1, 1, 1), groups=2.0), r"groups must be"),
    (
        "pac normalize str",
        lambda: pac3d(U, G, kernel_size=3, normalize="no"),
        r"normalize must be True or False",
    ),
    ("pac no kernel", lambda: pac3d(U, G), r"weight=None \(adaptive filtering\) needs kernel"),
    ("pac bias", lambda: pac3d(U, G, _r(3, 2, 1, 1, 1), _r(2)), r"bias has shape \(2,\)"),
    ("pac huge kernel", lambda: pac3d(U, G, kernel_size=BIG + 1), r"taps; at most 32768"),
    # --- pac_crf3d ---
    (
        "crf K=0",
        lambda: pac_crf3d(_r(1, 0, 4, 4, 4), G),
        r"pac_crf3d: unary has shape \(1, 0, 4, 4, 4\): C \(channels\) is 0.*at least one class",
    ),
    ("crf F=0", lambda: pac_crf3d(U, _r(1, 0, 4, 4, 4)), r"guide has shape \(1, 0, 4, 4, 4\)"),
    ("crf N=0", lambda: pac_crf3d(_r(0, 2, 4, 4, 4), _r(0, 1, 4, 4, 4)), r"N \(batch\) is 0"),
    ("crf D=0", lambda: pac_crf3d(_r(1, 2, 0, 4, 4), _r(1, 1, 0, 4, 4)), r"D is 0 \(axis 2\)"),
    ("crf iterations -1", lambda: pac_crf3d(U, G, iterations=-1), r"iterations must be an int"),
    ("crf iterations bool", lambda: pac_crf3d(U, G, iterations=True), r"iterations must be an"),
    ("crf iterations float", lambda: pac_crf3d(U, G, iterations=2.0), r"iterations must be an"),
    ("crf iterations 1e9", lambda: pac_crf3d(U, G, iterations=10**9), r"at most 1000"),
    ("crf even", lambda: pac_crf3d(U, G, kernel_size=4), r"odd.*\(4, 4, 4\)"),
    (
        "crf 41^3 taps",  # clipped to the 21^3 volume it is still 41^3 taps
        lambda: pac_crf3d(_r(1, 2, 21, 21, 21), _r(1, 1, 21, 21, 21), kernel_size=41),
        r"kernel_size \(clipped to the volume\) \(41, 41, 41\) has 68921 taps",
    ),
    ("crf kernel bool", lambda: pac_crf3d(U, G, kernel_size=(3, True, 3)), r"kernel_size must"),
    ("crf dilation 0", lambda: pac_crf3d(U, G, dilation=0), r"dilation must be >= 1"),
    ("crf compat nan", lambda: pac_crf3d(U, G, compat=NAN), r"compat must be a finite number"),
    ("crf compat inf", lambda: pac_crf3d(U, G, compat=-INF), r"compat must be a finite"),
    ("crf compat 1e300", lambda: pac_crf3d(U, G, compat=1e300), r"in \[-1e\+06, 1e\+06\]"),
    ("crf compat bool", lambda: pac_crf3d(U, G, compat=True), r"compat must be a finite number"),
    ("crf compat str", lambda: pac_crf3d(U, G, compat="1"), r"compat must be a finite number"),
    ("crf sigma 0", lambda: pac_crf3d(U, G, spatial_sigma=0.0), r"positive and finite"),
    ("crf sigma inf", lambda: pac_crf3d(U, G, spatial_sigma=INF), r"positive and finite"),
    ("crf sigma str", lambda: pac_crf3d(U, G, spatial_sigma="2"), r"None, a number or 3"),
    ("crf sigma strs", lambda: pac_crf3d(U, G, spatial_sigma=(1, 2, "3")), r"None, a number"),
    ("crf sigma bool", lambda: pac_crf3d(U, G, spatial_sigma=True), r"None, a number or 3"),
    ("crf sigma 2", lambda: pac_crf3d(U, G, spatial_sigma=(1.0, 2.0)), r"None, a number or 3"),
    ("crf backend", lambda: pac_crf3d(U, G, backend="gpu"), r"backend must be one of"),
    ("crf shapes", lambda: pac_crf3d(U, G[..., :3]), r"spatial sizes \(N, D, H, W\) must match"),
    # --- max_unpool3d ---
    ("unpool int values", lambda: max_unpool3d(PI, PI, 2), r"values must be a floating-point"),
    ("unpool float idx", lambda: max_unpool3d(PV, PV, 2), r"indices must be an integer tensor"),
    ("unpool bool idx", lambda: max_unpool3d(PV, PI > 0, 2), r"indices must be an integer"),
    ("unpool shapes", lambda: max_unpool3d(PV, PI[..., :1], 2), r"indices have shape"),
    (
        "unpool N=0",
        lambda: max_unpool3d(_r(0, 2, 2, 2, 2), torch.zeros(0, 2, 2, 2, 2, dtype=LONG), 2),
        r"max_unpool3d: values has shape \(0, 2, 2, 2, 2\): N \(batch\) is 0",
    ),
    (
        "unpool C=0",
        lambda: max_unpool3d(_r(1, 0, 2, 2, 2), torch.zeros(1, 0, 2, 2, 2, dtype=LONG), 2),
        r"C \(channels\) is 0",
    ),
    (
        "unpool W=0",
        lambda: max_unpool3d(_r(1, 1, 2, 2, 0), torch.zeros(1, 1, 2, 2, 0, dtype=LONG), 2),
        r"W is 0",
    ),
    ("unpool kernel 0", lambda: max_unpool3d(PV, PI, 0), r"need kernel_size >= 1"),
    ("unpool kernel bool", lambda: max_unpool3d(PV, PI, True), r"kernel_size must be an int"),
    ("unpool kernel 1000", lambda: max_unpool3d(PV, PI, 1000), r"has 1000000000 taps"),
    ("unpool stride 1e6", lambda: max_unpool3d(PV, PI, 2, 10**6), r"stride \(1000000, 1000000"),
    ("unpool out str", lambda: max_unpool3d(PV, PI, 2, output_size="444"), r"3 ints \(D, H, W\)"),
    ("unpool out strs", lambda: max_unpool3d(PV, PI, 2, output_size=("4",) * 3), r"3 ints"),
    ("unpool out float", lambda: max_unpool3d(PV, PI, 2, output_size=(4.0,) * 3), r"3 ints"),
    ("unpool out 2", lambda: max_unpool3d(PV, PI, 2, output_size=(4, 4)), r"3 ints"),
    ("unpool out far", lambda: max_unpool3d(PV, PI, 2, output_size=(BIG,) * 3), r"not reachable"),
    (
        "unpool idx range",
        lambda: max_unpool3d(PV, PI - PI.max() - 1, 2),
        r"indices must lie in \[0, 64\)",
    ),
    # --- modules ---
    ("VoxelMLP 0", lambda: VoxelMLP(0, [], 2), r"VoxelMLP: every width .* must be an int >= 1"),
    ("VoxelMLP hidden str", lambda: VoxelMLP(3, "64", 2), r"hidden must be a sequence of ints"),
    ("VoxelMLP hidden int", lambda: VoxelMLP(3, 64, 2), r"hidden must be a sequence of ints"),
    ("VoxelMLP float width", lambda: VoxelMLP(3, [2.5], 2), r"must be an int >= 1"),
    ("VoxelMLP bool width", lambda: VoxelMLP(True, [], 2), r"must be an int >= 1"),
    ("VoxelMLP activation", lambda: VoxelMLP(3, [], 2, "elu"), r"unknown activation"),
    ("VoxelMLP forward C=0", lambda: VoxelMLP(3, [], 2)(_r(1, 3, 0, 2, 2)), r"voxel_mlp: x has"),
    ("PacConv3d 0", lambda: PacConv3d(0, 4, 3), r"PacConv3d: in_channels must be an int >= 1"),
    ("PacConv3d out 0", lambda: PacConv3d(4, 0, 3), r"out_channels must be an int >= 1"),
    ("PacConv3d even", lambda: PacConv3d(4, 4, 4), r"PacConv3d: kernel sizes must be odd"),
    ("PacConv3d taps", lambda: PacConv3d(1, 1, 2001), r"PacConv3d: kernel_size .* taps"),
    ("PacConv3d groups", lambda: PacConv3d(4, 4, 3, groups=True), r"groups must be an int"),
    ("PacConv3d stride str", lambda: PacConv3d(4, 4, 3, stride="1"), r"stride must be an int"),
    ("PacConv3d bias str", lambda: PacConv3d(4, 4, 3, bias="no"), r"bias and normalize must be"),
    (
        "PacConv3d forward F=0",
        lambda: PacConv3d(2, 2, 3)(U, _r(1, 0, 4, 4, 4)),
        r"pac3d: guide has shape \(1, 0, 4, 4, 4\)",
    ),
    ("PacCRF3d iterations", lambda: PacCRF3d(iterations=-1), r"PacCRF3d: iterations must be"),
    ("PacCRF3d kernel", lambda: PacCRF3d(kernel_size=4), r"PacCRF3d: kernel sizes must be odd"),
    ("PacCRF3d compat", lambda: PacCRF3d(compat=INF), r"PacCRF3d: compat must be a finite"),
    ("PacCRF3d sigma", lambda: PacCRF3d(spatial_sigma=-1.0), r"PacCRF3d: spatial_sigma must"),
    ("PacCRF3d forward K=0", lambda: PacCRF3d()(_r(1, 0, 4, 4, 4), G), r"pac_crf3d: unary has"),
    ("MaxUnpool3d kernel", lambda: MaxUnpool3d("2"), r"MaxUnpool3d: kernel_size must be an int"),
    ("MaxUnpool3d stride", lambda: MaxUnpool3d(2, stride=2.0), r"MaxUnpool3d: stride must be"),
    (
        "MaxUnpool3d forward N=0",
        lambda: MaxUnpool3d(2)(_r(0, 1, 2, 2, 2), torch.zeros(0, 1, 2, 2, 2, dtype=LONG)),
        r"max_unpool3d: values has shape \(0, 1, 2, 2, 2\)",
    ),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and len(text) < 300, text  # one short line, no 300-digit numbers


def test_absurd_sizes_fail_fast_with_little_memory():
    """Each absurd call fails within a second (the CRF window is clipped and computed), and
    the process's peak RSS grows by < 100 MiB (before the fix: > 5 GiB, or minutes of work)."""
    script = textwrap.dedent(
        """
        import json, resource, time, torch
        from pacseg_kernels import max_unpool3d, pac3d, pac_crf3d
        r = lambda *s: torch.randn(*s)
        calls = {
            "crf kernel 10001": lambda: pac_crf3d(r(1, 2, 6, 7, 8), r(1, 1, 6, 7, 8),
                                                  kernel_size=10001),
            "pac kernel 2001": lambda: pac3d(r(1, 1, 2, 2, 2), r(1, 1, 2, 2, 2),
                                             kernel_size=2001, padding=1000),
            "pac dilation 1e9": lambda: pac3d(r(1, 1, 2, 2, 2), r(1, 1, 2, 2, 2),
                                              kernel_size=(1, 1, 3), padding=(0, 0, 10**9),
                                              dilation=(1, 1, 10**9)),
            "unpool kernel 1000": lambda: max_unpool3d(
                r(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1, dtype=torch.long), 1000),
            "crf iterations 1e9": lambda: pac_crf3d(r(1, 2, 6, 7, 8), r(1, 1, 6, 7, 8),
                                                    iterations=10**9),
        }
        pac_crf3d(r(1, 2, 3, 3, 3), r(1, 1, 3, 3, 3), kernel_size=3)  # warm up torch
        result = {}
        for name, call in calls.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t = time.perf_counter()
            try:
                out = call()
                outcome = "ok" if bool(torch.isfinite(out).all()) else "non-finite"
            except ValueError:
                outcome = "ValueError"
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            result[name] = [outcome, time.perf_counter() - t, grew / 1024]
        print(json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (outcome, seconds, mib) in result.items():
        clipped = name == "crf kernel 10001"  # computed, on its 11x13x15 useful window: ~0.4 s
        assert outcome == ("ok" if clipped else "ValueError"), (name, outcome)
        assert seconds < (3.0 if clipped else 1.0), (name, seconds)
        assert mib < 100, (name, mib)


# --- pac_crf3d: a window larger than the volume is clipped, exactly -------------------------


@pytest.mark.parametrize("engine", ["wavefront", "fused", "recompute", "autograd"])
def test_crf_clipped_window_equals_unclipped(engine, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    unary = 2 * torch.randn(1, 3, 3, 4, 5, generator=gen, dtype=torch.float64)
    guide = torch.randn(1, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
    kwargs = dict(iterations=3, kernel_size=(9, 11, 9), dilation=(1, 2, 1), spatial_sigma=3.0)
    assert crf.useful_kernel((9, 11, 9), (1, 2, 1), (3, 4, 5)) == (5, 3, 9)
    if engine == "recompute":
        monkeypatch.setattr(crf_torch, "RING_BUDGET", 0.0)
        monkeypatch.setattr(crf_torch, "RING_FLOOR_BYTES", 0)
    if engine == "autograd":
        unary.requires_grad_(True)
    backend = _crf_backend(engine)
    clipped = pac_crf3d(unary, guide, backend=backend, **kwargs)
    monkeypatch.setattr(crf, "useful_kernel", lambda kernel, dilation, shape: kernel)
    unclipped = pac_crf3d(unary, guide, backend=backend, **kwargs)
    torch.testing.assert_close(clipped, unclipped, rtol=1e-12, atol=1e-12)
    ref = crf_reference(unary, guide, **kwargs)  # by the definition, over the whole window
    torch.testing.assert_close(clipped.detach(), ref, rtol=1e-10, atol=1e-10)
    if engine == "autograd":
        weights = torch.randn(clipped.shape, generator=gen, dtype=torch.float64)
        (g_clipped,) = torch.autograd.grad((clipped * weights).sum(), unary)
        (g_unclipped,) = torch.autograd.grad((unclipped * weights).sum(), unary)
        torch.testing.assert_close(g_clipped, g_unclipped, rtol=1e-12, atol=1e-12)


def test_crf_window_clipped_to_centre_only():
    """A dilation beyond the volume leaves only the centre: no message, the unary's
    probabilities (logits ``unary - compat``)."""
    unary, guide = _r(1, 3, 2, 3, 4), _r(1, 1, 2, 3, 4)
    out = pac_crf3d(unary, guide, dilation=100, compat=2.0)
    torch.testing.assert_close(out, unary - 2.0)


# --- voxel_mlp: NaN and inf as nn.Sequential gives them ------------------------------------

_ACT_MODULES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def _sequential(widths, activation, gen):
    mods = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) / a**0.5)
            lin.bias.copy_(torch.randn(b, generator=gen) * 0.1)
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(_ACT_MODULES[activation]())
    return nn.Sequential(*mods)


SPECIALS = [NAN, INF, -INF, 3e38, -3e38, NAN, INF, -INF]


def _scatter_non_finite(x, gen, values):
    """Set a few features of a (N, C, D, H, W) tensor to ``values`` (NaN, +-inf, 3e38)."""
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=gen)[: len(values)]
    for i, value in zip(picks.tolist(), values):
        flat[i] = value
    return x


def _non_finite_case(activation, width, channels, spatial, seed, values=SPECIALS):
    gen = torch.Generator().manual_seed(seed)
    seq = _sequential([channels, width, width, 3], activation, gen)
    x = _scatter_non_finite(torch.randn(1, channels, *spatial, generator=gen), gen, values)
    weights = [m.weight.detach() for m in seq if isinstance(m, nn.Linear)]
    biases = [m.bias.detach() for m in seq if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref = seq(x.movedim(1, -1)).movedim(-1, 1)
    return x, weights, biases, ref


def _assert_nan_voxels_all_nan(x, out):
    nan_voxel = x.isnan().any(1, keepdim=True).expand_as(out)
    assert out[nan_voxel].isnan().all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width", [8, 48])  # the addmm path (< 32) and oneDNN (>= 32)
@pytest.mark.parametrize("channels_last", [False, True])
def test_voxel_mlp_non_finite_matches_sequential(activation, width, channels_last):
    x, weights, biases, ref = _non_finite_case(activation, width, 6, (4, 5, 6), width)
    assert mlp_torch.use_onednn(x, weights) == (
        width >= 32 and mlp_torch._onednn_linear() is not None
    )
    inp = x.movedim(1, -1).contiguous() if channels_last else x
    out = voxel_mlp(inp, weights, biases, activation, channels_last=channels_last, backend="torch")
    if channels_last:
        out = out.movedim(-1, 1)
    assert ref.isnan().any() and torch.isfinite(ref).any()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-4)
    _assert_nan_voxels_all_nan(x, out)


def test_voxel_mlp_onednn_relu_nan_without_non_finite_input():
    """Finite inputs whose hidden layer overflows (inf - inf = NaN before a ReLU): oneDNN's
    fused ReLU would give 0; the block is redone with torch's ReLU, as nn.Sequential."""
    gen = torch.Generator().manual_seed(3)
    seq = _sequential([4, 64, 64, 2], "relu", gen)
    x = torch.randn(1, 4, 3, 3, 3, generator=gen)
    x[0, :, 1, 1, 1] = 3e38  # finite, but the first layer overflows
    weights = [m.weight.detach() for m in seq if isinstance(m, nn.Linear)]
    biases = [m.bias.detach() for m in seq if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref = seq(x.movedim(1, -1)).movedim(-1, 1)
    out = voxel_mlp(x, weights, biases, "relu", backend="torch")
    assert not torch.isfinite(ref[0, :, 1, 1, 1]).any()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    # Non-finite weights disable the fused ReLU for every block.
    assert math.isnan(mlp_torch.relu_safe_input_bound([w * INF for w in weights], biases))
    # Zero weights still carry a NaN input (0 * NaN): the bound stays finite, NaN fails it.
    zeros = [torch.zeros_like(w) for w in weights]
    assert mlp_torch.relu_safe_input_bound(zeros, biases) < 3e38
    x[0, 0, 0, 0, 0] = NAN
    out = voxel_mlp(x, zeros, biases, "relu", backend="torch")
    assert out[0, :, 0, 0, 0].isnan().all() and not out[0, :, 0, 0, 1].isnan().any()


def test_voxel_mlp_non_finite_float64():
    x, weights, biases, _ = _non_finite_case("relu", 40, 5, (3, 4, 5), 11)
    x, weights, biases = x.double(), [w.double() for w in weights], [b.double() for b in biases]
    out = voxel_mlp(x, weights, biases, "relu", backend="torch")
    _assert_nan_voxels_all_nan(x, out)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: inf - inf
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_voxel_mlp_triton_non_finite(activation):
    # widths 5 -> 24 -> 24 -> 3: every layer zero-padded (to 16 / 32), the padded units must
    # not turn an inf into NaN. No 3e38 here: torch's GELU overflows above ~1.7e38 (to inf,
    # then NaN), the kernel's does not, so huge finite inputs may differ (docstring).
    x, weights, biases, ref = _non_finite_case(
        activation, 24, 5, (2, 3, 4), 5, [NAN, INF, -INF, NAN, INF, -INF]
    )
    to = lambda ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    out = voxel_mlp(x.to(DEVICE), to(weights), to(biases), activation, backend="triton").cpu()
    _assert_nan_voxels_all_nan(x, out)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-4)


# --- pac3d and pac_crf3d: NaN in, NaN out for the voxels it reaches ------------------------


def _window_hits(mask, kernel, stride, padding, dilation):
    """Bool (N, *out): outputs whose window (conv3d geometry) holds a set voxel of ``mask``
    (N, D, H, W), by the reference's unfold."""
    unfolded = _unfold(mask[:, None].double(), kernel, stride, padding, dilation)
    return unfolded[:, 0].amax(1) > 0


PAC_GEOMETRY = dict(kernel=(3, 3, 5), stride=(1, 2, 1), padding=(1, 1, 3), dilation=(1, 1, 2))


def _pac_nan_case(where, value):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 6, 7, generator=gen)
    guide = torch.randn(2, 2, 5, 6, 7, generator=gen)
    weight = torch.randn(4, 3, *PAC_GEOMETRY["kernel"], generator=gen)
    target = x if where == "input" else guide
    target[1, 1, 2, 3, 4] = value
    target[0, 0, 4, 0, 6] = value
    bad = ~torch.isfinite(target).all(1)
    geo = {k: v for k, v in PAC_GEOMETRY.items() if k != "kernel"}
    hits = _window_hits(bad, PAC_GEOMETRY["kernel"], *geo.values())
    return x, guide, weight, geo, hits


@pytest.mark.parametrize(("where", "value"), [("input", NAN), ("guide", NAN), ("guide", INF)])
@pytest.mark.parametrize("normalize", [False, True])
def test_pac3d_non_finite(where, value, normalize):
    x, guide, weight, geo, hits = _pac_nan_case(where, value)
    out = pac3d(x, guide, weight, normalize=normalize, backend="torch", **geo)
    assert torch.equal(out.isnan(), hits[:, None].expand_as(out))
    # The other outputs never read the bad voxels: they are those of a finite guide.
    fixed = pac3d(
        x.nan_to_num(0.0), guide.nan_to_num(0.0, 0.0, 0.0), weight, normalize=normalize, **geo
    )
    torch.testing.assert_close(out[~out.isnan()], fixed[~out.isnan()])
    depthwise = pac3d(x, guide, kernel_size=PAC_GEOMETRY["kernel"], normalize=normalize, **geo)
    if where == "guide":
        assert torch.equal(depthwise.isnan(), hits[:, None].expand_as(depthwise))
    else:
        assert torch.equal(depthwise.isnan().any(1), hits)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["input", "guide"])
def test_pac3d_triton_non_finite(where):
    gen = torch.Generator().manual_seed(6)
    x, guide = torch.randn(1, 2, 2, 3, 4, generator=gen), torch.randn(1, 1, 2, 3, 4, generator=gen)
    (x if where == "input" else guide)[0, 0, 1, 1, 2] = NAN
    bad = ~torch.isfinite(x if where == "input" else guide).all(1)
    hits = _window_hits(bad, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    out = pac3d(x.to(DEVICE), guide.to(DEVICE), kernel_size=3, padding=1, backend="triton")
    assert torch.equal(out.cpu().isnan().any(1), hits)


def _crf_nan_case(where, value, iterations):
    gen = torch.Generator().manual_seed(8)
    unary = 2 * torch.randn(1, 3, 6, 7, 8, generator=gen)
    guide = torch.randn(1, 2, 6, 7, 8, generator=gen)
    target = unary if where == "unary" else guide
    target[0, 1, 1, 2, 3] = value
    bad = (~torch.isfinite(target).all(1)).double()
    for _ in range(iterations):  # each step spreads NaN by one window
        bad = _window_hits(bad > 0, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)).double()
    return unary, guide, bad[:, None].expand(1, 3, 6, 7, 8) > 0


CRF_ENGINES = ["wavefront", "fused", "recompute", "autograd"]


def _crf_backend(engine: str) -> str:
    """``fused``: the CPU wavefront's numba loops (``backend="auto"``); others plain torch."""
    if engine != "fused":
        return "torch"
    if not crf_numba.available():
        pytest.skip("numba is not installed")
    return "auto"


@pytest.mark.parametrize(
    ("where", "value"), [("unary", NAN), ("unary", INF), ("guide", NAN), ("guide", -INF)]
)
@pytest.mark.parametrize("engine", CRF_ENGINES)
def test_pac_crf3d_non_finite(where, value, engine, monkeypatch):
    if engine == "recompute":
        monkeypatch.setattr(crf_torch, "RING_BUDGET", 0.0)
        monkeypatch.setattr(crf_torch, "RING_FLOOR_BYTES", 0)
    unary, guide, expected = _crf_nan_case(where, value, 2)
    if engine == "autograd":
        unary.requires_grad_(True)
    out = pac_crf3d(
        unary, guide, iterations=2, kernel_size=3, compat=2.0, backend=_crf_backend(engine)
    )
    assert torch.equal(out.isnan(), expected)


def test_pac_crf3d_minus_inf_logit_is_probability_zero():
    unary, guide = _r(1, 3, 4, 5, 6), _r(1, 1, 4, 5, 6)
    unary[0, 0, 1, 1, 1] = -INF
    out = pac_crf3d(unary, guide, iterations=3, kernel_size=3)
    assert not out.isnan().any()
    assert out[0, 0, 1, 1, 1] == -INF and torch.isfinite(out).sum() == out.numel() - 1


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["unary", "guide"])
def test_pac_crf3d_triton_non_finite(where):
    gen = torch.Generator().manual_seed(9)
    unary, guide = (
        torch.randn(1, 2, 2, 3, 4, generator=gen),
        torch.randn(1, 1, 2, 3, 4, generator=gen),
    )
    (unary if where == "unary" else guide)[0, 0, 0, 0, 0] = NAN
    out = pac_crf3d(
        unary.to(DEVICE), guide.to(DEVICE), iterations=1, kernel_size=3, backend="triton"
    )
    expected = _window_hits(torch.isnan(unary if where == "unary" else guide).any(1), (3,) * 3,
                            (1,) * 3, (1,) * 3, (1,) * 3)  # fmt: skip
    assert torch.equal(out.cpu().isnan().any(1), expected)


# --- any strides --------------------------------------------------------------------------


def _views(t: torch.Tensor):
    """Non-contiguous views equal to ``t``: permuted, stepped (every other element), and a
    transposed copy read back through ``.mT``."""
    yield "permuted", t.permute(0, 4, 3, 2, 1).contiguous().permute(0, 4, 3, 2, 1)
    yield "stepped", torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    yield "transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _ops():
    weights, biases = _mlp([3, 40, 2])
    narrow = _mlp([3, 8, 2])
    return {
        "voxel_mlp": lambda a, g: voxel_mlp(a, weights, biases, backend="torch"),
        "voxel_mlp narrow": lambda a, g: voxel_mlp(a, *narrow, backend="torch"),
        "voxel_mlp last": lambda a, g: voxel_mlp(
            a.movedim(1, -1), weights, biases, channels_last=True, backend="torch"
        ).movedim(-1, 1),
        "pac3d": lambda a, g: pac3d(a, g, kernel_size=3, padding=1, normalize=True),
        "pac_crf3d": lambda a, g: pac_crf3d(a, g, iterations=2, kernel_size=3, spatial_sigma=1.5),
    }


@pytest.mark.parametrize("op", list(_ops()))
def test_any_strides(op):
    run = _ops()[op]
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 4, 5, 6, generator=gen)
    guide = torch.randn(2, 2, 4, 5, 6, generator=gen)
    expected = run(x, guide)
    for (kind, xv), (_, gv) in zip(_views(x), _views(guide)):
        assert not xv.is_contiguous() and not gv.is_contiguous(), kind
        torch.testing.assert_close(run(xv, gv), expected, msg=f"{op}, {kind} views")
    # torch.flip copies (torch has no negative strides); every op here is equivariant under
    # flips (per-voxel, or a symmetric window), so flipped inputs give the flipped result.
    for dims in [(2,), (3, 4), (2, 3, 4)]:
        flipped = run(x.flip(dims), guide.flip(dims))
        torch.testing.assert_close(flipped, expected.flip(dims), msg=f"{op}, flip {dims}")
    # Expanded inputs (stride 0 along D): as their contiguous copies.
    xe, ge = x[:, :, :1].expand_as(x), guide[:, :, :1].expand_as(guide)
    torch.testing.assert_close(run(xe, ge), run(xe.contiguous(), ge.contiguous()))


def test_max_unpool3d_any_strides():
    gen = torch.Generator().manual_seed(11)
    values, indices = max_pool3d_with_indices(torch.randn(2, 3, 4, 6, 8, generator=gen), 2)
    expected = max_unpool3d(values, indices, 2)
    for (kind, v), (_, i) in zip(_views(values), _views(indices)):
        assert not v.is_contiguous() and not i.is_contiguous(), kind
        torch.testing.assert_close(max_unpool3d(v, i, 2), expected, rtol=0, atol=0, msg=kind)
    ve, ie = values[:, :1].expand_as(values), indices[:, :1].expand_as(indices)
    torch.testing.assert_close(
        max_unpool3d(ve, ie, 2), max_unpool3d(ve.contiguous(), ie.contiguous(), 2)
    )
