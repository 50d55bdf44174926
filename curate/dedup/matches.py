"""New rows against a reference's rows: for each new row, the reference row with the highest similarity above a
threshold (ties: the first in the reference's keep order). The kernel both global-step paths call, so they find
the same matches.

The rule is a maximum over every reference row the row meets, so it does not depend on how reference rows are
split into files, chunks or tasks: a cluster of the index read in several chunks, or a reference set searched in
several tasks, gives the same answer. Candidates come from bf16 products where the CPU multiplies bf16 natively
(float32 elsewhere) above ``threshold - margin``, and every candidate is rechecked in float32
(``curate.dedup.products.similarity``, the one kernel every reported similarity comes from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.dedup.cluster import DedupParams, normalize
from curate.dedup.layout import codes_of
from curate.dedup.products import BF16_MARGIN, FP32_MARGIN, TILE, Vectors, run_parallel, similarity

NONE = -1


@dataclass
class Found:
    """Per new row (or per probe entry): the best reference row found so far. ``sim`` is -inf where none."""

    sim: np.ndarray  # (n,) float32
    codes: np.ndarray  # (n, 4) uint64: the reference row's keep order (its key in codes 1..3)
    ref: np.ndarray  # (n,) int64: the reference row's id (shard << 32 | row of its run), -1 when none

    @staticmethod
    def empty(n: int) -> Found:
        return Found(np.full(n, -np.inf, np.float32), np.zeros((n, 4), np.uint64), np.full(n, NONE, np.int64))

    def merge(self, at: np.ndarray, sim: np.ndarray, codes: np.ndarray, ref: np.ndarray) -> None:
        """Take candidates (rows ``at``, unique) where better: higher similarity, or equal and earlier in the
        reference's keep order (codes, then id)."""
        better = _before(sim, codes, ref, self.sim[at], self.codes[at], self.ref[at])
        at = at[better]
        self.sim[at], self.codes[at], self.ref[at] = sim[better], codes[better], ref[better]

    @property
    def hit(self) -> np.ndarray:
        return self.ref >= 0


def _before(sim, codes, ref, sim0, codes0, ref0) -> np.ndarray:
    """(sim desc, codes asc, id asc) order: is each candidate before the current one?"""
    out = sim > sim0
    tie = sim == sim0
    undecided = tie.copy()
    for c in range(4):
        out |= undecided & (codes[:, c] < codes0[:, c])
        undecided &= codes[:, c] == codes0[:, c]
    return out | (undecided & (ref < ref0))


def best_of(rows: np.ndarray, sim: np.ndarray, codes: np.ndarray, ref: np.ndarray):
    """Candidate pairs (``rows`` = the new row of each) reduced to the best per row: (rows, sim, codes, ref)."""
    if not len(rows):
        return rows, sim, codes, ref
    order = np.lexsort((ref, codes[:, 3], codes[:, 2], codes[:, 1], codes[:, 0], -sim.astype(np.float64), rows))
    rows, sim, codes, ref = rows[order], sim[order], codes[order], ref[order]
    first = np.r_[True, rows[1:] != rows[:-1]]
    return rows[first], sim[first], codes[first], ref[first]


def search_vectors(x16: np.ndarray, params: DedupParams) -> Vectors:
    """Normalised rows for this module's products: float32, and a bf16 copy where the CPU multiplies bf16
    natively (the candidates). The one place the reference search makes its vectors (CPU products)."""
    return Vectors.for_precision(normalize(x16), params.precision)  # CPU products (the tiles are host code)


