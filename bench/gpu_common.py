"""What every row of bench/gpu.py shares: the run's settings, the image shards the stages read, timing on the
device, peak memory, FLOP counting and the sizing that keeps a row inside its share of the budget."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WORDS = "a photo of red blue cat dog tree house city night river mountain painting portrait boat".split()  # noqa: SIM905


@dataclass(frozen=True)
class Sizes:
    """Model sizes, batches and item counts of one `--size` (items: the most a row measures; the budget may cut)."""

    name: str
    images: int  # distinct images in the pool (shards repeat them)
    image_side: tuple[int, int]  # pool images' longer sides, smallest and largest
    aspect: float  # the pool's widest aspect ratio (1.0: square, so the tiny encode needs one bucket)
    sscd_trunk: str
    sscd_size: int
    sscd_batch: int
    sscd_items: int
    clip: str  # an open_clip architecture name, or "tiny" (curate.testing.tiny_clip)
    score_batch: int
    score_items: int
    sd3: Any  # "tiny" | "full" | TinySizes (curate.testing.tiny_sd3)
    encode: tuple[tuple[int, int, int], ...]  # (base resolution, batch, items)
    vlm: str  # "tiny" | "3b" | "3b-cut" (real widths, one layer: a machine without a GPU)
    caption_batch: int
    caption_items: int
    new_tokens: int
    mmdit_depth: int
    train_resolution: int
    train_batch: int
    train_steps: int
    dedup_rows: int
    repeats: int  # measured runs of each side (alternated); the best counts
    warmup: bool  # a first untimed batch of each side (kernels, autotuning, allocator); the tiny run skips it
    dtype: str  # what the models are saved in and the text encoders run in


@dataclass
class Row:
    stage: str
    model: str
    unit: str = "images"
    items: int = 0
    stage_rate: float | None = None  # items/s of the stage's own code
    bare_rate: float | None = None  # items/s of the bare model on prepared inputs
    flops: float | None = None  # FLOPs per item (FlopCounterMode)
    memory: int | None = None  # peak bytes allocated on the GPU
    note: str = ""
    error: str | None = None


@dataclass
class Ctx:
    sizes: Sizes
    device: str  # "cuda" or "cpu"
    work: Path
    cpus: int
    deadline: float  # time.perf_counter() by which every row must be done
    dry_run: bool = False
    models: Path | None = None  # prebuilt tiny models (the layout of curate.testing.tiny_models)
    pool: Any = None  # pyarrow Table: the ingest rows shards are made of
    run_uri: str = ""
    shards: int = 0
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def ingest_uri(self) -> str:
        from curate import storage

        return storage.join(self.run_uri, "ingest")

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def clock(ctx: Ctx, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``fn()`` with the device's queue drained before and after."""
    sync(ctx)
    started = time.perf_counter()
    result = fn()
    sync(ctx)
    return time.perf_counter() - started, result


def reset_memory(ctx: Ctx) -> None:
    """Free the last row's models on the GPU (a collection takes seconds with transformers loaded: GPU only)."""
    if ctx.cuda:
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(ctx: Ctx) -> int | None:
    if not ctx.cuda:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` as torch.utils.flop_counter counts them (matmuls, convolutions, attention); run it on
    meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def afford(ctx: Ctx, budget_end: float, per_item: float, default: int, step: int, sides: int = 2) -> tuple[int, str]:
    """Items to measure so that ``sides`` x repeats runs end by ``budget_end``: a multiple of ``step`` (a batch)
    between one step and ``default``, and a note when the budget cut it."""
    repeats = ctx.sizes.repeats
    room = budget_end - time.perf_counter()
    fits = int(room / max(1e-9, per_item * sides * repeats)) // step * step
    n = max(step, min(default, fits))
    return n, (f"cut to {n} of {default} items by the budget" if n < default else "")


# -- the images every image stage reads ------------------------------------------------------------------------------


def make_images(folder: Path, n: int, sides: tuple[int, int], aspect: float, threads: int, seed: int = 0) -> None:
    """JPEGs of smooth random content (low-resolution noise upscaled), longer side in ``sides``, portrait and
    landscape up to ``aspect``, each with a caption file of 5-40 words (the `local` stage's `txt` captions)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        long = int(rng.integers(sides[0], sides[1] + 1))
        short = max(16, int(long / rng.uniform(1.0, aspect)))
        w, h = (long, short) if i % 2 else (short, long)
        pixels = rng.integers(0, 255, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(" ".join(rng.choice(WORDS, int(rng.integers(5, 40)))))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))


def prepare_pool(ctx: Ctx) -> None:
    """The image pool as one `local` (ingest) shard, made by the local stage's own plan and process."""
    from curate.pipeline import parse_pipeline
    from curate.stages import local
    from curate.stages.spec import WorkContext

    images = ctx.work / "images"
    make_images(images, ctx.sizes.images, ctx.sizes.image_side, ctx.sizes.aspect, ctx.cpus)
    ctx.run_uri = str(ctx.work / "run")
    config = parse_pipeline(
        f"name: gpu\noutput: {ctx.run_uri}\nstages:\n  - kind: local\n    name: ingest\n    path: {images}\n"
        f"    shard_size: {ctx.sizes.images}\n    captions: txt\n"
    ).stage("ingest")
    (task,) = local.plan(config, None)
    ctx.pool = local.process(config, task, WorkContext(ctx.run_uri, "ingest", None), None).table
    assert all(s == "ok" for s in ctx.pool["status"].to_pylist()), "the pool's images must all decode"


def image_shard(ctx: Ctx, n: int) -> Any:
    """A new ingest shard of ``n`` rows cycling through the pool (fresh keys); returns its ShardTask."""
    import pyarrow as pa

    from curate import storage
    from curate.runfolder import ShardTask, StageDir

    index = ctx.shards
    ctx.shards += 1
    table = ctx.pool.take(pa.array(np.arange(n) % ctx.pool.num_rows))
    keys = pa.array([f"{index:08x}{i:016x}" for i in range(n)], pa.string())
    table = table.set_column(table.schema.get_field_index("key"), "key", keys)
    uri = StageDir(ctx.ingest_uri).shard(index)
    storage.write_parquet_atomic(uri, table)
    return ShardTask(index, (uri,))


def pool_images(ctx: Ctx, n: int) -> list[Any]:
    """The first ``n`` pool images decoded (PIL), cycling."""
    from curate.images import open_image

    data = ctx.pool["image"].to_pylist()
    return [open_image(data[i % len(data)]).image for i in range(n)]


def pool_captions(ctx: Ctx, n: int) -> list[str]:
    captions = ctx.pool["caption"].to_pylist()
    return [captions[i % len(captions)] or "" for i in range(n)]
