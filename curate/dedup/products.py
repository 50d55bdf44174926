"""The inner products dedup spends its time on (nearest centroids, in-cluster similarities), in bf16 where the
CPU multiplies bf16 natively (Intel AMX / AVX512-BF16, through PyTorch's oneDNN kernels), else float32.

Why: on the 2-core Sapphire Rapids development machine a (100k x 512) x (512 x 1k) product takes 1.18 s in
numpy's float32 OpenBLAS and 0.05 s in PyTorch bf16 (measured, docs/dedup.md). bf16 keeps 8 mantissa bits,
so:
- nearest-centroid assignment uses the bf16 products directly: rounding can only swap two centroids that
  are almost equally near, which changes a partition, never a similarity;
- the range search uses them to pick candidate pairs above ``threshold - BF16_MARGIN`` and recomputes every
  candidate in float32, so the pairs and similarities returned are exactly the float32 ones. For unit
  vectors the bf16 error is at most 2 * 2^-9 (inputs rounded) + 2^-9 (output rounded) < 0.006 (fp32
  accumulation), inside the margin.

Work is split into row blocks run by a thread pool with one BLAS/PyTorch thread each: on busy cores this
measured faster than one multi-threaded product (OpenMP threads spin-wait on each other).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Precision = Literal["auto", "bf16", "fp32"]
BF16_MARGIN = 0.01  # candidates above threshold - margin are rechecked in float32 (bf16 error < 0.006)
ROWS = 4096  # rows per range-search block inside a large cluster (memory bound)
ASSIGN_ROWS = 2048  # rows per nearest-centroid block (measured ~10% less CPU than 4096 at K=3000: cache)


def cores() -> int:
    try:
        import faiss

        return max(1, faiss.omp_get_max_threads())  # honours OMP_NUM_THREADS, which Ray sets per task
    except Exception:
        return max(1, os.cpu_count() or 1)


def bf16_native() -> bool:
    """True when PyTorch is installed and reports AMX or AVX512-BF16 on this CPU (bf16 GEMMs are fast)."""
    try:
        import torch
    except ImportError:
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and bool(check()) for check in checks)


def use_bf16(precision: Precision) -> bool:
    if precision == "bf16":
        import torch  # noqa: F401  (a clear ImportError when asked for bf16 without PyTorch)

        return True
    return precision == "auto" and bf16_native()


@dataclass
class Vectors:
    """L2-normalised float32 rows (the exact values) and, for bf16 products, a bf16 copy made once."""

    f32: np.ndarray
    b16: Any = None  # torch.Tensor (N, d) bfloat16, or None for float32 products

    @staticmethod
    def of(x: np.ndarray, bf16: bool) -> Vectors:
        if not bf16:
            return Vectors(x)
        import torch

        return Vectors(x, torch.from_numpy(x).to(torch.bfloat16))

    def __len__(self) -> int:
        return len(self.f32)

    def take(self, rows: np.ndarray) -> Vectors:
        if self.b16 is None:
            return Vectors(self.f32[rows])
        import torch

        return Vectors(self.f32[rows], self.b16[torch.from_numpy(np.asarray(rows, np.int64))])


@contextlib.contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """One BLAS and one PyTorch thread per worker thread (the pool gives the parallelism)."""
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:
        torch = None
    before = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None:
            torch.set_num_threads(1)
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def run_parallel(work: Callable[[Any], Any], items: Iterable[Any], threads: int = 0) -> list[Any]:
    """``work`` on every item in a thread pool of ``threads`` (0: one per core), single-threaded kernels."""
    items = list(items)
    threads = threads or cores()
    with single_threaded_kernels():
        if threads == 1 or len(items) <= 1:
            return [work(item) for item in items]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, items))


def nearest(x: Vectors, centroids: np.ndarray, top: int, threads: int = 0) -> np.ndarray:
    """The ``top`` nearest centroids (inner product) of every row, nearest first, as (N, top) int64."""
    top = min(top, len(centroids))
    out = np.empty((len(x), top), np.int64)
    if x.b16 is not None:
        import torch

        ct = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(torch.bfloat16).T.contiguous()

        def block(start: int) -> None:
            sims = x.b16[start : start + ASSIGN_ROWS] @ ct
            out[start : start + ASSIGN_ROWS] = _top_bf16(sims, top, lambda: x.b16[start : start + ASSIGN_ROWS] @ ct)
    else:
        c = np.ascontiguousarray(centroids, np.float32).T

        def block(start: int) -> None:
            sims = np.asarray(x.f32[start : start + ASSIGN_ROWS], np.float32) @ c
            rows = np.arange(len(sims))
            for t in range(top):
                best = sims.argmax(axis=1)
                out[start : start + ASSIGN_ROWS, t] = best
                sims[rows, best] = -np.inf

    run_parallel(block, range(0, len(x), ASSIGN_ROWS), threads)
    return out


def _top_bf16(sims: Any, top: int, recompute: Callable[[], Any]) -> np.ndarray:
    """Column indices of each row's ``top`` largest bf16 values, largest first.

    numpy's argmax over the raw bf16 bits viewed as int16 (measured 4x faster than torch's max with indices):
    non-negative bf16 values order like their int16 bits, and above every negative value. Rows whose pick
    was negative (no non-negative value left, rare for nearest centroids) are redone with torch.topk."""
    import torch

    keys = sims.view(torch.int16).numpy()  # shares memory with sims, which is overwritten below
    rows = np.arange(len(keys))
    out = np.empty((len(keys), top), np.int64)
    negative = np.zeros(len(keys), bool)
    for t in range(top):
        best = keys.argmax(axis=1)
        out[:, t] = best
        negative |= keys[rows, best] < 0
        keys[rows, best] = np.iinfo(np.int16).min  # the lowest key: not picked again
    if negative.any():
        redo = np.flatnonzero(negative)
        out[redo] = recompute()[torch.from_numpy(redo)].float().topk(top, dim=1).indices.numpy()
    return out


def pairs_above(
    x: Vectors, members: np.ndarray, threshold: float, block_rows: int = ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of ``members`` (rows of ``x``) with x_i . x_j > threshold in float32, as global row
    indices, and their similarity.

    The dense product block is what FAISS's IndexFlatIP.range_search computes; done here it avoids an index
    per cluster. bf16 blocks only pick candidates; each candidate's similarity is recomputed in float32.
    """
    found_i, found_j, found_s = [], [], []
    if x.b16 is not None:
        import torch

        sub = x.b16.index_select(0, torch.from_numpy(members))
    else:
        sub = x.f32[members]
    for start in range(0, len(members), block_rows):
        sims = sub[start : start + block_rows] @ sub[start:].T  # only the upper triangle (columns >= row)
        if x.b16 is not None:
            _, ii, jj = _candidates(sims[None], threshold - BF16_MARGIN)
        else:
            ii, jj = np.nonzero(sims > threshold)
        keep = jj > ii  # drop self matches and the lower half of the diagonal block
        ii, jj = ii[keep], jj[keep]
        if x.b16 is not None:
            i, j = members[ii + start], members[jj + start]
            s = np.einsum("ij,ij->i", x.f32[i], x.f32[j])
            exact = s > threshold
            i, j, s = i[exact], j[exact], s[exact]
        else:
            i, j, s = members[ii + start], members[jj + start], sims[ii, jj]
        found_i.append(i)
        found_j.append(j)
        found_s.append(s.astype(np.float32))
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)


