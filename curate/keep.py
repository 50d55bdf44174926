"""Which rows of a shard later stages should work on: the keep flags of the first joined stage that has them.

A stage that joins earlier stages (`join: [dedup, caption]`) reads shard i of each; the first one with a
boolean `keep` column decides (true: work on the row; false or null: skip it). Without such a stage
every row is kept.
"""

from __future__ import annotations

import pyarrow as pa


def kept_keys(joined: dict[str, pa.Table]) -> set[str] | None:
    """Keys whose `keep` is true in the first joined table (in join order) with a `keep` column;
    None when no joined table has one (keep everything)."""
    for table in joined.values():
        if "keep" in table.column_names:
            keys = table["key"].to_pylist()
            flags = table["keep"].to_pylist()
            return {k for k, f in zip(keys, flags, strict=True) if f is True}
    return None
