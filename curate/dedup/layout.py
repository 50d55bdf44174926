"""What the dedup global step's tasks share: its settings, the files under ``_global/``, and reading upstream rows.

    _global/
      _tasks/<phase>/<task>.json         task markers (curate.steps)
      cache/shard-<index>.npy             the upstream shard's embeddings as raw float16 (first vector pass)
      exact/map/p<part>/g<group>.parquet  rows with a sha256, hash-partitioned           (scan)
      exact/out/g<group>/p<part>.parquet  exact copies found, by map group of the copy     (exact)
      r<round>/sample/g<group>.parquet    k-means training rows                            (sample)
      r<round>/centroids-<i>.npy          after k-means (0) and each refine pass (i)       (kmeans, refine)
      r<round>/refine-<i>/...             per-group Lloyd sums and their tree sums
      r<round>/buckets.npy                cluster -> bucket (file partition of the assignment)
      r<round>/assign/b<bucket>/g<group>.parquet  rows by bucket: id, slot, cluster, order codes, vector
      r<round>/counts/g<group>.npy        members and nearest rows per cluster
      r<round>/nearest/g<group>.parquet   nearest centroid of every embedded row (round 0: the `cluster` column)
      r<round>/plan.json                  search tasks: cluster groups and clusters over the cap (plan)
      r<round>/giant/c<cluster>/block-<i>.parquet  a cluster over the cap in keep-order blocks (split)
      r<round>/search/q<part>/<task>.parquet      pairs found, hash-partitioned by the later row (search)
      r0/analysis/<task>.parquet          rows of the threshold analysis's clusters
      graph/...                            the pair graph: pruned, components, greedy decisions
      shard-<index>.parquet                the decisions of each upstream shard (write), read by the shard tasks

A file lives in the folder of the task that reads it, so each reader lists one folder. Row ids are
``shard << 32 | row`` (int64) everywhere; vectors travel as float16 bytes (1 KB per row at d=512).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup.cluster import DedupParams
from curate.dedup.order import CODE_COLUMNS, Order, order_codes, row_ids, shard_of
from curate.dedup.report import DEFAULT_THRESHOLDS
from curate.runfolder import shard_name
from curate.schema import embedding_matrix
from curate.steps import read_array, write_array

GiB = 2**30
MIN_GROUPS = 16  # map tasks at least, where there are that many upstream shards ...
MIN_GROUP_ROWS = 50_000  # ... of at least this many rows (smaller map tasks are mostly overhead)


@dataclass(frozen=True)
class Reference:
    """What a run is deduplicated against (``against:``): another run's dedup stage folder, with its index."""

    name: str
    path: str  # the reference's dedup stage folder (its `_index/`)
    threshold: float  # a row with a reference row above this cosine is removed
    reason: str = "seen_before"  # seen_before (an earlier run) | eval_overlap (a reference set)
    search: str = "auto"  # exact (every reference row) | clusters (the rows' probed clusters) | auto: by size
    probes: int | None = None  # nearest clusters per new row and round (clusters search); None: by rounds


@dataclass(frozen=True)
class Settings:
    """Everything the global step needs besides where the data is (plain data; pickled into every task)."""

    params: DedupParams = field(default_factory=DedupParams)
    order: Order = "largest_first"
    exact: bool = True
    analysis_clusters: int = 100
    analysis_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    single_process_rows: int = 200_000  # embedded rows up to which one in-memory task decides everything
    task_memory: int = 4 * GiB  # what each task is sized to stay under
    map_rows: int | None = None  # rows per map task (upstream shards are grouped up to it); None: from memory
    search_rows: int | None = None  # rows per search task, and the cluster cap; None: from memory
    graph_rows: int | None = None  # embedded rows per pair-graph partition; None: from memory
    central_cpus: float | None = None  # CPUs of the single tasks (k-means, report); None: the stage's
    references: tuple[Reference, ...] = ()  # searched first; their matches leave before the run's own dedup
    index: bool = True  # leave the dedup index (`_index/`) for later runs
    exact_rows: int = 150_000  # references with at most this many rows are searched exactly (search: auto)
    model: str | None = None  # the SSCD model's path (its file hash is the index's model identity)
    gallery: int = 6  # matched pairs per similarity band and reference in the report's gallery

    # bytes per row, measured with bench/dedup.py --distributed (peak task RSS / rows) and rounded up
    def map_task_rows(self) -> int:
        """Rows of one map task: its assignment output (top x ~1.1 KB per row) is held until written."""
        top = self.params.assign_top or 3  # the default's most
        return self.map_rows or max(1000, int(0.35 * self.task_memory / (1100 * top)))

    def search_task_rows(self) -> int:
        """Rows one search task loads (float16 read, float32 and bf16 copies: ~5 KB per row)."""
        return self.search_rows or max(1000, int(0.4 * self.task_memory / 5000))

    def probe_task_rows(self, entries_per_row: int) -> int:
        """New rows one reference-probe task holds before it writes (``entries_per_row`` = rounds x probes
        entries of ~1.1 KB each)."""
        return max(1000, int(0.35 * self.task_memory / (1100 * max(1, entries_per_row))))

    def graph_task_rows(self) -> int:
        """Embedded rows per pair-graph partition (edges, labels and messages: ~2 KB per embedded row)."""
        return self.graph_rows or max(1000, int(0.4 * self.task_memory / 2000))


