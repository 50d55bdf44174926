"""The dedup index a complete `dedup` stage leaves behind, so that later runs can search what it kept without
reading its upstream shards (docs/dedup.md, "Incremental dedup and decontamination").

    <stage>/_index/
      manifest.json                  written last: format, version, SSCD model identity (file hash), threshold,
                                     K, rounds, row counts, the run it came from, the references it was run against
      centroids-r<round>.npy         each round's frozen centroids (K x d float32)
      sizes-r<round>.npy             kept rows per cluster of the round (K int64)
      buckets-r<round>.npy           cluster -> bucket of the round (contiguous ranges of clusters)
      r<round>/b<bucket>/run-<i>.parquet   the kept rows, each in its nearest cluster of the round, sorted by
                                     (cluster, keep order): id, key, cluster, o0..o3 (keep order), vector (float16)
      parts/...                      the writers' files while the index is being written (deleted at the end)

Every kept row is stored once per round (1.1 KB per row and round), in its nearest cluster of that round: a later
run sends each new row to its ``probes`` nearest centroids of every round, and a pair split by a boundary in one
round usually meets in another (measured in docs/dedup.md). Files are sorted by cluster in row groups of
ROW_GROUP rows, so a reader of a few clusters reads only their row groups (Parquet statistics).

Why not a FAISS IVF index (``IndexIVFFlat`` written with ``write_index``): one file that a task must load whole
(or memory-map from local disk), no partial reads from an object store, and no keys or keep order beside the
vectors; the partition by cluster in plain Parquet is what lets a later run read only the clusters it touches.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import storage
from curate.dedup.layout import code_columns, compression, folder_files, name, vector_array
from curate.dedup.order import CODE_COLUMNS
from curate.model_paths import local_model_file
from curate.steps import read_array, write_array

FORMAT = "curate-dedup-index"
VERSION = 1
FOLDER = "_index"
ROW_GROUP = 4096  # rows per row group of an index file (~4.4 MB): the unit a reader of one cluster reads
HISTOGRAM_BINS = 200  # similarity to the nearest centroid, in bins of 0.01 over [-1, 1]


class NotAnIndex(Exception):
    """A path that cannot serve as a reference: the message says why (no index, unfinished run, bad format)."""


def folder(stage_uri: str) -> str:
    return storage.join(stage_uri, FOLDER)


def manifest_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, FOLDER, "manifest.json")


def rows_folder(index_uri: str, r: int, bucket: int) -> str:
    return storage.join(index_uri, f"r{r}", name("b", bucket))


def parts_folder(index_uri: str, r: int, bucket: int) -> str:
    return storage.join(index_uri, "parts", f"r{r}", name("b", bucket))


# -- model identity ----------------------------------------------------------------------------------------------


def model_identity(path: str) -> dict[str, Any]:
    """The SSCD model's identity: SHA-256 of its file (a folder: of its files, by name), read in 1 MB blocks.
    URLs and object-store paths are fetched into the model cache first, as the sscd stage loads them."""
    import os

    local = local_model_file(path)
    digest = hashlib.sha256()
    size = 0
    files = [local] if os.path.isfile(local) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(local) for f in names
    )  # fmt: skip
    for file in files:
        if len(files) > 1:
            digest.update(os.path.relpath(file, local).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
    return {"path": path, "sha256": digest.hexdigest(), "bytes": size}


def local_identity(path: str) -> dict[str, Any] | None:
    """``model_identity`` where it needs no download (local files, installed packages); None for URLs and object
    stores (the global step checks those before its first data phase)."""
    if storage.has_scheme(path) and not path.startswith(("file://", "package://")):
        return None
    try:
        return model_identity(path)
    except (OSError, FileNotFoundError):
        return None


# -- the manifest ------------------------------------------------------------------------------------------------


def read_manifest(stage_uri: str) -> dict[str, Any]:
    """The index manifest of a dedup stage folder, or NotAnIndex saying what the folder is instead."""
    uri = manifest_uri(stage_uri)
    try:
        exists = storage.exists(uri)
    except Exception as e:  # an object store that cannot be reached: say so, naming the path
        raise NotAnIndex(f"cannot read {uri}: {type(e).__name__}: {e}") from None
    if not exists:
        if storage.exists(storage.join(stage_uri, "_stage.json")):
            record = storage.read_json(storage.join(stage_uri, "_stage.json"))
            kind = record.get("kind")
            if kind != "dedup":
                raise NotAnIndex(f"{stage_uri} is a {kind!r} stage, not a dedup stage: no dedup index there")
            raise NotAnIndex(
                f"{stage_uri} is a dedup stage without an index (unfinished, run before indexes existed, or run "
                f"with `index: false`): no {FOLDER}/manifest.json"
            )
        raise NotAnIndex(f"not a dedup index: {stage_uri} has no {FOLDER}/manifest.json (give a dedup stage folder)")
    manifest = storage.read_json(uri)
    if manifest.get("format") != FORMAT:
        raise NotAnIndex(f"{uri} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise NotAnIndex(f"{uri}: index format version {manifest.get('version')}, this curate reads {VERSION}")
    if not storage.exists(storage.join(stage_uri, "_SUCCESS.json")):
        raise NotAnIndex(f"{stage_uri}: the dedup stage is not complete (no _SUCCESS.json); finish that run first")
    return manifest


def model_problem(manifest: dict[str, Any], identity: dict[str, Any] | None) -> str | None:
    """Why a reference made with another SSCD model cannot be searched (None when it can)."""
    theirs = (manifest.get("model") or {}).get("sha256")
    if identity is None:
        return None
    if theirs is None:
        return "the reference records no SSCD model identity, so its embeddings cannot be compared with this run's"
    if theirs != identity["sha256"]:
        return (
            f"made with another SSCD model: the reference's sha256 {theirs[:16]}... "
            f"({(manifest.get('model') or {}).get('path')}), this run's {identity['sha256'][:16]}... "
            f"({identity['path']}); its embeddings are not comparable"
        )
    return None


def write_manifest(index_uri: str, manifest: dict[str, Any]) -> None:
    storage.write_json(storage.join(index_uri, "manifest.json"), {"format": FORMAT, "version": VERSION, **manifest})


def describe_source(run_uri: str, stage_name: str, upstream_uri: str) -> dict[str, Any]:
    """Where the indexed rows came from: the run, the stage, the sscd stage and the image stage before it (for the
    pair gallery of a later run), read from the sscd stage's record."""
    images = None
    preprocessing = None
    record_uri = storage.join(upstream_uri, "_stage.json")
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record.get("upstream"):
            images = storage.join(run_uri, record["upstream"])
        config = record.get("config") or {}
        preprocessing = {k: config.get(k) for k in ("resize", "size") if k in config} or None
    return {"run": run_uri, "stage": stage_name, "sscd": upstream_uri, "images": images,
            "preprocessing": preprocessing}  # fmt: skip


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- rows --------------------------------------------------------------------------------------------------------


