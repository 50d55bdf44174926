"""`dedup` stage: SD3's copy-detection dedup over the `sscd` stage's embeddings (docs/dedup.md).

Global by nature, so it runs in two steps:
1. a global step (curate.steps) decides every row: up to `single_process_rows` embedded rows one Ray task does
   it in memory (curate.dedup.single), beyond that a chain of Ray task phases with bounded memory
   (curate.dedup.distributed): exact copies by hash partition, k-means on a sample, Lloyd passes and the
   assignment as map tasks, range search per group of clusters, SD3's greedy rule per connected component of
   the pair graph. Both write one decision file per upstream shard under ``_global/`` and the report under
   ``_report/``, and make the same decisions;
2. one shard task per upstream shard copies its decision file into the stage's shard, so resume,
   markers and statistics work as for every other stage. Later stages read rows with ``keep``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, PositiveInt, field_validator, model_validator

from curate import storage
from curate.config import ModelSpec, StageConfig, Strict
from curate.dedup import against, distributed, index, single
from curate.dedup.cluster import DedupParams
from curate.dedup.layout import GiB, Reference, Settings, Where
from curate.dedup.order import dense_rank, order_codes, row_ids
from curate.dedup.report import DEFAULT_THRESHOLDS
from curate.runfolder import ShardTask, StageDir, shard_name
from curate.schema import DEDUP_SCHEMA
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard
from curate.steps import GlobalPhase, GlobalSteps, GlobalTask


class Against(Strict):
    """One reference of ``against:``: an earlier run's dedup stage (``kind: run``, reason ``seen_before``) or a
    reference set such as eval images deduplicated in their own pipeline (``kind: eval``, reason
    ``eval_overlap``). docs/dedup.md, "Incremental dedup and decontamination"."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # names the reference in `dup_reference` and the report
    path: str  # the reference run's dedup stage folder (local or object store), which holds its `_index/`
    threshold: float | None = Field(None, gt=-1.0, lt=1.0)  # a copy above this cosine is removed; None: the stage's
    kind: Literal["run", "eval"] = "run"
    search: Literal["auto", "exact", "clusters"] = "auto"  # auto: exact up to `exact_rows` indexed rows
    probes: PositiveInt | None = None  # nearest clusters per row and round (clusters search); None: 24 / 8 by rounds

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return storage.absolute(value)


