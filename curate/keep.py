"""Which rows of an image shard a stage works on: the one rule shared by sscd, score, caption, encode and filter.

A row is processed when its image row is `ok` upstream and, when the stage names a keep source
(`keep_from`, a joined stage with `key` and `keep` columns such as `dedup` or a `filter`), its `keep` flag
is true. Every other row still gets an output row with a status saying why it was not processed, so shards
keep 1:1 lineage and nothing vanishes silently. The status of a row the keep source did not keep says why:

- `skipped_filtered` when the keep source is a filter (it has a `removed_by` column; `error` names the rule);
- the keep source's own status when it is not `ok` there (e.g. dedup saw an sscd row that a filter skipped
  or that failed to decode: the reason travels on instead of being called a duplicate);
- `skipped_duplicate` otherwise (dedup dropped it as a copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curate import storage

SKIPPED_DUPLICATE = "skipped_duplicate"  # keep is false in the keep source (dedup: a copy)
SKIPPED_FILTERED = "skipped_filtered"  # keep is false in a filter keep source (a rule removed the row)
NOT_OK_UPSTREAM = "not_ok_upstream"  # the image row itself has a non-ok status


@dataclass(frozen=True)
class KeepFlags:
    """A keep source's shard: keep per key, and (status, error) for each key it does not keep."""

    keep: dict[str, bool]
    why: dict[str, tuple[str, str]]

    @staticmethod
    def of(keep: dict[str, bool], source: str = "the keep source") -> KeepFlags:
        """Plain keep flags (a dedup-like source without statuses): every dropped row is a duplicate."""
        why = {k: (SKIPPED_DUPLICATE, f"keep is false in {source}") for k, v in keep.items() if not v}
        return KeepFlags(dict(keep), why)

    def skip(self, key: str) -> tuple[str, str] | None:
        """None when the row is kept, else its (status, error); a key absent from the source is a lineage error."""
        if key not in self.keep:
            raise ValueError(f"key {key} of the image shard is missing from the keep source")
        return None if self.keep[key] else self.why[key]


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


def read_keep(uri: str, source: str = "the keep source") -> KeepFlags:
    """Keep flags from a keep source's shard; a missing `keep` column is a lineage error, raised."""
    columns = storage.parquet_file(uri).schema_arrow.names
    missing = [c for c in ("key", "keep") if c not in columns]
    if missing:
        raise ValueError(f"{uri}: keep source has no column {', '.join(missing)} (columns: {', '.join(columns)})")
    extra = [c for c in ("removed_by", "status") if c in columns]
    table = storage.read_parquet(uri, columns=["key", "keep", *extra])
    keys = table["key"].to_pylist()
    keep = {k: bool(v) for k, v in zip(keys, table["keep"].to_pylist(), strict=True)}
    removed_by = table["removed_by"].to_pylist() if "removed_by" in extra else None
    status = table["status"].to_pylist() if "status" in extra else None
    why: dict[str, tuple[str, str]] = {}
    for i, key in enumerate(keys):
        if keep[key]:
            continue
        if removed_by is not None:
            why[key] = (SKIPPED_FILTERED, f"removed by {removed_by[i] or 'a rule'} in {source}")
        elif status is not None and status[i] not in (None, "ok"):
            why[key] = (str(status[i]), f"keep is false in {source}, whose status is {status[i]}")
        else:
            why[key] = (SKIPPED_DUPLICATE, f"keep is false in {source}")
    return KeepFlags(keep, why)


def unkept(
    keys: list[str], statuses: list[str], keep: KeepFlags | dict[str, bool] | None
) -> list[tuple[str, str] | None]:
    """Per row: the keep source's (status, error) for an `ok` row it does not keep, else None (rows that are
    not ok keep their own reason, which the caller already has). A key absent from the keep source breaks
    1:1 lineage and raises: the shard fails loudly rather than processing or dropping it by guess."""
    if keep is None:
        return [None] * len(keys)
    if isinstance(keep, dict):
        keep = KeepFlags.of(keep)
    absent = [k for k in keys if k not in keep.keep]
    if absent:
        raise ValueError(f"{len(absent)} keys of the image shard are missing from the keep source, e.g. {absent[0]}")
    return [keep.skip(key) if status == "ok" else None for key, status in zip(keys, statuses, strict=True)]


def select_rows(upstream: pa.Table, keep: KeepFlags | dict[str, bool] | None) -> Selection:
    """Apply the rule to an upstream shard (needs `key` and `status`); rows not ok upstream get
    `not_ok_upstream` (stages that keep the image row's own reason use `unkept` directly)."""
    statuses = upstream["status"].to_pylist()
    skips = unkept(upstream["key"].to_pylist(), statuses, keep)
    return Selection(
        [
            (NOT_OK_UPSTREAM, f"upstream status {status}") if status != "ok" else skip
            for status, skip in zip(statuses, skips, strict=True)
        ]
    )


def keep_table_for(context: Any, keep_from: str | None, index: int) -> KeepFlags | None:
    """The keep flags of shard ``index`` from the configured keep source, or None when there is none."""
    if keep_from is None:
        return None
    return read_keep(context.joined_shard(keep_from, index), keep_from)
