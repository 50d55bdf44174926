"""bench/gpu.py's rows for the training loop (MMDiT steps from encode shards against batches in memory) and for
dedup's products on the GPU (against the CPU path on the same machine, with the decisions compared)."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import replace
from typing import Any

from gpu_common import Ctx, Row, clock, peak_memory
from gpu_flops import train_flops


class _Enough(Exception):
    """Raised from the trainer's log callback once the timed steps are done: the loop stops before the final
    checkpoint (a depth-24 model, its EMA and AdamW state are 32 GB to write)."""


def _steps_per_second(ctx: Ctx, data: Any, depth: int, batch: int, warm: int, steps: int) -> float:
    """Steps/s of curate.train.loop.train over ``steps`` steps after ``warm`` (model build, first kernels out)."""
    from curate.train.loop import train
    from curate.train.settings import TrainConfig

    stamps: list[float] = []

    def log(line: str) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) > warm + steps:
            raise _Enough

    config = TrainConfig(
        output=str(ctx.work / f"train-{len(list(ctx.work.glob('train-*')))}"),
        depth=depth,
        steps=10**9,
        batch_size=batch,
        device=ctx.device,
        log_every=1,
        checkpoint_every=10**9,
    )
    with contextlib.suppress(_Enough):
        train(config, data, log=log)
    return steps / (stamps[warm + steps] - stamps[warm])


def bench_train(ctx: Ctx, budget_end: float) -> list[Row]:
    from encode import sd3_sized_shard  # bench/encode.py: an encode shard with SD3's tensor sizes

    from curate.train.data import ShardBatches
    from curate.train.loop import MemoryBatches

    s = ctx.sizes
    depth, resolution, batch, steps = s.mmdit_depth, s.train_resolution, s.train_batch, s.train_steps
    flops, parameters = train_flops(s)
    label = f"MMDiT depth {depth} ({parameters / 1e9:.2f}B)"
    note = ""
    if ctx.dry_run:  # the real width counted on meta above; the loop itself at depth 2 (a CPU holds no 2B model)
        note = f"dry run: depth {depth} ({parameters / 1e9:.2f}B, {flops / 1e12:.1f} TFLOP a step) on meta only"
        depth, resolution, batch, steps = 2, 64, 2, 2
        flops, label = None, "MMDiT depth 2"
    shard = sd3_sized_shard(ctx.work / "encode", max(4 * batch, 8), resolution)
    warm = 2 if s.warmup else 1
    in_memory = list(itertools.islice(iter(ShardBatches(shard, batch, seed=0)), 4))
    started = time.perf_counter()
    shards_rate = _steps_per_second(ctx, ShardBatches(shard, batch, seed=0), depth, batch, warm, steps)
    spent = time.perf_counter() - started
    if not ctx.dry_run and time.perf_counter() + spent > budget_end:  # the reference run gets what is left
        per_step = 1 / shards_rate
        setup = spent - (warm + steps) * per_step
        fits = int((budget_end - time.perf_counter() - setup) / per_step) - warm
        note = f"memory side cut to {max(2, fits)} of {steps} steps by the budget"
        steps = max(2, min(steps, fits))
    memory_rate = _steps_per_second(ctx, MemoryBatches(in_memory), depth, batch, warm, steps)
    return [
        Row(
            "train",
            f"{label}, {resolution}px, batch {batch}, bf16 autocast",
            "steps",
            steps,
            shards_rate,
            memory_rate,
            flops,
            peak_memory(ctx),
            "; ".join(
                filter(None, [note, f"images/s {shards_rate * batch:.1f}; bare: the same loop on batches in memory"])
            ),
        )
    ]


def bench_dedup(ctx: Ctx, budget_end: float) -> list[Row]:
    import numpy as np

    from curate.dedup.cluster import DedupParams, dedup, planted_vectors

    n, cut = ctx.sizes.dedup_rows, ""
    if budget_end - time.perf_counter() < 30 and n > 100_000:  # the CPU path alone takes seconds per 100k rows
        n, cut = 100_000, f"cut to 100,000 of {n:,} rows by the budget; "
    x, _ = planted_vectors(n, seed=0)
    x = x.astype(np.float16)  # what the sscd stage stores
    params = DedupParams()
    device = ctx.device if ctx.cuda else "cpu"  # on a CPU: the device code on the CPU (what tests check)
    on_device = replace(params, device=device)
    if ctx.sizes.warmup:
        dedup(x[:5000], params=on_device)  # kernels, cuBLASLt plans
    device_s, found = clock(ctx, lambda: dedup(x, params=on_device))
    device_peak = peak_memory(ctx)
    cpu_s, reference = clock(ctx, lambda: dedup(x, params=params))
    same = all(
        np.array_equal(getattr(found, f), getattr(reference, f), equal_nan=True)
        for f in ("keep", "dup_of", "similarity", "cluster")
    )
    steps = ", ".join(f"{k} {v:.2f}" for k, v in found.seconds.items())
    return [
        Row(
            "dedup",
            f"in-memory global step, torch products on {device} (int8 nearest, bf16 candidates)",
            "rows",
            n,
            n / device_s,
            n / cpu_s,
            None,
            device_peak,
            f"{cut}bare: the CPU path on {ctx.cpus} cores (stage/bare = speed-up); decisions identical: {same}; "
            f"removed {int((~found.keep).sum())}; device seconds: {steps}",
            None if same else "the device path's decisions differ from the CPU path's",
        )
    ]
