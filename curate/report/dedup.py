"""The dedup section: pairs of images side by side (kept, removed, similarity) in bands above the threshold,
exact copies apart, with the stage's own report (threshold analysis, cluster sizes; `dedup/_report/`).

Bounded sample: the dedup columns (key, dup_of, similarity, reason; no vectors) of at most PAIR_SHARDS shards
spread over the stage give the removed rows; up to PAIRS_PER_BAND of them per band, spread over the band. A
removed row names its kept row by key only (`dup_of`), which may live in any shard: the kept keys are looked
up in the `key` column of at most KEY_SHARDS shards (the sampled ones first). A pair whose kept row is not
found there is shown with the removed image alone and says so. Rows that matched a reference (a
`dup_reference` column, when the stage writes one) are counted per reference and reason instead: their kept
image lives in another run.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Any

from curate import storage
from curate.report.pictures import ImageFolder
from curate.report.samples import done_shards, image_stage, read_columns, spread
from curate.runfolder import RunDir

PAIR_SHARDS = 16
KEY_SHARDS = 64
PAIRS_PER_BAND = 4
BAND_EDGES = (0.0, 0.02, 0.05, 0.10)  # above the threshold; the last band runs to 1
COLUMNS = ["key", "dup_of", "similarity", "reason", "dup_reference"]


def bands(threshold: float) -> list[tuple[float, float]]:
    edges = [min(1.0, threshold + e) for e in BAND_EDGES] + [1.0 + 1e-6]
    return [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]


def _removed_rows(run: RunDir, name: str, shards: list[int]) -> tuple[list[dict[str, Any]], dict[str, int], bool]:
    """Removed rows (with dup_of or a reference) of the sampled shards, every key seen there -> its shard, and
    whether the shards have a `dup_reference` column."""
    stage = run.stage(name)
    removed: list[dict[str, Any]] = []
    where: dict[str, int] = {}
    has_reference = False
    for shard in shards:
        table = read_columns(stage.shard(shard), COLUMNS)
        columns = {c: table[c].to_pylist() for c in table.column_names}
        has_reference |= "dup_reference" in columns
        keys = columns["key"]
        where.update(dict.fromkeys(keys, shard))
        refs = columns.get("dup_reference", [None] * len(keys))
        for i, dup in enumerate(columns.get("dup_of", [None] * len(keys))):
            if dup is None and refs[i] is None:
                continue
            removed.append(
                {
                    "key": keys[i],
                    "shard": shard,
                    "dup_of": dup,
                    "similarity": columns["similarity"][i] if "similarity" in columns else None,
                    "reason": columns["reason"][i] if "reason" in columns else None,
                    "reference": refs[i],
                }
            )
    return removed, where, has_reference


def _locate(run: RunDir, name: str, keys: set[str], where: dict[str, int], scanned: list[int]) -> dict[str, int]:
    """key -> shard for the kept keys: the sampled shards' keys first, then more shards' `key` column."""
    found = {k: where[k] for k in keys if k in where}
    budget = [s for s in spread(done_shards(run.stage(name)), KEY_SHARDS) if s not in scanned]
    for shard in budget[: max(0, KEY_SHARDS - len(scanned))]:
        if len(found) == len(keys):
            break
        column = read_columns(run.stage(name).shard(shard), ["key"])["key"].to_pylist()
        found.update({k: shard for k in column if k in keys and k not in found})
    return found


def _pick(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: (r["similarity"] if r["similarity"] is not None else 2.0, r["key"]))
    return [rows[i] for i in spread(list(range(len(rows))), n)]


def dedup_section(run: RunDir, name: str, pictures: ImageFolder) -> dict[str, Any]:
    stage = run.stage(name)
    folder = storage.join(stage.uri, "_report")
    uri = storage.join(folder, "dedup_report.json")
    report = storage.read_json(uri) if storage.exists(uri) else None
    record = stage.read_record() if storage.exists(stage.record_uri) else {}
    threshold = float((report or {}).get("threshold") or (record.get("config") or {}).get("threshold") or 0.75)
    shards = spread(done_shards(stage), PAIR_SHARDS)
    removed, where, has_reference = _removed_rows(run, name, shards)
    within = [r for r in removed if r["reference"] is None and r["dup_of"] is not None]
    groups = [("exact copies", [r for r in within if r["reason"] == "exact_duplicate"])]
    near = [r for r in within if r["reason"] != "exact_duplicate"]
    for lo, hi in bands(threshold):
        label = f"similarity {lo:.2f} – {min(hi, 1.0):.2f}"
        groups.append((label, [r for r in near if r["similarity"] is not None and lo < r["similarity"] <= hi]))
    chosen = [(label, _pick(rows, PAIRS_PER_BAND), len(rows)) for label, rows in groups]
    kept_keys = {r["dup_of"] for _, rows, _ in chosen for r in rows}
    located = _locate(run, name, kept_keys, where, shards)
    source = image_stage(run, name)
    wanted = [(r["shard"], r["key"]) for _, rows, _ in chosen for r in rows]
    wanted += [(located[k], k) for k in kept_keys if k in located]
    thumbs = pictures.thumbnails(run.stage(source), wanted) if source else {}
    pair_groups = [
        {
            "label": label,
            "in_sample": count,
            "pairs": [
                {
                    "removed": r["key"],
                    "kept": r["dup_of"],
                    "similarity": r["similarity"],
                    "reason": r["reason"],
                    "removed_src": thumbs.get(r["key"]),
                    "kept_src": thumbs.get(r["dup_of"]),
                    "kept_found": r["dup_of"] in located,
                }
                for r in rows
            ],
        }
        for label, rows, count in chosen
    ]
    references: dict[tuple[str, str], list[str]] = defaultdict(list)
    counts: Counter[tuple[str, str]] = Counter()
    for r in removed:
        if r["reference"] is not None:
            counts[(r["reference"], r["reason"] or "-")] += 1
            if len(references[(r["reference"], r["reason"] or "-")]) < 3:
                references[(r["reference"], r["reason"] or "-")].append(r["key"])
    return {
        "name": name,
        "report": report,
        "threshold": threshold,
        "plot": pictures.copy(storage.join(folder, "dedup_report.png"), f"{name}-dedup_report.png"),
        "sampled_shards": len(shards),
        "removed_in_sample": len(removed),
        "key_shards": KEY_SHARDS,
        "groups": pair_groups,
        "pairs": sum(len(g["pairs"]) for g in pair_groups),
        "has_reference_column": has_reference,
        "references": [
            {"reference": ref, "reason": reason, "rows": n, "examples": references[(ref, reason)]}
            for (ref, reason), n in sorted(counts.items())
        ],
        "image_stage": source,
    }


__all__ = ["bands", "dedup_section"]
