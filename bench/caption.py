"""Caption stage throughput against a plain transformers generate loop, measured in the same run.

    python bench/caption.py                     # CPU, a small random-weight Qwen2-VL (~2 minutes)
    python bench/caption.py --size 2b --images 256 --batch-size 32 --max-new-tokens 64   # on a GPU

Both sides caption the same images with the same model weights, batch size, prompt and greedy settings:

- reference: images decoded beforehand (not timed), then `processor(...)` -> `model.generate` ->
  `batch_decode` of the new tokens, batch after batch: the loop a user would write;
- stage: the caption stage's `process` on an image shard, timed whole: it reads the Parquet shard,
  decodes the images, preprocesses, generates, cleans the text and builds the output table.

Runs alternate (stage, reference, stage, ...) and the best of each is reported, so a noisy shared
machine penalises neither side. "input wait" is the share of the stage's model loop spent waiting for
the next prepared batch (decode + processor running in background threads); near 0 means the model
never starves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from image_shard import write_image_shard
from PIL import Image


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Real sample photos (the demo set) plus noise images of mixed sizes, as JPEG/PNG files."""
    from curate.samples import write_samples

    write_samples(folder)
    rng = np.random.default_rng(seed)
    have = len([p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp")])
    for i in range(max(0, count - have)):
        w, h = int(rng.integers(160, 900)), int(rng.integers(160, 900))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(folder / f"noise-{i:04d}.jpg", quality=90)


def reference_loop(model, processor, images, prompt_text, batch_size, max_new_tokens):
    """The plain transformers loop: returns (captions, seconds)."""
    import torch

    captions = []
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(
            images=[[i] for i in batch], text=[prompt_text] * len(batch), padding=True, return_tensors="pt"
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        captions += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return captions, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["small", "2b"], default="small")
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

    from curate.caption.vlm import Captioner
    from curate.config import ModelSpec, Resources
    from curate.images import open_image
    from curate.runfolder import ShardTask
    from curate.stages.caption import CaptionConfig, process
    from curate.stages.spec import WorkContext
    from curate.testing.tiny_vlm import QWEN2_VL_2B, Qwen2VLSize, build_tiny_qwen2_vl

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    size = QWEN2_VL_2B if args.size == "2b" else Qwen2VLSize(hidden_size=128, intermediate_size=256, layers=2)
    t0 = time.perf_counter()
    model_dir = build_tiny_qwen2_vl(
        work / "model",
        size,
        max_pixels=28 * 28 * (256 if args.size == "2b" else 64),
        initializer_range=0.02 if args.size == "2b" else 0.5,
        dtype=dtype if args.size == "2b" else "float32",
    )
    make_images(work / "images", args.images)
    run = write_image_shard(work / "run", work / "images", captions="none")
    where = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)"
    print(
        f"setup {time.perf_counter() - t0:.1f}s: {args.size} Qwen2-VL random weights, {args.images} images, "
        f"batch {args.batch_size}, {args.max_new_tokens} new tokens, {dtype} on {where}"
    )

    spec = ModelSpec(path=str(model_dir), dtype=dtype)
    config = CaptionConfig(
        kind="caption",
        decode_threads=args.decode_threads,
        max_new_tokens=args.max_new_tokens,
        clean=True,
        resources=Resources(batch_size=args.batch_size),
    )
    captioner = Captioner(spec, config.loading(), config.generation())
    context = WorkContext(run.uri, "caption", run.stage("ingest").uri, {"captioner": spec})
    task = ShardTask(0, (run.stage("ingest").shard(0),))

    # the reference gets the same decoded, size-capped images the stage feeds its processor
    from curate import storage

    def decode_all() -> list[Image.Image]:
        table = storage.read_parquet(run.stage("ingest").shard(0), columns=["image", "status"])
        images = []
        for data, status in zip(table["image"].to_pylist(), table["status"].to_pylist(), strict=True):
            if status == "ok":
                image = open_image(data).image
                image.thumbnail((config.max_image_side, config.max_image_side), Image.Resampling.BICUBIC)
                images.append(image)
        return images

    decoded = decode_all()
    model, processor, prompt = captioner.model, captioner.processor, captioner.text_prompt

    # warm-up (first-call allocations, kernels)
    reference_loop(model, processor, decoded[: args.batch_size], prompt, args.batch_size, 4)

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
        ref_captions, seconds = reference_loop(model, processor, decoded, prompt, args.batch_size, args.max_new_tokens)
        times["ref"].append(seconds)
        started = time.perf_counter()
        reference_loop(model, processor, decode_all(), prompt, args.batch_size, args.max_new_tokens)
        times["ref+decode"].append(time.perf_counter() - started)

    generated = [r for r in stage_rows.to_pylist() if r["tokens_generated"] is not None]
    ok = [r for r in generated if r["status"] == "ok"]
    n = len(decoded)
    same = sum(r["caption_raw"] == c for r, c in zip(generated, ref_captions, strict=True))
    rate = {path: n / min(seconds) for path, seconds in times.items()}
    print()
    print("| path | images | best s | captions/s | vs generate loop |")
    print("| --- | ---: | ---: | ---: | ---: |")
    labels = {
        "ref": "transformers generate loop, images decoded beforehand (untimed)",
        "ref+decode": "transformers generate loop, decoding timed (sequential)",
        "stage": "caption stage process(): read shard, decode, generate, clean",
    }
    for path, label in labels.items():
        print(f"| {label} | {n} | {min(times[path]):.2f} | {rate[path]:.2f} | {rate[path] / rate['ref']:.2f}x |")
    print()
    print(f"stage input wait share: {statistics.median(waits):.1%} of its model loop (median of {args.repeats} runs)")
    print(f"stage raw text equal to the generate loop's: {same}/{n}; status ok: {len(ok)}/{n}")
    if cuda:
        print(f"captions/s per GPU: {rate['stage']:.2f} ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
