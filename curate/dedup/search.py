"""The range-search phase of the distributed global step: one task per group of clusters, and clusters above the
memory cap searched in blocks.

A search task reads its bucket's files (one per map group, one at a time), keeps its clusters' rows, sorts each
cluster into keep order and runs the same search as the single-process path (curate.dedup.products): for each
row its first ``max_neighbors`` + 1 earlier rows above the threshold. A cluster above the cap (LAION has clusters
of hundreds of thousands of near-identical placeholders) is first cut into keep-order blocks (``split``); one task
per column block then scans the row blocks before it in order, holding two blocks at a time. Both give exactly
the pairs of searching the cluster whole. Pairs go out partitioned by a hash of the later row, for the graph.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import storage
from curate.dedup.cluster import DedupParams, normalize
from curate.dedup.layout import (
    Where,
    code_columns,
    codes_of,
    compression,
    folder_files,
    hash_part,
    name,
    vectors_of,
    write_table,
)
from curate.dedup.order import CODE_COLUMNS, sort_order
from curate.dedup.products import Vectors, pairs_in_clusters, scan


def _bucket_files(where: Where, r: int, bucket: int) -> list[str]:
    return folder_files(where.round(r, "assign", name("b", bucket)), ".parquet")


def _rows_of(where: Where, r: int, bucket: int, clusters: list[int]) -> pa.Table | None:
    """The bucket's rows of ``clusters``, read one map group's file at a time."""
    wanted = pa.array(clusters, pa.int32())
    parts = []
    for uri in _bucket_files(where, r, bucket):
        table = storage.read_parquet(uri)
        parts.append(table.filter(pc.is_in(table["cluster"], value_set=wanted)))
    return pa.concat_tables(parts) if parts else None


def _keep_order(table: pa.Table, by_cluster: bool) -> pa.Table:
    keys = ([("cluster", "ascending")] if by_cluster else []) + [(c, "ascending") for c in (*CODE_COLUMNS, "id")]
    return table.take(pc.sort_indices(table, keys))


def _write_pairs(where: Where, r: int, task: str, table: pa.Table, a: np.ndarray, b: np.ndarray, sim: np.ndarray,
                 parts: int) -> int:  # fmt: skip
    """Pairs (a earlier, b later; rows of ``table``) with both rows' ids and keep-order codes, by hash of b."""
    ids, codes = table["id"].to_numpy(), codes_of(table)
    pairs = pa.table(
        {
            "a": pa.array(ids[a], pa.int64()),
            "b": pa.array(ids[b], pa.int64()),
            "sim": pa.array(sim, pa.float32()),
            **code_columns(codes[a], "a_"),
            **code_columns(codes[b], "b_"),
        }
    )
    part = hash_part(ids[b], parts)
    for q in range(parts):
        chunk = pairs.filter(pa.array(part == q))
        if chunk.num_rows:
            write_table(where.round(r, "search", name("q", q), task + ".parquet"), chunk)
    return pairs.num_rows


def search(where: Where, r: int, task: str, bucket: int, clusters: list[int], d: int,
           params: DedupParams, parts: int, analysed: list[int]) -> dict[str, Any]:  # fmt: skip
    """Pairs inside a group of whole clusters of one bucket; the nearest-centroid rows of its ``analysed``
    clusters are kept for the report's threshold analysis."""
    table = _rows_of(where, r, bucket, clusters)
    if table is None or not table.num_rows:
        return {"rows": 0, "pairs": 0}
    table = _keep_order(table, by_cluster=True)
    if analysed:
        mine = pc.and_(pc.equal(table["slot"], 0), pc.is_in(table["cluster"], value_set=pa.array(analysed, pa.int32())))
        write_table(where.round(r, "analysis", task + ".parquet"), table.filter(mine))
    x = params.vectors(normalize(vectors_of(table["vector"], d)))
    table = table.drop_columns(["vector"])
    cluster = table["cluster"].to_numpy()
    edges = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True])
    members = [np.arange(s, e) for s, e in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True) if e - s > 1]
    members.sort(key=len, reverse=True)
    found = pairs_in_clusters(x, members, params.threshold, params.block_rows, params.threads, params.quota)
    a, b, s = (np.concatenate(p) for p in zip(*found, strict=True)) if found else (np.zeros(0, np.int64),) * 3
    written = _write_pairs(where, r, task, table, a, b, np.asarray(s, np.float32), parts)
    return {"rows": table.num_rows, "pairs": written}


