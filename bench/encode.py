"""Benchmark the encode stage and the shard reader against direct library calls in the same run.

    python bench/encode.py                       # CPU: tiny random-weight SD3 models, base 256
    python bench/encode.py --size full --device cuda --resolution 512 1024   # on a GPU

Rows printed (and written with --json):
  stage      samples/s of the stage's per-shard work (decode, bucket, resize, VAE, CLIP-L, bigG, T5 for both
             captions, blobs, table) against StableDiffusion3Pipeline.encode_prompt + AutoencoderKL.encode
             on the same batches of already-resized pixels (target: >= 0.9x)
  bytes      bytes per sample of each tensor column in the written shard against its raw tensor size
  reader     samples/s of curate.shards.ShardDataset (shuffled, bucketed batches) against reading the same
             tensors from numpy memmaps with the same batch size in fully shuffled batches (target: >= 0.5x),
             epochs alternated; with --reader-only just the SD3-sized rows (no models built)
The stage is measured in-process with models loaded once, as a Ray actor runs it; Ray's scheduling is
not part of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from curate import storage
from curate.config import ModelSpec
from curate.encode.models import encode_images, pick_device
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir, ShardTask
from curate.shards import ShardDataset
from curate.stages import encode as encode_stage
from curate.stages import local
from curate.stages.spec import WorkContext
from curate.testing.tiny_sd3 import build_tiny_sd3, model_specs

WORDS = "a photo of red blue cat dog tree house city night river mountain painting portrait boat".split()  # noqa: SIM905


def make_images(folder: Path, n: int, base: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ratio = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        w = int(base * 1.3 * np.sqrt(ratio))
        h = int(base * 1.3 / np.sqrt(ratio))
        pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
        words = rng.choice(WORDS, size=int(rng.integers(5, 40)))
        (folder / f"{i:05d}.txt").write_text(" ".join(words))


def stage_config(text: str):
    return parse_pipeline(text).stage("encode")


def bench_resolution(
    models: Path, base: int, n: int, batch: int, device: str, dtype: str, work: Path, repeats: int = 3
) -> list[dict]:
    images = work / f"images-{base}"
    make_images(images, n, base)
    run = RunDir(str(work / f"run-{base}"))
    ingest_cfg = parse_pipeline(
        f"name: b\noutput: {run.uri}\nstages:\n  - kind: local\n    name: ingest\n    path: {images}\n"
        f"    shard_size: {n}\n"
    ).stage("ingest")
    (task,) = local.plan(ingest_cfg, None)
    table = local.process(ingest_cfg, task, WorkContext(run.uri, "ingest", None), None).table
    storage.write_parquet_atomic(run.stage("ingest").shard(0), table)

    specs = {role: ModelSpec(**spec) for role, spec in model_specs(models).items()}
    specs_yaml = "".join(f"  {r}: {{path: {s.path}, subfolder: {s.subfolder}}}\n" for r, s in specs.items())
    gpus = 1 if device == "cuda" else 0
    config = stage_config(
        f"name: b\noutput: {run.uri}\nmodels:\n{specs_yaml}stages:\n  - kind: local\n    name: ingest\n"
        f"    path: {images}\n  - kind: encode\n    input: ingest\n    base_resolution: {base}\n    dtype: {dtype}\n"
        f"    max_upscale: 8\n    resources: {{batch_size: {batch}, num_gpus: {gpus}}}\n"
    )
    context = WorkContext(run.uri, "encode", run.stage("ingest").uri, specs)
    state = encode_stage.setup(config, context)
    shard = ShardTask(0, (run.stage("ingest").shard(0),))
    encode_stage.process(config, ShardTask(0, shard.inputs), context, state)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_stage() -> tuple[float, Any]:
        sync()
        started = time.perf_counter()
        output = encode_stage.process(config, shard, context, state)
        sync()
        return time.perf_counter() - started, output

    stage_seconds, output = run_stage()
    out_uri = run.stage("encode").shard(0)
    storage.write_parquet_atomic(out_uri, output.table, row_group_sizes=output.row_groups, **output.options)
    encoded = output.extra["encoded"]

    # Reference: the libraries called directly on the same batches (pixels already resized, as in training
    # scripts that precompute), both captions through encode_prompt, the VAE on each bucket's batches.
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # encode_prompt's truncation warnings

    text = state.text
    pipe = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=None,
        vae=state.vae,
        text_encoder=text.clip_l,
        tokenizer=text.tokenizer_l,
        text_encoder_2=text.clip_g,
        tokenizer_2=text.tokenizer_g,
        text_encoder_3=text.t5,
        tokenizer_3=text.tokenizer_t5,
    )
    rows = [r for r in output.table.select(["key", "caption", "status"]).to_pylist() if r["status"] == "ok"]
    pixel_batches = []
    buckets = config.buckets()
    by_bucket: dict[str, list] = {}
    ingest_rows = {r["key"]: r for r in table.to_pylist()}
    from curate.encode.buckets import choose_bucket, place, resize_and_crop
    from curate.images import open_image

    for r in rows:
        image = open_image(ingest_rows[r["key"]]["image"]).image
        bucket, _ = choose_bucket(*image.size, buckets)
        by_bucket.setdefault(bucket.name, []).append(resize_and_crop(image, place(*image.size, bucket)))
    for items in by_bucket.values():
        pixel_batches += [np.stack(items[s : s + batch]) for s in range(0, len(items), batch)]
    captions = [r["caption"] for r in rows]

    def run_direct() -> float:
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(captions), batch):
                prompts = captions[s : s + batch]
                pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=prompts,
                    prompt_3=prompts,
                    max_sequence_length=77,
                    do_classifier_free_guidance=False,
                    device=torch.device(state.device),
                )
            for pixels in pixel_batches:
                encode_images(state.vae, pixels)
        sync()
        return time.perf_counter() - started

    # alternate the two, best of `repeats` each: the machine's load changes under both alike
    direct_seconds = run_direct()
    for _ in range(repeats - 1):
        stage_seconds = min(stage_seconds, run_stage()[0])
        direct_seconds = min(direct_seconds, run_direct())
    stage_rate = encoded / stage_seconds
    results = [
        {
            "row": "stage",
            "resolution": base,
            "samples": encoded,
            "stage_samples_per_s": round(stage_rate, 2),
            "direct_samples_per_s": round(encoded / direct_seconds, 2),
            "ratio": round(stage_rate * direct_seconds / encoded, 3),
        }
    ]
    # bytes per sample per column
    meta = pq.ParquetFile(out_uri).metadata
    for name in ("latent", "clip_l", "clip_g", "pooled", "t5"):
        stored = sum(
            meta.row_group(g).column(meta.schema.names.index(name)).total_compressed_size
            for g in range(meta.num_row_groups)
        )
        raw = output.extra.get(f"bytes.{name}", 0)
        count = output.extra.get(f"rows.{name}", 0)
        if count:
            results.append(
                {
                    "row": "bytes",
                    "resolution": base,
                    "column": name,
                    "bytes_per_sample": round(stored / count, 1),
                    "raw_bytes_per_sample": round(raw / count, 1),
                    "ratio": round(stored / raw, 3),
                }
            )
    results.append(bench_reader(run.stage("encode").uri, work / f"memmap-{base}", batch))
    results[-1]["resolution"] = base
    return results


SD3_SHAPES = {"clip_l": [77, 768], "clip_g": [77, 1280], "pooled": [2048], "t5": [77, 4096]}


def sd3_sized_shard(folder: Path, n: int, base: int, seed: int = 0) -> str:
    """An encode shard with SD3's real tensor sizes (random fp16 values, both captions) for the reader
    benchmark, written with the stage's schema, metadata, row groups and writer options."""
    import pyarrow as pa

    from curate.tensors import field_metadata

    rng = np.random.default_rng(seed)
    f = base // 8
    shapes = {"latent": [16, f, f], **SD3_SHAPES, **{k + "_synthetic": v for k, v in SD3_SHAPES.items()}}
    columns: dict[str, list] = {field.name: [None] * n for field in encode_stage.ENCODE_SCHEMA}
    columns["key"] = [f"{i:024x}" for i in range(n)]
    columns["caption"] = columns["caption_synthetic"] = ["a caption"] * n
    columns["status"] = ["ok"] * n
    columns["bucket"] = [f"{base}x{base}"] * n
    for name in (
        "bucket_width",
        "bucket_height",
        "original_width",
        "original_height",
        "resized_width",
        "resized_height",
    ):
        columns[name] = [base] * n
    columns["crop_left"] = columns["crop_top"] = [0] * n
    for name, shape in shapes.items():
        columns[name] = [rng.standard_normal(shape).astype(np.float16).tobytes() for _ in range(n)]
    table = pa.Table.from_pydict(columns, schema=encode_stage.ENCODE_SCHEMA)
    fields = [
        fl.with_metadata(
            field_metadata(
                "float16", shapes[fl.name] if fl.name != "latent" else [16, "bucket_height/8", "bucket_width/8"]
            )
        )
        if fl.name in shapes
        else fl
        for fl in table.schema
    ]
    sizes, buckets = encode_stage._row_groups(table, 64 << 20)
    info = {
        "dtype": "float16",
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "vae_factor": 8,
        "latent_channels": 16,
        "joint_attention_dim": 4096,
        "max_sequence_length": 77,
        "row_groups": [{"bucket": b, "rows": r} for b, r in zip(buckets, sizes, strict=True)],
    }
    table = table.cast(pa.schema(fields, metadata={b"curate.encode": json.dumps(info).encode()}))
    uri = str(folder / "shard-00000.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    config = encode_stage.EncodeConfig(kind="encode")
    storage.write_parquet_atomic(uri, table, row_group_sizes=sizes, **encode_stage._parquet_options(table, config))
    return uri


def bench_reader(
    uri: str | list[str], folder: Path, batch: int, epochs: int = 10, shuffle_rows: bool = True, prefetch: int = 1
) -> dict:
    """Reader against numpy memmaps of the same tensors, epochs alternated (load changes hit both alike).

    The memmap reference is a full random gather: each epoch shuffles every bucket's rows and reads
    ``batch`` of them at a time with one fancy index per column (page-cached memmaps; one copy). The
    reader's rows are shuffled inside each row group (row groups shuffled globally), so it is never
    easier for the reader than for the reference. ``cpu_ratio`` compares CPU seconds, counting the
    reader's background decode thread and Arrow's threads."""
    dataset = ShardDataset(uri, batch_size=batch, seed=0, shuffle_rows=shuffle_rows, prefetch=prefetch)
    columns = dataset.info.columns
    # memmaps of the same tensors, one file per (bucket, column), read in shuffled bucketed batches
    folder.mkdir(parents=True, exist_ok=True)
    maps: dict[str, dict[str, np.memmap]] = {}
    for b in dataset:
        for name in columns:
            array = b[name].view(torch.int16).numpy() if b[name].dtype == torch.bfloat16 else b[name].numpy()
            maps.setdefault(b["bucket"], {}).setdefault(name, []).append(array)  # type: ignore[arg-type]
    for bucket, cols in maps.items():
        for name, parts in list(cols.items()):
            array = np.concatenate(parts)  # type: ignore[arg-type]
            path = folder / f"{bucket}-{name}.npy"
            np.save(path, array)
            cols[name] = np.load(path, mmap_mode="r")
    samples = sum(len(next(iter(c.values()))) for c in maps.values())

    def memmap_epoch(seed: int) -> int:
        rng = random.Random(seed)
        count = 0
        for cols in maps.values():
            n = len(next(iter(cols.values())))
            order = list(range(n))
            rng.shuffle(order)
            for s in range(0, n, batch):
                idx = np.sort(order[s : s + batch])
                tensors = {name: torch.from_numpy(np.ascontiguousarray(m[idx])) for name, m in cols.items()}
                count += len(tensors["latent"])
        return count

    def reader_epoch(epoch: int) -> int:
        dataset.set_epoch(epoch)
        return sum(len(b["key"]) for b in dataset)

    seconds = {"memmap": 0.0, "reader": 0.0}
    cpu = dict(seconds)
    counts = {"memmap": 0, "reader": 0}
    for e in range(epochs):
        for name, run in (("memmap", memmap_epoch), ("reader", reader_epoch)):
            started, started_cpu = time.perf_counter(), time.process_time()
            counts[name] += run(e)
            seconds[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - started_cpu
    if counts["reader"] != counts["memmap"]:
        raise AssertionError(f"reader served {counts['reader']} samples, the memmaps {counts['memmap']}")
    reader_rate, memmap_rate = counts["reader"] / seconds["reader"], counts["memmap"] / seconds["memmap"]
    return {
        "row": "reader",
        "shuffle_rows": shuffle_rows,
        "prefetch": prefetch,
        "samples": samples,
        "epochs": epochs,
        "reader_samples_per_s": round(reader_rate, 1),
        "memmap_samples_per_s": round(memmap_rate, 1),
        "ratio": round(reader_rate / memmap_rate, 3),
        "cpu_ratio": round(cpu["memmap"] / cpu["reader"], 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def bench_reader_sd3_sizes(work: Path, base: int, samples: int, batch: int, epochs: int) -> list[dict]:
    """The reader on an SD3-sized shard: default (shuffled rows, read-ahead), unshuffled rows, and
    shuffled rows without the read-ahead thread (the reader on one thread, besides Arrow's)."""
    uri = sd3_sized_shard(work / f"sd3-sized-{base}", samples, base)
    rows = []
    for shuffle_rows, prefetch in ((True, 1), (False, 1), (True, 0)):
        row = bench_reader(
            [uri], work / f"memmap-sd3-sized-{base}", batch, epochs, shuffle_rows=shuffle_rows, prefetch=prefetch
        )
        row.update(row="reader_sd3_sizes", resolution=base, size="real tensor sizes")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--models", help="model folder to reuse (built there if missing)")
    parser.add_argument("--repeats", type=int, default=3, help="stage and direct runs, alternated; best of each")
    parser.add_argument(
        "--reader-samples",
        type=int,
        default=384,
        help="rows of the SD3-sized reader shard (12 row groups: steady state)",
    )
    parser.add_argument("--reader-epochs", type=int, default=6, help="reader and memmap epochs, alternated")
    parser.add_argument("--reader-only", action="store_true", help="only the SD3-sized reader rows (no models)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.device == "cuda" and pick_device(1) != "cuda":
        sys.exit("no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = None if args.reader_only else build_tiny_sd3(args.models or work / "models", size=args.size)
        results = []
        for base in args.resolution:
            rows = []
            if models is not None:
                rows = bench_resolution(
                    models, base, args.samples, args.batch_size, args.device, args.dtype, work, args.repeats
                )
                for row in rows:
                    row.update(device=args.device, size=args.size)
            for row in rows + bench_reader_sd3_sizes(
                work, base, args.reader_samples, args.batch_size, args.reader_epochs
            ):
                row.setdefault("device", args.device)
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