class DedupConfig(StageConfig):
    kind: Literal["dedup"]
    # the pipeline's SSCD model: its file hash is the index's model identity, compared with every reference's
    optional_model_roles: ClassVar[tuple[str, ...]] = ("sscd",)

    threshold: float = Field(0.75, gt=-1.0, lt=1.0)  # cosine similarity; > threshold is a copy (SSCD: 0.75)
    clusters: PositiveInt | None = None  # K; default 3*sqrt(N), at most 16,000 (SD3's K)
    # clusters each vector joins (a pair split by a boundary still meets), and independent clusterings whose pairs
    # are united; None: by N (2 and 1 up to 150k rows, 3 and 2 up to 2M, 3 and 3 beyond; docs/dedup.md)
    assign_top: int | None = Field(None, ge=1, le=8)
    points_per_centroid: PositiveInt = 32  # k-means training sample = min(N, this * K)
    niter: PositiveInt = 5  # k-means iterations on the sample (the refine iterations follow)
    refine_iters: int = Field(2, ge=0)  # Lloyd iterations over all vectors afterwards (each one assignment pass)
    rounds: PositiveInt | None = None
    max_neighbors: int = Field(32, ge=0)  # earlier neighbours kept per row (first in keep order); 0: all
    order: Literal["largest_first", "input_order"] = "largest_first"  # who is kept in a group: first in order
    exact: bool = True  # remove identical files (same sha256) before the embedding search
    # auto: every product on the task's GPU (torch) when `resources.num_gpus` gives tasks one and CUDA sees it
    # there, with the CPU path's decisions; true: FAISS's GPU k-means and flat index (faiss-gpu); false: CPUs only
    gpu: Literal["auto"] | bool = "auto"
    precision: Literal["auto", "bf16", "int8", "fp32"] = "auto"  # CPU products; auto: bf16, else int8 (docs)
    seed: int = 1234
    analysis_clusters: PositiveInt = 100  # clusters sampled for the threshold analysis
    analysis_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    # the global step: in memory up to this many embedded rows, else distributed (same decisions)
    single_process_rows: int = Field(200_000, ge=0)
    # distributed sizes; None: derived from `resources.memory` (default 4 GiB per task)
    map_rows: PositiveInt | None = None  # rows per map task (upstream shards are grouped up to it)
    search_rows: PositiveInt | None = None  # rows per search task; a larger cluster is searched in blocks
    graph_rows: PositiveInt | None = None  # embedded rows per partition of the pair graph
    central_cpus: float | None = Field(None, gt=0)  # CPUs of the single tasks (k-means, report); None: resources'
    # earlier runs and reference sets to deduplicate against, searched before the run's own dedup (in this order:
    # a row matched by several is named after the first)
    against: tuple[Against, ...] = ()
    index: bool = True  # leave a dedup index of the kept rows (`_index/`) for later runs' `against`
    exact_rows: PositiveInt = 150_000  # references with at most this many indexed rows are searched exactly
    gallery: int = Field(6, ge=0)  # matched pairs per similarity band and reference in the report

    @model_validator(mode="after")
    def _distinct_references(self) -> DedupConfig:
        names = [a.name for a in self.against]
        if len(set(names)) != len(names):
            raise ValueError(f"against: reference names must differ (got {names})")
        return self

    def references(self) -> tuple[Reference, ...]:
        return tuple(
            Reference(
                name=a.name,
                path=a.path,
                threshold=self.threshold if a.threshold is None else a.threshold,
                reason="eval_overlap" if a.kind == "eval" else "seen_before",
                search=a.search,
                probes=a.probes,
            )
            for a in self.against
        )

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Every reference must be a complete dedup stage with an index. Local folders only: references in an
        object store are checked when the stage starts, before it reads a row (as other remote inputs are)."""
        problems = []
        for i, a in enumerate(self.against):
            if _remote(a.path):
                continue
            try:
                index.read_manifest(a.path)
            except index.NotAnIndex as e:
                problems.append((("against", i, "path"), str(e)))
        return problems

    def check_models(self, models: dict[str, ModelSpec]) -> list[tuple[tuple[Any, ...], str]]:
        """Every reference must have been made with this pipeline's SSCD model (same file hash). Models behind a
        URL or in an object store are checked when the stage starts, before it reads any row."""
        spec = models.get("sscd")
        if not self.against or spec is None or spec.path is None:
            return []
        identity = index.local_identity(spec.path)
        problems = []
        for i, a in enumerate(self.against):
            if _remote(a.path):
                continue
            try:
                manifest = index.read_manifest(a.path)
            except index.NotAnIndex:
                continue  # check_inputs names it
            problem = index.model_problem(manifest, identity)
            if problem:
                problems.append((("against", i, "path"), problem))
        return problems

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
            gpus=self.resources.num_gpus,
            precision=self.precision,
            max_neighbors=self.max_neighbors,
        )

    def settings(self, model: str | None = None) -> Settings:
        return Settings(
            params=self.params(),
            order=self.order,
            exact=self.exact,
            analysis_clusters=self.analysis_clusters,
            analysis_thresholds=self.analysis_thresholds,
            single_process_rows=self.single_process_rows,
            task_memory=self.resources.memory or 4 * GiB,
            map_rows=self.map_rows,
            search_rows=self.search_rows,
            graph_rows=self.graph_rows,
            central_cpus=self.central_cpus,
            references=self.references(),
            index=self.index,
            exact_rows=self.exact_rows,
            model=model,
            gallery=self.gallery,
        )


def _remote(uri: str) -> bool:
    return storage.has_scheme(uri) and not uri.startswith("file://")


def keep_rank(order: str, keys: list[str], width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Position of each row in keep order (0 is kept first).

    ``largest_first``: most pixels first (the best copy of a group survives), ties by key;
    ``input_order``: upstream shard order, then row order (the first seen survives, as in SD3's loop).
    """
    ids = row_ids(0, len(keys))
    return dense_rank(order_codes(order, keys, width, height, ids), ids)  # type: ignore[arg-type]