def plan_buckets(sizes: np.ndarray, target: int) -> np.ndarray:
    """Clusters into buckets of contiguous cluster ids of about ``target`` rows (a cluster above it alone): the
    files of a bucket are sorted by cluster, so a reader of a few clusters reads few row groups."""
    buckets = np.zeros(len(sizes), np.int64)
    bucket, load = 0, 0
    for c, size in enumerate(np.asarray(sizes, np.int64).tolist()):
        if load and load + size > target:
            bucket, load = bucket + 1, 0
        buckets[c] = bucket
        load += size
    return buckets


def row_table(ids: np.ndarray, keys: list[str], cluster: np.ndarray, codes: np.ndarray, x16: np.ndarray) -> pa.Table:
    """Index rows, sorted by (cluster, keep order)."""
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "key": pa.array(keys, pa.string()),
            "cluster": pa.array(np.asarray(cluster, np.int32), pa.int32()),
            **code_columns(codes),
            "vector": vector_array(x16),
        }
    )
    return sort_rows(table)


def sort_rows(table: pa.Table) -> pa.Table:
    """By cluster, then keep order (where the table has it), then id."""
    codes = [c for c in CODE_COLUMNS if c in table.column_names]
    keys = [("cluster", "ascending"), *((c, "ascending") for c in codes), ("id", "ascending")]
    return table.take(pc.sort_indices(table, keys))


def write_rows(uri: str, table: pa.Table) -> None:
    """One sorted file in row groups of ROW_GROUP rows, vectors uncompressed (float16 does not compress)."""
    dictionary = [c for c in ("key",) if c in table.column_names]
    storage.write_parquet_atomic(
        uri, table, row_group_size=ROW_GROUP, compression=compression(table.schema), use_dictionary=dictionary
    )


def bucket_files(index_uri: str, r: int, bucket: int) -> list[str]:
    return folder_files(rows_folder(index_uri, r, bucket), ".parquet")


def read_clusters(
    uris: list[str], clusters: np.ndarray, columns: list[str] | None = None, chunk_rows: int | None = None
) -> Iterator[pa.Table]:
    """The rows of ``clusters`` from sorted index files, reading only the row groups whose cluster range meets
    them; in chunks of about ``chunk_rows`` rows (whole row groups) when given, else one table per file."""
    wanted = np.unique(np.asarray(clusters, np.int64))
    value_set = pa.array(wanted.astype(np.int32), pa.int32())
    for uri in uris:
        file = storage.parquet_file(uri)
        meta = file.metadata
        column = meta.schema.to_arrow_schema().get_field_index("cluster")
        groups = []
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            if stats is None or not stats.has_min_max:
                groups.append(g)
                continue
            lo = np.searchsorted(wanted, stats.min)
            if lo < len(wanted) and wanted[lo] <= stats.max:
                groups.append(g)
        pending: list[pa.Table] = []
        rows = 0
        for g in groups:
            table = file.read_row_group(g, columns=columns if columns is None or "cluster" in columns
                                        else [*columns, "cluster"])  # fmt: skip
            table = table.filter(pc.is_in(table["cluster"], value_set=value_set))
            if not table.num_rows:
                continue
            pending.append(table)
            rows += table.num_rows
            if chunk_rows is not None and rows >= chunk_rows:
                yield pa.concat_tables(pending)
                pending, rows = [], 0
        if pending:
            yield pa.concat_tables(pending)


