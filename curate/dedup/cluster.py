"""SD3's copy-detection dedup on plain numpy arrays: k-means clusters, range search inside each cluster,
greedy keep/mark. No Ray and no files here, so the algorithm is testable and benchmarkable on its own.

Method (Esser et al. 2024, App. E.2):
1. spherical k-means on a sample of the L2-normalised embeddings into K clusters (Lloyd from K random
   sample rows, as FAISS initialises), then ``refine_iters`` Lloyd iterations over all vectors;
2. every vector assigned to its nearest centroid (optionally its ``assign_top`` nearest, so a pair split by
   a cluster boundary still meets in one cluster);
3. inside each cluster an exact range search: all pairs with cosine similarity > ``threshold``;
4. greedy: walk the items in keep order; the first unmarked item of a group is kept and all its neighbours
   are marked as its duplicates. A marked item marks nobody.

Cost: each Lloyd/assignment pass is N x K x d multiply-adds, the range search about N x top^2 x (N/K) x d;
with K ~ sqrt(N) both grow as N^1.5 (versus N^2 x d for brute force). The products run in bf16 on CPUs
with AMX/AVX512-BF16 (curate.dedup.products; similarities stay exact float32), on a GPU through FAISS.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from curate.dedup.products import Precision, Vectors, nearest, pairs_above, pairs_in_clusters, use_bf16

MAX_CLUSTERS = 16_000  # SD3's K at their scale; beyond it clusters grow instead (see default_clusters)


def default_clusters(n: int) -> int:
    """K that grows with the data: 3*sqrt(N) (949 at 100k, 3,000 at 1M, 16,000 from 28M on), at most N/4.

    Chosen by measurement (docs/dedup.md, `bench/dedup.py --sweep`): assignment costs N*K and the
    in-cluster search about N*N/K, so K ~ sqrt(N) balances them; with factor 3 and top-2 assignment pair
    recall on structureless random vectors (the worst case) is >= 0.99. Capped at SD3's 16,000.
    """
    if n <= 1:
        return 1
    return int(min(MAX_CLUSTERS, max(1, min(n // 4, round(3 * math.sqrt(n))))))


@dataclass(frozen=True)
class DedupParams:
    threshold: float = 0.75  # cosine similarity; pairs strictly above it are duplicates
    clusters: int | None = None  # None: default_clusters(N)
    assign_top: int = 2  # clusters each vector joins (1: SD3's plain assignment)
    points_per_centroid: int = 32  # k-means training sample = min(N, this * K)
    niter: int = 5  # on the sample; the refine iterations over all vectors follow (measured: 10 adds nothing)
    refine_iters: int = 2  # Lloyd iterations over all vectors after training on the sample
    rounds: int = 1  # independent clusterings (seed, seed+1, ...) whose pairs are united: recall for time
    seed: int = 1234
    gpu: bool | None = None  # FAISS GPU k-means and assignment; None: when FAISS sees a GPU
    precision: Precision = "auto"  # CPU products: bf16 (auto: when the CPU has AMX/AVX512-BF16) or fp32
    threads: int = 0  # clusters searched at once, each with single-threaded BLAS; 0: one per core
    block_rows: int = 4096  # rows per similarity block inside a large cluster (memory bound)


@dataclass
class Pairs:
    """Duplicate pairs found (i < j, each pair once) and their similarity."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    @staticmethod
    def empty() -> Pairs:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.i)

    def keys(self, n: int) -> np.ndarray:
        return self.i.astype(np.int64) * n + self.j.astype(np.int64)


@dataclass
class Clustering:
    centroids: np.ndarray  # (K, d) float32, unit norm
    assignment: np.ndarray  # (N, assign_top) int64, nearest first
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class DedupResult:
    keep: np.ndarray  # (N,) bool
    dup_of: np.ndarray  # (N,) int64, index of the kept item that marked it, -1 when kept
    similarity: np.ndarray  # (N,) float32, similarity to dup_of (NaN when kept)
    cluster: np.ndarray  # (N,) int64, nearest centroid
    pairs: Pairs
    clustering: Clustering
    seconds: dict[str, float]


