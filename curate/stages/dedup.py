"""`dedup` stage: SD3's copy-detection dedup over the `sscd` stage's embeddings (docs/dedup.md).

Global by nature, so it runs in two steps:
1. a global step (``prepare``, one Ray task with the stage's resources, a GPU for FAISS when given) reads
   every upstream shard's key/sscd/status/size/sha256, removes exact copies (same sha256), clusters and
   range-searches the rest (curate.dedup.cluster), writes one decision file per upstream shard under
   ``_global/`` and the report under ``_report/``;
2. one shard task per upstream shard copies its decision file into the stage's shard, so resume,
   markers and statistics work as for every other stage. Later stages read rows with ``keep``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, PositiveInt

from curate import storage
from curate.config import StageConfig
from curate.dedup.cluster import DedupParams, default_clusters, exact_groups
from curate.dedup.cluster import dedup as cluster_dedup
from curate.dedup.report import DEFAULT_THRESHOLDS, cluster_size_stats, threshold_analysis, write_report
from curate.runfolder import ShardTask, StageDir, shard_name
from curate.schema import DEDUP_SCHEMA, embedding_matrix
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard


class DedupConfig(StageConfig):
    kind: Literal["dedup"]

    threshold: float = Field(0.75, gt=-1.0, lt=1.0)  # cosine similarity; > threshold is a copy (SSCD: 0.75)
    clusters: PositiveInt | None = None  # K; default 3*sqrt(N), at most 16,000 (SD3's K)
    assign_top: int = Field(2, ge=1, le=8)  # clusters each vector joins; 2 catches pairs split by a boundary
    points_per_centroid: PositiveInt = 32  # k-means training sample = min(N, this * K)
    niter: PositiveInt = 5  # k-means iterations on the sample (the refine iterations follow)
    refine_iters: int = Field(2, ge=0)  # Lloyd iterations over all vectors afterwards (each one assignment pass)
    rounds: PositiveInt = 1  # independent clusterings whose pairs are united (docs/dedup.md: 2 for >= 1M rows)
    order: Literal["largest_first", "input_order"] = "largest_first"  # who is kept in a group: first in order
    exact: bool = True  # remove identical files (same sha256) before the embedding search
    gpu: Literal["auto"] | bool = "auto"  # FAISS GPU k-means / assignment when importable and a GPU is visible
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # CPU products; auto: bf16 on AMX/AVX512-BF16 CPUs
    seed: int = 1234
    analysis_clusters: PositiveInt = 100  # clusters sampled for the threshold analysis
    analysis_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    def params(self) -> DedupParams:
        return DedupParams(
            threshold=self.threshold,
            clusters=self.clusters,
            assign_top=self.assign_top,
            points_per_centroid=self.points_per_centroid,
            niter=self.niter,
            refine_iters=self.refine_iters,
            rounds=self.rounds,
            seed=self.seed,
            gpu=None if self.gpu == "auto" else self.gpu,
            precision=self.precision,
        )


def keep_rank(order: str, keys: list[str], width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Position of each row in keep order (0 is kept first).

    ``largest_first``: most pixels first (the best copy of a group survives), ties by key;
    ``input_order``: upstream shard order, then row order (the first seen survives, as in SD3's loop).
    """
    n = len(keys)
    if order == "input_order":
        return np.arange(n)
    pixels = np.nan_to_num(width.astype(np.float64)) * np.nan_to_num(height.astype(np.float64))
    by = np.lexsort((np.array(keys, dtype=object).astype(str), -pixels))
    rank = np.empty(n, np.int64)
    rank[by] = np.arange(n)
    return rank


def _read_upstream(upstream: StageDir) -> tuple[pa.Table, np.ndarray, list[int]]:
    tables, vectors, shards = [], [], []
    for index in sorted(upstream.done_shards()):
        table = storage.read_parquet(
            upstream.shard(index), columns=["key", "sscd", "status", "width", "height", "sha256"]
        )
        vectors.append(embedding_matrix(table["sscd"]))
        tables.append(table.drop_columns(["sscd"]))
        shards.append(index)
    if not tables:
        return pa.table({}), np.zeros((0, 512), np.float16), []
    return pa.concat_tables(tables), np.concatenate(vectors), shards


