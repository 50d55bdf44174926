"""`score`: CLIP score, aesthetic, NSFW and watermark scores of every image, kept so filters can change later.

SD3 dropped explicit and low-aesthetic images before dedup, and DataComp found CLIP image-text score the
strongest single filter. One forward pass of an open_clip model per image gives the image embedding; the
original caption's text embedding gives the CLIP score (cosine of the two L2-normalised embeddings, raw,
not x100); heads on the image embedding (curate.score.heads) give the other scores. Heads that the models
do not define are skipped and their columns stay null; nothing is faked. The `filter` stage reads these
shards and applies thresholds, so changing a threshold needs no model.

It reads an image stage (`local`, `download`) and, with `keep_from`, the keep flags of a joined stage (a
cheap prefilter, dedup) so the model only sees rows worth scoring (rule in curate.keep). Inside an actor
(model loaded once by `setup`; batching in curate.score.batches) the images of a batch are decoded and
transformed in parallel on a thread pool; on a GPU the next batches are prepared while the model runs the
current one, on a CPU (where both would share the same cores, so overlapping gains nothing) preparing and
running alternate. One output row per upstream row, in order; rows not scored keep a status.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, field_validator, model_validator

from curate import storage
from curate.config import ModelSpec, StageConfig
from curate.images import DEFAULT_MAX_PIXELS
from curate.keep import check_keep_from, keep_table_for, unkept
from curate.runfolder import ShardTask
from curate.schema import SCORE_SCHEMA
from curate.score.batches import ScoreState, prepared_batches, score_batch
from curate.score.heads import HEAD_NAMES, check_output, describe_head
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard

HeadName = Literal["aesthetic", "nsfw", "watermark"]
SCORE_COLUMNS = ("clip_score", *HEAD_NAMES)
SCORE_ERROR = "score_error"  # the model failed on the row (after retrying it alone)


class PositiveClass(BaseModel):
    """The class index a two-logit probability head scores (ignored for one-logit heads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nsfw: Literal[0, 1] = 1
    watermark: Literal[0, 1] = 1


class ScoreConfig(StageConfig):
    kind: Literal["score"]

    architecture_roles: ClassVar[tuple[str, ...]] = ("clip_scorer",)

    # which heads run; None: each of aesthetic_head, nsfw_head, watermark_head that the models define
    heads: tuple[HeadName, ...] | None = None
    positive_class: PositiveClass = PositiveClass()
    keep_embedding: bool = False  # store the L2-normalised image embedding (float16) in `embedding`
    keep_from: str | None = None  # a joined stage with `key` + `keep` (a prefilter, dedup): keep=false rows skipped
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    # CPU threads per actor decoding + transforming images; default: the actor's num_cpus (at least 2). On a
    # GPU give the actor enough CPUs to keep it fed.
    decode_threads: PositiveInt | None = None
    # batches prepared ahead of the one the model is running; default 2 when the model runs on a GPU, 0 on a CPU
    prefetch_batches: NonNegativeInt | None = None

    @field_validator("heads")
    @classmethod
    def _distinct(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a head is listed twice")
        return value

    @model_validator(mode="after")
    def _keep_source_is_joined(self) -> ScoreConfig:
        check_keep_from(self.keep_from, self.join)
        return self

    @property
    def model_roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("clip_scorer", *(f"{name}_head" for name in self.heads or ()))

    @property
    def optional_model_roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.heads is not None else tuple(f"{name}_head" for name in HEAD_NAMES)

    def active_heads(self, models: dict[str, ModelSpec]) -> tuple[str, ...]:
        if self.heads is not None:
            return self.heads
        return tuple(name for name in HEAD_NAMES if f"{name}_head" in models)

    def batch_size(self) -> int:
        return self.resources.batch_size or 32

    def check_models(self, models: dict[str, ModelSpec]) -> list[tuple[tuple[Any, ...], str]]:
        from curate.score.clip import embedding_width, source_problems

        clip = models["clip_scorer"]
        problems: list[tuple[tuple[Any, ...], str]] = [((), message) for message in source_problems(clip)]
        width = None if problems else embedding_width(clip)
        for name in self.active_heads(models):
            role = f"{name}_head"
            spec = models[role]
            if spec.path is None:
                problems.append(((), f"models.{role}: a head is a file; give its `path` (not a hub `id`)"))
                continue
            try:
                chain = describe_head(spec.path)
            except Exception as e:  # any unreadable file (pickle, zip, safetensors errors) is a config problem
                problems.append(((), f"models.{role}: {spec.path}: not a usable head: {e}"))
                continue
            if chain is None:
                continue  # TorchScript or remote: checked when loaded
            problem = check_output(name, chain.output_width)
            if problem:
                problems.append(((), f"models.{role}: {problem}"))
            if width is not None and chain.input_width != width:
                problems.append(
                    (
                        (),
                        f"models.{role}: the head takes {chain.input_width}-d embeddings but the clip_scorer model "
                        f"gives {width}-d ones (heads are trained for one CLIP model; LAION's for ViT-L/14, 768-d)",
                    )
                )
        return problems


def setup(config: ScoreConfig, context: WorkContext) -> ScoreState:
    import torch

    from curate.score.clip import load_clip_scorer
    from curate.score.heads import check_against, load_head

    threads = max(1, int(config.resources.num_cpus))
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    scorer = load_clip_scorer(context.models["clip_scorer"])
    heads = []
    for name in config.active_heads(context.models):
        reference = context.models[f"{name}_head"].path or ""
        head = load_head(name, reference, scorer.device, getattr(config.positive_class, name, 1))
        check_against(head, scorer.width, scorer.device, reference)
        heads.append(head)
    pool = ThreadPoolExecutor(config.decode_threads or max(2, threads), thread_name_prefix="score-decode")
    return ScoreState(scorer, heads, pool, ThreadPoolExecutor(1, thread_name_prefix="score-batch"))


UPSTREAM_COLUMNS = ("key", "image", "status", "error", "caption", "width", "height")


def _float_column(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def _embedding_column(vectors: np.ndarray, present: np.ndarray) -> pa.Array:
    """(N, D) float16 with rows where ``present`` is false stored as null (zero-length, masked)."""
    lengths = np.where(present, vectors.shape[1], 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = pa.array(vectors[present].reshape(-1), pa.float16())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~present))


def process(config: ScoreConfig, task: ShardTask, context: WorkContext, state: ScoreState) -> ShardOutput:
    started = time.perf_counter()
    uri = context.upstream_shard(task.index)
    available = storage.parquet_file(uri).schema_arrow.names
    upstream = storage.read_parquet(uri, columns=[c for c in UPSTREAM_COLUMNS if c in available])
    n = upstream.num_rows
    # rows not ok upstream keep the image stage's own status and reason, as sscd does
    status: list[str] = upstream["status"].to_pylist()
    error: list[str | None] = upstream["error"].to_pylist() if "error" in available else [None] * n
    skips = unkept(upstream["key"].to_pylist(), status, keep_table_for(context, config.keep_from, task.index))
    to_score = []
    for i, skip in enumerate(skips):
        if skip is not None:
            status[i], error[i] = skip
        elif status[i] == "ok":
            error[i] = None
            to_score.append(i)
    captions = upstream["caption"].to_pylist() if "caption" in available else [None] * n
    image_column = upstream["image"]
    columns = {name: np.full(n, np.nan, np.float32) for name in SCORE_COLUMNS}
    width = state.scorer.width
    embeddings = np.zeros((n, width), np.float16) if config.keep_embedding else None
    scored = np.zeros(n, bool)
    model_seconds = wait = 0.0
    batches = 0
    stream = prepared_batches(
        state,
        to_score,
        lambda i: image_column[i].as_py(),
        captions,
        config.batch_size(),
        config.max_pixels,
        config.prefetch_batches,
    )
    while True:
        t0 = time.perf_counter()
        batch = next(stream, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        for row, row_status, message in batch.failures:
            status[row], error[row] = row_status, message
        if not batch.rows:
            continue
        t1 = time.perf_counter()
        results = score_batch(state, batch)
        model_seconds += time.perf_counter() - t1
        batches += 1
        for part, outcome in results:
            if isinstance(outcome, str):
                for row in part.rows:
                    status[row], error[row] = SCORE_ERROR, outcome
                continue
            scored[part.rows] = True
            for name, values in outcome.columns.items():
                columns[name][part.rows] = values
            if embeddings is not None:
                embeddings[part.rows] = outcome.embeddings.astype(np.float16)
    out = pa.table(
        {
            "key": upstream["key"],
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            **{name: _float_column(values) for name, values in columns.items()},
            "width": upstream["width"] if "width" in available else pa.nulls(n, pa.int32()),
            "height": upstream["height"] if "height" in available else pa.nulls(n, pa.int32()),
            "embedding": _embedding_column(embeddings, scored)
            if embeddings is not None
            else pa.nulls(n, pa.list_(pa.float16())),
        },
        schema=SCORE_SCHEMA,
    )
    extra = {
        "fed_to_model": len(to_score),
        "scored": int(scored.sum()),
        "clip_scored": int((~np.isnan(columns["clip_score"])).sum()),
        "heads": [head.name for head in state.heads],
        "batches": batches,
        "model_seconds": round(model_seconds, 4),
        "input_wait_seconds": round(wait, 4),
        "seconds": round(time.perf_counter() - started, 4),
        "device": state.scorer.device,
    }
    return ShardOutput(out, extra)


def describe(config: ScoreConfig) -> str:
    heads = ", ".join(config.heads) if config.heads is not None else "every head the models define"
    keep = f"; skips keep=false rows of {config.keep_from}" if config.keep_from else ""
    return f"CLIP score + heads ({heads}), batch {config.batch_size()}{keep}"


SPEC = StageSpec(
    kind="score",
    config=ScoreConfig,
    summary="CLIP score (open_clip), aesthetic, NSFW and watermark scores of every image, kept for filters",
    schema=SCORE_SCHEMA,
    plan=one_task_per_upstream_shard,
    process=process,
    setup=setup,
    describe_inputs=describe,
)