def normalize(x: np.ndarray) -> np.ndarray:
    """A float32 copy with unit rows: one N x d allocation whatever the input dtype (float16 from the stage)."""
    y = np.array(x, dtype=np.float32, order="C", copy=True)
    y /= np.maximum(np.sqrt(np.einsum("ij,ij->i", y, y)), 1e-12)[:, None]  # einsum: no N x d temporary
    return y


def gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def cluster(x: np.ndarray | Vectors, params: DedupParams) -> Clustering:
    """Spherical k-means on a sample, ``refine_iters`` Lloyd iterations over all rows, then every row's
    ``assign_top`` nearest centroids. CPU: our Lloyd on bf16/float32 products (curate.dedup.products);
    GPU: FAISS's k-means and a FAISS GPU flat index."""
    vectors = x if isinstance(x, Vectors) else Vectors.of(x, use_bf16(params.precision))
    n, d = vectors.f32.shape
    k = min(params.clusters or default_clusters(n), n)
    top = min(params.assign_top, k)
    gpu = gpu_available() if params.gpu is None else params.gpu
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if k == 1:
        centroids = normalize(vectors.f32.mean(axis=0, keepdims=True)) if n else np.zeros((1, d), np.float32)
    else:
        rng = np.random.default_rng(params.seed)
        sample_size = min(n, params.points_per_centroid * k)
        sample = vectors.take(np.sort(rng.choice(n, sample_size, replace=False))) if sample_size < n else vectors
        if gpu:
            centroids = _faiss_kmeans(sample.f32, k, params, gpu=True)
        else:
            centroids = sample.f32[np.sort(rng.choice(len(sample), k, replace=False))]  # FAISS's init too
            for _ in range(params.niter):
                centroids = _lloyd_step(sample.f32, centroids, nearest(sample, centroids, 1, params.threads)[:, 0])
    seconds["kmeans"] = time.perf_counter() - started
    started = time.perf_counter()

    def assign(centroids: np.ndarray, top: int) -> np.ndarray:
        return _assign_gpu(vectors.f32, centroids, top) if gpu else nearest(vectors, centroids, top, params.threads)

    for _ in range(params.refine_iters if k > 1 else 0):
        centroids = _lloyd_step(vectors.f32, centroids, assign(centroids, 1)[:, 0])
    seconds["refine"] = time.perf_counter() - started
    started = time.perf_counter()
    assignment = assign(centroids, top) if k > 1 else np.zeros((n, 1), np.int64)
    seconds["assign"] = time.perf_counter() - started
    return Clustering(centroids, assignment, seconds)


def _faiss_kmeans(sample: np.ndarray, k: int, params: DedupParams, gpu: bool) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=params.niter,
        spherical=True,
        seed=params.seed,
        max_points_per_centroid=params.points_per_centroid,
        min_points_per_centroid=1,  # small runs: fewer points per centroid is fine for partitioning
        gpu=gpu,
    )
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    return normalize(kmeans.centroids)


_BLOCK = 262_144  # rows per block of the GPU assignment and the Lloyd update


def _assign_gpu(x: np.ndarray, centroids: np.ndarray, top: int) -> np.ndarray:
    """The ``top`` nearest centroids of every row on a FAISS GPU flat index (same answer as IndexFlatIP)."""
    import faiss

    index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(centroids.shape[1]))
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    assignment = np.empty((len(x), top), np.int64)
    for start in range(0, len(x), _BLOCK):
        _, labels = index.search(np.ascontiguousarray(x[start : start + _BLOCK], dtype=np.float32), top)
        assignment[start : start + _BLOCK] = labels
    return assignment


