"""Exact copies (same sha256 of the file bytes) by hash partition: no task holds every hash.

``scan``: one task per map group writes the group's embedded rows that have a sha256 (hash, id, keep-order
codes) into ``parts`` files by a CRC-32 of the hash. ``exact``: one task per partition sorts its rows by (hash,
keep order); in every run of equal hashes the first row is kept and the others are its exact copies, written by
the map group of the copy so that later map tasks read only their own.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.dedup.layout import (
    Group,
    Where,
    code_columns,
    codes_of,
    excluded_ids,
    group_of,
    name,
    read_folder,
    read_shard,
    write_table,
)
from curate.dedup.order import CODE_COLUMNS, Order

ROWS_PER_PART = 4_000_000  # rows of one exact partition (a string and 40 bytes each, sorted in one task)


def parts_for(rows: int) -> int:
    return max(1, -(-rows // ROWS_PER_PART))


def scan(where: Where, group: Group, order: Order, exact: bool, parts: int) -> dict[str, Any]:
    """Count the group's embedded rows (left: those no reference removed); with ``exact``, partition those with
    a sha256 by its CRC-32."""
    ok_rows, embedded, tables = 0, 0, []
    excluded = excluded_ids(where, group)
    for shard, _ in group.shards:
        rows, table = read_shard(where, shard, order, with_vectors=False)
        ok = rows.ok & ~np.isin(rows.ids, excluded)
        ok_rows += int(ok.sum())
        embedded += int(rows.ok.sum())
        if not exact:
            continue
        sha = table["sha256"].to_pylist()
        keep = np.flatnonzero(ok & np.array([s is not None for s in sha], bool))
        if not len(keep):
            continue
        hashes = [sha[i] for i in keep.tolist()]
        part = np.array([zlib.crc32(h.encode()) % parts for h in hashes], np.int64)
        tables.append(
            pa.table(
                {
                    "sha256": pa.array(hashes, pa.string()),
                    "id": pa.array(rows.ids[keep], pa.int64()),
                    **code_columns(rows.codes[keep]),
                    "part": pa.array(part, pa.int64()),
                }
            )
        )
    written = 0
    if tables:
        table = pa.concat_tables(tables)
        part = table["part"].to_numpy()
        for p in np.unique(part).tolist():
            chunk = table.filter(pa.array(part == p)).drop_columns(["part"])
            write_table(where.path("exact", "map", name("p", p), name("g", group.index) + ".parquet"), chunk)
            written += chunk.num_rows
    return {"ok": ok_rows, "embedded": embedded, "hashed": written}


def resolve(where: Where, part: int, first_shards: np.ndarray) -> dict[str, Any]:
    """The exact copies in one hash partition: all but the first row of each hash, in keep order."""
    table = read_folder(where.path("exact", "map", name("p", part)))
    if table is None or not table.num_rows:
        return {"copies": {}}
    order = pc.sort_indices(table, [("sha256", "ascending"), *((c, "ascending") for c in CODE_COLUMNS),
                                    ("id", "ascending")])  # fmt: skip
    table = table.take(order)
    sha = table["sha256"]
    first = np.r_[True, ~pc.equal(sha.slice(1), sha.slice(0, len(sha) - 1)).to_numpy(zero_copy_only=False)]
    keeper = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    copy = np.flatnonzero(~first)
    ids = table["id"].to_numpy()
    codes = codes_of(table)
    copies = pa.table(
        {
            "id": pa.array(ids[copy], pa.int64()),
            "dup_of": pa.array(ids[keeper[copy]], pa.int64()),
            **code_columns(codes[keeper[copy]], "dup_"),
        }
    )
    group = group_of(ids[copy], first_shards)
    counts: dict[str, int] = {}
    for g in np.unique(group).tolist():
        chunk = copies.filter(pa.array(group == g))
        write_table(where.path("exact", "out", name("g", g), name("p", part) + ".parquet"), chunk)
        counts[str(g)] = chunk.num_rows
    return {"copies": counts}
