"""Caption stage throughput against a plain transformers generate loop, per VLM family, measured in the same run.

    python bench/caption.py                          # CPU, Qwen2-VL, small random weights (~2 minutes)
    python bench/caption.py --family all             # every family the stage drives, one table
    python bench/caption.py --family gemma3,florence2 --images 24
    python bench/caption.py --size 2b --images 256 --batch-size 32 --max-new-tokens 64   # Qwen2-VL-2B layout, GPU

Each family is a random-weight model of its real architecture (curate.testing.tiny_vlms; `small`: a
128-wide, 2-layer language model), loaded through the stage's loading path, prompted the way
configs/captioners.yaml prompts it. Both sides caption the same images with the same weights, batch size,
prompt and greedy settings:

- reference: images decoded beforehand (not timed), then `processor(...)` -> `model.generate` ->
  `batch_decode` of the new tokens, batch after batch: the loop a user would write;
- stage: the caption stage's `process` on an image shard, timed whole: it reads the Parquet shard,
  decodes the images, preprocesses, generates, cleans the text and builds the output table.

Runs alternate (stage, reference, reference with decoding, ...) and the best of each is reported, so a noisy
shared machine penalises neither side. "wait" is the share of the stage's model loop spent waiting for the
next prepared batch (decode + processor running in background threads); near 0 means the model never starves.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from image_shard import write_image_shard
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cpu_header() -> str:
    """The CPU model and the flags that decide matrix speed (lscpu), for the header."""
    try:
        info = dict(
            line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        )
    except (OSError, ValueError):
        return "cpu: lscpu unavailable"
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    have = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    return f"cpu: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: {have}"


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Real sample photos (the demo set) plus noise images of mixed sizes, as JPEG/PNG files."""
    from curate.samples import write_samples

    write_samples(folder)
    rng = np.random.default_rng(seed)
    have = len([p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp")])
    for i in range(max(0, count - have)):
        w, h = int(rng.integers(160, 900)), int(rng.integers(160, 900))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(folder / f"noise-{i:04d}.jpg", quality=90)


def reference_loop(captioner, images, batch_size, max_new_tokens):
    """The plain transformers loop: returns (captions, seconds)."""
    import torch

    model, processor, prompt = captioner.model, captioner.processor, captioner.text_prompt
    captions = []
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(
            images=[[i] for i in batch], text=[prompt] * len(batch), padding=True, return_tensors="pt"
        ).to(model.device)
        inputs.pop("labels", None)  # PaliGemma's processor returns training labels
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, 1:] if model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1] :]
        captions += processor.batch_decode(new, skip_special_tokens=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return captions, time.perf_counter() - started


def bench_family(family: str, args, work: Path, run, dtype: str) -> dict:
    import torch

    from curate import storage
    from curate.caption.vlm import Captioner
    from curate.config import ModelSpec, Resources
    from curate.images import open_image
    from curate.runfolder import ShardTask
    from curate.stages.caption import CaptionConfig, process
    from curate.stages.spec import WorkContext
    from curate.testing.tiny_vlm import QWEN2_VL_2B, build_tiny_qwen2_vl
    from curate.testing.tiny_vlms import BUILDERS
    from curate.testing.vlm_parts import SMALL

    cuda = torch.cuda.is_available()
    if args.size == "2b":
        model_dir = build_tiny_qwen2_vl(
            work / family, QWEN2_VL_2B, max_pixels=28 * 28 * 256, initializer_range=0.02, dtype=dtype
        )
    else:
        model_dir = BUILDERS[family](work / family, SMALL)
    entry = yaml.safe_load((REPO / "configs" / "captioners.yaml").read_text())[family]["caption"]
    stage_fields = {k: v for k, v in entry.items() if k in ("prompt", "task_prompt", "system_prompt")}
    spec = ModelSpec(path=str(model_dir), dtype=dtype)
    config = CaptionConfig(
        kind="caption",
        decode_threads=args.decode_threads,
        max_new_tokens=args.max_new_tokens,
        resources=Resources(batch_size=args.batch_size),
        **stage_fields,
    )
    captioner = Captioner(spec, config.loading(), config.generation())
    context = WorkContext(run.uri, "caption", run.stage("ingest").uri, {"captioner": spec})
    task = ShardTask(0, (run.stage("ingest").shard(0),))

    def decode_all() -> list[Image.Image]:  # the same decoded, size-capped images the stage feeds its processor
        table = storage.read_parquet(run.stage("ingest").shard(0), columns=["image", "status"])
        images = []
        for data, status in zip(table["image"].to_pylist(), table["status"].to_pylist(), strict=True):
            if status == "ok":
                image = open_image(data).image
                image.thumbnail((config.max_image_side, config.max_image_side), Image.Resampling.BICUBIC)
                images.append(image)
        return images

    decoded = decode_all()
    reference_loop(captioner, decoded[: args.batch_size], args.batch_size, 4)  # warm-up
    times: dict[str, list[float]] = {"ref": [], "ref+decode": [], "stage": []}
    waits = []
    stage_rows = ref_captions = None
    for _ in range(args.repeats):  # interleaved, so load changes hit every path alike
        started = time.perf_counter()
        output = process(config, task, context, captioner)
        if cuda:
            torch.cuda.synchronize()
        times["stage"].append(time.perf_counter() - started)
        extra = output.extra
        waits.append(extra["input_wait_seconds"] / max(1e-9, extra["input_wait_seconds"] + extra["generate_seconds"]))
        stage_rows = output.table
        ref_captions, seconds = reference_loop(captioner, decoded, args.batch_size, args.max_new_tokens)
        times["ref"].append(seconds)
        started = time.perf_counter()
        reference_loop(captioner, decode_all(), args.batch_size, args.max_new_tokens)
        times["ref+decode"].append(time.perf_counter() - started)
    generated = [r for r in stage_rows.to_pylist() if r["tokens_generated"] is not None]
    n = len(decoded)
    return {
        "family": family,
        "images": n,
        "best": {path: min(seconds) for path, seconds in times.items()},
        "wait": statistics.median(waits),
        # the stage orders a shard's images by size; compare as multisets of (raw text)
        "same": sum(min(a, b) for a, b in _counts([r["caption_raw"] for r in generated], ref_captions)),
        "ok": sum(r["status"] == "ok" for r in generated),
        "tokens": sum(r["tokens_generated"] for r in generated),
    }


def _counts(left: list[str], right: list[str]) -> list[tuple[int, int]]:
    keys = set(left) | set(right)
    return [(left.count(k), right.count(k)) for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_vl", help="model_type(s), comma-separated, or all")
    parser.add_argument("--size", choices=["small", "2b"], default="small", help="2b: Qwen2-VL-2B layout only")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16; default: bf16 on GPU")
    args = parser.parse_args()

    import torch

    from curate.testing.tiny_vlms import BUILDERS

    families = list(BUILDERS) if args.family == "all" else args.family.split(",")
    unknown = [f for f in families if f not in BUILDERS]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)} (known: {', '.join(BUILDERS)}, all)")
    if args.size == "2b" and families != ["qwen2_vl"]:
        parser.error("--size 2b builds the Qwen2-VL-2B layout only: use --family qwen2_vl")
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    t0 = time.perf_counter()
    make_images(work / "images", args.images)
    run = write_image_shard(work / "run", work / "images", captions="none")
    where = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)"
    print(cpu_header())
    ready = time.perf_counter() - t0
    print(
        f"{args.images} images, batch {args.batch_size}, {args.max_new_tokens} new tokens, {dtype} on {where}, "
        f"{args.size} random weights, best of {args.repeats} alternating runs (images ready in {ready:.1f}s)"
    )
    print()
    print(
        "| family | images | generate loop s | loop with decoding s | stage s | stage vs loop | "
        "stage vs loop with decoding | stage wait | same text | captions/s (stage) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family in families:
        row = bench_family(family, args, work, run, dtype)
        best, n = row["best"], row["images"]
        print(
            f"| {family} | {n} | {best['ref']:.2f} | {best['ref+decode']:.2f} | {best['stage']:.2f} | "
            f"{best['ref'] / best['stage']:.2f}x | {best['ref+decode'] / best['stage']:.2f}x | {row['wait']:.0%} | "
            f"{row['same']}/{n} | {n / best['stage']:.2f} |",
            flush=True,
        )
    if cuda:
        print(f"captions/s per GPU above: {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
