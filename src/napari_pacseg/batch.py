"""Batch and out-of-core segmentation, the public entry: ``segment_zarr`` (zarr volumes larger
than memory, chunk by chunk, locally or on a dask cluster; ``batch_zarr``) and
``segment_files`` (files, folders and patterns into one folder with resumable records;
``batch_files``)."""

from .batch_files import (
    FileResult,
    expand_inputs,
    iter_segment_files,
    output_paths,
    read_record,
    segment_files,
)
from .batch_zarr import DEFAULT_CHUNKS, ZarrResult, segment_zarr, source_paths
from .model_io import ModelPayload

__all__ = [
    "DEFAULT_CHUNKS",
    "FileResult",
    "ModelPayload",
    "ZarrResult",
    "expand_inputs",
    "iter_segment_files",
    "output_paths",
    "read_record",
    "segment_files",
    "segment_zarr",
    "source_paths",
]