@dataclass(frozen=True)
class Where:
    upstream: str  # the upstream (sscd) stage folder
    root: str  # this stage's _global folder
    report: str  # this stage's _report folder
    against: bool = False  # rows were removed by references first (``removed``): later phases leave them out

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def round(self, r: int, *parts: str) -> str:
        return storage.join(self.root, f"r{r}", *parts)

    def decisions(self, shard: int) -> str:
        return storage.join(self.root, shard_name(shard) + ".parquet")

    def removed(self, group: int) -> str:
        """The rows of map group ``group`` that a reference removed (curate.dedup.resolve)."""
        return storage.join(self.root, "against", "removed", name("g", group) + ".parquet")


@dataclass(frozen=True)
class Group:
    """A map task's upstream shards (consecutive), with their row counts."""

    index: int
    shards: tuple[tuple[int, int], ...]  # (shard index, rows)

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.shards)


def group_shards(shards: list[tuple[int, int]], rows: int) -> list[Group]:
    """Consecutive shards in groups of about equal rows: at most ``rows`` each where shards allow (a larger shard
    is a group of its own), and up to MIN_GROUPS groups of at least MIN_GROUP_ROWS rows where there are that many
    shards, so that a run spreads over a few machines' cores even when one task could hold it all. A function
    of the shards and settings only, never of the cluster: task markers are named by group."""
    total = sum(r for _, r in shards)
    at_least = min(MIN_GROUPS, total // MIN_GROUP_ROWS)
    count = min(len(shards), max(-(-total // max(1, rows)), at_least, 1)) if shards else 0
    groups: list[Group] = []
    current: list[tuple[int, int]] = []
    done = 0
    for shard in shards:
        if current and sum(r for _, r in current) + shard[1] > rows:
            groups.append(Group(len(groups), tuple(current)))
            current = []
        current.append(shard)
        done += shard[1]
        if done >= total * (len(groups) + 1) / max(1, count):
            groups.append(Group(len(groups), tuple(current)))
            current = []
    if current:
        groups.append(Group(len(groups), tuple(current)))
    return groups


def first_shards(groups: list[Group]) -> np.ndarray:
    """Each group's first shard index: with ``group_of``, which group a row id belongs to."""
    return np.array([g.shards[0][0] for g in groups], np.int64)


def group_of(ids: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    return np.searchsorted(firsts, shard_of(ids), side="right") - 1


def name(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}"


def hash_part(ids: np.ndarray, parts: int) -> np.ndarray:
    """A partition in [0, parts) from int64 ids (Fibonacci hashing: consecutive ids spread evenly)."""
    mixed = np.asarray(ids, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(33)) % np.uint64(max(1, parts))).astype(np.int64)


# -- vectors as float16 bytes -----------------------------------------------------------------------------------


def vector_array(x: np.ndarray) -> pa.Array:
    """(n, d) float16 -> a fixed-size binary column (measured several times faster than tensor columns)."""
    x = np.ascontiguousarray(x, np.float16)
    width = x.shape[1] * 2 if x.ndim == 2 else 0
    # the array's own memory (no copy): callers pass arrays they no longer change
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(max(1, width)), len(x), [None, pa.py_buffer(x)])


def vectors_of(column: pa.ChunkedArray | pa.Array, d: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.binary(2 * d))
    if not len(column):
        return np.zeros((0, d), np.float16)
    data = column.buffers()[1]
    width = column.type.byte_width
    raw = np.frombuffer(data, np.uint8, count=len(column) * width, offset=column.offset * width)
    return raw.view(np.float16).reshape(len(column), d)


def codes_of(table: pa.Table, prefix: str = "") -> np.ndarray:
    return np.stack([table[prefix + c].to_numpy() for c in CODE_COLUMNS], axis=1).astype(np.uint64)


def code_columns(codes: np.ndarray, prefix: str = "") -> dict[str, pa.Array]:
    return {prefix + c: pa.array(np.ascontiguousarray(codes[:, i]), pa.uint64()) for i, c in enumerate(CODE_COLUMNS)}


def read_files(uris: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """The files that exist, concatenated (tasks write no file for an empty partition)."""
    tables = [storage.read_parquet(u, columns=columns) for u in uris if storage.exists(u)]
    return pa.concat_tables(tables) if tables else None


def folder_files(folder: str, suffix: str) -> list[str]:
    """The finished files of a folder, by name. Files are written into the folder of the task that reads them
    (one listing per reader, never a probe per writer: at 1e9 rows that is thousands of writers)."""
    names = storage.list_names(folder)
    return [storage.join(folder, n) for n in names if n.endswith(suffix) and not n.startswith(".tmp-")]


def read_folder(folder: str, columns: list[str] | None = None) -> pa.Table | None:
    tables = [storage.read_parquet(u, columns=columns) for u in folder_files(folder, ".parquet")]
    return pa.concat_tables(tables) if tables else None


def write_table(uri: str, table: pa.Table) -> None:
    storage.write_parquet_atomic(uri, table, compression=compression(table.schema), use_dictionary=False)


def compression(schema: pa.Schema) -> dict[str, str]:
    """zstd for ids and codes, none for the float16 vectors: they do not compress, and zstd on them cost the
    assignment and search passes ~10% of their time (1M rows)."""
    return {f.name: "none" if pa.types.is_fixed_size_binary(f.type) else "zstd" for f in schema}


# -- upstream rows ----------------------------------------------------------------------------------------------


@dataclass
class ShardRows:
    """One upstream shard's rows as the map tasks see them."""

    shard: int
    ids: np.ndarray  # (n,) int64
    ok: np.ndarray  # (n,) bool: has an embedding
    codes: np.ndarray  # (n, 4) uint64: keep order
    exact_copy: np.ndarray  # (n,) bool: removed as an exact copy (filled by the caller)
    vectors: np.ndarray | None = None  # (n, d) float16
    excluded: np.ndarray | None = None  # (n,) bool: removed by a reference before the run's own dedup

    @property
    def reps(self) -> np.ndarray:
        """Rows the embedding search sees: embedded, not removed by a reference, not an exact copy."""
        return np.flatnonzero(self.ok & ~self.exact_copy & ~self.left_out)

    @property
    def left_out(self) -> np.ndarray:
        return self.excluded if self.excluded is not None else np.zeros(len(self.ids), bool)


def shard_vectors(where: Where, shard: int) -> np.ndarray:
    """A shard's embeddings as (n, d) float16, from the step's cache, made by the first pass that needs them.

    Measured: reading the fixed-shape tensor column from Parquet costs ~12 us a row (float16 values stored as
    2-byte FIXED_LEN_BYTE_ARRAY list elements, decoded one by one), the cache's raw bytes ~0.5 us; the
    distributed step reads every vector four times a round (sample, two Lloyd passes, assignment)."""
    uri = where.path("cache", shard_name(shard) + ".npy")
    if storage.exists(uri):
        return read_array(uri)
    table = storage.read_parquet(storage.join(where.upstream, shard_name(shard) + ".parquet"), columns=["sscd"])
    x = np.ascontiguousarray(embedding_matrix(table["sscd"]), np.float16)
    write_array(uri, x)
    return x


def read_shard(
    where: Where, shard: int, order: Order, with_vectors: bool, with_codes: bool = True
) -> tuple[ShardRows, pa.Table]:
    columns = ["status", "sha256", *(["key", "width", "height"] if with_codes else [])]
    table = storage.read_parquet(storage.join(where.upstream, shard_name(shard) + ".parquet"), columns=columns)
    n = table.num_rows
    ids = row_ids(shard, n)
    codes = np.zeros((n, 4), np.uint64)
    if with_codes:
        width = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)
        height = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)
        codes = order_codes(order, table["key"].to_pylist(), width, height, ids)
    ok = np.asarray(table["status"].to_numpy(zero_copy_only=False) == "ok", bool)
    vectors = shard_vectors(where, shard) if with_vectors else None
    return ShardRows(shard, ids, ok, codes, np.zeros(n, bool), vectors), table


def exact_copies(where: Where, group: Group) -> np.ndarray:
    """Ids of the group's rows that the exact step removed (sorted)."""
    table = read_folder(where.path("exact", "out", name("g", group.index)), ["id"])
    return np.sort(table["id"].to_numpy()) if table is not None else np.zeros(0, np.int64)


def excluded_ids(where: Where, group: Group) -> np.ndarray:
    """Ids of the group's rows that a reference removed (sorted; none without references)."""
    if not where.against or not storage.exists(where.removed(group.index)):
        return np.zeros(0, np.int64)
    return np.sort(storage.read_parquet(where.removed(group.index), ["id"])["id"].to_numpy())


def group_rows(where: Where, group: Group, order: Order, with_codes: bool = False) -> Iterator[ShardRows]:
    """The group's shards with their vectors, one at a time (bounded memory), exact copies and rows removed by a
    reference marked; keep-order codes only when asked (they cost a pass over the keys)."""
    copies = exact_copies(where, group)
    excluded = excluded_ids(where, group)
    for shard, _ in group.shards:
        rows, _ = read_shard(where, shard, order, with_vectors=True, with_codes=with_codes)
        rows.exact_copy = np.isin(rows.ids, copies)
        rows.excluded = np.isin(rows.ids, excluded)
        yield rows
