"""The clustering phases of the distributed global step: sample, k-means, Lloyd refinement, assignment.

Each function is one Ray task. Map tasks read their group's upstream shards one at a time; the k-means task
holds only the sample (``points_per_centroid`` x K rows); the Lloyd sums travel as K x d float64 files summed in
a tree. The assignment writes every embedded row once per assigned cluster, partitioned by bucket (a group of
clusters planned from the size estimate of the last refine pass), so a search task reads only its bucket.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup.cluster import (
    DedupParams,
    centroids_from_sums,
    faiss_gpu,
    lloyd_sums,
    nearest_centroids,
    normalize,
    sample_plan,
    train_centroids,
)
from curate.dedup.layout import (
    Group,
    Where,
    code_columns,
    folder_files,
    group_rows,
    name,
    read_folder,
    vector_array,
    vectors_of,
    write_table,
)
from curate.dedup.order import Order
from curate.dedup.products import Vectors, resolve_precision
from curate.dedup.report import analysed_clusters
from curate.steps import read_array, write_array


def _gpu(params: DedupParams) -> bool:
    return faiss_gpu(params)


def _vectors(x16: np.ndarray, params: DedupParams) -> Vectors:
    """Normalised rows for nearest-centroid products only (no bf16 copy unless those products are bf16), on the
    task's GPU when it has one."""
    device = params.product_device()
    nearest, _ = resolve_precision(params.precision, device)
    return Vectors.of(normalize(x16), bf16=nearest == "bf16", int8=nearest == "int8", device=device)


def sample(where: Where, group: Group, order: Order, offset: int, takes: dict[int, np.ndarray]):
    """Copy the group's k-means training rows of each round (``takes``: round -> sorted positions among the
    group's embedded rows; ``offset``: the group's first position overall)."""
    chosen: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {r: [] for r in takes}
    seen = 0
    for rows in group_rows(where, group, order):
        reps = rows.reps
        assert rows.vectors is not None
        for r, positions in takes.items():
            local = positions[(positions >= seen) & (positions < seen + len(reps))] - seen
            if len(local):
                chosen[r].append((local + seen + offset, rows.vectors[reps[local]]))
        seen += len(reps)
    for r, parts in chosen.items():
        if parts:
            pos = np.concatenate([p for p, _ in parts])
            x = np.concatenate([v for _, v in parts])
            table = pa.table({"pos": pa.array(pos, pa.int64()), "vector": vector_array(x)})
            write_table(where.round(r, "sample", name("g", group.index) + ".parquet"), table)
    return {"rows": seen}


def kmeans(where: Where, r: int, n: int, k: int, d: int, params: DedupParams, bucket_plan: dict | None):
    """Train the round's centroids on its sample (``params.seed`` is the round's seed). With one cluster every
    row is in it: a unit vector stands for its centroid."""
    if k == 1:
        write_array(where.round(r, "centroids-0.npy"), np.eye(1, d, dtype=np.float32))
        if bucket_plan is not None:
            write_buckets(where, r, np.full(1, float(n)), **bucket_plan)
        return {"k": 1, "sample": 0}
    rows, init = sample_plan(n, k, params)
    table = read_folder(where.round(r, "sample"))
    assert table is not None
    table = table.sort_by("pos")
    x = _vectors(vectors_of(table["vector"], d), params)
    expected = len(rows) if rows is not None else n
    if len(x) != expected:
        raise RuntimeError(f"round {r}: the k-means sample has {len(x)} rows, the plan {expected}")
    centroids, counts = train_centroids(x, k, init, params, _gpu(params))
    write_array(where.round(r, "centroids-0.npy"), centroids)
    estimate = counts * (n / max(1, len(x))) if counts is not None else np.full(k, n / k)
    if bucket_plan is not None:
        write_buckets(where, r, estimate, **bucket_plan)
    return {"k": k, "sample": len(x)}


def refine(where: Where, r: int, i: int, group: Group, order: Order, params: DedupParams):
    """One Lloyd pass over the group: nearest centroid of every embedded row, per-centroid sums (exact)."""
    centroids = read_array(where.round(r, f"centroids-{i - 1}.npy"))
    k, d = centroids.shape
    sums = np.zeros((k, d + 1), np.float64)
    for rows in group_rows(where, group, order):
        reps = rows.reps
        if not len(reps):
            continue
        assert rows.vectors is not None
        x = _vectors(rows.vectors[reps], params)
        labels = nearest_centroids(x, centroids, 1, params, _gpu(params))[:, 0]
        part, counts = lloyd_sums(x, labels, k)
        sums[:, :d] += part
        sums[:, d] += counts
    write_array(where.round(r, f"refine-{i}", name("g", group.index) + ".npy"), sums)
    return {}


