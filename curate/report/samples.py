"""Bounded samples of a run folder: which shards and markers the report reads, and rows read out of them.

The report must cost the same at 1e9 rows as at 1e3, so it never reads every shard. What it reads:
- markers: at most MARKER_SCAN per stage, spread evenly over the shard indexes (all of them below that);
- rows: whole columns of at most a fixed number of shards per section (key / status / error / captions, never
  the image column), then the image column of only the row groups that hold the rows it shows.

Memory follows the shard size, never the run's: what a build holds at once is the small columns of the shards a
section reads (the dedup section's 16 shards' keys are the most: ~100 bytes per row as Python strings, 8 MB at
5,000 rows per shard), one row group of images, and the page.

Shard choice is deterministic (evenly spaced over the done shards, first and last included), so two builds
of the same run folder show the same rows and thumbnails are reused from ``_report/img/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.runfolder import RunDir, ShardStats, StageDir

MARKER_SCAN = 200  # markers read per stage, to find the shards holding each status
READ_THREADS = 16  # markers are small objects: read them in parallel (an object store answers in ~20-50 ms)


def spread(items: list[int], n: int) -> list[int]:
    """At most ``n`` items, evenly spaced, first and last included (all of them when there are few)."""
    if len(items) <= n:
        return list(items)
    if n <= 1:
        return items[:n]
    return sorted({items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)})


def done_shards(stage: StageDir) -> list[int]:
    """Shard indexes with a marker: every planned shard of a complete stage (no listing), else the listing."""
    if stage.is_complete() and storage.exists(stage.record_uri):
        return list(range(int(stage.read_record().get("shards", 0))))
    return sorted(stage.done_shards())


def read_markers(stage: StageDir, indexes: Iterable[int]) -> list[ShardStats]:
    indexes = list(indexes)
    if not indexes:
        return []
    with ThreadPoolExecutor(min(READ_THREADS, len(indexes))) as pool:
        docs = list(pool.map(lambda i: storage.read_json(stage.marker(i)), indexes))
    return [ShardStats.from_dict(d) for d in docs]


def sample_markers(stage: StageDir, limit: int | None = None) -> list[ShardStats]:
    """The markers of at most ``limit`` (MARKER_SCAN) done shards, spread over the stage."""
    return read_markers(stage, spread(done_shards(stage), limit or MARKER_SCAN))


def read_columns(uri: str, wanted: list[str]) -> pa.Table:
    """The wanted columns a shard has (others are absent from the result, not an error)."""
    file = storage.parquet_file(uri)
    names = file.schema_arrow.names
    return file.read(columns=[c for c in wanted if c in names])


def rows_with_keys(uri: str, keys: Iterable[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    """key -> {column: value} for the given keys of one shard, reading the wanted (possibly large) columns only
    from the row groups that hold those keys: memory is one row group's worth, whatever the shard's size."""
    wanted = set(keys)
    file = storage.parquet_file(uri)
    names = file.schema_arrow.names
    columns = [c for c in dict.fromkeys(["key", *columns]) if c in names]
    key_column = np.asarray(file.read(columns=["key"])["key"].to_pylist(), dtype=object)
    hits = np.flatnonzero([k in wanted for k in key_column])
    if not len(hits):
        return {}
    starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])
    out: dict[str, dict[str, Any]] = {}
    for group in sorted(set(np.searchsorted(starts, hits, side="right") - 1)):
        table = file.read_row_group(int(group), columns=columns)
        for row in table.to_pylist():
            if row["key"] in wanted:
                out[row["key"]] = row
    return out


def image_stage(run: RunDir, name: str) -> str | None:
    """The source stage whose shards hold the images of ``name``'s rows: follow `_stage.json`'s `upstream` until a
    stage has none. Every stage keeps 1:1 lineage (shard i holds the keys of its input's shard i), so a shard
    index carries over to the source."""
    seen = set()
    while name not in seen:
        seen.add(name)
        stage = run.stage(name)
        if not storage.exists(stage.record_uri):
            return None
        upstream = stage.read_record().get("upstream")
        if not upstream:
            return name
        name = upstream
    return None


__all__ = [
    "MARKER_SCAN",
    "done_shards",
    "image_stage",
    "read_columns",
    "read_markers",
    "rows_with_keys",
    "sample_markers",
    "spread",
]