def pairs_in_clusters(
    x: Vectors, clusters: list[np.ndarray], threshold: float, block_rows: int = ROWS, threads: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``pairs_above`` for every cluster (members ascending). With bf16, clusters of similar size are
    padded into one batched product (torch.bmm), so a few thousand small clusters cost a few hundred
    kernel calls instead of a few per cluster (measured: per-cluster calls were no faster than float32)."""
    if x.b16 is None:
        return run_parallel(lambda members: pairs_above(x, members, threshold, block_rows), clusters, threads)
    big = [m for m in clusters if len(m) > block_rows]
    small = sorted((m for m in clusters if len(m) <= block_rows), key=len)
    batches, start = [], 0
    while start < len(small):
        end = start + 1
        # grow the batch while the padded (batch x width x width) block stays under 2M similarities
        while end < len(small) and (end - start + 1) * len(small[end]) ** 2 <= 2_000_000:
            end += 1
        batches.append(small[start:end])
        start = end

    def search(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(batch) == 1 and len(batch[0]) > block_rows:
            return pairs_above(x, batch[0], threshold, block_rows)
        return _batched_pairs(x, batch, threshold)

    return run_parallel(search, [[m] for m in big] + batches, threads)


def _batched_pairs(x: Vectors, batch: list[np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    width = max(len(m) for m in batch)
    index = np.zeros((len(batch), width), np.int64)
    valid = np.zeros((len(batch), width), bool)
    for row, members in enumerate(batch):
        index[row, : len(members)] = members
        valid[row, : len(members)] = True
    rows = x.b16.index_select(0, torch.from_numpy(index.reshape(-1))).view(len(batch), width, -1)
    rows.masked_fill_(~torch.from_numpy(valid)[:, :, None], 0)  # padding rows: similarity 0 to everything
    b, ii, jj = _candidates(torch.bmm(rows, rows.transpose(1, 2)), threshold - BF16_MARGIN)
    keep = jj > ii
    i, j = index[b[keep], ii[keep]], index[b[keep], jj[keep]]
    s = np.einsum("ij,ij->i", x.f32[i], x.f32[j])
    exact = s > threshold
    return i[exact], j[exact], s[exact].astype(np.float32)


def _candidates(sims: Any, bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, row, column) of entries > bound in a (batch, rows, columns) bf16 block. Rows with any are found
    first with a max reduction (duplicates are rare), measured 4x faster than one nonzero over the block.
    Rows and columns start at the same member, so the diagonal holds self-similarities: it is zeroed."""
    sims.diagonal(dim1=1, dim2=2).fill_(0)
    b, r = (sims.amax(dim=2) > bound).nonzero(as_tuple=True)
    k, col = (sims[b, r] > bound).nonzero(as_tuple=True)
    return b[k].numpy(), r[k].numpy(), col.numpy()
