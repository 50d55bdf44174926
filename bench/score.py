"""Score stage throughput against direct open_clip calls on the same batches, measured in the same run.

    python bench/score.py          # CPU: random-weight ViT-B-32, 48 images, 6 runs each (~2 min)
    python bench/score.py --arch ViT-L-14-quickgelu --images 2048 --batch-size 256 --decode-threads 16   # GPU

Both sides use the same random-weight open_clip model of a real architecture (saved as a checkpoint file and
loaded by the stage through `architecture` + `path`, as a user's checkpoint would be), the same images
and captions, and the same batch size:

- reference: images decoded and transformed with open_clip's own preprocess and captions tokenized
  beforehand (not timed); then per batch `encode_image` + `encode_text`, L2 normalisation and the cosine:
  the loop a user would write, with nothing else to do;
- stage: the score stage's `process` on an image shard, timed whole: it reads the Parquet shard, decodes,
  transforms and tokenizes on its threads, runs the model and the heads (LAION-format aesthetic MLP and a
  linear NSFW head) and builds the output table.

Runs alternate (stage, reference, reference, stage, ...) and the best of each is reported. Target: stage >= 0.9x the
reference. On a CPU the stage's decoding competes with the model for the same cores, so the ratio there
is a lower bound of what a GPU actor with enough CPUs gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from image_shard import write_image_shard
from PIL import Image

WORDS = ["a", "photo", "of", "the", "red", "blue", "small", "large", "cat", "dog", "house", "tree", "street"]


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """The demo's real sample photos, then random crops of them rescaled to 256-720 px (photo-like JPEGs, as
    a downloader's resized output is), each with a caption file."""
    from curate.samples import write_samples

    write_samples(folder, broken=False, duplicates=False)
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    have = len([p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp", ".gif")])
    for i in range(max(0, count - have)):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(256, 720)), int(rng.integers(256, 720)))
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC).save(
            folder / f"crop-{i:04d}.jpg", quality=90
        )
        (folder / f"crop-{i:04d}.txt").write_text(" ".join(rng.choice(WORDS, int(rng.integers(5, 30)))))


