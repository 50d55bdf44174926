"""DataComp's "keep the top fraction by CLIP score", made exact over a whole run.

The cutoff is global, so the filter's global step computes it once from every shard's candidates (rows
that every other rule kept) and each shard task compares against it. Ties at the cutoff score are broken
by key, so exactly ceil(fraction x candidates) rows are kept, however the shards are split.
Memory: 12 bytes per candidate (score, shard, row) plus the keys of rows tied with the cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
