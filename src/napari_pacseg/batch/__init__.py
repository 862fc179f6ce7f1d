"""Batch and out-of-core segmentation, the public entry: ``segment_zarr`` (zarr volumes larger
than memory, chunk by chunk, locally or on a dask cluster; ``batch_zarr``) and
``segment_files`` (files, folders and patterns into one folder with resumable records;
``batch_files``)."""

from napari_pacseg.batch.files import (
    FileResult,
    expand_inputs,
    iter_segment_files,
    output_paths,
    read_record,
    segment_files,
)
from napari_pacseg.batch.zarr_runs import DEFAULT_CHUNKS, ZarrResult, segment_zarr, source_paths
from napari_pacseg.io.model_file import ModelPayload

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
