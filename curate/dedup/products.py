"""The inner products dedup spends its time on (nearest centroids, in-cluster similarities), in the cheapest
precision the CPU multiplies natively, with results that do not depend on how rows are split into blocks.

Two kinds of products, each in the cheapest precision the CPU runs natively (``resolve_precision``):
- nearest centroids (k-means, Lloyd passes, assignment) in int8 through ``torch._int_mm`` (oneDNN's int8 GEMM):
  rows quantised to 7 bits with a scale of their own, centroids to 8 bits with one shared scale (7 bits on one
  side keeps AVX2's vpmaddubsw from saturating: the products are then exact int32, identical on every ISA).
  The error only moves a row between two almost equally near centroids: a different partition, never a
  different similarity. (bf16 or float32 when asked, or without PyTorch.)
- range-search candidates in bf16 on CPUs with AMX or AVX512-BF16 (PyTorch's oneDNN kernels), candidates
  above ``threshold - BF16_MARGIN``, each rechecked in float32. For unit vectors the bf16 error is below
  2 * 2^-9 (inputs rounded) + 2^-9 (output rounded) < 0.006 with float32 accumulation, inside the margin.
  Elsewhere float32 products (candidates above ``threshold - FP32_MARGIN``), then the same recheck.
Quantisation error in nearest-centroid choices only changes which rows meet; every similarity returned is the
float32 dot product of the two normalised rows (``similarity``), whichever precision found the candidate.

Work is split into row blocks run by a thread pool with one BLAS/PyTorch thread each: on busy cores this
measured faster than one multi-threaded product (OpenMP threads spin-wait on each other).

On a GPU (``Vectors.device``, a torch device) the same functions run their products there: nearest centroids in
int8 (``torch._int_mm``, cuBLASLt; the same quantisation, so the same exact int32 products and the same choices as
on a CPU), range-search candidates in bf16 (float32 with ``precision: fp32``; margin ``BF16_MARGIN`` either way,
which also covers TF32), and the Lloyd sums in float64 fixed point (curate.dedup.cluster.lloyd_sums). The
float32 recheck of every candidate stays on the host (``similarity``'s kernel), so the pairs, their
similarities and every decision are those of the CPU path. Only candidate rows and indices cross back from the
device, never a dense block. ``device="cpu"`` runs that code on the CPU (how the tests check it). FAISS's GPU
build was the alternative considered: its k-means is not our Lloyd (other partitions, so other decisions) and
its wheel is built for CUDA 12 (shared/NOTES.md); it stays behind ``gpu: true``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Precision = Literal["auto", "bf16", "int8", "fp32"]
BF16_MARGIN = 0.01  # candidates above threshold - margin are rechecked in float32 (bf16 error < 0.006)
FP32_MARGIN = 1e-4  # float32 GEMM vs the float32 recheck: both within 512 * 2^-24 = 3.1e-5 of the exact value
ROWS = 4096  # rows per range-search block inside a large cluster (memory bound)
TILE = 4_194_304  # similarities per tile of a large cluster's search (bounds the candidate lists)
ASSIGN_ROWS = 2048  # rows per nearest-centroid block (measured ~10% less CPU than 4096 at K=3000: cache)
DEVICE_SIMS = 1 << 28  # products per nearest-centroid block on a device (1 GiB of int32 scores)
DEVICE_TILE = 1 << 26  # similarities per range-search tile / cluster batch on a device
BATCH_SIMS = 2_000_000  # similarities per batch of small clusters on the CPU


def cores() -> int:
    """Threads to use: the CPUs Ray gave the current task (a reused worker keeps the OMP_NUM_THREADS of the task
    it was started for), else OpenMP's count (OMP_NUM_THREADS), else the machine's."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
        except Exception:
            pass
    try:
        import faiss

        return max(1, faiss.omp_get_max_threads())
    except Exception:
        return max(1, os.cpu_count() or 1)


def bf16_native() -> bool:
    """True when PyTorch reports AMX or AVX512-BF16 on this CPU and its kernels may use AVX-512 (bf16 GEMMs
    are fast). ``ATEN_CPU_CAPABILITY=avx2`` (with ``ONEDNN_MAX_CPU_ISA=AVX2``) makes an AVX-512 CPU behave like
    an AVX2 one, which is how bench/dedup.py measures the AVX2 machines."""
    try:
        import torch
    except ImportError:
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX", "AVX512_BF16"):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and bool(check()) for check in checks)


