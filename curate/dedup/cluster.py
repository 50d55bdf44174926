"""SD3's copy-detection dedup on plain numpy arrays: k-means clusters, range search inside each cluster,
greedy keep/mark. No Ray and no files here, so the algorithm is testable and benchmarkable on its own.

Method (Esser et al. 2024, App. E.2):
1. spherical k-means on a sample of the L2-normalised embeddings into K clusters (Lloyd from K random
   sample rows, as FAISS initialises), then ``refine_iters`` Lloyd iterations over all vectors;
2. every vector assigned to its nearest centroid (optionally its ``assign_top`` nearest, so a pair split by
   a cluster boundary still meets in one cluster);
3. inside each cluster an exact range search: for each member, its earlier members (in keep order) with cosine
   similarity > ``threshold``, the first ``max_neighbors`` of them (a bound on the pair graph: a cluster of
   near-identical images would otherwise give n^2 pairs);
4. greedy: walk the items in keep order; the first unmarked item of a group is kept and all its neighbours
   are marked as its duplicates. A marked item marks nobody.

Every step is a function of the rows and their keep order only, never of how rows are split into blocks or
tasks: Lloyd sums are exact (fixed point), nearest-centroid blocks restart at each upstream shard (``bounds``),
and a pair's similarity is always the same float32 dot product. That is what lets the distributed global step
(curate.dedup.distributed) reach exactly the decisions of this single-process one.

Cost: each Lloyd/assignment pass is N x K x d multiply-adds, the range search about N x top^2 x (N/K) x d;
with K ~ sqrt(N) both grow as N^1.5 (versus N^2 x d for brute force). The products run in int8/bf16 on CPUs
(curate.dedup.products; similarities stay exact float32), and in torch on the task's GPU when the stage gives its
tasks one (``product_device``), with the same decisions; FAISS's GPU k-means only when asked (``gpu=True``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from curate.dedup.products import Precision, Vectors, cuda_device, earlier_pairs, nearest, pairs_in_clusters

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


# (rows up to, assign_top, rounds): the cheapest measured settings with pair recall >= 0.99 on structureless
# vectors (bench/dedup.py, bench/dedup_rounds.py; docs/dedup.md): recall per round falls as clusters grow
# (3*sqrt(N)/... rows each). A third cluster per row costs less than another round at small N; beyond that a
# round is the cheaper step: at clusters of ~1,000 rows a fourth cluster per row halves the pairs missed for
# 2.2x the search, another round divides them by 6-7 for one more clustering and search (bench/dedup_rounds.py).
SEARCH_DEFAULTS = ((150_000, 2, 1), (2_000_000, 3, 2), (5_000_000, 3, 3), (None, 3, 4))


def default_search(n: int) -> tuple[int, int]:
    """(assign_top, rounds) for ``n`` rows: top-2 and one clustering up to 150k rows (recall 0.995 at 100k),
    top-3 and two up to 2M (0.997 at 1M), three up to 5M, four beyond (10M: 0.988 with three rounds; four in
    docs/dedup.md)."""
    for limit, top, rounds in SEARCH_DEFAULTS:
        if limit is None or n <= limit:
            return top, rounds
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class DedupParams:
    threshold: float = 0.75  # cosine similarity; pairs strictly above it are duplicates
    clusters: int | None = None  # None: default_clusters(N)
    assign_top: int | None = None  # clusters each vector joins (1: SD3's plain assignment); None: default_search(N)
    points_per_centroid: int = 32  # k-means training sample = min(N, this * K)
    niter: int = 5  # on the sample; the refine iterations over all vectors follow (measured: 10 adds nothing)
    refine_iters: int = 2  # Lloyd iterations over all vectors after training on the sample
    rounds: int | None = None  # independent clusterings (seed, seed+1, ...) whose pairs are united; None: by N
    seed: int = 1234
    # None (auto): torch products on the task's GPU when it has one (product_device); True: FAISS's GPU k-means
    # and flat-index assignment (faiss-gpu; another k-means, so other partitions); False: CPUs only
    gpu: bool | None = None
    gpus: float = 0.0  # GPUs the stage gives each task of its global step (resources.num_gpus)
    device: str | None = None  # the products' torch device when the caller knows it (tests: "cpu"); None: decided
    precision: Precision = "auto"  # CPU products: bf16 (AMX/AVX512-BF16), int8 (other x86) or fp32
    threads: int = 0  # clusters searched at once, each with single-threaded BLAS; 0: one per core
    block_rows: int = 4096  # rows per similarity block inside a large cluster (memory bound)
    max_neighbors: int = 32  # earlier neighbours kept per row, first in keep order (0: all)

    def resolved(self, n: int) -> DedupParams:
        """These settings for ``n`` rows: ``assign_top`` and ``rounds`` from ``default_search`` where unset."""
        top, rounds = default_search(n)
        return replace(self, assign_top=self.assign_top or top, rounds=self.rounds or rounds)

    def product_device(self) -> str | None:
        """Where the products run, decided in the task, never on the driver (a CPU head node sees no GPU):
        ``device`` when given, else "cuda" when the stage gives its tasks GPUs (``gpus``), PyTorch sees one here
        and GPUs are not turned off (``gpu=False``); None: the CPU path."""
        if self.device is not None:
            return self.device
        if self.gpu is False or self.gpus <= 0:
            return None
        return cuda_device()

    def vectors(self, x: np.ndarray) -> Vectors:
        """``x`` (normalised rows) ready for this task's products (curate.dedup.products)."""
        return Vectors.for_precision(x, self.precision, self.product_device())

    @property
    def quota(self) -> int:
        """Neighbours the search keeps per row and cluster: one more than the bound, to tell a cut list."""
        return self.max_neighbors + 1 if self.max_neighbors > 0 else 0


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
    bounded: np.ndarray | None = None  # (N,) bool: kept, but had more earlier neighbours than max_neighbors
    rounds: list[Clustering] = field(default_factory=list)  # every round's clustering (the first is `clustering`)