def _tile_pairs(new: Vectors, ref: Vectors, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (new row, reference row) with float32 similarity above ``threshold``, in tiles of at most TILE
    products (bf16 or float32 candidates, float32 recheck)."""
    bf16 = new.b16 is not None and ref.b16 is not None
    bound = threshold - (BF16_MARGIN if bf16 else FP32_MARGIN)
    rows = max(1, min(len(new), TILE // max(1, len(ref))))
    cols = max(1, TILE // rows)
    out_i, out_j = [], []
    for r0 in range(0, len(new), rows):
        for c0 in range(0, len(ref), cols):
            if bf16:
                sims = new.b16[r0 : r0 + rows] @ ref.b16[c0 : c0 + cols].T
                any_row = (sims.amax(dim=1) > bound).nonzero(as_tuple=True)[0]
                if not len(any_row):
                    continue
                k, j = (sims[any_row] > bound).nonzero(as_tuple=True)
                i = any_row[k].numpy()
                j = j.numpy()
            else:
                sims = new.f32[r0 : r0 + rows] @ ref.f32[c0 : c0 + cols].T
                i, j = np.nonzero(sims > bound)
            out_i.append(i + r0)
            out_j.append(j + c0)
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j = np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)
    s = _pair_similarity(new.f32, ref.f32, i, j)
    hit = s > threshold
    return i[hit], j[hit], s[hit]


RECHECK = 32_768  # candidate pairs rechecked at once (two float32 row copies each)


def _pair_similarity(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float32 dot products of (a[i], b[j]) in chunks: ``products.similarity`` on the two rows of each pair
    stacked, so every similarity comes from the same kernel as the in-run search's."""
    out = np.zeros(len(i), np.float32)
    for start in range(0, len(i), RECHECK):
        ii, jj = i[start : start + RECHECK], j[start : start + RECHECK]
        n = len(ii)
        out[start : start + n] = similarity(np.concatenate([a[ii], b[jj]]), np.arange(n), np.arange(n, 2 * n))
    return out


Hits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # group, new row, sim, codes, reference id


def _no_hits() -> Hits:
    z = np.zeros(0, np.int64)
    return z, z, np.zeros(0, np.float32), np.zeros((0, 4), np.uint64), z


def search_groups(
    new: Vectors,
    ref: Vectors,
    ref_table: pa.Table,
    groups: list[tuple[np.ndarray, np.ndarray]],
    threshold: float,
    threads: int = 0,
    sample: np.ndarray | None = None,
    floor: float = -1.0,
) -> tuple[Hits, Hits]:
    """For each group (new rows, reference rows: positions in ``new`` / ``ref``, e.g. the rows probing one
    cluster and that cluster's index rows), the best reference row above ``threshold`` for each of its new rows;
    and for the ``sample`` new rows (a bool per row of ``new``), their most similar reference row of the group if
    above ``floor`` (near misses, for the report's gallery). Groups run in a thread pool, single-threaded kernels
    each. Returns both as (group, new row, similarity, codes, reference id), one entry per (group, new row)."""
    codes, ids = codes_of(ref_table), ref_table["id"].to_numpy()

    def work(g: int) -> tuple[Hits, Hits]:
        mine, theirs = groups[g]
        i, j, s = _tile_pairs(new.take(mine), ref.take(theirs), threshold)
        rows, s, c, r = best_of(mine[i], s, codes[theirs[j]], ids[theirs[j]])
        found = (np.full(len(rows), g, np.int64), rows, s, c, r)
        near = _no_hits()
        few = mine[sample[mine]] if sample is not None else mine[:0]
        if len(few):
            best = (new.f32[few] @ ref.f32[theirs].T).argmax(axis=1)
            s = _pair_similarity(new.f32, ref.f32, few, theirs[best])
            keep = s > floor
            near = (np.full(int(keep.sum()), g, np.int64), few[keep], s[keep], codes[theirs[best[keep]]],
                    ids[theirs[best[keep]]])  # fmt: skip
        return found, near

    todo = [g for g, (mine, theirs) in enumerate(groups) if len(mine) and len(theirs)]
    results = run_parallel(work, todo, threads)
    return _joined([f for f, _ in results]), _joined([n for _, n in results])


def _joined(parts: list[Hits]) -> Hits:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return _no_hits()
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def match_table(ids: np.ndarray, sim: np.ndarray, codes: np.ndarray, ref: np.ndarray, **extra) -> pa.Table:
    from curate.dedup.layout import code_columns

    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "sim": pa.array(sim, pa.float32()),
            **code_columns(codes),
            "ref": pa.array(ref, pa.int64()),
            **{k: pa.array(v) for k, v in extra.items()},
        }
    )


def read_found(table: pa.Table | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if table is None or not table.num_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.uint64), np.zeros(0, np.int64)
    return table["id"].to_numpy(), table["sim"].to_numpy(), codes_of(table), table["ref"].to_numpy()
