"""Writing the dedup index (curate.dedup.index) at the end of the global step, by both paths in the same format.

Distributed, after the decisions are written:

    index-plan     one task                          -> each round's cluster -> bucket (from the clusters' sizes)
    index-rows     one task per map group            -> its kept rows, once per round, by bucket (parts/)
    index-compact  one task per (round, bucket)      -> the parts in sorted runs (usually one file per bucket)
    index-finish   one task                          -> sizes, centroids, parts deleted, manifest written last

A map task holds its group's kept rows once per round (1.1 KB each: the map groups are sized for the assignment's
``assign_top`` copies per row, so they fit); a compaction task at most ``run_rows`` rows. The single-process step
writes the same files from memory (``write_in_memory``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup import index
from curate.dedup.cluster import normalize
from curate.dedup.layout import Group, Settings, Where, folder_files, name, read_files, read_shard
from curate.dedup.order import Order
from curate.dedup.report import method
from curate.steps import read_array, write_array


def manifest(settings: Settings, identity: dict[str, Any] | None, source: dict[str, Any],
             references: list[dict[str, Any]], k: int, rounds: int, rows: dict[str, int],
             histogram: list[int], path: str) -> dict[str, Any]:  # fmt: skip
    """What a later run needs to know about this index (and a user, reading it)."""
    return {
        "created_at": index.now(),
        "model": identity,
        "d": rows.pop("d"),
        **method(settings.params, settings.order),
        "k": k,
        "rounds": rounds,
        "rows": rows,
        "source": source,
        "path": path,
        "references": [
            {key: r[key] for key in ("name", "path", "threshold", "reason", "search", "probes", "rows", "created_at")}
            for r in references
        ],
        "nearest_similarity": _nearest(histogram),
    }


def _nearest(histogram: list[int] | np.ndarray) -> dict[str, Any]:
    """Quantiles of the kept rows' similarity to their nearest round-0 centroid (the histogram itself is
    ``nearest-similarity.npy``: HISTOGRAM_BINS bins over [-1, 1])."""
    from curate.dedup.drift import quantiles

    return {"file": "nearest-similarity.npy", **dict(zip(("p5", "p50", "p95"), quantiles(histogram), strict=True))}


# -- distributed ----------------------------------------------------------------------------------------------


def plan(where: Where, index_uri: str, rounds: int, target: int) -> dict[str, Any]:
    """Each round's buckets: contiguous clusters of about ``target`` rows, sized by the round's nearest counts;
    round 0's centroid norms (the assignment tasks' sums) for the held-out similarities."""
    norms = [read_array(u) for u in folder_files(where.round(0, "norms"), ".npy")]
    if norms:
        write_array(where.round(0, "norm.npy"), np.sum(norms, axis=0))
    out = []
    for r in range(rounds):
        sizes = read_array(where.round(r, "sizes.npy"))[:, 1]
        buckets = index.plan_buckets(sizes, target)
        write_array(storage.join(index_uri, f"buckets-r{r}.npy"), buckets)
        out.append(int(buckets.max()) + 1 if len(buckets) else 0)
    return {"buckets": out}


def _lookup(table: pa.Table, ids: np.ndarray) -> np.ndarray:
    known = table["id"].to_numpy()
    at = np.searchsorted(known, ids)
    if len(ids) and (at.max(initial=0) >= len(known) or not np.array_equal(known[np.minimum(at, len(known) - 1)], ids)):
        raise RuntimeError("a kept row has no nearest centroid in its round's assignment")
    return table["cluster"].to_numpy()[at]


def rows_task(where: Where, index_uri: str, group: Group, rounds: int, k: int, order: Order,
              final: list[str]) -> dict[str, Any]:  # fmt: skip
    """The group's kept rows into the index parts, once per round in its nearest cluster of that round."""
    buckets = [read_array(storage.join(index_uri, f"buckets-r{r}.npy")) for r in range(rounds)]
    nearest = [read_files([where.round(r, "nearest", name("g", group.index) + ".parquet")]) for r in range(rounds)]
    nearest = [t.sort_by("id") if t is not None else None for t in nearest]
    first = read_array(final[0]) if rounds else None
    norm = read_array(where.round(0, "norm.npy")) if rounds else None
    counts = np.zeros((rounds, k), np.int64)
    histogram = np.zeros(index.HISTOGRAM_BINS, np.int64)
    pending: dict[tuple[int, int], list[pa.Table]] = {}
    kept_rows = 0
    for shard, _ in group.shards:
        keep = storage.read_parquet(where.decisions(shard), ["keep"])["keep"].to_numpy(zero_copy_only=False)
        rows, table = read_shard(where, shard, order, with_vectors=True, with_codes=True)
        assert rows.vectors is not None
        kept = np.flatnonzero(np.asarray(keep, bool) & rows.ok)
        if not len(kept) or not rounds:
            continue
        kept_rows += len(kept)
        ids, codes, x16 = rows.ids[kept], rows.codes[kept], rows.vectors[kept]
        keys = table["key"].take(pa.array(kept)).to_pylist()
        for r in range(rounds):
            assert nearest[r] is not None
            cluster = _lookup(nearest[r], ids)
            counts[r] += np.bincount(cluster, minlength=k)
            if r == 0:
                assert first is not None and norm is not None
                similarity = np.einsum("ij,ij->i", normalize(x16), first[cluster])
                histogram += index.nearest_histogram(index.held_out_similarity(similarity, norm[cluster]))
            bucket = buckets[r][cluster]
            for b in np.unique(bucket).tolist():
                mine = np.flatnonzero(bucket == b)
                pending.setdefault((r, b), []).append(
                    index.row_table(ids[mine], [keys[j] for j in mine.tolist()], cluster[mine], codes[mine], x16[mine])
                )
    for (r, b), tables in sorted(pending.items()):
        index.write_rows(storage.join(index.parts_folder(index_uri, r, b), name("g", group.index) + ".parquet"),
                         index.sort_rows(pa.concat_tables(tables)))  # fmt: skip
    write_array(storage.join(index_uri, "parts", "counts", name("g", group.index) + ".npy"), counts)
    return {"kept": kept_rows, "histogram": histogram.tolist()}