def reference_loop(scorer, batches) -> tuple[np.ndarray, float]:
    """Direct open_clip calls on prepared batches: returns (CLIP scores, seconds)."""
    import torch
    import torch.nn.functional as F

    model, scores = scorer.model, []
    started = time.perf_counter()
    with torch.inference_mode():
        for pixels, tokens in batches:
            image = F.normalize(model.encode_image(pixels.to(scorer.device, scorer.input_dtype)).float(), dim=-1)
            text = F.normalize(model.encode_text(tokens.to(scorer.device)).float(), dim=-1)
            scores.append((image * text).sum(-1).cpu().numpy())
    if scorer.device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.concatenate(scores), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", help="an open_clip architecture name (random weights)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores)")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16; default fp16 on GPU")
    args = parser.parse_args()

    import open_clip
    import torch
    from safetensors.torch import save_file

    from curate import storage
    from curate.config import ModelSpec, Resources
    from curate.images import open_image
    from curate.runfolder import ShardTask
    from curate.stages.score import ScoreConfig, process, setup
    from curate.stages.spec import WorkContext
    from curate.testing.tiny_clip import laion_mlp

    cuda = torch.cuda.is_available()
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch)
    width = int(model.text_projection.shape[-1])
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(work / "model.safetensors"))
    del model
    torch.save(laion_mlp(width).state_dict(), work / "aesthetic.pth")
    torch.save(torch.nn.Linear(width, 1).state_dict(), work / "nsfw.pth")
    make_images(work / "images", args.images)
    run = write_image_shard(work / "run", work / "images")

    models = {
        "clip_scorer": ModelSpec(path=str(work / "model.safetensors"), architecture=args.arch, dtype=args.dtype),
        "aesthetic_head": ModelSpec(path=str(work / "aesthetic.pth")),
        "nsfw_head": ModelSpec(path=str(work / "nsfw.pth")),
    }
    config = ScoreConfig(
        kind="score",
        decode_threads=args.decode_threads,
        resources=Resources(batch_size=args.batch_size, num_cpus=float(torch.get_num_threads())),
    )
    context = WorkContext(run.uri, "score", run.stage("ingest").uri, models)
    state = setup(config, context)
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    scorer = state.scorer
    task = ShardTask(0, (run.stage("ingest").shard(0),))
    where = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)"

    # the reference gets the stage's decoded images through open_clip's own preprocess and tokenizer
    table = storage.read_parquet(run.stage("ingest").shard(0), columns=["image", "status", "caption"])
    rows = [(d, c) for d, s, c in zip(*(table[k].to_pylist() for k in ("image", "status", "caption")), strict=True)]
    rows = [(d, c) for d, c in rows if c and c.strip()]
    pixels = torch.stack([scorer.transform(open_image(d).image) for d, _ in rows])
    tokens = scorer.tokenizer([c for _, c in rows])
    size = args.batch_size
    batches = [(pixels[i : i + size], tokens[i : i + size]) for i in range(0, len(rows), size)]
    n = len(rows)
    print(
        f"setup {time.perf_counter() - t0:.1f}s: {args.arch} random weights ({scorer.width}-d), {n} captioned images, "
        f"batch {size}, {scorer.input_dtype} on {where}"
    )

    reference_loop(scorer, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"ref": [], "stage": []}
    waits, model_times = [], []
    stage_scores = ref_scores = None
    for repeat in range(args.repeats):  # interleaved, first one side then the other, so load changes hit both alike
        for path in ("stage", "ref") if repeat % 2 == 0 else ("ref", "stage"):
            if path == "ref":
                ref_scores, seconds = reference_loop(scorer, batches)
                times["ref"].append(seconds)
                continue
            started = time.perf_counter()
            output = process(config, task, context, state)
            if cuda:
                torch.cuda.synchronize()
            times["stage"].append(time.perf_counter() - started)
            extra = output.extra
            model_times.append(extra["model_seconds"])
            total = extra["input_wait_seconds"] + extra["model_seconds"]
            waits.append(extra["input_wait_seconds"] / max(1e-9, total))
            stage_scores = np.array([v for v in output.table["clip_score"].to_pylist() if v is not None], np.float32)

    rate = {path: n / min(seconds) for path, seconds in times.items()}
    labels = {
        "ref": "open_clip encode_image + encode_text on prepared batches (decode, preprocess untimed)",
        "stage": "score stage process(): read shard, decode, preprocess, tokenize, model, 2 heads, table",
    }
    print()
    print("| path | images | best s | images/s | vs open_clip |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, label in labels.items():
        print(f"| {label} | {n} | {min(times[path]):.2f} | {rate[path]:.2f} | {rate[path] / rate['ref']:.2f}x |")
    print()
    print(f"stage / open_clip: {rate['stage'] / rate['ref']:.2f}x (target >= 0.9x)")
    print(
        "runs (s): stage " + " ".join(f"{t:.2f}" for t in times["stage"]),
        "| open_clip " + " ".join(f"{t:.2f}" for t in times["ref"]),
    )
    print("stage model seconds per run: " + " ".join(f"{t:.2f}" for t in model_times))
    print(f"stage input wait share: {statistics.median(waits):.1%} of its model loop (median of {args.repeats} runs)")
    print(f"max |clip_score stage - open_clip|: {float(np.abs(stage_scores - ref_scores).max()):.2e}")
    print(
        f"stage: {extra['fed_to_model']} images fed, {extra['batches']} batches, model {extra['model_seconds']:.2f}s, "
        f"input wait {extra['input_wait_seconds']:.2f}s (last run)"
    )
    if cuda:
        print(f"images/s per GPU: {rate['stage']:.1f} ({torch.cuda.get_device_name()}, {args.arch})")
    after = os.getloadavg()
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in after)}")


if __name__ == "__main__":
    main()
