"""`sscd` stage: an SSCD copy-detection embedding for every `ok` image (the input of `dedup`).

Runs as a Ray actor pool: each actor loads the model once (``setup``). Inside an actor a small thread pool
decodes and resizes the next batches (Pillow releases the GIL) while the model runs on the current one,
so the model never waits on a single decoding core. One output row per upstream row: images that failed
upstream keep their status and error; images that fail to decode here get theirs; their ``sscd`` is all
zeros (not null, so Ray Data and numpy read the column as one (N, 512) array) and must be ignored by
status, as every stage does. With `keep_from` (a joined `filter` stage), rows the keep source does not
keep are not embedded either and get its skip status (`skipped_filtered`, curate.keep), which `dedup`
then counts as not ok (keep false, reason `not_ok`).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import PositiveInt, model_validator

from curate import storage
from curate.config import StageConfig
from curate.images import DEFAULT_MAX_PIXELS, ImageError, open_image
from curate.keep import check_keep_from, keep_table_for, unkept
from curate.schema import SSCD_DIMS, SSCD_SCHEMA, embedding_array
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard

UPSTREAM_COLUMNS = ["key", "image", "status", "error", "width", "height", "sha256"]


class SscdConfig(StageConfig):
    kind: Literal["sscd"]
    model_roles: ClassVar[tuple[str, ...]] = ("sscd",)

    resize: Literal["square", "short_side"] = "square"  # SSCD's 320x320 squash, or short side 288
    size: PositiveInt | None = None  # default 320 (square) / 288 (short_side)
    format: Literal["auto", "torchscript", "onnx"] = "auto"  # auto: .onnx suffix -> onnx, else TorchScript
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    # CPU threads per actor decoding and resizing ahead of the model; default: the actor's num_cpus (at
    # least 2). On a GPU give the actor enough CPUs to feed it (ResNet-50 at 320 px wants ~8-16 cores).
    decode_threads: PositiveInt | None = None
    prefetch_batches: PositiveInt = 2  # batches decoded ahead of the one the model is running
    keep_from: str | None = None  # a joined stage with `key` + `keep` (a filter): keep=false rows are not embedded

    @model_validator(mode="after")
    def _keep_source_is_joined(self) -> SscdConfig:
        check_keep_from(self.keep_from, self.join)
        return self

    def batch_size(self) -> int:
        return self.resources.batch_size or 32


@dataclass
class SscdState:
    model: Any  # curate.sscd.model.SSCDModel
    pool: ThreadPoolExecutor


def setup(config: SscdConfig, context: WorkContext) -> SscdState:
    from curate.sscd.model import load_sscd

    threads = max(1, int(config.resources.num_cpus))
    model = load_sscd(context.models["sscd"].path or "", config.format, threads=threads)
    decode_threads = config.decode_threads or max(2, threads)
    return SscdState(model, ThreadPoolExecutor(decode_threads, thread_name_prefix="sscd-decode"))


def _prepare(config: SscdConfig, images: list[bytes]) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Decode + resize on a CPU thread: pixels per image, or None with (status, error)."""
    from curate.sscd.model import resize

    pixels: list[np.ndarray | None] = []
    failures: list[tuple[str, str]] = []
    for data in images:
        try:
            decoded = open_image(data, config.max_pixels)
            pixels.append(resize(decoded.image, config.resize, config.size))
            failures.append(("ok", ""))
        except ImageError as e:
            pixels.append(None)
            failures.append((e.status, e.message))
        except Exception as e:  # a Pillow bug on one file must not lose the shard
            pixels.append(None)
            failures.append(("decode_error", f"{type(e).__name__}: {e}"))
    return pixels, failures


def _embed(model: Any, pixels: list[np.ndarray | None]) -> np.ndarray:
    """Embeddings for the decoded images of a batch; images of one shape go through the model together."""
    out = np.zeros((len(pixels), SSCD_DIMS), np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        if p is not None:
            by_shape.setdefault(p.shape, []).append(i)
    for rows in by_shape.values():
        out[rows] = model.embed(np.stack([pixels[i] for i in rows]))
    return out


def embed_images(config: SscdConfig, state: SscdState, images: list[bytes]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Embed a list of encoded images, decoding ahead on the state's thread pool."""
    size = config.batch_size()
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    pending: deque[Future] = deque()
    vectors, outcomes = [], []
    next_batch = 0
    while next_batch < len(batches) or pending:
        while next_batch < len(batches) and len(pending) <= config.prefetch_batches:
            pending.append(state.pool.submit(_prepare, config, batches[next_batch]))
            next_batch += 1
        pixels, failures = pending.popleft().result()
        vectors.append(_embed(state.model, pixels))
        outcomes += failures
    return (np.concatenate(vectors) if vectors else np.zeros((0, SSCD_DIMS), np.float32)), outcomes


def process(config: SscdConfig, task, context: WorkContext, state: SscdState) -> ShardOutput:
    started = time.perf_counter()
    (upstream_uri,) = task.inputs
    table = storage.read_parquet(upstream_uri, columns=UPSTREAM_COLUMNS)
    status = table["status"].to_pylist()
    error = table["error"].to_pylist()
    skips = unkept(table["key"].to_pylist(), status, keep_table_for(context, config.keep_from, task.index))
    for i, skip in enumerate(skips):
        if skip is not None:
            status[i], error[i] = skip
    ok_rows = [i for i, s in enumerate(status) if s == "ok"]
    images = table["image"].to_pylist()
    vectors, outcomes = embed_images(config, state, [images[i] for i in ok_rows])
    embeddings = np.zeros((table.num_rows, SSCD_DIMS), np.float16)
    embeddings[ok_rows] = vectors.astype(np.float16)
    for row, (new_status, message) in zip(ok_rows, outcomes, strict=True):
        if new_status != "ok":
            status[row], error[row] = new_status, message
            embeddings[row] = 0
    out = pa.table(
        {
            "key": table["key"],
            "sscd": embedding_array(embeddings),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            "width": table["width"],
            "height": table["height"],
            "sha256": table["sha256"],
        },
        schema=SSCD_SCHEMA,
    )
    seconds = time.perf_counter() - started
    extra = {"embedded": len(ok_rows), "embed_seconds": round(seconds, 3), "device": state.model.device}
    if config.keep_from is not None:
        extra["skipped_by_keep_source"] = sum(skip is not None for skip in skips)
    return ShardOutput(out, extra)


def describe(config: SscdConfig) -> str:
    keep = f"; skips keep=false rows of {config.keep_from}" if config.keep_from else ""
    return f"SSCD embeddings ({config.resize}, batch {config.batch_size()}){keep}"


SPEC = StageSpec(
    kind="sscd",
    config=SscdConfig,
    summary="SSCD copy-detection embeddings (512-d, L2-normalised, float16) of every ok image",
    schema=SSCD_SCHEMA,
    plan=one_task_per_upstream_shard,
    process=process,
    setup=setup,
    describe_inputs=describe,
)