def _lloyd_step(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One spherical k-means update: each centroid becomes the normalised sum of its rows.

    Over *all* rows (the refine iterations) every row then pulls on its own centroid, which measurably
    keeps near-duplicates together (docs/dedup.md). Empty clusters keep their centroid.
    """
    import scipy.sparse

    k, d = centroids.shape
    sums = np.zeros((k, d), np.float64)
    for start in range(0, len(x), _BLOCK):
        block = np.asarray(x[start : start + _BLOCK], dtype=np.float32)
        lab = labels[start : start + _BLOCK]
        # one-hot (K x rows) sparse product: one pass over the rows, measured 2x less CPU than bincounts
        onehot = scipy.sparse.csr_matrix(
            (np.ones(len(lab), np.float32), (lab, np.arange(len(lab)))), shape=(k, len(lab))
        )
        sums += onehot @ block
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids).astype(np.float32)


def members_by_cluster(assignment: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """Indices of each cluster's members (ascending), every column of a top-k assignment included."""
    flat = assignment.reshape(-1)
    items = np.repeat(np.arange(assignment.shape[0]), assignment.shape[1]) if assignment.ndim == 2 else None
    if items is None:
        items = np.arange(len(flat))
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(k + 1))
    for c in range(k):
        members = items[order[bounds[c] : bounds[c + 1]]]
        if len(members) > 1:
            yield np.unique(members)


def range_search_members(
    x: np.ndarray | Vectors, members: np.ndarray, threshold: float, block_rows: int = 4096
) -> Pairs:
    """Exact range search inside one cluster: every pair (i < j) with x_i . x_j > threshold (float32 values;
    with bf16 products only the candidate search is in bf16, see curate.dedup.products)."""
    vectors = x if isinstance(x, Vectors) else Vectors(np.asarray(x, np.float32))
    return Pairs(*pairs_above(vectors, np.asarray(members, np.int64), threshold, block_rows))


def unique_pairs(parts: list[Pairs], n: int) -> Pairs:
    """Concatenate pair lists and drop repeats (a pair found in two clusters under top-2 assignment)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Pairs.empty()
    i = np.concatenate([p.i for p in parts])
    j = np.concatenate([p.j for p in parts])
    s = np.concatenate([p.sim for p in parts])
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(lo.astype(np.int64) * n + hi, return_index=True)
    return Pairs(lo[first], hi[first], s[first])


def clustered_pairs(x: np.ndarray | Vectors, clustering: Clustering, params: DedupParams) -> Pairs:
    """Range search in every cluster, clusters in parallel threads with one BLAS/PyTorch thread each.

    Measured: multi-threaded OpenBLAS on many small (hundreds of rows) products is up to 30x slower than
    one BLAS thread per cluster when the cores are busy, and no faster when they are idle.
    """
    vectors = x if isinstance(x, Vectors) else Vectors.of(x, use_bf16(params.precision))
    clusters = list(members_by_cluster(clustering.assignment, len(clustering.centroids)))
    clusters.sort(key=len, reverse=True)  # big ones first so threads finish together

    found = pairs_in_clusters(vectors, clusters, params.threshold, params.block_rows, params.threads)
    return unique_pairs([Pairs(*part) for part in found], len(vectors))


def greedy(n: int, pairs: Pairs, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SD3's rule over the pair graph: in keep order (``rank``: 0 first), an unmarked item is kept and
    marks all its neighbours; a marked item marks nobody. Returns keep, dup_of (-1 if kept), similarity."""
    keep = np.ones(n, bool)
    dup_of = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    if not len(pairs):
        return keep, dup_of, similarity
    # adjacency in CSR form, both directions
    src = np.concatenate([pairs.i, pairs.j])
    dst = np.concatenate([pairs.j, pairs.i])
    sim = np.concatenate([pairs.sim, pairs.sim])
    order = np.argsort(src, kind="stable")
    src, dst, sim = src[order], dst[order], sim[order]
    starts = np.searchsorted(src, np.arange(n + 1))
    nodes = np.unique(src)
    for node in nodes[np.argsort(rank[nodes], kind="stable")].tolist():
        if not keep[node]:
            continue
        lo, hi = starts[node], starts[node + 1]
        for other, s in zip(dst[lo:hi].tolist(), sim[lo:hi].tolist(), strict=True):
            if keep[other] and rank[other] > rank[node]:
                keep[other] = False
                dup_of[other] = node
                similarity[other] = s
    return keep, dup_of, similarity