def finish(index_uri: str, rounds: int, k: int, final: list[str], document: dict[str, Any],
           histogram: list[int]) -> dict[str, Any]:  # fmt: skip
    """Sizes and centroids of every round, the parts deleted, and the manifest: written last, so an index with a
    manifest is complete."""
    sizes = np.zeros((rounds, k), np.int64)
    for uri in folder_files(storage.join(index_uri, "parts", "counts"), ".npy"):
        sizes += read_array(uri)
    for r in range(rounds):
        write_array(storage.join(index_uri, f"sizes-r{r}.npy"), sizes[r])
        write_array(storage.join(index_uri, f"centroids-r{r}.npy"), np.asarray(read_array(final[r]), np.float32))
    if storage.exists(storage.join(index_uri, "parts")):
        storage.remove_tree(storage.join(index_uri, "parts"))
    document["rows"]["indexed"] = int(sizes[0].sum()) if rounds else 0
    index.write_histogram(index_uri, histogram)
    index.write_manifest(index_uri, document)
    return {"indexed": document["rows"]["indexed"]}


# -- single process ---------------------------------------------------------------------------------------------


def write_in_memory(index_uri: str, ids: np.ndarray, keys: list[str], codes: np.ndarray, x16: np.ndarray,
                    centroids: list[np.ndarray], nearest: list[np.ndarray], searched_nearest: list[np.ndarray],
                    norm: np.ndarray, target: int, run_rows: int,
                    document: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The index of the single-process step: ``ids``/``keys``/``codes``/``x16`` of the kept rows, each round's
    centroids, the kept rows' nearest cluster per round, and every searched row's (the bucket plan's sizes, as
    the distributed step counts them); ``norm``: round 0's centroid norms (index.held_out_similarity)."""
    histogram = np.zeros(index.HISTOGRAM_BINS, np.int64)
    for r, (c, cluster, everyone) in enumerate(zip(centroids, nearest, searched_nearest, strict=True)):
        k = len(c)
        buckets = index.plan_buckets(np.bincount(everyone, minlength=k), target)
        sizes = np.bincount(cluster, minlength=k)
        index.write_small(index_uri, r, c, sizes, buckets)
        if r == 0 and len(ids):
            similarity = np.einsum("ij,ij->i", normalize(x16), c[cluster])
            histogram += index.nearest_histogram(index.held_out_similarity(similarity, norm[cluster]))
        bucket = buckets[cluster]
        for b in np.unique(bucket).tolist():
            mine = np.flatnonzero(bucket == b)
            table = index.row_table(ids[mine], [keys[j] for j in mine.tolist()], cluster[mine], codes[mine], x16[mine])
            for run, start in enumerate(range(0, table.num_rows, run_rows)):
                index.write_rows(storage.join(index.rows_folder(index_uri, r, b), name("run-", run) + ".parquet"),
                                 table.slice(start, run_rows))  # fmt: skip
    document["rows"]["indexed"] = len(ids) if centroids else 0
    document["nearest_similarity"] = _nearest(histogram)
    index.write_histogram(index_uri, histogram)
    index.write_manifest(index_uri, document)
    return {"indexed": document["rows"]["indexed"]}
