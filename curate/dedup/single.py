"""The single-process global step: every upstream row in one task's memory (about 4 KB per embedded row:
float16, float32 and bf16 copies), decided with the in-memory algorithm (curate.dedup.cluster).

Faster than the distributed chain for small runs (no files between phases, one normalisation); the stage uses
it up to ``single_process_rows`` embedded rows. It makes exactly the distributed chain's decisions: same keep
order (curate.dedup.order), same exact-copy rule, same k-means sample and initialisation, exact Lloyd sums,
nearest-centroid blocks restarting at each upstream shard, the same bounded neighbour search and greedy rule.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup import against_report, index, index_write
from curate.dedup.against import check_width, sample_every, search_in_memory
from curate.dedup.cluster import dedup as cluster_dedup
from curate.dedup.cluster import (
    default_clusters,
    exact_groups,
    faiss_gpu,
    nearest_centroids,
    normalize,
)
from curate.dedup.layout import Settings, Where, codes_of, read_folder
from curate.dedup.order import dense_rank, keys_from_codes, order_codes, row_ids
from curate.dedup.report import analysed_clusters, cluster_size_stats, method, threshold_analysis, write_report
from curate.dedup.resolve import decide as decide_removals
from curate.schema import DEDUP_SCHEMA, embedding_matrix


def read_upstream(upstream: str, shards: list[tuple[int, int]]) -> tuple[pa.Table, np.ndarray]:
    """key / status / width / height / sha256 of every upstream row, and the (N, d) float16 embeddings."""
    from curate.runfolder import StageDir

    tables, vectors = [], []
    for shard, _ in shards:
        table = storage.read_parquet(
            StageDir(upstream).shard(shard), columns=["key", "sscd", "status", "width", "height", "sha256"]
        )
        vectors.append(embedding_matrix(table["sscd"]))
        tables.append(table.drop_columns(["sscd"]))
    if not tables:
        return pa.table({}), np.zeros((0, 512), np.float16)
    return pa.concat_tables(tables), np.concatenate(vectors)


def _starts(shards: list[tuple[int, int]]) -> np.ndarray:
    return np.cumsum([0] + [rows for _, rows in shards])[:-1]


def decide(
    settings: Settings,
    table: pa.Table,
    vectors: np.ndarray,
    shards: list[tuple[int, int]],
    removed: pa.Table | None = None,
    references: tuple[tuple[str, str], ...] = (),
):
    """keep / dup_of / similarity / cluster / reason / dup_reference for every row, the report, the cluster
    sizes, and the dedup result (for the index). ``removed``: rows a reference removed (curate.dedup.resolve),
    left out of the run's own dedup; ``references``: (name, reason) of each reference."""
    started = time.perf_counter()
    n = table.num_rows
    ids = np.concatenate([row_ids(s, rows) for s, rows in shards]) if shards else np.zeros(0, np.int64)
    keys = table["key"].to_pylist()
    status = table["status"].to_pylist()
    width = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    codes = order_codes(settings.order, keys, width, height, ids)
    rank = dense_rank(codes, ids)
    embedded = np.array([s == "ok" for s in status], bool)
    seen = np.zeros(n, bool)
    seen_at = np.zeros(0, np.int64)
    if removed is not None and removed.num_rows:
        seen_at = np.searchsorted(ids, removed["id"].to_numpy())
        seen[seen_at] = True
    ok = embedded & ~seen  # the rows the run's own dedup sees
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
    reference: list[str | None] = [None] * n
    seen_keys: dict[int, str] = {}
    if len(seen_at):
        similarity[seen_at] = removed["similarity"].to_numpy()
        which = removed["reference"].to_numpy()
        for row, i, key in zip(seen_at.tolist(), which.tolist(), keys_from_codes(codes_of(removed, "dup_")[:, 1:]),
                               strict=True):  # fmt: skip
            reference[row] = references[i][0]
            reason[row] = references[i][1]
            seen_keys[row] = key
    k = len(result.clustering.centroids)
    others = np.flatnonzero(embedded & ((exact_of >= 0) | seen))  # exact copies and rows a reference removed
    if len(others) and len(reps):  # their cluster: their own nearest centroid (the distributed step does the same)
        if k > 1:
            x = params.vectors(normalize(vectors[others]))
            first = result.clustering.centroids
            cluster[others] = nearest_centroids(
                x, first, 1, params, faiss_gpu(params), np.searchsorted(others, starts)
            )[:, 0]
        else:
            cluster[others] = 0

    sizes = np.bincount(result.cluster, minlength=k) if len(reps) else np.zeros(0, np.int64)
    members = np.bincount(result.clustering.assignment.reshape(-1), minlength=k) if len(reps) else sizes
    chosen = analysed_clusters(sizes, members, settings.analysis_clusters, settings.search_task_rows())
    members = np.flatnonzero(np.isin(result.cluster, chosen))
    analysis = threshold_analysis(
        vectors[reps[members]], result.cluster[members], rank[reps[members]], chosen, settings.analysis_thresholds
    )
    dropped = int((embedded & ~keep).sum())
    report = {
        "rows": n,
        "ok": int(embedded.sum()),
        "removed": dropped,
        "fraction_removed": dropped / max(1, int(embedded.sum())),
        "against_removed": int(seen.sum()),
        **{r: int((reason[seen] == r).sum()) for r in ("seen_before", "eval_overlap")},
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
        "dup_of": [seen_keys.get(i, keys[d] if d >= 0 else None) for i, d in enumerate(dup_of.tolist())],
        "similarity": similarity,
        "reason": reason.tolist(),
        "status": status,
        "dup_reference": reference,
    }
    extra = {"ids": ids, "codes": codes, "reps": reps, "result": result, "params": params}
    return columns, report, sizes, extra


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
            "dup_reference": pa.array(columns["dup_reference"], pa.string()),
        },
        schema=DEDUP_SCHEMA,
    )