def read_chunks(uri: str, chunk_rows: int) -> Iterator[pa.Table]:
    """Every row of an index file, in chunks of whole row groups of about ``chunk_rows`` rows."""
    file = storage.parquet_file(uri)
    pending, rows = [], 0
    for g in range(file.metadata.num_row_groups):
        table = file.read_row_group(g)
        pending.append(table)
        rows += table.num_rows
        if rows >= chunk_rows:
            yield pa.concat_tables(pending)
            pending, rows = [], 0
    if pending:
        yield pa.concat_tables(pending)


def load(index_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The small parts of an index a search plan needs: each round's centroids, sizes and buckets."""
    rounds = int(manifest.get("rounds") or 0)
    return {
        "centroids": [read_array(storage.join(index_uri, f"centroids-r{r}.npy")) for r in range(rounds)],
        "sizes": [read_array(storage.join(index_uri, f"sizes-r{r}.npy")) for r in range(rounds)],
        "buckets": [read_array(storage.join(index_uri, f"buckets-r{r}.npy")) for r in range(rounds)],
    }


def write_histogram(index_uri: str, histogram: list[int] | np.ndarray) -> None:
    write_array(storage.join(index_uri, "nearest-similarity.npy"), np.asarray(histogram, np.int64))


def read_histogram(index_uri: str) -> list[int]:
    uri = storage.join(index_uri, "nearest-similarity.npy")
    return read_array(uri).tolist() if storage.exists(uri) else []


def held_out_similarity(similarity: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """A row's similarity to its nearest centroid with its own pull taken out: the centroid is its members' sum
    S normalised (|S| = ``norm`` = the sum of its members' similarities to it), so without the row it is S - x,
    and x.(S - x)/|S - x| = (s |S| - 1) / sqrt(|S|^2 - 2 s |S| + 1). New rows never pulled the centroids, so the
    drift report compares them with the reference's rows this way (in clusters of tens of rows the pull alone
    adds ~0.05 to a member's similarity)."""
    s, n = np.asarray(similarity, np.float64), np.asarray(norm, np.float64)
    return (s * n - 1) / np.sqrt(np.maximum(n * n - 2 * s * n + 1, 1e-12))


def nearest_histogram(similarity: np.ndarray) -> np.ndarray:
    """Counts of similarities to the nearest centroid in HISTOGRAM_BINS bins over [-1, 1]."""
    return np.histogram(np.clip(similarity, -1, 1), bins=HISTOGRAM_BINS, range=(-1.0, 1.0))[0].astype(np.int64)


# -- writing the index from the distributed step -----------------------------------------------------------------


def write_small(index_uri: str, r: int, centroids: np.ndarray, sizes: np.ndarray, buckets: np.ndarray) -> None:
    write_array(storage.join(index_uri, f"centroids-r{r}.npy"), np.asarray(centroids, np.float32))
    write_array(storage.join(index_uri, f"sizes-r{r}.npy"), np.asarray(sizes, np.int64))
    write_array(storage.join(index_uri, f"buckets-r{r}.npy"), np.asarray(buckets, np.int64))


def compact(index_uri: str, r: int, bucket: int, run_rows: int) -> dict[str, Any]:
    """The writers' parts of one (round, bucket) into sorted runs of at most ``run_rows`` rows (one when it
    fits), then the parts deleted. A re-run after the parts are gone finds the runs and counts them."""
    done_uri = storage.join(index_uri, "parts", f"r{r}", name("done-b", bucket) + ".json")
    if storage.exists(done_uri):  # a re-run after the runs were written: only the parts may be left to delete
        if storage.exists(parts_folder(index_uri, r, bucket)):
            storage.remove_tree(parts_folder(index_uri, r, bucket))
        return storage.read_json(done_uri)
    parts = folder_files(parts_folder(index_uri, r, bucket), ".parquet")
    runs, pending, rows, total = 0, [], 0, 0

    def flush() -> None:
        nonlocal runs, pending, rows
        if pending:
            write_rows(storage.join(rows_folder(index_uri, r, bucket), name("run-", runs) + ".parquet"),
                       sort_rows(pa.concat_tables(pending)))  # fmt: skip
            runs, pending, rows = runs + 1, [], 0

    for uri in parts:
        table = storage.read_parquet(uri)
        if rows and rows + table.num_rows > run_rows:
            flush()
        pending.append(table)
        rows += table.num_rows
        total += table.num_rows
    flush()
    result = {"rows": total, "runs": runs}
    storage.write_json(done_uri, result)  # before the parts go: a run killed while deleting them loses nothing
    if parts:
        storage.remove_tree(parts_folder(index_uri, r, bucket))
    return result
