"""Which rows the references remove, and what the report samples from their matches.

Per map group (``resolve``, one task each; the single-process step calls ``decide`` on arrays): each reference's
matches reduced to the best per row (highest similarity; ties: first in the reference's keep order), then the
rule of ``against:``: a row matched by any reference is removed, named after the first reference in the list
that matched it (``dup_reference``), with reason ``seen_before`` (an earlier run) or ``eval_overlap`` (a
reference set), ``dup_of`` = that reference row's key and its similarity. Reference rows are never changed.

It also keeps, per reference, a small deterministic sample of pairs in similarity bands around the threshold
(the report's gallery: matches above it, near misses of sampled rows below it), and the probe rank at which each
matched row was first found (drift: matches found only in the last probes mean some are missed).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup.against import root
from curate.dedup.layout import Where, code_columns, hash_part, name, read_folder, write_table
from curate.dedup.matches import best_of, read_found

# similarity bands of the gallery, as offsets from the reference's threshold: [t-0.15, t-0.1), ..., (t+0.1, 1]
BAND_EDGES = (-0.15, -0.10, -0.05, 0.0, 0.05, 0.10)


def band_labels(threshold: float) -> list[str]:
    edges = [threshold + e for e in BAND_EDGES] + [1.0]
    return [f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(edges)]


def band_of(sim: np.ndarray, threshold: float) -> np.ndarray:
    """Band index of each similarity (-1 below the lowest band). Bands above the threshold are open below
    (a match is strictly above it), bands below are closed above."""
    offsets = np.asarray(sim, np.float64) - threshold
    below = np.searchsorted(np.array(BAND_EDGES[:4]), offsets, side="left") - 1  # (t-0.15..t]: 0..2
    above = 3 + np.searchsorted(np.array(BAND_EDGES[4:]), offsets, side="left")  # (t..]: 3..5
    band = np.where(offsets > 0, above, below)
    return np.where(offsets <= BAND_EDGES[0], -1, band)


def decide(refs: list[dict[str, Any]], per_ref: list[dict[str, np.ndarray]], gallery: int) -> dict[str, Any]:
    """The removals of one set of rows. ``per_ref[i]``: the rows' best match with reference i (``ids``, ``sim``,
    ``codes``, ``ref``; only matched rows), their first probe rank (``probe``), near misses of sampled rows
    (``near_*``). Returns the removed rows (ids sorted, with reference index, similarity, codes, reference id),
    counts per reference and the gallery sample."""
    removed_ids: list[np.ndarray] = []
    parts = []
    taken = np.zeros(0, np.int64)
    counts, probes, samples = [], [], []
    for i, (info, found) in enumerate(zip(refs, per_ref, strict=True)):
        ids = found["ids"]
        fresh = ~np.isin(ids, taken)
        parts.append((ids[fresh], np.full(int(fresh.sum()), i, np.int16), found["sim"][fresh],
                      found["codes"][fresh], found["ref"][fresh]))  # fmt: skip
        removed_ids.append(ids[fresh])
        taken = np.union1d(taken, ids)
        counts.append({"matched": len(ids), "removed": int(fresh.sum())})
        rank = found["probe"]
        probes.append(np.bincount(rank[rank >= 0], minlength=max(1, int(info.get("probes") or 1))).tolist())
        samples.append(_sample(i, info["threshold"], found, gallery))
    if parts:
        ids, ref_index, sim, codes, ref_ids = (np.concatenate(p) for p in zip(*parts, strict=True))
    else:
        ids, ref_index, sim = np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0, np.float32)
        codes, ref_ids = np.zeros((0, 4), np.uint64), np.zeros(0, np.int64)
    order = np.argsort(ids)
    removed = pa.table(
        {
            "id": pa.array(ids[order], pa.int64()),
            "reference": pa.array(ref_index[order], pa.int16()),
            "similarity": pa.array(sim[order], pa.float32()),
            **code_columns(codes[order], "dup_"),
            "ref_id": pa.array(ref_ids[order], pa.int64()),
        }
    )
    return {"removed": removed, "counts": counts, "probes": probes, "gallery": pa.concat_tables(samples)}


def _sample(i: int, threshold: float, found: dict[str, np.ndarray], gallery: int) -> pa.Table:
    """Up to ``gallery`` pairs per band: matches for the bands above the threshold, near misses below; the rows
    with the smallest hash of their id, so every map group offers the same kind of sample and the report keeps
    the overall smallest."""
    ids = np.concatenate([found["ids"], found["near_ids"]])
    sim = np.concatenate([found["sim"], found["near_sim"]]).astype(np.float32)
    codes = np.concatenate([found["codes"], found["near_codes"]])
    refs = np.concatenate([found["ref"], found["near_ref"]])
    matched = np.r_[np.ones(len(found["ids"]), bool), np.zeros(len(found["near_ids"]), bool)]
    band = band_of(sim, threshold)
    keep = (band >= 0) & (matched == (band >= 3))  # a near miss above the threshold is already a match
    h = hash_part(ids, 1 << 30)
    chosen = []
    for b in np.unique(band[keep]).tolist():
        mine = np.flatnonzero(keep & (band == b))
        chosen.append(mine[np.argsort(h[mine], kind="stable")[:gallery]])
    pick = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return pa.table(
        {
            "reference": pa.array(np.full(len(pick), i, np.int16), pa.int16()),
            "band": pa.array(band[pick].astype(np.int8), pa.int8()),
            "id": pa.array(ids[pick], pa.int64()),
            "ref_id": pa.array(refs[pick], pa.int64()),
            "similarity": pa.array(sim[pick], pa.float32()),
            **code_columns(codes[pick], "ref_"),
            "hash": pa.array(h[pick], pa.int64()),
        }
    )


def _best(table: pa.Table | None) -> dict[str, np.ndarray]:
    ids, sim, codes, ref = read_found(table)
    probe = np.full(0, -1, np.int64)
    if table is not None and table.num_rows and "probe" in table.column_names:
        order = np.argsort(ids, kind="stable")
        entry_ids, ranks = ids[order], table["probe"].to_numpy().astype(np.int64)[order]
        first = np.flatnonzero(np.r_[True, entry_ids[1:] != entry_ids[:-1]])
        probe = np.minimum.reduceat(ranks, first) if len(first) else probe
    ids, sim, codes, ref = best_of(ids, sim, codes, ref)
    return {"ids": ids, "sim": sim, "codes": codes, "ref": ref, "probe": probe if len(probe) == len(ids)
            else np.full(len(ids), -1, np.int64)}  # fmt: skip


def resolve(where: Where, g: int, refs: list[dict[str, Any]], gallery: int) -> dict[str, Any]:
    """The rows of map group ``g`` that the references remove (``where.removed(g)``) and its gallery sample."""
    per_ref = []
    for i in range(len(refs)):
        found = _best(read_folder(root(where, i, "match", name("g", g))))
        near = _best(read_folder(root(where, i, "near", name("g", g))))
        per_ref.append({**found, **{f"near_{k}": v for k, v in near.items() if k != "probe"}})
    out = decide(refs, per_ref, gallery)
    write_table(where.removed(g), out["removed"])
    if out["gallery"].num_rows:
        write_table(where.path("against", "gallery", name("g", g) + ".parquet"), out["gallery"])
    return {"counts": out["counts"], "probes": out["probes"], "removed": out["removed"].num_rows}


def removed_rows(where: Where, g: int) -> pa.Table | None:
    """The rows of map group ``g`` a reference removed (sorted by id), or None without references."""
    if not where.against or not storage.exists(where.removed(g)):
        return None
    return storage.read_parquet(where.removed(g))