def int8_available() -> bool:
    try:
        import torch

        return hasattr(torch, "_int_mm")
    except ImportError:
        return False


def cuda_device() -> str | None:
    """The GPU when PyTorch is installed and sees one (in a task Ray sets CUDA_VISIBLE_DEVICES), else None."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def resolve_precision(precision: Precision, device: Any = None) -> tuple[str, str]:
    """(nearest-centroid products, range-search candidate products) for a ``precision`` setting.

    On a device (a GPU): ``auto`` and ``int8`` give int8 nearest centroids (exact, so the CPU's choices) and bf16
    candidates; ``bf16`` both in bf16; ``fp32`` both in float32.

    ``auto``: int8 for the nearest centroids wherever PyTorch has its int8 GEMM (measured 1.6x bf16 and 4x numpy
    float32 on an AVX512-BF16 EPYC, 2x float32 under an AVX2 limit, and the same pair recall as bf16: 0.921 vs
    0.915 at 1M), and bf16 candidates for the range search where the CPU multiplies bf16 natively (AMX /
    AVX512-BF16), else float32 ones. ``bf16``, ``int8``, ``fp32`` force one kind for both (int8: float32 search)."""
    if device is not None:
        return {"bf16": ("bf16", "bf16"), "fp32": ("fp32", "fp32")}.get(precision, ("int8", "bf16"))
    if precision in ("bf16", "int8"):
        import torch  # noqa: F401  (a clear ImportError when asked for them without PyTorch)

        return (precision, "bf16" if precision == "bf16" else "fp32")
    if precision == "fp32":
        return ("fp32", "fp32")
    return ("int8" if int8_available() else "fp32", "bf16" if bf16_native() else "fp32")


def describe_precision(precision: Precision, device: Any = None) -> str:
    nearest, search = resolve_precision(precision, device)
    where = f" on {device}" if device is not None else ""
    return f"{nearest} nearest centroids, {search} search candidates{where}"


@dataclass
class Vectors:
    """L2-normalised float32 rows (the exact values) and, for bf16 products, a bf16 copy made once.
    ``int8``: nearest centroids through int8 products (quantised per block, nothing stored); without it and
    with a bf16 copy, through bf16 products.

    With ``device`` (a torch device) the products run there: the rows are uploaded once as float32 (``d32``, for
    int8 quantisation, float32 products and Lloyd sums) and the bf16 copy is made on the device. Held there:
    6 bytes per dimension (3 KB per row at d=512); ``f32`` stays on the host for the float32 recheck."""

    f32: np.ndarray
    b16: Any = None  # torch.Tensor (N, d) bfloat16, or None for float32 / int8 products
    int8: bool = False
    device: Any = None  # torch.device of the products, or None: the CPU path (numpy / oneDNN)
    d32: Any = None  # (device only) torch.Tensor (N, d) float32 on the device

    @staticmethod
    def of(x: np.ndarray, bf16: bool = False, int8: bool = False, device: Any = None) -> Vectors:
        if device is not None:
            import torch

            d32 = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
            return Vectors(x, d32.to(torch.bfloat16) if bf16 else None, int8, d32.device, d32)
        if not bf16:
            return Vectors(x, None, int8)
        import torch

        return Vectors(x, torch.from_numpy(x).to(torch.bfloat16), int8)

    @staticmethod
    def for_precision(x: np.ndarray, precision: Precision, device: Any = None) -> Vectors:
        nearest, search = resolve_precision(precision, device)
        return Vectors.of(x, bf16="bf16" in (nearest, search), int8=nearest == "int8", device=device)

    def __len__(self) -> int:
        return len(self.f32)

    def take(self, rows: np.ndarray) -> Vectors:
        if self.b16 is None and self.d32 is None:
            return Vectors(self.f32[rows], None, self.int8)
        import torch

        index = torch.from_numpy(np.asarray(rows, np.int64))
        if self.device is not None:
            index = index.to(self.device)
        b16 = None if self.b16 is None else self.b16[index]
        return Vectors(self.f32[rows], b16, self.int8, self.device, None if self.d32 is None else self.d32[index])


@contextlib.contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """One BLAS and one PyTorch thread per worker thread (the pool gives the parallelism)."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")  # not imported: no PyTorch threads to limit (and no 4 s import for fp32)
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


