"""The last phases of the distributed global step: one decision file per upstream shard, and the report.

``write`` (one task per map group) joins, by row id, the exact copies and the greedy removals of its rows and
their nearest centroids, and turns dup_of codes back into keys: the same table the single-process path writes.
``report`` (one task) sums the counts, reads the sampled clusters' rows for the threshold analysis, and writes
``_report/``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup import against_report
from curate.dedup.layout import Group, Settings, Where, codes_of, name, read_files, read_folder, vectors_of
from curate.dedup.order import dense_rank, keys_from_codes
from curate.dedup.report import cluster_size_stats, method, threshold_analysis, write_report
from curate.dedup.resolve import removed_rows
from curate.runfolder import shard_name
from curate.schema import DEDUP_SCHEMA
from curate.steps import read_array


def _lookup(table: pa.Table | None, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each id: whether ``table`` (sorted by id) has it, and its row there."""
    if table is None or not table.num_rows:
        return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
    known = table["id"].to_numpy()
    at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return known[at] == ids, at


def write(
    where: Where, group: Group, rounds_done: bool, references: tuple[tuple[str, str], ...] = ()
) -> dict[str, Any]:
    """The decision file of each shard of the group (``rounds_done``: the embedding search ran, i.e. some row had
    an embedding that was neither an exact copy nor removed by a reference; ``references``: (name, reason) of
    each reference, in order)."""
    seen = removed_rows(where, group.index)
    copies = read_folder(where.path("exact", "out", name("g", group.index)))
    near = read_folder(where.path("graph", "greedy", name("m", group.index)))
    nearest = read_files([where.round(0, "nearest", name("g", group.index) + ".parquet")]) if rounds_done else None
    copies = copies.sort_by("id") if copies is not None else None
    near = near.sort_by("id") if near is not None else None
    nearest = nearest.sort_by("id") if nearest is not None else None
    counts = {"kept": 0, "exact_duplicate": 0, "near_duplicate": 0, "not_ok": 0, "bounded": 0,
              "seen_before": 0, "eval_overlap": 0}  # fmt: skip
    for shard, _ in group.shards:
        table = storage.read_parquet(storage.join(where.upstream, shard_name(shard) + ".parquet"), ["key", "status"])
        n = table.num_rows
        ids = (np.int64(shard) << np.int64(32)) | np.arange(n, dtype=np.int64)
        ok = np.asarray(table["status"].to_numpy(zero_copy_only=False) == "ok", bool)
        is_copy, copy_at = _lookup(copies, ids)
        in_near, near_at = _lookup(near, ids)
        is_near = in_near.copy()
        if near is not None and near.num_rows:
            is_near &= near["dup_of"].to_numpy()[near_at] >= 0
        dup_codes = np.zeros((n, 4), np.uint64)
        similarity = np.full(n, np.nan, np.float32)
        if copies is not None and copies.num_rows:
            dup_codes[is_copy] = codes_of(copies, "dup_")[copy_at[is_copy]]
            similarity[is_copy] = 1.0
        if near is not None and near.num_rows:
            dup_codes[is_near] = codes_of(near, "dup_")[near_at[is_near]]
            similarity[is_near] = near["similarity"].to_numpy()[near_at[is_near]]
        is_seen, seen_at = _lookup(seen, ids)
        reference: list[str | None] = [None] * n
        seen_reason = np.full(n, "", object)
        if seen is not None and seen.num_rows:
            dup_codes[is_seen] = codes_of(seen, "dup_")[seen_at[is_seen]]
            similarity[is_seen] = seen["similarity"].to_numpy()[seen_at[is_seen]]
            which = seen["reference"].to_numpy()[seen_at[is_seen]]
            for row, i in zip(np.flatnonzero(is_seen).tolist(), which.tolist(), strict=True):
                reference[row] = references[i][0]
                seen_reason[row] = references[i][1]
        has_dup = is_copy | is_near | is_seen
        dup_keys: list[str | None] = [None] * n
        for i, key in zip(np.flatnonzero(has_dup).tolist(), keys_from_codes(dup_codes[has_dup, 1:]), strict=True):
            dup_keys[i] = key
        cluster = np.full(n, -1, np.int64)
        if nearest is not None and nearest.num_rows:
            found, at = _lookup(nearest, ids)
            cluster[found] = nearest["cluster"].to_numpy()[at[found]]
        keep = ok & ~has_dup
        reason = np.where(~ok, "not_ok", np.where(is_seen, seen_reason, np.where(is_copy, "exact_duplicate",
                          np.where(is_near, "near_duplicate", "kept"))))  # fmt: skip
        decisions = pa.table(
            {
                "key": table["key"],
                "cluster": pa.array(cluster, pa.int32()),
                "keep": pa.array(keep, pa.bool_()),
                "dup_of": pa.array(dup_keys, pa.string()),
                "similarity": pa.array(similarity, pa.float32(), from_pandas=True),
                "reason": pa.array(reason.tolist(), pa.string()),
                "status": table["status"],
                "dup_reference": pa.array(reference, pa.string()),
            },
            schema=DEDUP_SCHEMA,
        )
        storage.write_parquet_atomic(where.decisions(shard), decisions)
        counts["kept"] += int(keep.sum())
        counts["exact_duplicate"] += int(is_copy.sum())
        counts["near_duplicate"] += int(is_near.sum())
        counts["not_ok"] += int((~ok).sum())
        counts["bounded"] += int((in_near & ~is_near).sum())
        for r in ("seen_before", "eval_overlap"):
            counts[r] += int((seen_reason == r).sum())
    return counts


def report(where: Where, settings: Settings, d: int, totals: dict[str, Any], extra: dict[str, Any] | None = None):
    """The report: counts, cluster sizes, and the threshold analysis over the clusters round 0's plan sampled
    (their rows kept by the search tasks); with references (``extra``), their section, drift and pair gallery
    (curate.dedup.against_report)."""
    sizes = np.zeros(0, np.int64)
    chosen = np.zeros(0, np.int64)
    rows = None
    if totals["searched"]:
        sizes = read_array(where.round(0, "sizes.npy"))[:, 1]
        chosen = np.array(json.loads(storage.read_text(where.round(0, "plan.json")))["analysed"], np.int64)
        rows = read_folder(where.round(0, "analysis"))
    if rows is not None and rows.num_rows:
        rows = rows.sort_by("id")
        ids = rows["id"].to_numpy()
        x, cluster, rank = vectors_of(rows["vector"], d), rows["cluster"].to_numpy(), dense_rank(codes_of(rows), ids)
    else:
        x, cluster, rank = np.zeros((0, d), np.float16), np.zeros(0, np.int64), np.zeros(0, np.int64)
    analysis = threshold_analysis(x, cluster, rank, chosen, settings.analysis_thresholds)
    params = settings.params
    ok = totals["ok"]
    removed = totals["exact_duplicates"] + totals["near_duplicates"] + totals.get("against_removed", 0)
    document = {
        **totals,
        "removed": removed,
        "fraction_removed": removed / max(1, ok),
        **method(params, settings.order),
        "clusters": cluster_size_stats(sizes),
        "threshold_analysis": analysis,
    }
    document.pop("searched", None)
    lines = []
    if extra:
        candidates = read_folder(where.path("against", "gallery"))
        lines = against_report.build(
            document, extra["references"], extra["counts"], extra["searched"], extra["histograms"],
            extra["by_rank"], ok, where.report, candidates, extra["images"], where.upstream, settings.gallery,
        )  # fmt: skip
    write_report(where.report, document, sizes, lines)
    return {"removed": removed}
