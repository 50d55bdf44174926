"""DataComp's "keep the top fraction by CLIP score", made exact over a whole run.

The cutoff is global, so the filter's global step computes it once from every shard's candidates (rows
that every other rule kept) and each shard task compares against it. Ties at the cutoff score are broken
by key, so exactly ceil(fraction x candidates) rows are kept, however the shards are split.
``cutoff`` holds 12 bytes per candidate (score, shard, row) in one process; the stage uses the bounded form
below it (radix selection over per-shard histograms), which gives the same cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate import storage
from curate.runfolder import shard_name
from curate.steps import read_array, write_array


def keep_count(fraction: float, candidates: int) -> int:
    """ceil(fraction x candidates), without float noise turning 0.3 x 10 into 4."""
    return min(candidates, math.ceil(round(fraction * candidates, 6)))


@dataclass
class Candidates:
    """Scores of the candidate rows of each shard with where they are (shard index, row in shard)."""

    scores: list[np.ndarray]
    shards: list[np.ndarray]
    rows: list[np.ndarray]

    @staticmethod
    def empty() -> Candidates:
        return Candidates([], [], [])

    def add(self, shard: int, rows: np.ndarray, scores: np.ndarray) -> None:
        self.scores.append(scores.astype(np.float32))
        self.shards.append(np.full(len(rows), shard, np.int32))
        self.rows.append(rows.astype(np.int32))


def cutoff(candidates: Candidates, fraction: float, keys_of_shard) -> tuple[tuple[float, str] | None, dict]:
    """((cutoff score, cutoff key) or None when there are no candidates, summary). ``keys_of_shard(i)`` gives
    the keys of shard i (read only for shards holding rows tied with the cutoff score)."""
    if not candidates.scores or sum(len(s) for s in candidates.scores) == 0:
        return None, {"candidates": 0, "kept": 0, "fraction": fraction, "cutoff_score": None, "cutoff_key": None}
    scores = np.concatenate(candidates.scores)
    shards = np.concatenate(candidates.shards)
    rows = np.concatenate(candidates.rows)
    k = keep_count(fraction, len(scores))
    score = np.float32(-np.partition(-scores, k - 1)[k - 1])  # the k-th largest
    above = int((scores > score).sum())
    tied = np.flatnonzero(scores == score)
    tied_keys = []
    for shard in np.unique(shards[tied]):
        keys = keys_of_shard(int(shard))
        tied_keys += [keys[r] for r in rows[tied][shards[tied] == shard]]
    key = sorted(tied_keys)[k - above - 1]
    summary = {
        "candidates": len(scores),
        "kept": k,
        "fraction": fraction,
        "cutoff_score": float(score),
        "cutoff_key": key,
        "tied_at_cutoff": len(tied),
    }
    return (float(score), key), summary


# -- the same cutoff with bounded memory: per-shard histograms, then one pass over the boundary bin --------------
#
# Rows are ordered by a uint32 code (ascending = kept first: the score's float32 bits made monotone, inverted)
# and then by key. Radix selection finds the keep_count-th row: the high 16 bits of the code from per-shard
# histograms, then the low 16 bits inside that bin, then the keys of the rows tied at that exact score, sorted in
# one task. Memory: 65,536 counters per task and the tied keys; the candidates themselves stay in per-shard
# files (score code and key, ~30 bytes per candidate).

DIGIT = 16


def order_code(scores: np.ndarray) -> np.ndarray:
    """uint32 codes that sort ascending as the scores sort descending (float32 order; -0.0 counts as 0.0)."""
    bits = (np.asarray(scores, np.float32) + np.float32(0.0)).view(np.uint32)
    monotone = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return (~monotone).astype(np.uint32)


def score_of(code: int) -> float:
    monotone = ~np.uint32(code)
    bits = monotone ^ np.uint32(0x80000000) if monotone & np.uint32(0x80000000) else ~monotone
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def write_candidates(root: str, shard: int, scores: np.ndarray, keys: list[str]) -> dict:
    """A shard's candidates (rows every other rule kept) and the histogram of their codes' high digit."""
    code = order_code(scores)
    table = pa.table({"code": pa.array(code, pa.uint32()), "key": pa.array(keys, pa.string())})
    storage.write_parquet_atomic(storage.join(root, "candidates", shard_name(shard) + ".parquet"), table)
    write_array(storage.join(root, "hist-0", shard_name(shard) + ".npy"), _histogram(code >> DIGIT))
    return {"candidates": len(code)}


def _histogram(digits: np.ndarray) -> np.ndarray:
    """Sparse histogram: (2, bins) of digit values and counts."""
    values, counts = np.unique(np.asarray(digits, np.int64), return_counts=True)
    return np.stack([values, counts.astype(np.int64)])


def _codes(root: str, shard: int) -> tuple[np.ndarray, pa.Table]:
    table = storage.read_parquet(storage.join(root, "candidates", shard_name(shard) + ".parquet"))
    return table["code"].to_numpy(), table


def low_histogram(root: str, shard: int, high: int) -> dict:
    """Histogram of the low digit of the shard's candidates in bin ``high``."""
    code, _ = _codes(root, shard)
    inside = code[(code >> DIGIT) == high]
    write_array(storage.join(root, "hist-1", shard_name(shard) + ".npy"), _histogram(inside & 0xFFFF))
    return {"in_bin": len(inside)}


def select(root: str, level: int, shards: list[int], k: int) -> dict:
    """The digit holding the k-th candidate (1-based) of the summed histograms, and how many come before it."""
    total = np.zeros(1 << DIGIT, np.int64)
    for shard in shards:
        values, counts = read_array(storage.join(root, f"hist-{level}", shard_name(shard) + ".npy"))
        np.add.at(total, values, counts)
    running = np.cumsum(total)
    digit = int(np.searchsorted(running, k))  # first digit whose running count reaches k
    return {"digit": digit, "before": int(running[digit] - total[digit]), "in_digit": int(total[digit])}


def tied_keys(root: str, shard: int, code: int) -> dict:
    """Keys of the shard's candidates with exactly this code (the cutoff score)."""
    codes, table = _codes(root, shard)
    keys = table.filter(pa.array(codes == np.uint32(code)))["key"]
    storage.write_parquet_atomic(storage.join(root, "ties", shard_name(shard) + ".parquet"), pa.table({"key": keys}))
    return {"tied": len(keys)}


def resolve(root: str, shards: list[int], code: int, k: int, before: int, fraction: float, candidates: int,
            out_uri: str) -> dict:  # fmt: skip
    """The cutoff key: the (k - before)-th of the keys tied at the cutoff score; writes the summary."""
    keys: list[str] = []
    for shard in shards:
        keys += storage.read_parquet(storage.join(root, "ties", shard_name(shard) + ".parquet"))["key"].to_pylist()
    keys.sort()
    summary = {
        "candidates": candidates,
        "kept": k,
        "fraction": fraction,
        "cutoff_score": score_of(code),
        "cutoff_key": keys[k - before - 1],
        "tied_at_cutoff": len(keys),
    }
    storage.write_json(out_uri, summary)
    return summary