def dedup(x: np.ndarray, rank: np.ndarray | None = None, params: DedupParams | None = None) -> DedupResult:
    """Near-duplicate removal over L2-normalised vectors ``x`` (N, d); ``rank`` orders who is kept."""
    params = params or DedupParams()
    n = len(x)
    rank = np.arange(n) if rank is None else np.asarray(rank)
    if n == 0:
        empty = np.zeros(0, np.int64)
        clustering = Clustering(np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32), empty.reshape(0, 1))
        return DedupResult(np.zeros(0, bool), empty, np.zeros(0, np.float32), empty, Pairs.empty(), clustering, {})
    started = time.perf_counter()
    xs = normalize(x)
    vectors = Vectors.of(xs, use_bf16(params.precision))
    seconds = {"normalize": time.perf_counter() - started}
    found, clusterings = [], []
    for round_ in range(params.rounds):  # independent clusterings (seeds): a pair needs to meet in one
        clustering = cluster(vectors, replace(params, seed=params.seed + round_))
        started = time.perf_counter()
        found.append(clustered_pairs(vectors, clustering, params))
        clustering.seconds["range_search"] = time.perf_counter() - started
        clusterings.append(clustering)
        for step, value in clustering.seconds.items():
            seconds[step] = seconds.get(step, 0.0) + value
    pairs = unique_pairs(found, n) if len(found) > 1 else found[0]
    started = time.perf_counter()
    keep, dup_of, similarity = greedy(n, pairs, rank)
    seconds["greedy"] = time.perf_counter() - started
    first = clusterings[0]
    return DedupResult(keep, dup_of, similarity, first.assignment[:, 0], pairs, first, seconds)


def brute_force_pairs(x: np.ndarray, threshold: float) -> Pairs:
    """The exact reference: FAISS IndexFlatIP.range_search of every vector against all (similarity > r)."""
    import faiss

    xs = normalize(x)
    index = faiss.IndexFlatIP(xs.shape[1])
    index.add(xs)
    lims, sims, labels = index.range_search(xs, threshold)
    rows = np.repeat(np.arange(len(xs)), np.diff(lims.astype(np.int64)))
    keep = labels > rows
    return Pairs(rows[keep], labels[keep].astype(np.int64), sims[keep].astype(np.float32))


def pair_recall(found: Pairs, truth: Pairs, n: int) -> float:
    if not len(truth):
        return 1.0
    return float(np.isin(truth.keys(n), found.keys(n)).mean())


def exact_groups(values: list[str | None], rank: np.ndarray) -> np.ndarray:
    """For exact duplicates (same sha256): index of the group's first item in keep order, -1 for that first
    item itself and for items without a value."""
    first: dict[str, int] = {}
    dup_of = np.full(len(values), -1, np.int64)
    for index in np.argsort(rank, kind="stable").tolist():
        value = values[index]
        if value is None:
            continue
        if value in first:
            dup_of[index] = first[value]
        else:
            first[value] = index
    return dup_of


def planted_vectors(
    n: int, d: int = 512, dup_fraction: float = 0.1, group_size: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors with planted near-duplicate groups (the benchmark's and the tests' data).

    ``dup_fraction`` of the rows are copies: each group has one original and ``group_size - 1`` copies at
    cosine ~0.80-0.99 to it (noise of random strength). Returns vectors and each row's group (-1: none).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    group = np.full(n, -1, np.int64)
    copies_per_group = group_size - 1
    n_groups = int(n * dup_fraction / copies_per_group)
    rows = rng.permutation(n)
    originals = rows[:n_groups]
    copies = rows[n_groups : n_groups + n_groups * copies_per_group].reshape(n_groups, copies_per_group)
    group[originals] = np.arange(n_groups)
    target = rng.uniform(0.80, 0.99, size=copies.shape).astype(np.float32)  # cosine to the original
    noise = rng.standard_normal((*copies.shape, d), dtype=np.float32)
    base = x[originals][:, None, :]
    noise -= (noise * base).sum(-1, keepdims=True) * base  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    mixed = target[..., None] * base + np.sqrt(1 - target[..., None] ** 2) * noise
    x[copies] = mixed
    group[copies] = np.arange(n_groups)[:, None]
    return x, group