def add_sums(inputs: list[str], output: str) -> dict[str, Any]:
    """A level of the tree that sums Lloyd partials (sums are exact, so the tree's shape does not matter)."""
    total = None
    for uri in inputs:
        part = read_array(uri)
        total = part if total is None else total + part
    write_array(output, total)
    return {}


def update(where: Where, r: int, i: int, inputs: list[str], bucket_plan: dict | None) -> dict[str, Any]:
    """The last sum of a refine pass, and the new centroids; after the last pass, the bucket plan."""
    add_sums(inputs, where.round(r, f"refine-{i}", "total.npy"))
    total = read_array(where.round(r, f"refine-{i}", "total.npy"))
    previous = read_array(where.round(r, f"centroids-{i - 1}.npy"))
    d = previous.shape[1]
    counts = total[:, d].astype(np.int64)
    write_array(where.round(r, f"centroids-{i}.npy"), centroids_from_sums(total[:, :d], counts, previous))
    if bucket_plan is not None:
        write_buckets(where, r, counts.astype(np.float64), **bucket_plan)
    return {"empty": int((counts == 0).sum())}


def write_buckets(where: Where, r: int, estimate: np.ndarray, top: int, target: int) -> None:
    """Clusters packed into buckets of about ``target`` rows by their estimated sizes (x ``top``: every row is
    in ``top`` clusters), largest first onto the emptiest bucket; a cluster above ``target`` gets its own."""
    size = np.asarray(estimate, np.float64) * top
    buckets = np.zeros(len(size), np.int64)
    big = np.flatnonzero(size > target)
    small = np.flatnonzero(size <= target)
    count = max(1, int(np.ceil(size[small].sum() / target))) if len(small) else 0
    heap = [(0.0, b) for b in range(count)]
    for c in small[np.argsort(-size[small], kind="stable")].tolist():
        load, b = heapq.heappop(heap)
        buckets[c] = b
        heapq.heappush(heap, (load + size[c], b))
    buckets[big] = count + np.arange(len(big))
    write_array(where.round(r, "buckets.npy"), buckets)


def assign(
    where: Where,
    r: int,
    group: Group,
    order: Order,
    centroids_uri: str,
    params: DedupParams,
    with_nearest: bool,
    nearest_reps: bool = False,
) -> dict[str, Any]:
    """Every embedded row's ``assign_top`` clusters; rows written once per cluster, into their bucket's file.
    With ``with_nearest`` also the nearest centroid of every embedded row (exact copies and rows a reference
    removed too), for the decisions' ``cluster`` column; with ``nearest_reps`` that of the searched rows only
    (a later round's, for the dedup index)."""
    centroids = read_array(centroids_uri)
    buckets = read_array(where.round(r, "buckets.npy"))
    k = len(centroids)
    top = min(params.assign_top or 2, k)
    counts = np.zeros((k, 2), np.int64)  # members (any slot), nearest (slot 0)
    norms = np.zeros(k, np.float64)  # sum of the nearest rows' similarity to their centroid (~ its sum's norm)
    by_bucket: dict[int, list[pa.Table]] = {}  # appended per shard: the output is held once, never re-sorted
    nearest_parts: list[pa.Table] = []
    for rows in group_rows(where, group, order, with_codes=True):
        assert rows.vectors is not None
        reps = rows.reps
        if len(reps):
            x = _vectors(rows.vectors[reps], params)
            assignment = (nearest_centroids(x, centroids, top, params, _gpu(params)) if k > 1
                          else np.zeros((len(reps), 1), np.int64))  # fmt: skip
            if with_nearest:
                np.add.at(norms, assignment[:, 0], np.einsum("ij,ij->i", x.f32, centroids[assignment[:, 0]]))
            del x
            ids, codes, vectors = rows.ids[reps], rows.codes[reps], rows.vectors[reps]
            slots = np.repeat(np.arange(assignment.shape[1], dtype=np.int8)[None, :], len(reps), 0).reshape(-1)
            member = np.repeat(np.arange(len(reps)), assignment.shape[1])
            cluster = assignment.reshape(-1)
            bucket = buckets[cluster]
            order_ = np.argsort(bucket, kind="stable")
            member, slots, cluster, bucket = member[order_], slots[order_], cluster[order_], bucket[order_]
            counts[:, 0] += np.bincount(cluster, minlength=k)
            counts[:, 1] += np.bincount(assignment[:, 0], minlength=k)
            edges = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1], True])
            for start, end in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
                pick = member[start:end]
                by_bucket.setdefault(int(bucket[start]), []).append(
                    pa.table(
                        {
                            "id": pa.array(ids[pick], pa.int64()),
                            "slot": pa.array(slots[start:end], pa.int8()),
                            "cluster": pa.array(cluster[start:end].astype(np.int32), pa.int32()),
                            **code_columns(codes[pick]),
                            "vector": vector_array(vectors[pick]),
                        }
                    )
                )
            if with_nearest or nearest_reps:
                nearest_parts.append(_nearest_table(rows.ids[reps], assignment[:, 0]))
        copies = np.flatnonzero(rows.ok & (rows.exact_copy | rows.left_out))
        if with_nearest and len(copies):
            x = _vectors(rows.vectors[copies], params)
            nearest = (nearest_centroids(x, centroids, 1, params, _gpu(params))[:, 0] if k > 1
                       else np.zeros(len(copies), np.int64))  # fmt: skip
            nearest_parts.append(_nearest_table(rows.ids[copies], nearest))
    written = 0
    for bucket_index in sorted(by_bucket):
        table = pa.concat_tables(by_bucket.pop(bucket_index))
        write_table(where.round(r, "assign", name("b", bucket_index), name("g", group.index) + ".parquet"), table)
        written += table.num_rows
    write_array(where.round(r, "counts", name("g", group.index) + ".npy"), counts)
    if with_nearest or nearest_reps:
        table = pa.concat_tables(nearest_parts) if nearest_parts else _nearest_table(np.zeros(0), np.zeros(0))
        write_table(where.round(r, "nearest", name("g", group.index) + ".parquet"), table)
    if with_nearest:
        write_array(where.round(r, "norms", name("g", group.index) + ".npy"), norms)
    return {"rows": written}