def blocks(n: int, bounds: np.ndarray | None, size: int) -> list[tuple[int, int]]:
    """Row blocks of at most ``size`` that restart at every bound (the start of each upstream shard), so a row's
    block, and with it every product, is the same whether one task holds all shards or one shard."""
    edges = [0, n] if bounds is None else sorted({0, n, *(int(b) for b in bounds if 0 < b < n)})
    return [(s, min(e, s + size)) for a, e in itertools.pairwise(edges) for s in range(a, e, size)]


def nearest(
    x: Vectors, centroids: np.ndarray, top: int, threads: int = 0, bounds: np.ndarray | None = None
) -> np.ndarray:
    """The ``top`` nearest centroids (inner product) of every row, nearest first, as (N, top) int64."""
    top = min(top, len(centroids))
    out = np.empty((len(x), top), np.int64)
    if x.device is not None:
        _nearest_on_device(x, centroids, top, bounds, out)
        return out
    if x.int8:
        ct, k = _int8_centroids(centroids)

        def block(span: tuple[int, int]) -> None:
            start, end = span
            out[start:end] = _top_int8(x.f32[start:end], ct, k, top)
    elif x.b16 is not None:
        import torch

        ct = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(torch.bfloat16).T.contiguous()

        def block(span: tuple[int, int]) -> None:
            start, end = span
            sims = x.b16[start:end] @ ct
            out[start:end] = _top_bf16(sims, top, lambda: x.b16[start:end] @ ct)
    else:
        c = np.ascontiguousarray(centroids, np.float32).T

        def block(span: tuple[int, int]) -> None:
            start, end = span
            out[start:end] = _top_float(np.asarray(x.f32[start:end], np.float32) @ c, top)

    run_parallel(block, blocks(len(x), bounds, ASSIGN_ROWS), threads)
    return out


