"""Objects: connected pieces split by a watershed, their measurement table, and the chunked form for zarr runs."""
