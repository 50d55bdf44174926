"""Training steps/s reading from Parquet training shards against the same steps on batches already in memory.

    python bench/train.py                         # CPU: depth-2 MMDiT, SD3-sized tensors at 256^2
    python bench/train.py --device cuda --depth 24 --batch 8 --resolution 1024 --steps 50   # on a GPU

Both runs train the same model from the same seed for the same number of steps on the same batches
(the memory run gets the batches the reader produced, read beforehand); only where the batches come from
differs. Target: shards >= 0.9x of memory (the loader never starves the model). On a GPU it also prints
tokens/s and model FLOP utilisation (6 * parameters * tokens per second against the GPU's bf16 peak).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from curate.train.data import ShardBatches
from curate.train.loop import MemoryBatches, TrainConfig, train
from curate.train.model import build_mmdit, count_parameters, mmdit_config

BENCH = Path(__file__).resolve().parent


def sd3_sized_shard(folder: Path, n: int, resolution: int) -> str:
    spec = importlib.util.spec_from_file_location("bench_encode", BENCH / "encode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sd3_sized_shard(folder, n, resolution)


def run(config: TrainConfig, data) -> float:
    """Steps/s over the steps after the first few (model build and warm-up excluded)."""
    times: list[float] = []

    def log(line: str) -> None:
        times.append(time.perf_counter())

    train(config, data, log=log)
    # log lines come every `log_every` steps: rate between the first and the last
    return (config.steps - config.log_every) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        shard = sd3_sized_shard(Path(tmp) / "encode", args.samples, args.resolution)
        common = dict(
            depth=args.depth,
            steps=args.steps,
            batch_size=args.batch,
            device=args.device,
            log_every=max(1, args.steps // 8),
            checkpoint_every=10**9,
            encoder_dropout=0.464,
        )
        reader = ShardBatches(shard, args.batch, seed=0)
        in_memory = list(itertools.islice(iter(ShardBatches(shard, args.batch, seed=0)), args.steps))
        rows = []
        for round_ in range(args.rounds):  # alternate, so machine noise hits both alike
            shards_rate = run(TrainConfig(output=f"{tmp}/s{round_}", **common), ShardBatches(shard, args.batch, seed=0))
            memory_rate = run(TrainConfig(output=f"{tmp}/m{round_}", **common), MemoryBatches(in_memory))
            rows.append((shards_rate, memory_rate))
        best_shards = max(r[0] for r in rows)
        best_memory = max(r[1] for r in rows)
        config = mmdit_config(args.depth, joint_attention_dim=reader.joint_attention_dim)
        model = build_mmdit(
            args.depth, joint_attention_dim=reader.joint_attention_dim, pooled_projection_dim=reader.pooled_dim
        )
        params = count_parameters(model)
        tokens = args.batch * ((args.resolution // 16) ** 2 + 154)  # image patches + text tokens per step
        result = {
            "device": args.device,
            "depth": args.depth,
            "hidden": config["caption_projection_dim"],
            "parameters": params,
            "batch": args.batch,
            "resolution": args.resolution,
            "steps": args.steps,
            "shards_steps_per_s": round(best_shards, 3),
            "memory_steps_per_s": round(best_memory, 3),
            "ratio": round(best_shards / best_memory, 3),
            "tokens_per_s": round(best_shards * tokens, 1),
        }
        if args.device.startswith("cuda"):
            result["mfu"] = round(6 * params * best_shards * tokens / (args.peak_tflops * 1e12), 4)
        print("| source | steps/s |\n| --- | ---: |")
        for i, (s, m) in enumerate(rows):
            print(f"| shards, round {i} | {s:.3f} |\n| memory, round {i} | {m:.3f} |")
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
