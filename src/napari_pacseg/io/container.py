"""The safetensors container of a model file: its layout checked from the header alone, its
tensors decoded and encoded by the ``safetensors`` library.

Layout: 8 bytes little-endian header length ``n``, ``n`` bytes of a UTF-8 JSON header mapping
tensor names to ``{"dtype", "shape", "data_offsets"}`` plus ``"__metadata__"`` (strings to
strings), then the raw little-endian data: the tensors' byte ranges tile it exactly (no gap,
no overlap, nothing after the last one).

What is ours and what is the library's. The library (``safetensors.deserialize``,
``safetensors.numpy.save``) decodes the tensors' bytes once every check here has passed, and
writes the file. The checks themselves stay ours, run on the header before the data is read:
the library reads a file only whole (``deserialize`` takes every byte, ``safe_open`` maps the
file and checks it with its own rules) and its checks fall short of what the corpus tests
(``tests/napari_pacseg/test_model_file_corpus.py``) ask of a model file:

- it accepts duplicate tensor keys and unknown keys in a tensor's entry;
- its header limit is 100 MB (ours: ``MAX_HEADER_BYTES``) and it has no limit on the data;
- its messages name neither the file nor the tensor and say nothing of what to do.

So ``header_length``, ``parse_header`` and ``tensor_ranges`` check the length, the JSON
(strictly, with ``codec.parse_json``), the names, dtypes, shapes and offsets; then ``decode``
hands the whole file to the library, which checks the layout again and cuts out the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.numpy

from napari_pacseg.checks import is_int, one_line, short_repr
from napari_pacseg.io.codec import ModelFileError, json_kind, parse_json

MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 30
MAX_FILE_BYTES = 8 + MAX_HEADER_BYTES + MAX_TENSOR_BYTES


def header_length(first: bytes, size: int, name: str) -> int:
    """The header length ``n`` from a file's first 8 bytes ``first`` (the whole file when
    shorter), checked against the file's ``size`` and the limits; ``ModelFileError`` naming
    ``name`` (the file) otherwise."""
    if size < 8:
        raise ModelFileError(
            f"{name}: {size} bytes is too short for a model file (empty or truncated)"
        )
    if size > MAX_FILE_BYTES:
        raise ModelFileError(f"{name}: {size} bytes is over the size limit of a model file")
    n = int.from_bytes(first, "little")
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


def parse_header(raw: bytes, name: str) -> dict:
    """The JSON header ``raw`` as a dict, parsed strictly (``codec.parse_json``)."""
    header = parse_json(raw, name, "the header")
    if not isinstance(header, dict):
        raise ModelFileError(f"{name}: the header is JSON {json_kind(header)}, not an object")
    return header


def _is_uint(value) -> bool:
    return is_int(value) and value >= 0


def tensor_ranges(
    header: dict, shapes: Mapping[str, tuple[int, ...]], size: int, name: str, data_start: int
) -> tuple[list[tuple[int, int, str]], int]:
    """``(ranges, data_bytes)`` of a file of ``size`` bytes whose data begins at
    ``data_start`` (``8 + n``): each tensor's ``(start, stop, tensor)`` within the data,
    sorted, and the data's length.

    Checks that ``header`` holds exactly the tensors of ``shapes`` (name -> shape the model
    needs), each as float32 (``F32``) of that shape, with byte ranges that tile the data (no
    overlap, no gap), within ``MAX_TENSOR_BYTES``, ending exactly at the file's end (neither
    truncated nor followed by trailing bytes); ``ModelFileError`` naming ``name`` otherwise."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(shapes) - set(entries))
    unexpected = sorted(set(entries) - set(shapes))
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
        if tuple(shape) != shapes[tensor]:
            raise ModelFileError(
                f"{name}: tensor {shown} has shape {short_repr(tuple(shape))} but the config needs {shapes[tensor]}"
            )
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
            raise ModelFileError(
                f"{name}: tensor {shown} has data_offsets {short_repr(offsets)}: not a list "
                "of 2 non-negative integers [start, end]"
            )
        start, stop = offsets
        need = 4 * math.prod(shapes[tensor])
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
    _check_metadata_text(header.get("__metadata__"), name)
    return layout, end


def _check_metadata_text(block, name: str) -> None:
    """Refuse a lone surrogate (``"\\ud800"``) in a ``__metadata__`` key or value: Python's
    JSON takes it, the library's refuses the header, and the checksum does not cover the
    other keys of the block, so without this such a file would fail only in ``decode``."""
    for text in (*block, *block.values()) if isinstance(block, dict) else ():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ModelFileError(
                f"{name}: a __metadata__ key or value holds a lone surrogate escape "
                "(such as \\ud800), which the safetensors format does not allow: corrupt"
            ) from None


def decode(file: bytes, name: str) -> dict[str, bytes]:
    """Each tensor's raw bytes (little-endian float32) in ``file``, a whole model file whose
    header passed ``tensor_ranges``: cut out by ``safetensors.deserialize``, which checks the
    layout again. Its refusal (never expected after our checks) is a ``ModelFileError``."""
    try:
        return {tensor: info["data"] for tensor, info in safetensors.deserialize(file)}
    except safetensors.SafetensorError as err:
        raise ModelFileError(
            f"{name}: not a valid safetensors file ({one_line(err, 120)})"
        ) from None


def encode(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of ``arrays`` (name -> little-endian float32 array) and
    ``metadata``, written by ``safetensors.numpy.save``: the header is compact JSON with
    ``"__metadata__"`` first, then the tensors in name order (all are F32), each entry's keys
    in the order dtype, shape, data_offsets, padded with spaces to a multiple of 8 bytes; the
    data follows in the same order. Byte for byte what the file format of ``model_file``
    documents (the bundled demo model re-saved is its own file)."""
    return safetensors.numpy.save(dict(arrays), metadata=dict(metadata))