def decide(config: DedupConfig, table: pa.Table, vectors: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """keep / dup_of / similarity / cluster / reason for every row, and the report."""
    started = time.perf_counter()
    n = table.num_rows
    keys = table["key"].to_pylist()
    status = table["status"].to_pylist()
    width = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    rank = keep_rank(config.order, keys, width, height)
    ok = np.array([s == "ok" for s in status], bool)
    sha = [h if ok[i] and config.exact else None for i, h in enumerate(table["sha256"].to_pylist())]
    exact_of = exact_groups(sha, rank)
    reps = np.flatnonzero(ok & (exact_of < 0))
    x = vectors[reps]  # float16 rows; dedup makes the one float32 (and bf16) working copy
    result = cluster_dedup(x, rank[reps], config.params())

    keep = np.zeros(n, bool)
    dup_of = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    cluster = np.full(n, -1, np.int64)
    reason = np.array(["not_ok"] * n, dtype=object)
    keep[reps] = result.keep
    cluster[reps] = result.cluster
    near = reps[~result.keep]
    dup_of[near] = reps[result.dup_of[~result.keep]]
    similarity[near] = result.similarity[~result.keep]
    reason[reps] = np.where(result.keep, "kept", "near_duplicate")
    exact = np.flatnonzero(exact_of >= 0)
    dup_of[exact] = exact_of[exact]  # the first identical file in keep order
    similarity[exact] = 1.0
    cluster[exact] = cluster[exact_of[exact]]
    reason[exact] = "exact_duplicate"

    k = len(result.clustering.centroids)
    analysis = threshold_analysis(x, result.cluster, rank[reps], config.analysis_thresholds, config.analysis_clusters)
    sizes = np.bincount(result.cluster, minlength=k) if len(reps) else np.zeros(0, np.int64)
    removed = int((ok & ~keep).sum())
    report = {
        "rows": n,
        "ok": int(ok.sum()),
        "removed": removed,
        "fraction_removed": removed / max(1, int(ok.sum())),
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "pairs_found": len(result.pairs),
        "threshold": config.threshold,
        "metric": "cosine similarity of L2-normalised SSCD embeddings (inner product), strictly greater",
        "order": config.order,
        "assign_top": config.assign_top,
        "rounds": config.rounds,
        "k": k,
        "k_default": default_clusters(len(reps)),
        "clusters": cluster_size_stats(result.cluster, k),
        "threshold_analysis": analysis,
        "seconds": {**{k_: round(v, 3) for k_, v in result.seconds.items()}},
    }
    report["seconds"]["total"] = round(time.perf_counter() - started, 3)
    dup_keys = [keys[d] if d >= 0 else None for d in dup_of.tolist()]
    columns = {
        "key": keys,
        "cluster": cluster,
        "keep": keep,
        "dup_of": dup_keys,
        "similarity": similarity,
        "reason": reason.tolist(),
        "status": status,
        "_sizes": sizes,
    }
    return columns, report


def prepare(config: DedupConfig, upstream: StageDir | None, stage: StageDir, context: WorkContext) -> dict[str, Any]:
    assert upstream is not None
    table, vectors, shards = _read_upstream(upstream)
    columns, report = decide(config, table, vectors)
    sizes = columns.pop("_sizes")
    full = pa.table(
        {
            "key": pa.array(columns["key"], pa.string()),
            "cluster": pa.array(columns["cluster"], pa.int32()),
            "keep": pa.array(columns["keep"], pa.bool_()),
            "dup_of": pa.array(columns["dup_of"], pa.string()),
            "similarity": pa.array(columns["similarity"], pa.float32(), from_pandas=True),
            "reason": pa.array(columns["reason"], pa.string()),
            "status": pa.array(columns["status"], pa.string()),
        },
        schema=DEDUP_SCHEMA,
    )
    offset = 0
    rows = {s.shard: s.rows for s in upstream.shard_stats()}
    for index in shards:
        part = full.slice(offset, rows[index])
        offset += rows[index]
        storage.write_parquet_atomic(storage.join(stage.global_uri, shard_name(index) + ".parquet"), part)
    write_report(storage.join(stage.uri, "_report"), report, sizes)
    return {"removed": report["removed"], "fraction_removed": report["fraction_removed"], "k": report["k"]}


def process(config: DedupConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    (upstream_uri,) = task.inputs
    stage = StageDir(storage.join(context.run_uri, context.stage_name))
    table = storage.read_parquet(storage.join(stage.global_uri, shard_name(task.index) + ".parquet"))
    table = table.cast(DEDUP_SCHEMA)
    upstream_keys = storage.read_parquet(upstream_uri, columns=["key"])["key"]
    if not table["key"].equals(upstream_keys):  # the global step saw another version of the upstream shard
        raise RuntimeError(f"dedup decisions for shard {task.index} do not match the keys of {upstream_uri}")
    keep = table["keep"].to_pylist()
    reasons = table["reason"].to_pylist()
    extra = {
        "kept": sum(keep),
        "exact_duplicate": reasons.count("exact_duplicate"),
        "near_duplicate": reasons.count("near_duplicate"),
    }
    return ShardOutput(table, extra)


def kept_keys(dedup_stage_uri: str, index: int) -> set[str]:
    """Keys to keep from upstream shard ``index``: how a later stage reading the image stage's shard
    ``index`` (shard numbers line up through sscd and dedup) processes only kept rows."""
    table = storage.read_parquet(StageDir(dedup_stage_uri).shard(index), columns=["key", "keep"])
    return {k for k, keep in zip(table["key"].to_pylist(), table["keep"].to_pylist(), strict=True) if keep}


def describe(config: DedupConfig) -> str:
    k = config.clusters or "3*sqrt(N)"
    rounds = f", {config.rounds} rounds" if config.rounds > 1 else ""
    return f"cosine > {config.threshold:g}, K={k}, top-{config.assign_top} assignment{rounds}, {config.order}"


SPEC = StageSpec(
    kind="dedup",
    config=DedupConfig,
    summary="SD3 dedup: exact sha256 copies, then FAISS k-means + in-cluster range search on SSCD embeddings",
    schema=DEDUP_SCHEMA,
    plan=one_task_per_upstream_shard,
    process=process,
    prepare=prepare,
    describe_inputs=describe,
)