def normalize(x: np.ndarray) -> np.ndarray:
    """A float32 copy with unit rows: one N x d allocation whatever the input dtype (float16 from the stage)."""
    y = np.array(x, dtype=np.float32, order="C", copy=True)
    y /= np.maximum(np.sqrt(np.einsum("ij,ij->i", y, y)), 1e-12)[:, None]  # einsum: no N x d temporary
    return y


def faiss_gpu(params: DedupParams) -> bool:
    """FAISS's GPU k-means and flat index: only when asked for (``gpu=True``); the torch products on the task's
    GPU (``product_device``) make the CPU path's decisions, FAISS's k-means does not."""
    return params.gpu is True


def cluster_count(n: int, params: DedupParams) -> int:
    return max(1, min(params.clusters or default_clusters(n), n))


def sample_plan(n: int, k: int, params: DedupParams) -> tuple[np.ndarray | None, np.ndarray]:
    """Which rows train k-means (sorted positions; None: all of them) and which sample rows start as centroids
    (FAISS's initialisation: K random sample rows). One random stream from ``params.seed``, so every path that
    calls this trains on the same rows."""
    rng = np.random.default_rng(params.seed)
    size = min(n, params.points_per_centroid * k)
    sample = np.sort(rng.choice(n, size, replace=False)) if size < n else None
    return sample, np.sort(rng.choice(size, k, replace=False))