def search_references(settings: Settings, refs: list[dict[str, Any]], table: pa.Table, vectors: np.ndarray,
                      shards: list[tuple[int, int]]) -> dict[str, Any]:  # fmt: skip
    """Every embedded row against each reference (curate.dedup.against.search_in_memory), then the removals
    (curate.dedup.resolve.decide)."""
    ids = np.concatenate([row_ids(s, rows) for s, rows in shards]) if shards else np.zeros(0, np.int64)
    ok = np.flatnonzero(np.array([s == "ok" for s in table["status"].to_pylist()], bool))
    starts = np.searchsorted(ok, _starts(shards))
    d = vectors.shape[1]
    params = settings.params
    every = sample_every(sum(rows for _, rows in shards))
    per_ref, searched, histograms, ranks = [], [], [], []
    for info in refs:
        check_width(info, d)
        out = search_in_memory(info, ids[ok], vectors[ok], starts, d, params, every, settings.search_task_rows() // 2)
        found, near, probe = out["found"], out["near"], out["probe"]
        hit, close = found.hit, near.hit
        per_ref.append({
            "ids": ids[ok][hit], "sim": found.sim[hit], "codes": found.codes[hit], "ref": found.ref[hit],
            "probe": probe[hit],
            "near_ids": ids[ok][close], "near_sim": near.sim[close], "near_codes": near.codes[close],
            "near_ref": near.ref[close],
        })  # fmt: skip
        searched.append({k: out[k] for k in ("touched", "index_rows_read", "entries", "products")})
        histograms.append(out["histogram"].tolist())
        ranks.append(np.bincount(probe[hit & (probe >= 0)], minlength=max(1, info["probes"])).tolist())
    decided = decide_removals(refs, per_ref, settings.gallery)
    return {**decided, "searched": searched, "histograms": histograms, "by_rank": ranks}


def run(where: Where, settings: Settings, shards: list[tuple[int, int]], info: dict[str, Any] | None = None,
        stage_uri: str | None = None, searched: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The whole global step in this task: the references searched, decision files per upstream shard, the
    dedup index (``stage_uri``'s ``_index/``) and the report. ``info``: the identify phase's result
    (curate.dedup.against.identify) when there are references or an index to write; ``searched``: the references
    were already searched by the distributed phases (large references; their removals are under ``where``)."""
    table, vectors = read_upstream(where.upstream, shards)
    refs = (info or {}).get("references", [])
    against = None
    if searched is not None:
        removed = read_folder(where.path("against", "removed"))
        gallery = read_folder(where.path("against", "gallery"))
        against = {**searched, "removed": removed.sort_by("id") if removed is not None else None, "gallery": gallery}
    elif refs:
        against = search_references(settings, refs, table, vectors, shards)
    names = tuple((r["name"], r["reason"]) for r in refs)
    columns, report, sizes, extra = decide(settings, table, vectors, shards, against and against["removed"], names)
    full = decision_table(columns)
    offset = 0
    for shard, rows in shards:
        storage.write_parquet_atomic(where.decisions(shard), full.slice(offset, rows))
        offset += rows
    if settings.index and stage_uri is not None and info is not None:
        report["index"] = _write_index(settings, info, stage_uri, table, vectors, columns, report, extra)
    lines = []
    if against is not None:
        lines = against_report.build(
            report, refs, against["counts"], against["searched"], against["histograms"], against["by_rank"],
            int(report["ok"]), where.report, against["gallery"], info["source"].get("images") if info else None,
            where.upstream, settings.gallery,
        )  # fmt: skip
    write_report(where.report, report, sizes, lines)
    return {"removed": report["removed"], "fraction_removed": report["fraction_removed"], "k": report["k"]}


def _write_index(settings: Settings, info: dict[str, Any], stage_uri: str, table: pa.Table, vectors: np.ndarray,
                 columns: dict[str, Any], report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The dedup index of this run's kept rows, from memory (curate.dedup.index_write)."""
    result, reps = extra["result"], extra["reps"]
    kept = np.flatnonzero(np.asarray(columns["keep"], bool))
    local = np.searchsorted(reps, kept)
    d = vectors.shape[1]
    rounds = result.rounds
    centroids = [c.centroids if len(c.centroids) > 1 else np.eye(1, d, dtype=np.float32) for c in rounds]
    k = len(centroids[0]) if centroids else 0
    document = index_write.manifest(
        replace(settings, params=extra["params"]), info["identity"], info["source"], info["references"], k, len(rounds),
        {"d": d, "upstream": int(report["rows"]), "embedded": int(report["ok"]), "kept": len(kept)},
        [], "single-process",
    )  # fmt: skip
    keys = table["key"].take(pa.array(kept, pa.int64())).to_pylist()
    norm = np.zeros(k)
    if rounds:  # round 0's centroid norms: the searched rows' similarities to their nearest centroid, summed
        nearest = rounds[0].assignment[:, 0]
        similarity = np.einsum("ij,ij->i", normalize(vectors[reps]), centroids[0][nearest])
        norm = np.bincount(nearest, weights=similarity, minlength=k)
    return index_write.write_in_memory(
        index.folder(stage_uri), extra["ids"][kept], keys, extra["codes"][kept], vectors[kept], centroids,
        [c.assignment[local, 0] for c in rounds], [c.assignment[:, 0] for c in rounds], norm,
        settings.search_task_rows(), settings.search_task_rows(), document,
    )  # fmt: skip
