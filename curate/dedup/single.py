"""The single-process global step: every upstream row in one task's memory (about 4 KB per embedded row:
float16, float32 and bf16 copies), decided with the in-memory algorithm (curate.dedup.cluster).

Faster than the distributed chain for small runs (no files between phases, one normalisation); the stage uses
it up to ``single_process_rows`` embedded rows. It makes exactly the distributed chain's decisions: same keep
order (curate.dedup.order), same exact-copy rule, same k-means sample and initialisation, exact Lloyd sums,
nearest-centroid blocks restarting at each upstream shard, the same bounded neighbour search and greedy rule.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup.cluster import dedup as cluster_dedup
from curate.dedup.cluster import (
    default_clusters,
    exact_groups,
    faiss_gpu,
    nearest_centroids,
    normalize,
)
from curate.dedup.layout import Settings, Where
from curate.dedup.order import dense_rank, order_codes, row_ids
from curate.dedup.report import analysed_clusters, cluster_size_stats, method, threshold_analysis, write_report
from curate.schema import DEDUP_SCHEMA, embedding_matrix


def read_upstream(upstream: str, shards: list[tuple[int, int]]) -> tuple[pa.Table, np.ndarray]:
    """key / status / width / height / sha256 of every upstream row, and the (N, d) float16 embeddings."""
    from curate.runfolder import StageDir

    tables, vectors = [], []
    for index, _ in shards:
        table = storage.read_parquet(
            StageDir(upstream).shard(index), columns=["key", "sscd", "status", "width", "height", "sha256"]
        )
        vectors.append(embedding_matrix(table["sscd"]))
        tables.append(table.drop_columns(["sscd"]))
    if not tables:
        return pa.table({}), np.zeros((0, 512), np.float16)
    return pa.concat_tables(tables), np.concatenate(vectors)


def _starts(shards: list[tuple[int, int]]) -> np.ndarray:
    return np.cumsum([0] + [rows for _, rows in shards])[:-1]


def decide(settings: Settings, table: pa.Table, vectors: np.ndarray, shards: list[tuple[int, int]]):
    """keep / dup_of / similarity / cluster / reason for every row, the report, and the cluster sizes."""
    started = time.perf_counter()
    n = table.num_rows
    ids = np.concatenate([row_ids(s, rows) for s, rows in shards]) if shards else np.zeros(0, np.int64)
    keys = table["key"].to_pylist()
    status = table["status"].to_pylist()
    width = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    codes = order_codes(settings.order, keys, width, height, ids)
    rank = dense_rank(codes, ids)
    ok = np.array([s == "ok" for s in status], bool)
    sha = [h if ok[i] and settings.exact else None for i, h in enumerate(table["sha256"].to_pylist())]
    exact_of = exact_groups(sha, rank)
    reps = np.flatnonzero(ok & (exact_of < 0))
    params = settings.params.resolved(len(reps))
    starts = _starts(shards)
    result = cluster_dedup(vectors[reps], rank[reps], params, np.searchsorted(reps, starts))

    keep = np.zeros(n, bool)
    dup_of = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    cluster = np.full(n, -1, np.int64)
    reason = np.array(["not_ok"] * n, dtype=object)
    keep[reps] = result.keep
    cluster[reps] = result.cluster
    near = reps[~result.keep]
    dup_of[near] = reps[result.dup_of[~result.keep]]
    similarity[near] = result.similarity[~result.keep]
    reason[reps] = np.where(result.keep, "kept", "near_duplicate")
    exact = np.flatnonzero(exact_of >= 0)
    dup_of[exact] = exact_of[exact]  # the first identical file in keep order
    similarity[exact] = 1.0
    reason[exact] = "exact_duplicate"
    k = len(result.clustering.centroids)
    if len(exact):  # an exact copy's cluster: its own nearest centroid (the distributed step computes the same)
        if k > 1:
            x = params.vectors(normalize(vectors[exact]))
            first = result.clustering.centroids
            found = nearest_centroids(x, first, 1, params, faiss_gpu(params), np.searchsorted(exact, starts))
            cluster[exact] = found[:, 0]
        else:
            cluster[exact] = 0

    sizes = np.bincount(result.cluster, minlength=k) if len(reps) else np.zeros(0, np.int64)
    members = np.bincount(result.clustering.assignment.reshape(-1), minlength=k) if len(reps) else sizes
    chosen = analysed_clusters(sizes, members, settings.analysis_clusters, settings.search_task_rows())
    members = np.flatnonzero(np.isin(result.cluster, chosen))
    analysis = threshold_analysis(
        vectors[reps[members]], result.cluster[members], rank[reps[members]], chosen, settings.analysis_thresholds
    )
    removed = int((ok & ~keep).sum())
    report = {
        "rows": n,
        "ok": int(ok.sum()),
        "removed": removed,
        "fraction_removed": removed / max(1, int(ok.sum())),
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "pairs_found": len(result.pairs),
        "bounded": int(result.bounded.sum()) if result.bounded is not None else 0,
        **method(params, settings.order),
        "k": k,
        "k_default": default_clusters(len(reps)),
        "clusters": cluster_size_stats(sizes),
        "threshold_analysis": analysis,
        "path": "single-process (one task)",
        "seconds": {k_: round(v, 3) for k_, v in result.seconds.items()},
    }
    report["seconds"]["total"] = round(time.perf_counter() - started, 3)
    columns = {
        "key": keys,
        "cluster": cluster,
        "keep": keep,
        "dup_of": [keys[d] if d >= 0 else None for d in dup_of.tolist()],
        "similarity": similarity,
        "reason": reason.tolist(),
        "status": status,
    }
    return columns, report, sizes


def decision_table(columns: dict[str, Any]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(columns["key"], pa.string()),
            "cluster": pa.array(columns["cluster"], pa.int32()),
            "keep": pa.array(columns["keep"], pa.bool_()),
            "dup_of": pa.array(columns["dup_of"], pa.string()),
            "similarity": pa.array(columns["similarity"], pa.float32(), from_pandas=True),
            "reason": pa.array(columns["reason"], pa.string()),
            "status": pa.array(columns["status"], pa.string()),
        },
        schema=DEDUP_SCHEMA,
    )


def run(where: Where, settings: Settings, shards: list[tuple[int, int]]) -> dict[str, Any]:
    """The whole global step in this task: decision files per upstream shard and the report."""
    table, vectors = read_upstream(where.upstream, shards)
    columns, report, sizes = decide(settings, table, vectors, shards)
    full = decision_table(columns)
    offset = 0
    for index, rows in shards:
        storage.write_parquet_atomic(where.decisions(index), full.slice(offset, rows))
        offset += rows
    write_report(where.report, report, sizes)
    return {"removed": report["removed"], "fraction_removed": report["fraction_removed"], "k": report["k"]}
