"""Which rows of an image shard a model stage works on: the one rule shared by caption and encode.

A row is processed when its image row is `ok` upstream and, when the stage names a keep source
(`keep_from`, a joined stage with `key` and `keep` columns such as `dedup`), its `keep` flag is true.
Every other row still gets an output row with a status saying why it was not processed, so shards keep
1:1 lineage and nothing vanishes silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curate import storage

SKIPPED_DUPLICATE = "skipped_duplicate"  # keep is false in the keep source
NOT_OK_UPSTREAM = "not_ok_upstream"  # the image row itself has a non-ok status


@dataclass(frozen=True)
class Selection:
    """Per row of the upstream shard: None to process it, else (status, error) of its output row."""

    skip: list[tuple[str, str] | None]

    @property
    def process(self) -> list[int]:
        return [i for i, s in enumerate(self.skip) if s is None]


def check_keep_from(keep_from: str | None, join: tuple[str, ...]) -> None:
    """Config-time rule: the keep source must be one of the stage's joined stages (so it is read beside)."""
    if keep_from is not None and keep_from not in join:
        raise ValueError(f"keep_from {keep_from!r} must also be listed in `join` (join: {list(join)})")


def read_keep(uri: str) -> dict[str, bool]:
    """key -> keep from a keep source's shard; a missing `keep` column is a lineage error, raised."""
    columns = storage.parquet_file(uri).schema_arrow.names
    missing = [c for c in ("key", "keep") if c not in columns]
    if missing:
        raise ValueError(f"{uri}: keep source has no column {', '.join(missing)} (columns: {', '.join(columns)})")
    table = storage.read_parquet(uri, columns=["key", "keep"])
    return {k: bool(v) for k, v in zip(table["key"].to_pylist(), table["keep"].to_pylist(), strict=True)}


def select_rows(upstream: pa.Table, keep: dict[str, bool] | None) -> Selection:
    """Apply the rule to an upstream shard (needs `key` and `status`). A key absent from the keep source
    breaks 1:1 lineage and raises: the shard fails loudly rather than captioning or dropping it by guess."""
    keys = upstream["key"].to_pylist()
    statuses = upstream["status"].to_pylist()
    skip: list[tuple[str, str] | None] = []
    absent = [k for k in keys if keep is not None and k not in keep]
    if absent:
        raise ValueError(f"{len(absent)} keys of the image shard are missing from the keep source, e.g. {absent[0]}")
    for key, status in zip(keys, statuses, strict=True):
        if status != "ok":
            skip.append((NOT_OK_UPSTREAM, f"upstream status {status}"))
        elif keep is not None and not keep[key]:
            skip.append((SKIPPED_DUPLICATE, "keep is false in the keep source"))
        else:
            skip.append(None)
    return Selection(skip)


def keep_table_for(context: Any, keep_from: str | None, index: int) -> dict[str, bool] | None:
    """The keep flags of shard ``index`` from the configured keep source, or None when there is none."""
    if keep_from is None:
        return None
    return read_keep(context.joined_shard(keep_from, index))