def train_centroids(
    sample: Vectors, k: int, init: np.ndarray, params: DedupParams, gpu: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Spherical k-means on the sample: (centroids, cluster sizes on the sample at the last iteration, or None
    from FAISS's GPU k-means)."""
    if gpu:
        return _faiss_kmeans(sample.f32, k, params, gpu=True), None
    centroids = sample.f32[init]
    labels = np.zeros(len(sample), np.int64)
    for _ in range(params.niter):
        labels = nearest(sample, centroids, 1, params.threads)[:, 0]
        sums, counts = lloyd_sums(sample, labels, k)
        centroids = centroids_from_sums(sums, counts, centroids)
    return centroids, np.bincount(labels, minlength=k)


def cluster(x: np.ndarray | Vectors, params: DedupParams, bounds: np.ndarray | None = None) -> Clustering:
    """Spherical k-means on a sample, ``refine_iters`` Lloyd iterations over all rows, then every row's
    ``assign_top`` nearest centroids. CPU: our Lloyd on bf16/int8/float32 products (curate.dedup.products);
    GPU: FAISS's k-means and a FAISS GPU flat index. ``bounds``: row offsets where upstream shards start."""
    vectors = x if isinstance(x, Vectors) else params.vectors(x)
    n, d = vectors.f32.shape
    params = params.resolved(n)
    k = cluster_count(n, params)
    top = min(params.assign_top or 2, k)
    gpu = faiss_gpu(params)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if k == 1:  # one cluster: every row is in it, the centroid only describes it
        centroids = normalize(vectors.f32.mean(axis=0, keepdims=True)) if n else np.zeros((1, d), np.float32)
        return Clustering(centroids, np.zeros((n, 1), np.int64), {"kmeans": time.perf_counter() - started})
    rows, init = sample_plan(n, k, params)
    sample = vectors.take(rows) if rows is not None else vectors
    centroids, _ = train_centroids(sample, k, init, params, gpu)
    seconds["kmeans"] = time.perf_counter() - started
    started = time.perf_counter()

    def assign(centroids: np.ndarray, top: int) -> np.ndarray:
        return nearest_centroids(vectors, centroids, top, params, gpu, bounds)

    for _ in range(params.refine_iters):
        sums, counts = lloyd_sums(vectors, assign(centroids, 1)[:, 0], k)
        centroids = centroids_from_sums(sums, counts, centroids)
    seconds["refine"] = time.perf_counter() - started
    started = time.perf_counter()
    assignment = assign(centroids, top)
    seconds["assign"] = time.perf_counter() - started
    return Clustering(centroids, assignment, seconds)


def nearest_centroids(
    vectors: Vectors, centroids: np.ndarray, top: int, params: DedupParams, gpu: bool, bounds: np.ndarray | None = None
) -> np.ndarray:
    """Every row's ``top`` nearest centroids: a FAISS GPU flat index, or our CPU products (blocks restarting at
    ``bounds``)."""
    if gpu:
        return _assign_gpu(vectors.f32, centroids, top)
    return nearest(vectors, centroids, top, params.threads, bounds)


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


_BLOCK = 262_144  # rows per block of the GPU assignment
_SUM_ROWS = 16_384  # rows per block of the Lloyd sums (float64 copies of this many rows)
FIXED_POINT = float(2**24)  # Lloyd sums in units of 2^-24: exact and order-free up to 2^29 rows per cluster


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


def lloyd_sums(x: np.ndarray | Vectors, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-centroid sums of the rows (float64 holding whole multiples of 2^-24) and counts.

    Each float32 component is rounded to a multiple of 2^-24 (exact in float32 for |x| <= 1), so every partial
    sum is an integer multiple of 2^-24 below 2^53 units: float64 adds them exactly, and sums made per shard,
    per task or over everything at once are bit-identical. A one-hot (K x rows) sparse product does the
    adding (measured 2x less CPU than bincounts, 20x less than sort + reduceat); on a device (``Vectors`` with
    one) ``index_add_`` in float64 there, whose atomic adds are exact in any order too."""
    if isinstance(x, Vectors):
        if x.device is not None:
            return _lloyd_sums_on_device(x.d32, labels, k)
        x = x.f32
    import scipy.sparse

    d = x.shape[1]
    sums = np.zeros((k, d), np.float64)
    for start in range(0, len(x), _SUM_ROWS):
        block = np.rint(np.asarray(x[start : start + _SUM_ROWS], np.float32) * np.float32(FIXED_POINT))
        lab = labels[start : start + _SUM_ROWS]
        onehot = scipy.sparse.csr_matrix(
            (np.ones(len(lab), np.float64), (lab, np.arange(len(lab)))), shape=(k, len(lab))
        )
        sums += onehot @ block.astype(np.float64)
    return sums / FIXED_POINT, np.bincount(labels, minlength=k).astype(np.int64)


def _lloyd_sums_on_device(x: Any, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=x.device)
    index = torch.from_numpy(np.asarray(labels, np.int64)).to(x.device)
    step = 8 * _SUM_ROWS
    for start in range(0, len(x), step):
        block = torch.round(x[start : start + step] * FIXED_POINT).to(torch.float64)  # as numpy's rint, float32
        sums.index_add_(0, index[start : start + step], block)
    return (sums / FIXED_POINT).cpu().numpy(), np.bincount(labels, minlength=k).astype(np.int64)


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """One spherical k-means update: each centroid becomes its normalised sum; empty clusters keep theirs.

    Over *all* rows (the refine iterations) every row then pulls on its own centroid, which measurably keeps
    near-duplicates together (docs/dedup.md)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where((norms > 0) & (counts[:, None] > 0), sums / np.maximum(norms, 1e-300), previous).astype(np.float32)


def members_by_cluster(assignment: np.ndarray, k: int, rank: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Each cluster's members (every column of a top-k assignment), in keep order (``rank``; default: row order).
    Clusters with fewer than two members are skipped."""
    assignment = assignment.reshape(len(assignment), -1)
    flat = assignment.reshape(-1)
    items = np.repeat(np.arange(assignment.shape[0]), assignment.shape[1])
    order = np.lexsort((rank[items] if rank is not None else items, flat))
    bounds = np.searchsorted(flat[order], np.arange(k + 1))
    for c in range(k):
        if bounds[c + 1] - bounds[c] > 1:
            yield items[order[bounds[c] : bounds[c + 1]]]


def range_search_members(
    x: np.ndarray | Vectors, members: np.ndarray, threshold: float, block_rows: int = 4096
) -> Pairs:
    """Exact range search inside one cluster: every pair with x_i . x_j > threshold (float32 values; with bf16
    products only the candidate search is in bf16, see curate.dedup.products), as (i, j) with i < j."""
    vectors = x if isinstance(x, Vectors) else Vectors(np.asarray(x, np.float32))
    a, b, s = earlier_pairs(vectors, np.asarray(members, np.int64), threshold, 0, block_rows)
    return Pairs(np.minimum(a, b), np.maximum(a, b), s)


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


def clustered_pairs(
    x: np.ndarray | Vectors, clustering: Clustering, params: DedupParams, rank: np.ndarray | None = None
) -> Pairs:
    """Range search in every cluster, members in keep order, clusters in parallel threads with one
    BLAS/PyTorch thread each. Measured: multi-threaded OpenBLAS on many small (hundreds of rows) products is up
    to 30x slower than one BLAS thread per cluster when the cores are busy, and no faster when they are idle."""
    vectors = x if isinstance(x, Vectors) else params.vectors(x)
    clusters = list(members_by_cluster(clustering.assignment, len(clustering.centroids), rank))
    clusters.sort(key=len, reverse=True)  # big ones first so threads finish together
    found = pairs_in_clusters(vectors, clusters, params.threshold, params.block_rows, params.threads, params.quota)
    return unique_pairs([Pairs(*part) for part in found], len(vectors))


@dataclass
class Neighbours:
    """The pair graph as SD3's greedy rule reads it: for each later row b, its earlier rows a in keep order."""

    a: np.ndarray  # earlier row (int64)
    b: np.ndarray  # later row
    sim: np.ndarray
    cut: np.ndarray  # rows b whose list was cut to max_neighbors (sorted, unique)


def bound_neighbours(a: np.ndarray, b: np.ndarray, sim: np.ndarray, rank: np.ndarray, limit: int) -> Neighbours:
    """Orient pairs by keep order (``rank`` per row), drop repeats, and keep each row's first ``limit`` earlier
    neighbours (0: all), sorted by (b, rank of a)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    swap = rank[a] > rank[b]
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    order = np.lexsort((rank[a], b))
    a, b, sim = a[order], b[order], np.asarray(sim, np.float32)[order]
    fresh = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    a, b, sim = a[fresh], b[fresh], sim[fresh]
    if limit <= 0 or not len(a):
        return Neighbours(a, b, sim, np.zeros(0, np.int64))
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    place = np.arange(len(b)) - np.repeat(starts, np.diff(np.r_[starts, len(b)]))
    cut = np.unique(b[place >= limit])
    keep = place < limit
    return Neighbours(a[keep], b[keep], sim[keep], cut)


def greedy_rule(n: int, graph: Neighbours, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SD3's rule over the pair graph: in keep order, an unmarked row is kept and marks its neighbours; a marked
    row marks nobody. So a row is removed by its first kept earlier neighbour (``graph`` sorted by (b, rank of
    a)). Returns keep, dup_of (-1 if kept), similarity."""
    keep = np.ones(n, bool)
    dup_of = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    if not len(graph.a):
        return keep, dup_of, similarity
    starts = np.flatnonzero(np.r_[True, graph.b[1:] != graph.b[:-1]])
    ends = np.r_[starts[1:], len(graph.b)]
    later = graph.b[starts]
    by_rank = np.argsort(rank[later], kind="stable")
    kept = keep.tolist()  # Python lists: the loop below touches single items
    a, sim = graph.a.tolist(), graph.sim.tolist()
    for g in by_rank.tolist():
        node = int(later[g])
        for e in range(int(starts[g]), int(ends[g])):
            if kept[a[e]]:
                kept[node] = False
                dup_of[node] = a[e]
                similarity[node] = sim[e]
                break
    return np.array(kept, bool), dup_of, similarity


def greedy(n: int, pairs: Pairs, rank: np.ndarray, max_neighbors: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SD3's greedy rule over a pair list (``greedy_rule``), each row's earlier neighbours cut to the first
    ``max_neighbors`` (0: all). Returns keep, dup_of (-1 if kept), similarity."""
    return greedy_rule(n, bound_neighbours(pairs.i, pairs.j, pairs.sim, rank, max_neighbors), rank)


def dedup(
    x: np.ndarray,
    rank: np.ndarray | None = None,
    params: DedupParams | None = None,
    bounds: np.ndarray | None = None,
) -> DedupResult:
    """Near-duplicate removal over vectors ``x`` (N, d; normalised here); ``rank`` orders who is kept (0 first);
    ``bounds``: row offsets where upstream shards start (see ``cluster``)."""
    n = len(x)
    params = (params or DedupParams()).resolved(n)
    rank = np.arange(n) if rank is None else np.asarray(rank)
    if n == 0:
        empty = np.zeros(0, np.int64)
        clustering = Clustering(np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32), empty.reshape(0, 1))
        return DedupResult(np.zeros(0, bool), empty, np.zeros(0, np.float32), empty, Pairs.empty(), clustering, {})
    started = time.perf_counter()
    xs = normalize(x)
    vectors = params.vectors(xs)
    seconds = {"normalize": time.perf_counter() - started}
    found, clusterings = [], []
    for round_ in range(params.rounds):  # independent clusterings (seeds): a pair needs to meet in one
        clustering = cluster(vectors, replace(params, seed=params.seed + round_), bounds)
        started = time.perf_counter()
        found.append(clustered_pairs(vectors, clustering, params, rank))
        clustering.seconds["range_search"] = time.perf_counter() - started
        clusterings.append(clustering)
        for step, value in clustering.seconds.items():
            seconds[step] = seconds.get(step, 0.0) + value
    pairs = unique_pairs(found, n) if len(found) > 1 else found[0]
    started = time.perf_counter()
    graph = bound_neighbours(pairs.i, pairs.j, pairs.sim, rank, params.max_neighbors)
    keep, dup_of, similarity = greedy_rule(n, graph, rank)
    seconds["greedy"] = time.perf_counter() - started
    bounded = np.zeros(n, bool)
    bounded[graph.cut] = keep[graph.cut]
    first = clusterings[0]
    return DedupResult(keep, dup_of, similarity, first.assignment[:, 0], pairs, first, seconds, bounded, clusterings)


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
