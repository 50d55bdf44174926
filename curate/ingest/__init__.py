"""Reading images users already have: WebDataset tar shards (`tars`, `tar_plan`) and Parquet image tables
(`tables`), plus what both need (image checks in `rows`, metadata columns in `columns`, img2dataset's
sidecar files in `sidecar`).

Plain parameters only (URIs, byte and row ranges, settings); the `webdataset` and `parquet` stages are
thin adapters over this package. docs/sources.md describes the behaviour.
"""