def _nearest_on_device(x: Vectors, centroids: np.ndarray, top: int, bounds: np.ndarray | None, out: np.ndarray) -> None:
    """``nearest`` with the products on ``x.device``: int8 as on the CPU (same quantisation, exact int32 products,
    so the same choices), or bf16 / float32; blocks restart at ``bounds`` as on the CPU; one block at a time (a
    device runs one product well)."""
    import torch

    k = len(centroids)
    if x.int8:
        ct, _ = _int8_centroids(centroids)
        ct = ct.T.contiguous().to(x.device).T  # column-major (d, K): the layout cuBLASLt's int8 GEMM takes

        def scores(start: int, end: int) -> Any:
            return _int8_scores(x.d32[start:end], ct, k)
    else:
        c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(x.device)
        source = x.b16 if x.b16 is not None else x.d32
        c = c.to(source.dtype).T

        def scores(start: int, end: int) -> Any:
            return source[start:end] @ c

    rows = max(32, min(65_536, DEVICE_SIMS // max(1, k)))
    for start, end in blocks(len(x), bounds, rows):
        out[start:end] = _top_torch(scores(start, end), top).cpu().numpy()


def _int8_scores(rows: Any, ct: Any, k: int) -> Any:
    """int32 products of float32 rows (a torch tensor) quantised exactly as ``_top_int8`` does in numpy, with
    int8 centroids ``ct``; padding columns (k and beyond) get the lowest score. IEEE float32 arithmetic makes the
    quantised rows bit-identical to numpy's."""
    import torch

    n = len(rows)
    q = torch.zeros((max(n, 17), rows.shape[1]), dtype=torch.int8, device=rows.device)
    q[:n] = _quantise_rows(rows)
    sims = torch._int_mm(q, ct)[:n]
    sims[:, k:] = torch.iinfo(torch.int32).min
    return sims


def _quantise_rows(rows: Any) -> Any:
    """``quantise_rows`` in torch, bit for bit: a true division (``63.0 / tensor`` would
    be torch's reciprocal times 63, off by an ulp), then round half to even, both IEEE as numpy's."""
    import torch

    peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    scale = torch.full_like(peak, 63.0).div_(peak)
    return torch.round(rows * scale).to(torch.int8)


def _top_torch(sims: Any, top: int) -> Any:
    """Column indices of each row's ``top`` largest values, largest first, ties to the first column (argmax's
    rule, as numpy's), computed where ``sims`` lives."""
    import torch

    lowest = torch.iinfo(sims.dtype).min if not sims.is_floating_point() else float("-inf")
    out = torch.empty((len(sims), top), dtype=torch.int64, device=sims.device)
    for t in range(top):
        best = sims.argmax(dim=1)
        out[:, t] = best
        if t + 1 < top:
            sims.scatter_(1, best[:, None], lowest)
    return out


def _top_float(sims: np.ndarray, top: int) -> np.ndarray:
    out = np.empty((len(sims), top), np.int64)
    rows = np.arange(len(sims))
    for t in range(top):
        best = sims.argmax(axis=1)
        out[:, t] = best
        sims[rows, best] = -np.inf
    return out


def _int8_centroids(centroids: np.ndarray) -> tuple[Any, int]:
    """Centroids as an int8 (d, K padded to a multiple of 8) matrix with one shared scale (8 bits)."""
    import torch

    k = len(centroids)
    c = np.asarray(centroids, np.float32)
    scale = 127.0 / max(float(np.abs(c).max()), 1e-12)
    padded = np.zeros((-(-k // 8) * 8, c.shape[1]), np.int8)
    padded[:k] = np.rint(c * scale).astype(np.int8)
    return torch.from_numpy(padded).T.contiguous(), k


def quantise_rows(rows: np.ndarray) -> np.ndarray:
    """Rows to 7 bits (int8 in [-63, 63]) with a scale of their own."""
    scale = 63.0 / np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12)
    return np.rint(rows * scale).astype(np.int8)


def _top_int8(rows: np.ndarray, ct: Any, k: int, top: int) -> np.ndarray:
    """Nearest centroids by int8 products: rows to 7 bits with their own scale (exact int32 sums on AVX2 too)."""
    import torch

    n = len(rows)
    q = np.zeros((max(n, 17), rows.shape[1]), np.int8)  # _int_mm needs more than 16 rows
    q[:n] = quantise_rows(rows)
    sims = torch._int_mm(torch.from_numpy(q), ct).numpy()[:n]
    sims[:, k:] = np.iinfo(np.int32).min  # padding columns are never nearest
    out = np.empty((n, top), np.int64)
    index = np.arange(n)
    for t in range(top):
        best = sims.argmax(axis=1)
        out[:, t] = best
        sims[index, best] = np.iinfo(np.int32).min
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


# -- the range search: each row's first earlier neighbours in keep order ----------------------------------------


def similarity(f32: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float32 dot products of row pairs: the similarity every path reports (one kernel, so the value of a pair
    does not depend on which block or task found it)."""
    if not len(i):
        return np.zeros(0, np.float32)
    return np.einsum("ij,ij->i", f32[i], f32[j]).astype(np.float32)


def take_first(
    a: np.ndarray,
    b: np.ndarray,
    need: np.ndarray,
    exact: Callable[[np.ndarray, np.ndarray], np.ndarray],
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From candidate pairs (a earlier than b, positions in keep order), for each b the first ``need[b]`` a's (in
    order) whose exact similarity is above ``threshold``; ``need`` is decreased by what is taken."""
    out_a, out_b, out_s = [], [], []
    order = np.lexsort((a, b))
    a, b = a[order], b[order]
    while len(a):
        open_ = need[b] > 0
        a, b = a[open_], b[open_]
        if not len(a):
            break
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        rank_in_b = np.arange(len(b)) - np.repeat(starts, np.diff(np.r_[starts, len(b)]))
        take = rank_in_b < need[b]
        ta, tb = a[take], b[take]
        s = exact(ta, tb)
        hit = s > threshold
        out_a.append(ta[hit])
        out_b.append(tb[hit])
        out_s.append(s[hit])
        np.subtract.at(need, tb[hit], 1)
        a, b = a[~take], b[~take]
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s).astype(np.float32)


def _bound(x: Vectors, threshold: float) -> float:
    """Candidates are above threshold - margin: bf16's on a device whatever its products (TF32 included)."""
    return threshold - (BF16_MARGIN if x.b16 is not None or x.device is not None else FP32_MARGIN)


def _search_copy(x: Vectors) -> Any:
    """The rows the range-search products read: bf16 (torch), float32 on a device (torch), or numpy float32."""
    if x.b16 is not None:
        return x.b16
    return x.d32 if x.device is not None else x.f32


def _product(rows: Vectors, cols: Vectors) -> Any:
    """(rows x cols) similarities in the search precision: a torch tensor or a numpy float32 array."""
    return _search_copy(rows) @ _search_copy(cols).T


def _above(sims: Any, bound: float, compact: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """(rows of the block that have a candidate, or None for all rows; their mask ``sims > bound``) on the host.
    ``compact`` (a device): only rows with a candidate cross back (duplicates are rare)."""
    if isinstance(sims, np.ndarray):
        return None, sims > bound
    hit = sims > bound
    if not compact:
        return None, hit.numpy()
    rows = hit.any(dim=1).nonzero().squeeze(1)
    return rows.cpu().numpy(), hit[rows].cpu().numpy()


def scan(
    rows: Vectors,
    row_pos: np.ndarray,
    cols: Vectors,
    col_pos: np.ndarray,
    need: np.ndarray,
    threshold: float,
    block_rows: int = ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (row, column) with the row earlier in keep order (``row_pos`` < ``col_pos``, ascending positions),
    for each column its first ``need`` rows with similarity above ``threshold``, in tiles of at most TILE
    similarities over the columns still open. Returns local row and column indices and similarities;
    ``need`` (per column) is decreased by what was found.

    The result is a function of the vectors and the order only: searching a cluster as one block, or as column
    blocks against row blocks taken in order (a cluster over the memory cap), gives the same pairs."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bound = _bound(rows, threshold)
    device = rows.device is not None

    def exact(ia: np.ndarray, jb: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", rows.f32[ia], cols.f32[jb]).astype(np.float32)

    for r0 in range(0, len(rows), block_rows):
        r1 = min(len(rows), r0 + block_rows)
        open_cols = np.flatnonzero((need > 0) & (col_pos > row_pos[r0]))
        if not len(open_cols):
            continue
        width = max(1, (DEVICE_TILE if device else TILE) // (r1 - r0))
        for c0 in range(0, len(open_cols), width):
            cb = open_cols[c0 : c0 + width]
            cb = cb[need[cb] > 0]
            if not len(cb):
                continue
            hit, mask = _above(_product(_slice(rows, r0, r1), cols.take(cb)), bound, compact=device)
            index = np.arange(r0, r1) if hit is None else r0 + hit
            mask &= row_pos[index, None] < col_pos[cb][None, :]
            found += _tile_pairs(mask, index, cb, need, exact, threshold)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(p) for p in zip(*found, strict=True))  # type: ignore[return-value]


def _tile_pairs(
    mask: np.ndarray, index: np.ndarray, cb: np.ndarray, need: np.ndarray, exact: Callable, threshold: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Candidates of one tile (``mask``: rows ``index`` x columns ``cb``; rows without a candidate may be left out)
    through ``take_first``. A dense tile (a cluster of near-identical images) first keeps each column's first
    need + 8 candidates (a running count down the rows), so the candidate lists stay near quota x columns;
    columns that still need more after the float32 recheck get the rest of their candidates, which all lie
    further down."""
    found = []
    count = int(mask.sum())
    if not count:
        return found
    if count <= 8 * len(cb) + 65_536:
        ii, jj = np.nonzero(mask)
        found.append(take_first(index[ii], cb[jj], need, exact, threshold))
        return found
    running = np.cumsum(mask, axis=0, dtype=np.int32)
    limit = (need[cb] + 8).astype(np.int32)
    ii, jj = np.nonzero(mask & (running <= limit[None, :]))
    found.append(take_first(index[ii], cb[jj], need, exact, threshold))
    more = np.flatnonzero((need[cb] > 0) & (running[-1] > limit))
    if len(more):
        ii, jj = np.nonzero(mask[:, more] & (running[:, more] > limit[more][None, :]))
        found.append(take_first(index[ii], cb[more][jj], need, exact, threshold))
    return found


def _slice(x: Vectors, start: int, end: int) -> Vectors:
    b16 = None if x.b16 is None else x.b16[start:end]
    return Vectors(x.f32[start:end], b16, x.int8, x.device, None if x.d32 is None else x.d32[start:end])


def earlier_pairs(
    x: Vectors, members: np.ndarray, threshold: float, quota: int = 0, block_rows: int = ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inside one cluster (``members``: rows of ``x`` in keep order): for each member, its first ``quota``
    earlier members (0: all) with float32 similarity above ``threshold``. Returns (earlier row, later row,
    similarity) as rows of ``x``.

    The dense product block is what FAISS's IndexFlatIP.range_search computes; done here it avoids an index
    per cluster, and the quota keeps a cluster of near-identical images (LAION's placeholders) from producing
    n^2 pairs: once a column has its quota it leaves the product."""
    members = np.asarray(members, np.int64)
    n = len(members)
    sub = x.take(members)
    need = np.full(n, quota if quota > 0 else n, np.int64)
    pos = np.arange(n)
    ia, jb, s = scan(sub, pos, sub, pos, need, threshold, block_rows)
    return members[ia], members[jb], s


def pairs_in_clusters(
    x: Vectors,
    clusters: list[np.ndarray],
    threshold: float,
    block_rows: int = ROWS,
    threads: int = 0,
    quota: int = 0,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``earlier_pairs`` for every cluster (members in keep order). Small clusters of similar size are padded
    into one batched product (torch.bmm with bf16 or on a device, one stacked float32 matmul otherwise), so a few
    thousand small clusters cost a few hundred kernel calls instead of a few per cluster (measured: per-cluster
    calls were no faster than float32). Batches are larger on a device (``DEVICE_TILE``), where each call costs a
    launch and a synchronisation."""
    limit = DEVICE_TILE if x.device is not None else BATCH_SIMS

    def alone(members: np.ndarray) -> bool:
        """Searched by itself in tiles with its quota (`scan`): a cluster over a block, or whose own product is
        over the batch limit. Padded whole, a dense one had every candidate pair held before the quota cut them:
        a 4,096-row group of near copies grew the RSS by 1.16 GiB in 4.7 s that way, by 0.21 GiB in 0.7 s through
        `scan`, with the same pairs (tests/test_dedup.py)."""
        return len(members) > block_rows or len(members) ** 2 > limit

    big = [m for m in clusters if alone(m)]
    small = sorted((m for m in clusters if not alone(m)), key=len)
    batches, start = [], 0
    while start < len(small):
        end = start + 1
        # grow the batch while the padded (batch x width x width) block stays under the limit
        while end < len(small) and (end - start + 1) * len(small[end]) ** 2 <= limit:
            end += 1
        batches.append(small[start:end])
        start = end

    def search(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(batch) == 1 and alone(batch[0]):
            return earlier_pairs(x, batch[0], threshold, quota, block_rows)
        return _batched_pairs(x, batch, threshold, quota)

    return run_parallel(search, [[m] for m in big] + batches, threads)


def _batched_pairs(
    x: Vectors, batch: list[np.ndarray], threshold: float, quota: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(len(m) for m in batch)
    index = np.zeros((len(batch), width), np.int64)
    valid = np.zeros((len(batch), width), bool)
    for row, members in enumerate(batch):
        index[row, : len(members)] = members
        valid[row, : len(members)] = True
    bound = _bound(x, threshold)
    if x.b16 is not None or x.device is not None:
        import torch

        source = _search_copy(x)
        flat_index = torch.from_numpy(index.reshape(-1)).to(source.device)
        rows = source.index_select(0, flat_index).view(len(batch), width, -1)
        rows.masked_fill_(~torch.from_numpy(valid).to(source.device)[:, :, None], 0)  # padding rows: 0 to all
        b, ii, jj = _candidates(torch.bmm(rows, rows.transpose(1, 2)), bound)
    else:
        rows = x.f32[index.reshape(-1)].reshape(len(batch), width, -1)
        rows[~valid] = 0
        sims = np.matmul(rows, rows.transpose(0, 2, 1))
        b, ii, jj = np.nonzero(np.triu(sims > bound, 1))
    keep = jj > ii  # positions in keep order: ii earlier
    b, ii, jj = b[keep], ii[keep], jj[keep]
    flat_a, flat_b = b * width + ii, b * width + jj
    need = np.where(valid.reshape(-1), quota if quota > 0 else width, 0).astype(np.int64)
    flat = index.reshape(-1)

    def exact(ia: np.ndarray, jb: np.ndarray) -> np.ndarray:
        return similarity(x.f32, flat[ia], flat[jb])

    ia, jb, s = take_first(flat_a, flat_b, need, exact, threshold)
    return flat[ia], flat[jb], s


def _candidates(sims: Any, bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, row, column) of entries > bound in a (batch, rows, columns) torch block (bf16, or float32 on a
    device). Rows with any are found first with a max reduction (duplicates are rare), measured 4x faster than
    one nonzero over the block; only their indices leave a device. Rows and columns start at the same member,
    so the diagonal holds self-similarities: it is zeroed."""
    sims.diagonal(dim1=1, dim2=2).fill_(0)
    b, r = (sims.amax(dim=2) > bound).nonzero(as_tuple=True)
    k, col = (sims[b, r] > bound).nonzero(as_tuple=True)
    return b[k].cpu().numpy(), r[k].cpu().numpy(), col.cpu().numpy()
