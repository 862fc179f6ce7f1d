"""Checks of what users pass in: images, spacings, sizes, devices. Each failure is a ``ValueError``
(``TypeError`` for a wrong kind of object) whose one-line message says what was wrong and what to
do, with values clipped so that a 300-digit number or a huge array never floods a message."""

from __future__ import annotations

import math
import numbers
import operator
import unicodedata

import numpy as np
import torch

from pacseg_kernels.checks import short_repr

FLOAT32_MAX = float(np.finfo(np.float32).max)

_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def unprintable_chars(text: str) -> list[str]:
    """The characters of ``text`` that must never reach a terminal or a label: control
    characters (the ``\\x1b`` of ANSI escapes, newlines), lone surrogates (not encodable),
    line and paragraph separators, bidirectional overrides."""
    return [
        c
        for c in text
        if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI_CONTROLS
    ]


def printable(text: str) -> str:
    """``text`` with the characters of ``unprintable_chars`` (and any other non-printable one)
    shown as escapes, so a name from a file can never drive a terminal."""
    bad = set(unprintable_chars(text))
    return "".join(repr(c)[1:-1] if c in bad or not c.isprintable() else c for c in text)


def one_line(text, limit: int = 500) -> str:
    """``text`` (or an exception's message) on one line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(err: BaseException, limit: int = 500) -> str:
    """An exception as one line for a user: its message (``ValueError``/``OSError``: written for
    users), else prefixed by its type; out of memory says what to do."""
    if isinstance(err, MemoryError):
        return "out of memory; convert the volume to zarr and segment it in chunks"
    text = one_line(err, limit) or type(err).__name__
    return text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"


def as_tuple_field(obj, name: str) -> None:
    """Store a list given for a tuple field of a frozen dataclass as a tuple."""
    if isinstance(getattr(obj, name), list):
        object.__setattr__(obj, name, tuple(getattr(obj, name)))


def is_int(value) -> bool:
    """A real ``int`` (``bool`` is not one here; neither is ``3.0``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite real number: an ``int`` or ``float``, not a ``bool`` or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def check_callable(value, name: str, call: str = "") -> None:
    """``TypeError`` unless ``value`` is None or callable (a progress or cancel callback:
    checked where it is passed, not where it is first called, deep in the work). ``call``
    shows how it is called, e.g. ``"progress(done, total)"``."""
    if value is not None and not callable(value):
        how = f" (called as {call})" if call else ""
        raise TypeError(
            f"{name} must be a callable{how} or None, got {type(value).__name__} "
            f"{short_repr(value)}"
        )


MAX_SEED = 2**63 - 1


def check_seed(value, name: str = "seed") -> int:
    """``value`` as a random seed: an int in ``[0, MAX_SEED]`` (not a bool, float or string;
    ``ValueError`` as ``check_int``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer in [0, 2**63 - 1], got {type(value).__name__} "
            f"{short_repr(value)}"
        )
    value = operator.index(value)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {short_repr(value)}")
    return value


def as_array(value, what: str) -> np.ndarray:
    """``np.asarray(value)``, with a one-line ``ValueError`` for a ragged nested list (numpy's
    "inhomogeneous shape") or anything else numpy cannot take as one array."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as err:
        if isinstance(value, (list, tuple)) and "inhomogeneous" in str(err):
            raise ValueError(
                f"{what}: a ragged nested list (rows of different lengths); give a numpy array "
                "(every row of the same length)"
            ) from None
        raise ValueError(
            f"{what} cannot be read as an array ({one_line(err, 120)}); give a numpy array"
        ) from None


def as_volume(image, channel_axis: int | None, what: str = "image") -> np.ndarray:
    """``(C, D, H, W)`` view of a 3D image, or of a 4D one with ``channel_axis``; any strides
    (``as_image`` with ``ndim=3``)."""
    return as_image(image, channel_axis, what, ndim=3)[0]


def as_image(
    image, channel_axis: int | None, what: str = "image", ndim: int | None = None
) -> tuple[np.ndarray, bool]:
    """``(vol, flat)``: a ``(C, D, H, W)`` view (any strides) of a 2D or 3D image, with one
    more axis when ``channel_axis`` is given, and whether it was 2D (then ``D == 1``: a 2D
    image is segmented as a one-plane volume with in-plane windows).

    ``ndim`` is the model's kind: 3 refuses 2D images, 2 refuses volumes deeper than one plane
    (each with a message that says what to do), None takes either. Also refuses non-numeric
    and complex dtypes, empty arrays, and float values that are NaN, infinite, or beyond the
    float32 range the pipeline computes in.
    """
    if isinstance(image, (str, bytes)) or image is None:
        raise TypeError(f"{what} must be an array, got {short_repr(image)}")
    arr = as_array(image, what)
    if np.iscomplexobj(arr):
        raise ValueError(
            f"{what} has the complex dtype {arr.dtype}; segment its magnitude (np.abs) or its "
            "real part explicitly"
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{what} has dtype {arr.dtype}; a numeric image is required")
    if channel_axis is None:
        spatial = arr.ndim
        arr = arr[None]
    else:
        if arr.ndim not in (3, 4):
            raise ValueError(
                f"{what} with channel_axis={short_repr(channel_axis)} must be 3D (a 2D image's "
                f"channels) or 4D (a volume's), got shape {short_repr(arr.shape)}"
            )
        axis = check_int(channel_axis, "channel_axis", low=-arr.ndim, high=arr.ndim - 1)
        arr = np.moveaxis(arr, axis, 0)
        spatial = arr.ndim - 1
    shape = short_repr(np.shape(image))
    if spatial not in (2, 3):
        raise ValueError(
            f"{what} must be 2D (H, W) or 3D (D, H, W), got shape {shape}; for a "
            "multichannel image pass channel_axis, for a time-lapse or a stack of 2D frames "
            "frame_axis"
        )
    flat = spatial == 2
    if flat and ndim == 3:
        raise ValueError(
            f"{what} is 2D (shape {shape}) but the model is a 3D model (trained on volumes): "
            "train a 2D model on 2D images, or pass image[None] to segment it as a one-plane "
            "volume"
        )
    if not flat and ndim == 2 and arr.shape[1] != 1:
        raise ValueError(
            f"{what} is 3D (shape {shape}) but the model is a 2D model (trained on 2D images): "
            "pass frame_axis=0 to segment each plane as a 2D image, or train a 3D model"
        )
    if flat:
        arr = arr[:, None]
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {shape})")
    if np.issubdtype(arr.dtype, np.floating):
        low, high = float(arr.min()), float(arr.max())  # NaN and inf show in these two
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))  # only to say how many
            raise ValueError(f"{what} holds {bad} NaN or infinite values; fill or mask them first")
        peak = max(abs(low), abs(high))
        if peak > FLOAT32_MAX / 4:  # differences of two values must stay finite in float32
            raise ValueError(
                f"{what} holds values up to {peak:.3g}, beyond the float32 range the "
                f"segmentation computes in (|x| < {FLOAT32_MAX / 4:.2g}); rescale it first"
            )
    return arr, flat


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (a Python or numpy integer; not a bool, float or string) within
    ``[low, high]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {short_repr(value)}")
    value = operator.index(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer in {span}, got {short_repr(value)}")
    return value


def check_number(value, name: str) -> float:
    """``value`` as a finite float (a real number; not a bool or string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {short_repr(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {short_repr(value)}")
    return value


def _sequence(value, n: int, name: str, example: str) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be {n} {example}, got {short_repr(value)}")
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{name} must be {n} {example}, got {short_repr(value)}")
    return items


def check_spacing(spacing, default, n: int = 3) -> tuple[float, ...]:
    """``spacing`` (``n`` positive finite numbers, z first; y and x for ``n = 2``), or
    ``default`` when None."""
    if spacing is None:
        spacing = default
    example = "positive numbers (y, x)" if n == 2 else "positive numbers (z, y, x)"
    items = _sequence(spacing, n, "spacing", example)
    values = []
    for s in items:
        if isinstance(s, torch.Tensor) and s.numel() == 1 and s.is_floating_point():
            s = s.item()  # a napari or torch user's scalar tensor
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
            raise ValueError(f"spacing must be {n} {example}, got {short_repr(spacing)}")
        s = float(s)
        if not (math.isfinite(s) and 0 < s < 1e12):
            raise ValueError(f"spacing must be {n} {example}, got {short_repr(spacing)}")
        values.append(s)
    return tuple(values)


def check_ints(value, n: int | None, name: str, low: int = 1, high: int | None = None) -> tuple:
    """``value`` as a tuple of ints in ``[low, high]`` (``n`` of them when ``n`` is given)."""
    if n is not None:
        items = _sequence(value, n, name, "integers")
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of integers, got {short_repr(value)}")
    else:
        items = list(value)
    return tuple(check_int(v, f"{name} entries", low, high) for v in items)


def resolve_device(device) -> torch.device:
    """``torch.device`` of "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1",
    "mps" or a ``torch.device``; ``ValueError`` for a malformed name or a device this machine
    does not have."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {short_repr(device)}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"device {short_repr(device)} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {short_repr(str(device))}: CUDA is not available here (no NVIDIA GPU, or a "
                "torch build without CUDA); use device='cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {short_repr(str(device))}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device {short_repr(str(device))}: MPS is not available here; use 'cpu'"
            )
    elif dev.type != "cpu":
        raise ValueError(
            f"device {short_repr(str(device))} is not supported; use 'auto', 'cpu', 'cuda' or 'mps'"
        )
    return dev