# -- clusters above the cap ---------------------------------------------------------------------------------------


def split(where: Where, r: int, cluster: int, bucket: int, block: int) -> dict[str, Any]:
    """Cut one cluster into keep-order blocks of ``block`` rows, streaming (ids and codes held, vectors not)."""
    columns = ["cluster", "id", *CODE_COLUMNS]
    keys = []
    for uri in _bucket_files(where, r, bucket):
        table = storage.read_parquet(uri, columns=columns)
        keys.append(table.filter(pc.equal(table["cluster"], cluster)).drop_columns(["cluster"]))
    order = pa.concat_tables(keys)
    ids = order["id"].to_numpy()
    position = np.empty(len(ids), np.int64)
    position[sort_order(codes_of(order), ids)] = np.arange(len(ids))
    by_id = np.argsort(ids)
    ids_sorted, block_of = ids[by_id], position[by_id] // block
    blocks = int(block_of.max()) + 1 if len(ids) else 0
    with contextlib.ExitStack() as stack:
        writers: dict[int, Any] = {}
        for uri in _bucket_files(where, r, bucket):
            table = storage.read_parquet(uri)
            table = table.filter(pc.equal(table["cluster"], cluster))
            which = block_of[np.searchsorted(ids_sorted, table["id"].to_numpy())]
            for i in np.unique(which).tolist():
                chunk = table.filter(pa.array(which == i))
                if i not in writers:
                    target = where.round(r, "giant", name("c", cluster), name("block-", i) + ".parquet")
                    writers[i] = stack.enter_context(
                        storage.parquet_writer(
                            target, chunk.schema, compression=compression(chunk.schema), use_dictionary=False
                        )
                    )
                writers[i].write_table(chunk)
    return {"rows": len(ids), "blocks": blocks}


def _block(where: Where, r: int, cluster: int, i: int, d: int, params: DedupParams) -> tuple[pa.Table, Vectors]:
    table = storage.read_parquet(where.round(r, "giant", name("c", cluster), name("block-", i) + ".parquet"))
    table = _keep_order(table, by_cluster=False)
    x = params.vectors(normalize(vectors_of(table["vector"], d)))
    return table.drop_columns(["vector"]), x


def search_block(where: Where, r: int, task: str, cluster: int, column: int, block: int, d: int,
                 params: DedupParams, parts: int) -> dict[str, Any]:  # fmt: skip
    """Column block ``column`` of a cluster over the cap against row blocks 0..column in keep order: for each of
    its rows, the first quota earlier rows of the whole cluster above the threshold."""
    cols, xc = _block(where, r, cluster, column, d, params)
    col_pos = column * block + np.arange(cols.num_rows)
    need = np.full(cols.num_rows, params.quota if params.quota > 0 else cols.num_rows * (column + 1), np.int64)
    found_a, found_b, found_s, tables = [], [], [], []
    offset = 0
    for i in range(column + 1):
        rows, xr = (cols, xc) if i == column else _block(where, r, cluster, i, d, params)
        row_pos = i * block + np.arange(rows.num_rows)
        ia, jb, s = scan(xr, row_pos, xc, col_pos, need, params.threshold, params.block_rows)
        tables.append(rows)
        found_a.append(ia + offset)
        found_b.append(jb)
        found_s.append(s)
        offset += rows.num_rows
    # one table holding the row blocks' ids and codes, then the column block's: pairs index into it
    every = pa.concat_tables([*tables, cols])
    a = np.concatenate(found_a)
    b = np.concatenate(found_b) + offset
    written = _write_pairs(where, r, task, every, a, b, np.concatenate(found_s), parts)
    return {"rows": cols.num_rows, "pairs": written}
