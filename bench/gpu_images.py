"""bench/gpu.py's rows for the image stages: sscd, score, encode (and its models one by one), caption.

Each builds the real architecture with random weights (or the tiny one), saves it in the format the stage loads,
loads it through the stage's own `setup`, and times the stage's `process` on an ingest shard (read, decode,
resize, batch, model, output table) against the bare model on inputs already prepared on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpu_common import (
    Ctx,
    Row,
    afford,
    clock,
    count_flops,
    image_shard,
    peak_memory,
    pool_captions,
    pool_images,
)
from gpu_flops import encode_flops, score_flops, sscd_flops


@dataclass
class Measured:
    items: int
    stage_s: float  # best run
    bare_s: float
    extra: dict[str, Any]  # the last stage run's marker counters
    note: str


def measure(ctx: Ctx, budget_end: float, batch: int, default: int, stage, bare) -> Measured:
    """``stage(n) -> (seconds, extra)`` and ``bare(n) -> seconds``: a warm-up batch of each (kernels, autotuning,
    the allocator), then ``repeats`` runs of each on as many items as fit the budget, alternated (stage, bare,
    bare, stage, ...) so drift hits both alike; the best run of each counts."""
    if ctx.dry_run:
        seconds, extra = stage(batch)
        return Measured(batch, seconds, bare(batch), extra, "dry run: one batch, not a measurement")
    if ctx.sizes.warmup:
        stage(batch)
        bare(batch)
    n, note = min(default, batch), ""
    if default > batch:
        t_stage, _ = stage(batch)
        per_item = (t_stage + bare(batch)) / batch
        n, note = afford(ctx, budget_end, per_item, default, batch, sides=1)
    times: dict[str, list[float]] = {"stage": [], "bare": []}
    extra: dict[str, Any] = {}
    for repeat in range(ctx.sizes.repeats):
        for side in ("stage", "bare") if repeat % 2 == 0 else ("bare", "stage"):
            if side == "stage":
                seconds, extra = stage(n)
            else:
                seconds = bare(n)
            times[side].append(seconds)
    return Measured(n, min(times["stage"]), min(times["bare"]), extra, note)


def _shards(ctx: Ctx):
    made: dict[int, Any] = {}

    def shard(n: int):
        if n not in made:
            made[n] = image_shard(ctx, n)
        return made[n]

    return shard


def _resources(ctx: Ctx, batch: int):
    from curate.config import Resources

    return Resources(num_cpus=ctx.cpus, num_gpus=1 if ctx.cuda else 0, batch_size=batch)


# -- sscd ------------------------------------------------------------------------------------------------------------


def bench_sscd(ctx: Ctx, budget_end: float) -> list[Row]:
    import torch

    from curate.config import ModelSpec
    from curate.stages.spec import WorkContext
    from curate.stages.sscd import SscdConfig, process, setup
    from curate.testing.tiny_sscd import build_sscd_torchscript

    s = ctx.sizes
    path = build_sscd_torchscript(ctx.work / "sscd.torchscript.pt", s.sscd_trunk)  # type: ignore[arg-type]
    config = SscdConfig(kind="sscd", size=s.sscd_size, decode_threads=ctx.cpus, resources=_resources(ctx, s.sscd_batch))
    context = WorkContext(ctx.run_uri, "sscd", ctx.ingest_uri, {"sscd": ModelSpec(path=str(path))})
    state = setup(config, context)
    shard = _shards(ctx)
    device = state.model.device
    x = torch.randn(s.sscd_batch, 3, s.sscd_size, s.sscd_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def stage(n: int):
        task = shard(n)
        seconds, out = clock(ctx, lambda: process(config, task, context, state))
        assert out.extra["embedded"] == n, out.extra
        return seconds, out.extra

    def bare(n: int) -> float:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(math.ceil(n / s.sscd_batch)):
                    state.model.runner(x)

        return clock(ctx, run)[0]

    got = measure(ctx, budget_end, s.sscd_batch, s.sscd_items, stage, bare)
    flops, _ = sscd_flops(s)
    return [
        Row(
            "sscd",
            f"SSCD {s.sscd_trunk} TorchScript fp32, {s.sscd_size}px, batch {s.sscd_batch}",
            "images",
            got.items,
            got.items / got.stage_s,
            got.items / got.bare_s,
            flops,
            peak_memory(ctx),
            "; ".join(filter(None, [got.note, f"{ctx.cpus} decode threads"])),
        )
    ]


# -- score -----------------------------------------------------------------------------------------------------------


def _clip_models(ctx: Ctx) -> dict[str, Any]:
    """The clip_scorer and two heads (LAION aesthetic MLP, linear NSFW) as files, as model specs."""
    import torch

    from curate.config import ModelSpec
    from curate.testing.tiny_clip import build_tiny_clip, laion_mlp

    arch = ctx.sizes.clip
    if arch == "tiny":
        paths = build_tiny_clip(ctx.models or ctx.work / "clip")
        return {
            "clip_scorer": ModelSpec(path=str(paths["clip"])),
            "aesthetic_head": ModelSpec(path=str(paths["aesthetic"])),
            "nsfw_head": ModelSpec(path=str(paths["nsfw"])),
        }

    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    width = int(model.text_projection.shape[-1])
    folder = ctx.work / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    del model
    torch.save(laion_mlp(width).state_dict(), folder / "aesthetic.pth")
    torch.save(torch.nn.Linear(width, 1).state_dict(), folder / "nsfw.pth")
    return {
        "clip_scorer": ModelSpec(path=str(folder / "model.safetensors"), architecture=arch),
        "aesthetic_head": ModelSpec(path=str(folder / "aesthetic.pth")),
        "nsfw_head": ModelSpec(path=str(folder / "nsfw.pth")),
    }


def bench_score(ctx: Ctx, budget_end: float) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from curate.stages.score import ScoreConfig, process, setup
    from curate.stages.spec import WorkContext

    s = ctx.sizes
    models = _clip_models(ctx)
    config = ScoreConfig(kind="score", decode_threads=ctx.cpus, resources=_resources(ctx, s.score_batch))
    context = WorkContext(ctx.run_uri, "score", ctx.ingest_uri, models)
    state = setup(config, context)
    scorer = state.scorer
    side = scorer.model.visual.image_size
    side = side[0] if isinstance(side, tuple | list) else side
    pixels = torch.randn(s.score_batch, 3, side, side, device=scorer.device).to(scorer.input_dtype)
    tokens = scorer.tokenizer(pool_captions(ctx, s.score_batch)).to(scorer.device)
    shard = _shards(ctx)

    def stage(n: int):
        task = shard(n)
        seconds, out = clock(ctx, lambda: process(config, task, context, state))
        assert out.extra["scored"] == n, out.extra
        return seconds, out.extra

    def bare(n: int) -> float:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(math.ceil(n / s.score_batch)):
                    image = F.normalize(scorer.model.encode_image(pixels).float(), dim=-1)
                    text = F.normalize(scorer.model.encode_text(tokens).float(), dim=-1)
                    (image * text).sum(-1)

        return clock(ctx, run)[0]

    got = measure(ctx, budget_end, s.score_batch, s.score_items, stage, bare)
    flops, _ = score_flops(s)
    return [
        Row(
            "score",
            f"open_clip {models['clip_scorer'].architecture or 'tiny'} {str(scorer.input_dtype)[6:]} + 2 heads, "
            f"batch {s.score_batch}",
            "images",
            got.items,
            got.items / got.stage_s,
            got.items / got.bare_s,
            flops,
            peak_memory(ctx),
            "; ".join(filter(None, [got.note, f"{ctx.cpus} decode threads; bare: image + text towers"])),
        )
    ]


# -- encode ----------------------------------------------------------------------------------------------------------

ENCODERS = {"clip_l": "CLIP-L text", "clip_g": "OpenCLIP bigG text", "t5": "T5-XXL encoder"}


def _sd3_folder(ctx: Ctx):
    from curate.testing.tiny_sd3 import build_tiny_sd3

    s = ctx.sizes
    if s.sd3 == "tiny" and ctx.models is not None and (ctx.models / "sd3").is_dir():
        return ctx.models / "sd3"
    return build_tiny_sd3(ctx.work / "sd3", s.sd3, device=ctx.device, dtype=s.dtype)


def bench_encode(ctx: Ctx, budget_end: float) -> list[Row]:
    import time

    import torch

    from curate.config import ModelSpec
    from curate.stages.encode import EncodeConfig, process, setup
    from curate.stages.spec import WorkContext
    from curate.testing.tiny_sd3 import model_specs

    s = ctx.sizes
    folder = _sd3_folder(ctx)
    dtype = s.dtype if ctx.cuda else None
    specs = {role: ModelSpec(**spec, dtype=dtype) for role, spec in model_specs(folder).items()}
    context = WorkContext(ctx.run_uri, "encode", ctx.ingest_uri, specs)

    def config_for(resolution: int, batch: int) -> EncodeConfig:
        return EncodeConfig(
            kind="encode",
            base_resolution=resolution,
            dtype="bfloat16",
            max_upscale=16.0,
            decode_threads=ctx.cpus,
            resources=_resources(ctx, batch),
        )

    state = setup(config_for(*s.encode[0][:2]), context)
    text, vae, device = state.text, state.vae, state.device
    flops = {name: f for name, (f, _) in encode_flops(s).items()}
    text_flops = {role: flops[role] for role in ENCODERS}
    ids_of = {}
    for role, tokenizer, length in (
        ("clip_l", text.tokenizer_l, 77),
        ("clip_g", text.tokenizer_g, 77),
        ("t5", text.tokenizer_t5, 77),
    ):
        ids_of[role] = lambda n, tok=tokenizer, length=length: tok(
            pool_captions(ctx, n), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
    shard = _shards(ctx)
    rows: list[Row] = []
    parts: dict[str, float] = {}
    for k, (resolution, batch, default) in enumerate(s.encode):
        config = config_for(resolution, batch)
        pixels = torch.randn(batch, 3, resolution, resolution, device=device, dtype=vae.dtype)
        ids = {role: ids_of[role](batch) for role in ENCODERS}

        def stage(n: int, config=config):
            task = shard(n)
            seconds, out = clock(ctx, lambda: process(config, task, context, state))
            assert out.extra["encoded"] == n, out.extra
            return seconds, out.extra

        def bare(n: int, pixels=pixels, ids=ids, batch=batch, resolution=resolution) -> float:
            """The VAE on a batch of pixels, then each text encoder on token ids (as encode_prompt calls them)."""
            runs = math.ceil(n / batch)
            calls = {
                f"vae{resolution}": lambda: vae.encode(pixels).latent_dist.mean,
                "clip_l": lambda: text.clip_l(ids["clip_l"], output_hidden_states=True),
                "clip_g": lambda: text.clip_g(ids["clip_g"], output_hidden_states=True),
                "t5": lambda: text.t5(ids["t5"]),
            }
            with torch.inference_mode():
                for name, call in calls.items():
                    parts[name] = clock(ctx, lambda call=call: [call() for _ in range(runs)])[0]
            return sum(parts[name] for name in calls)

        end = time.perf_counter() + (budget_end - time.perf_counter()) / (len(s.encode) - k)
        got = measure(ctx, end, batch, default, stage, bare)  # `parts`: the last bare run's, on got.items
        vae_flops = flops[f"vae{resolution}"]
        rows.append(
            Row(
                f"encode {resolution}",
                f"SD3 VAE + CLIP-L + bigG + T5-XXL{'' if isinstance(s.sd3, str) else ' (T5 cut)'}, "
                f"{s.dtype if ctx.cuda else 'float32'}, batch {batch}",
                "images",
                got.items,
                got.items / got.stage_s,
                got.items / got.bare_s,
                vae_flops + sum(text_flops.values()),
                peak_memory(ctx),
                "; ".join(filter(None, [got.note, "bare: the sum of the rows below; one caption per image"])),
            )
        )
        vae_rate = got.items / parts[f"vae{resolution}"]
        rows.append(Row(f"  vae {resolution}", f"SD3 VAE encoder, {resolution}px", "images", got.items, None, vae_rate,
                        vae_flops))  # fmt: skip
        if k == 0:
            for role, label in ENCODERS.items():
                rate = got.items / parts[role]
                rows.append(Row(f"  {role}", label, "prompts", got.items, None, rate, text_flops[role]))
    return rows


# -- caption ---------------------------------------------------------------------------------------------------------


VLM_LABELS = {"tiny": "tiny Qwen2.5-VL", "3b": "Qwen2.5-VL-3B", "3b-cut": "Qwen2.5-VL-3B widths, 1 layer + 1 block"}


def _vlm_folder(ctx: Ctx):
    from curate.testing.tiny_vlms import build_qwen2_5_vl, build_qwen2_5_vl_3b

    folder = ctx.work / "vlm"
    if ctx.sizes.vlm == "tiny":
        return build_qwen2_5_vl(folder)
    cut = {"text_layers": 1, "vision_depth": 1} if ctx.sizes.vlm == "3b-cut" else {}
    return build_qwen2_5_vl_3b(folder, device=ctx.device, dtype=ctx.sizes.dtype if ctx.cuda else "float32", **cut)


def bench_caption(ctx: Ctx, budget_end: float) -> list[Row]:
    from PIL import Image

    from curate.config import ModelSpec
    from curate.stages.caption import CaptionConfig, process, setup
    from curate.stages.spec import WorkContext

    s = ctx.sizes
    folder = _vlm_folder(ctx)
    spec = ModelSpec(path=str(folder), dtype=s.dtype if ctx.cuda else None)
    config = CaptionConfig(
        kind="caption", max_new_tokens=s.new_tokens, decode_threads=ctx.cpus, resources=_resources(ctx, s.caption_batch)
    )
    context = WorkContext(ctx.run_uri, "caption", ctx.ingest_uri, {"captioner": spec})
    captioner = setup(config, context)
    # a fixed number of new tokens: random weights would end captions anywhere (EOS is suppressed until then)
    captioner.generation_config.min_new_tokens = s.new_tokens
    images = pool_images(ctx, len(ctx.pool))
    for image in images:  # what the stage feeds its processor (max_image_side), smallest first as it batches
        image.thumbnail((config.max_image_side, config.max_image_side), Image.Resampling.BICUBIC)
    images.sort(key=lambda im: (im.size[0] * im.size[1], im.size[0] / im.size[1]))
    prepared: dict[int, list[Any]] = {}
    shard = _shards(ctx)

    def batches(n: int) -> list[Any]:  # processor outputs made before timing: the bare model's input
        if n not in prepared:
            chosen = sorted((images[i % len(images)] for i in range(n)), key=lambda im: im.size[0] * im.size[1])
            prepared[n] = [captioner.prepare(chosen[i : i + s.caption_batch]) for i in range(0, n, s.caption_batch)]
        return prepared[n]

    def stage(n: int):
        task = shard(n)
        seconds, out = clock(ctx, lambda: process(config, task, context, captioner))
        assert out.extra["fed_to_model"] == n and out.extra["batches_retried"] == 0, out.extra
        return seconds, out.extra

    def bare(n: int) -> float:
        ready = batches(n)
        return clock(ctx, lambda: [captioner.generate(inputs) for inputs in ready])[0]

    got = measure(ctx, budget_end, s.caption_batch, s.caption_items, stage, bare)
    one = captioner.prepare(images[len(images) // 2 : len(images) // 2 + 1])
    flops = count_flops(lambda: captioner.generate(one))
    tokens = got.extra.get("tokens_generated", 0)
    visual = int(one["image_grid_thw"].prod()) // 4 if "image_grid_thw" in one else 0
    return [
        Row(
            "caption",
            f"{VLM_LABELS[s.vlm]} transformers generate, "
            f"{s.dtype if ctx.cuda else 'float32'}, batch {s.caption_batch}, {s.new_tokens} new tokens",
            "images",
            got.items,
            got.items / got.stage_s,
            got.items / got.bare_s,
            flops,
            peak_memory(ctx),
            "; ".join(
                filter(
                    None,
                    [
                        got.note,
                        f"tokens/s: stage {tokens / got.stage_s:.0f}, bare {got.items * s.new_tokens / got.bare_s:.0f}",
                        f"~{visual} visual tokens for a median image",
                    ],
                )
            ),
        )
    ]