def decide(config: DedupConfig, table: pa.Table, vectors: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """keep / dup_of / similarity / cluster / reason for every row of one upstream shard, and the report (the
    single-process path on a table in memory)."""
    columns, report, _, _ = single.decide(config.settings(), table, vectors, [(0, table.num_rows)])
    return columns, report


def global_step(config: DedupConfig, upstream: StageDir | None, stage: StageDir, context: WorkContext) -> GlobalSteps:
    assert upstream is not None
    stats = upstream.shard_stats()
    shards = [(s.shard, s.rows) for s in stats]
    embedded = sum(s.status.get("ok", 0) for s in stats)
    model = context.models.get("sscd")
    settings = config.settings(model.path if model is not None else None)
    where = Where(upstream.uri, stage.global_uri, storage.join(stage.uri, "_report"))
    info = None
    if settings.references or settings.index:  # before any row is read: the model's identity, the references
        task = GlobalTask("identify", against.identify, (where, settings, context.run_uri, context.stage_name))
        info = (yield GlobalPhase("identify", (task,)))["identify"]
    d = 512
    if shards:
        d = int(storage.parquet_file(upstream.shard(shards[0][0])).schema_arrow.field("sscd").type.shape[0])
    if embedded > settings.single_process_rows:
        return (yield from distributed.plan(settings, where, shards, d, info, stage.uri))
    if info is not None and against.reference_rows(info) > 10 * settings.single_process_rows:
        # a small batch against references larger than one task should read: they are searched as phases of tasks
        return (yield from distributed.searched_then_single(settings, where, shards, d, info, stage.uri))
    task = GlobalTask("single", single.run, (where, settings, shards, info, stage.uri))
    results = yield GlobalPhase("single", (task,))
    return results["single"]


def process(config: DedupConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    (upstream_uri,) = task.inputs
    stage = StageDir(storage.join(context.run_uri, context.stage_name))
    table = storage.read_parquet(storage.join(stage.global_uri, shard_name(task.index) + ".parquet"))
    if "dup_reference" not in table.column_names:  # decided before references existed (a resumed older run)
        table = table.append_column("dup_reference", pa.nulls(table.num_rows, pa.string()))
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
        "seen_before": reasons.count("seen_before"),
        "eval_overlap": reasons.count("eval_overlap"),
    }
    return ShardOutput(table, extra)


def kept_keys(dedup_stage_uri: str, index: int) -> set[str]:
    """Keys to keep from upstream shard ``index``: how a later stage reading the image stage's shard
    ``index`` (shard numbers line up through sscd and dedup) processes only kept rows."""
    table = storage.read_parquet(StageDir(dedup_stage_uri).shard(index), columns=["key", "keep"])
    return {k for k, keep in zip(table["key"].to_pylist(), table["keep"].to_pylist(), strict=True) if keep}


def describe(config: DedupConfig) -> str:
    k = config.clusters or "3*sqrt(N)"
    top = f"top-{config.assign_top}" if config.assign_top else "top-2/3 (by N)"
    rounds = f", {config.rounds} rounds" if config.rounds else ", 1-3 rounds (by N)"
    against_ = "".join(
        f"; against {a.name} ({a.kind}, cosine > {a.threshold if a.threshold is not None else config.threshold:g}): "
        f"{a.path}"
        for a in config.against
    )
    index_ = "" if config.index else "; no index"
    return f"cosine > {config.threshold:g}, K={k}, {top} assignment{rounds}, {config.order}{against_}{index_}"


SPEC = StageSpec(
    kind="dedup",
    config=DedupConfig,
    summary="SD3 dedup: exact sha256 copies, then FAISS k-means + in-cluster range search on SSCD embeddings",
    schema=DEDUP_SCHEMA,
    plan=one_task_per_upstream_shard,
    process=process,
    global_step=global_step,
    describe_inputs=describe,
)