def _nearest_table(ids: np.ndarray, cluster: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "cluster": pa.array(cluster, pa.int32())})


def plan_search(where: Where, r: int, k: int, search_rows: int, analysis: int) -> dict[str, Any]:
    """Exact cluster sizes (summed over the map groups) -> the round's search tasks: the clusters of each bucket
    packed into tasks of at most ``search_rows`` rows, and clusters above it, searched in keep-order blocks of
    ``search_rows`` / 2 (each search task then holds two blocks). Round 0 also picks the ``analysis`` clusters
    of the report's threshold analysis (their search tasks keep their rows for it)."""
    counts = np.zeros((k, 2), np.int64)
    for uri in folder_files(where.round(r, "counts"), ".npy"):
        counts += read_array(uri)
    write_array(where.round(r, "sizes.npy"), counts)
    buckets = read_array(where.round(r, "buckets.npy"))
    tasks: list[dict[str, Any]] = []
    giant: list[dict[str, Any]] = []
    block = max(1, search_rows // 2)
    for b in np.unique(buckets).tolist():
        current: list[int] = []
        load = 0
        for c in np.flatnonzero(buckets == b).tolist():
            size = int(counts[c, 0])
            if size < 2:
                continue
            if size > search_rows:
                giant.append({"cluster": c, "bucket": b, "size": size, "blocks": -(-size // block), "block": block})
                continue
            if current and load + size > search_rows:
                tasks.append({"bucket": b, "clusters": current})
                current, load = [], 0
            current.append(c)
            load += size
        if current:
            tasks.append({"bucket": b, "clusters": current})
    chosen = analysed_clusters(counts[:, 1], counts[:, 0], analysis, search_rows) if r == 0 else np.zeros(0)
    plan = {"tasks": tasks, "giant": giant, "analysed": sorted(int(c) for c in chosen)}
    storage.write_json(where.round(r, "plan.json"), plan)
    return {"tasks": len(tasks), "giant": len(giant), "members": int(counts[:, 0].sum())}


def remove_cache(where: Where) -> dict[str, Any]:
    """Delete the embeddings cache once the last vector pass has run."""
    freed = sum(f.size for f in storage.list_files(where.path("cache")))
    if storage.exists(where.path("cache")):
        storage.remove_tree(where.path("cache"))
    return {"bytes": freed}


def remove_rows(where: Where, r: int) -> dict[str, Any]:
    """Delete the round's rows by bucket and its large clusters' blocks once its search has run (they are the
    step's bulk: assign_top x ~1 KB per embedded row and round)."""
    freed = 0
    for folder in (where.round(r, "assign"), where.round(r, "giant")):
        freed += sum(f.size for f in storage.list_files(folder))
        if storage.exists(folder):
            storage.remove_tree(folder)
    return {"bytes": freed}


def round_params(params: DedupParams, r: int) -> DedupParams:
    return replace(params, seed=params.seed + r)


def read_plan(where: Where, r: int) -> dict[str, Any]:
    return json.loads(storage.read_text(where.round(r, "plan.json")))
