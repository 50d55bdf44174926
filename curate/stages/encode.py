"""`encode`: image shards -> SD3 training shards (VAE latents + CLIP-L / OpenCLIP bigG / T5 embeddings).

Reads image shard i (its `input`, e.g. `ingest`) and shard i of each joined stage: keep flags from the
joined stage named by `keep_from` (curate.keep), synthetic captions from the first with a
`caption_synthetic` column. Every upstream row becomes exactly one output row: encoded rows (`ok`)
first, grouped by aspect-ratio bucket with row groups that never span two buckets, then the rows not
encoded with their status. Models load once per actor (`setup`); images are decoded and resized on a
thread pool inside the actor while the text encoders run, so the accelerator is not waiting on Pillow.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, PositiveInt, model_validator

from curate import storage
from curate.config import StageConfig
from curate.encode.buckets import Bucket, Placement, choose_bucket, make_buckets, place, resize_and_crop
from curate.images import DEFAULT_MAX_PIXELS, ImageError, open_image
from curate.keep import check_keep_from, keep_table_for, unkept
from curate.runfolder import ShardTask
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard
from curate.tensors import field_metadata, to_blobs

TEXT_COLUMNS = ("clip_l", "clip_g", "pooled", "t5")
SYNTHETIC = "_synthetic"
TENSOR_COLUMNS = (
    "latent",
    "latent_std",
    *TEXT_COLUMNS,
    *(c + SYNTHETIC for c in TEXT_COLUMNS),
)

ENCODE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("caption_synthetic", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("bucket", pa.string()),
        pa.field("bucket_width", pa.int32()),
        pa.field("bucket_height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("resized_width", pa.int32()),
        pa.field("resized_height", pa.int32()),
        pa.field("crop_left", pa.int32()),
        pa.field("crop_top", pa.int32()),
        *(pa.field(name, pa.binary()) for name in TENSOR_COLUMNS),
    ]
)


class EncodeConfig(StageConfig):
    kind: Literal["encode"]
    model_roles: ClassVar[tuple[str, ...]] = ("vae", "clip_l", "clip_g")
    optional_model_roles: ClassVar[tuple[str, ...]] = ("t5",)

    base_resolution: PositiveInt = Field(1024, description="buckets have about base_resolution**2 pixels")
    side_multiple: PositiveInt = 64  # bucket sides are multiples of this (VAE factor 8 x patch 2 at least)
    max_aspect: float = Field(4.0, ge=1.0)  # widest bucket; 4.0 gives buckets from 1:4 to 4:1
    aspect_tolerance: float = Field(0.25, ge=0.0)  # how far beyond the extreme buckets an image may be
    max_upscale: float = Field(4.0, gt=0.0)  # images that need more enlargement than this are `too_small`
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # stored tensors
    store_std: bool = False  # also store the latent distribution's std (to sample mean + std * eps)
    t5: bool = True  # encode with T5 when the models define a `t5` role
    max_sequence_length: PositiveInt = 77  # T5 tokens
    # Width of SD3's joint text sequence: T5's d_model when T5 runs; without T5 the width of the zeros
    # diffusers puts in T5's place (the transformer's joint_attention_dim, 4096 for SD3).
    joint_attention_dim: PositiveInt | None = None
    row_group_bytes: PositiveInt = 64 << 20
    tensor_compression: Literal["none", "zstd"] = "none"
    decode_threads: PositiveInt = 4
    chunk_rows: PositiveInt = 256  # rows decoded and encoded at a time: bounds the pixels held in memory

    keep_from: str | None = None  # a joined stage with `key` + `keep` (dedup, filter): keep=false rows are skipped

    @model_validator(mode="after")
    def _multiple(self) -> EncodeConfig:
        check_keep_from(self.keep_from, self.join)
        if self.side_multiple % 8:
            raise ValueError("side_multiple must be a multiple of the VAE factor 8")
        if self.base_resolution % self.side_multiple:
            raise ValueError("base_resolution must be a multiple of side_multiple")
        return self

    def buckets(self) -> list[Bucket]:
        return make_buckets(self.base_resolution, self.side_multiple, self.max_aspect)


@dataclass
class EncodeState:
    text: Any
    vae: Any
    device: str


def setup(config: EncodeConfig, context: WorkContext) -> EncodeState:
    from curate.encode.models import load_text_encoders, load_vae, pick_device

    device = pick_device(config.resources.num_gpus)
    models = dict(context.models)
    if not config.t5:
        models.pop("t5", None)
    text = load_text_encoders(models, device)
    if text.t5 is not None and config.joint_attention_dim not in (None, text.t5.config.d_model):
        raise ValueError(
            f"encode.joint_attention_dim is {config.joint_attention_dim} but the T5 encoder's width is "
            f"{text.t5.config.d_model}; set joint_attention_dim to the width SD3 pads to (T5's d_model)"
        )
    return EncodeState(text, load_vae(models["vae"], device), device)


@dataclass
class _Row:
    index: int
    placement: Placement


def _prepare(config: EncodeConfig, buckets: list[Bucket], data: bytes) -> tuple[Placement | None, Any, str, str]:
    """Decode, bucket, resize and crop one image: (placement, pixels, status, error)."""
    try:
        decoded = open_image(data, config.max_pixels)
    except ImageError as e:
        return None, None, e.status, e.message
    width, height = decoded.image.size
    bucket, reason = choose_bucket(width, height, buckets, config.aspect_tolerance)
    if bucket is None:
        return None, None, "no_bucket", str(reason)
    placement = place(width, height, bucket)
    if placement.scale > config.max_upscale:
        return (
            None,
            None,
            "too_small",
            f"{width}x{height} needs {placement.scale:.2f}x enlargement for bucket {bucket.name} "
            f"(max_upscale {config.max_upscale})",
        )
    return placement, resize_and_crop(decoded.image, placement), "ok", ""


def _joined_tables(config: EncodeConfig, task: ShardTask, context: WorkContext) -> dict[str, pa.Table]:
    return {name: storage.read_parquet(context.joined_shard(name, task.index)) for name in config.join}


def _synthetic_captions(joined: dict[str, pa.Table]) -> dict[str, str | None] | None:
    for table in joined.values():
        if "caption_synthetic" in table.column_names:
            return dict(zip(table["key"].to_pylist(), table["caption_synthetic"].to_pylist(), strict=True))
    return None


def _text_blobs(
    state: EncodeState, config: EncodeConfig, prompts: list[str | None], batch_size: int
) -> tuple[dict[str, list[bytes | None]], dict[str, list[int]]]:
    """Per-encoder blobs for each prompt (None where the prompt is None) and the per-row shapes."""
    from curate.encode.models import encode_text

    out: dict[str, list[bytes | None]] = {c: [None] * len(prompts) for c in TEXT_COLUMNS}
    shapes: dict[str, list[int]] = {}
    todo = [i for i, p in enumerate(prompts) if p is not None]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        result = encode_text(state.text, [prompts[i] for i in chunk], config.max_sequence_length)
        for name in TEXT_COLUMNS:
            tensor = getattr(result, name)
            if tensor is None:
                continue
            shapes[name] = list(tensor.shape[1:])
            for i, blob in zip(chunk, to_blobs(tensor, config.dtype), strict=True):
                out[name][i] = blob
    return out, shapes


def process(config: EncodeConfig, task: ShardTask, context: WorkContext, state: EncodeState) -> ShardOutput:
    started = time.perf_counter()
    images = storage.read_parquet(context.upstream_shard(task.index))
    joined = _joined_tables(config, task, context)
    keep_flags = keep_table_for(context, config.keep_from, task.index)
    synthetic = _synthetic_captions(joined)
    keys = images["key"].to_pylist()
    n = len(keys)
    captions = images["caption"].to_pylist()
    upstream_status = images["status"].to_pylist()
    upstream_error = images["error"].to_pylist()
    rows: dict[str, list[Any]] = {f.name: [None] * n for f in ENCODE_SCHEMA}
    rows["key"], rows["caption"] = keys, captions
    rows["caption_synthetic"] = [synthetic.get(k) if synthetic else None for k in keys]
    rows["status"], rows["error"] = list(upstream_status), list(upstream_error)
    rows["original_width"] = images["width"].to_pylist()
    rows["original_height"] = images["height"].to_pylist()

    todo = []  # rows not ok upstream keep the image stage's own status and reason
    for i, skip in enumerate(unkept(keys, upstream_status, keep_flags)):
        if skip is not None:  # skipped_duplicate / skipped_filtered / the keep source's status (curate.keep)
            rows["status"][i], rows["error"][i] = skip
        elif upstream_status[i] == "ok":
            todo.append(i)

    buckets = config.buckets()
    batch_size = config.resources.batch_size or 16
    image_column = images["image"]
    text: dict[str, list[bytes | None]] = {c: [None] * n for c in TEXT_COLUMNS}
    text_syn: dict[str, list[bytes | None]] = {c: [None] * n for c in TEXT_COLUMNS}
    text_shapes: dict[str, list[int]] = {}
    by_bucket: dict[str, list[tuple[int, Placement]]] = defaultdict(list)
    latent_shape: list[Any] = []
    # Chunks of rows bound the decoded pixels held at once (chunk_rows x 3 MB at 1024^2).
    chunks = [todo[s : s + config.chunk_rows] for s in range(0, len(todo), config.chunk_rows)]
    with ThreadPoolExecutor(config.decode_threads) as pool:

        def submit(chunk: list[int]) -> dict[int, Any]:
            return {i: pool.submit(_prepare, config, buckets, image_column[i].as_py()) for i in chunk}

        pending = submit(chunks[0]) if chunks else {}
        for k, chunk in enumerate(chunks):
            futures = pending
            # the text encoders run while this chunk's images decode on the pool (torch releases the GIL)
            for target, source in ((text, captions), (text_syn, rows["caption_synthetic"])):
                blobs, shapes_found = _text_blobs(state, config, [source[i] for i in chunk], batch_size)
                text_shapes.update(shapes_found)
                for name in TEXT_COLUMNS:
                    for i, blob in zip(chunk, blobs[name], strict=True):
                        target[name][i] = blob
            decoded: dict[str, list[tuple[int, Placement, np.ndarray]]] = defaultdict(list)
            for i, future in futures.items():
                placement, pixels, status, error = future.result()
                if placement is None:
                    rows["status"][i], rows["error"][i] = status, error
                    continue
                decoded[placement.bucket.name].append((i, placement, pixels))
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else {}  # decoded while the VAE runs
            latent_shape = _encode_latents(state, config, decoded, rows, batch_size) or latent_shape
            for name, items in decoded.items():
                by_bucket[name] += [(i, placement) for i, placement, _ in items]

    encoded = {i for items in by_bucket.values() for i, _ in items}
    for name in TEXT_COLUMNS:
        for suffix, source in (("", text), (SYNTHETIC, text_syn)):
            rows[name + suffix] = [source[name][i] if i in encoded else None for i in range(n)]

    # Order: encoded rows by bucket (row groups never span two buckets), then everything else.
    order = [i for name in sorted(by_bucket) for i, _ in by_bucket[name]]
    order += [i for i in range(n) if i not in encoded]
    table = pa.Table.from_pydict({k: [v[i] for i in order] for k, v in rows.items()}, schema=ENCODE_SCHEMA)

    shapes: dict[str, list[Any]] = {"latent": latent_shape, "latent_std": latent_shape}
    for name, shape in text_shapes.items():
        shapes[name] = shapes[name + SYNTHETIC] = shape
    table = _with_metadata(table, config, state, shapes)
    row_groups, bucket_of_group = _row_groups(table, config.row_group_bytes)
    meta = dict(table.schema.metadata)
    info = json.loads(meta[b"curate.encode"])
    info["row_groups"] = [{"bucket": b, "rows": r} for b, r in zip(bucket_of_group, row_groups, strict=True)]
    meta[b"curate.encode"] = json.dumps(info).encode()
    table = table.replace_schema_metadata(meta)

    extra: dict[str, Any] = {"encoded": len(encoded), "encode_seconds": round(time.perf_counter() - started, 3)}
    for name in TENSOR_COLUMNS:
        column = table[name]
        present = len(column) - column.null_count
        if present:
            extra[f"bytes.{name}"] = int(pa.compute.sum(pa.compute.binary_length(column)).as_py())
            extra[f"rows.{name}"] = present
    for name in sorted(by_bucket):
        extra[f"bucket.{name}"] = len(by_bucket[name])
    return ShardOutput(table, extra, row_groups=tuple(row_groups), options=_parquet_options(table, config))


def _encode_latents(
    state: EncodeState,
    config: EncodeConfig,
    decoded: dict[str, list[tuple[int, Placement, np.ndarray]]],
    rows: dict[str, list[Any]],
    batch_size: int,
) -> list[Any]:
    """VAE batches of one bucket each; fills the latent and bucket columns. Returns the per-row latent shape."""
    from curate.encode.models import encode_images

    shape: list[Any] = []
    for name in sorted(decoded):
        items = decoded[name]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            mean, std = encode_images(state.vae, np.stack([p for _, _, p in chunk]))
            shape = [int(mean.shape[1]), "bucket_height/8", "bucket_width/8"]
            means = to_blobs(mean, config.dtype)
            stds = to_blobs(std, config.dtype) if config.store_std else [None] * len(chunk)
            for (i, placement, _), m, s in zip(chunk, means, stds, strict=True):
                bucket = placement.bucket
                rows["latent"][i], rows["latent_std"][i] = m, s
                rows["bucket"][i] = bucket.name
                rows["bucket_width"][i], rows["bucket_height"][i] = bucket.width, bucket.height
                rows["resized_width"][i], rows["resized_height"][i] = placement.resized_width, placement.resized_height
                rows["crop_left"][i], rows["crop_top"][i] = placement.crop_left, placement.crop_top
                rows["status"][i], rows["error"][i] = "ok", None
    return shape


def _with_metadata(table: pa.Table, config: EncodeConfig, state: EncodeState, shapes: dict[str, list[Any]]) -> pa.Table:
    """Field metadata (dtype, per-row shape) on every tensor column; SD3 facts in the schema metadata."""
    fields = []
    for f in table.schema:
        if f.name in TENSOR_COLUMNS and f.name in shapes and table[f.name].null_count < table.num_rows:
            f = f.with_metadata(field_metadata(config.dtype, shapes[f.name]))
        fields.append(f)
    vae = state.vae.config
    text = state.text
    info = {
        "dtype": config.dtype,
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor,
        "latent_channels": vae.latent_channels,
        "vae_factor": 2 ** (len(vae.block_out_channels) - 1),
        "latent_std": config.store_std,
        "clip_l_dim": text.clip_l.config.projection_dim,
        "clip_g_dim": text.clip_g.config.projection_dim,
        "clip_tokens": text.tokenizer_l.model_max_length,
        "t5": text.t5 is not None,
        "max_sequence_length": config.max_sequence_length,
        "joint_attention_dim": text.t5.config.d_model if text.t5 is not None else config.joint_attention_dim or 4096,
        "base_resolution": config.base_resolution,
        "buckets": [b.name for b in config.buckets()],
    }
    metadata = {**(table.schema.metadata or {}), b"curate.encode": json.dumps(info).encode()}
    return table.cast(pa.schema(fields, metadata=metadata))


def _row_groups(table: pa.Table, target_bytes: int) -> tuple[list[int], list[str | None]]:
    """Row counts of row groups of about ``target_bytes`` that never span two buckets."""
    buckets = table["bucket"].to_pylist()
    sizes, names = [], []
    start = 0
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    while start < len(buckets):
        end = start
        while end < len(buckets) and buckets[end] == buckets[start]:
            end += 1
        span = end - start
        if buckets[start] is not None:
            per_row = max(1, table.slice(start, span).nbytes // span)
        step = max(1, target_bytes // per_row)
        for s in range(start, end, step):
            sizes.append(min(step, end - s))
            names.append(buckets[start])
        start = end
    return sizes, names


def _parquet_options(table: pa.Table, config: EncodeConfig) -> dict[str, Any]:
    """Dictionaries only for key/text-code columns; tensors uncompressed by default (reads at memory speed)."""
    compression = {
        name: (config.tensor_compression if name in TENSOR_COLUMNS else "zstd") for name in table.column_names
    }
    return {
        "compression": compression,
        "use_dictionary": ["key", "status", "error", "bucket"],
    }


def describe(config: EncodeConfig) -> str:
    return (
        f"base {config.base_resolution} ({len(config.buckets())} buckets), {config.dtype}, "
        f"T5 {'on' if config.t5 else 'off'} at {config.max_sequence_length} tokens"
    )


SPEC = StageSpec(
    kind="encode",
    config=EncodeConfig,
    summary="SD3 training shards: bucketed VAE latents and CLIP-L / bigG / T5 embeddings",
    schema=ENCODE_SCHEMA,
    plan=one_task_per_upstream_shard,
    process=process,
    setup=setup,
    describe_inputs=describe,
)
