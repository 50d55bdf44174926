"""`validate`: train a small MMDiT on the run's training shards, sample from it, and write a report.

The last stage of a pipeline answers "are these shards usable?" before a cluster is spent on them: the
loss must fall, the samples must come out, and the report puts the loss curve, a sample grid and every
stage's statistics on one page (RUN/validate/report.md with its images beside it).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, PositiveInt

from curate import storage
from curate.config import ModelSpec, StageConfig
from curate.runfolder import ShardTask, StageDir
from curate.stages.spec import ShardOutput, StageSpec, WorkContext
from curate.train.settings import TrainSettings

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("prompt_source", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


class ValidateConfig(StageConfig):
    kind: Literal["validate"]
    # the VAE decodes samples; configured prompts (not shard prompts) also need clip_l / clip_g (/ t5)
    model_roles: ClassVar[tuple[str, ...]] = ("vae",)
    optional_model_roles: ClassVar[tuple[str, ...]] = ("clip_l", "clip_g", "t5")

    train: TrainSettings = TrainSettings(steps=300, batch_size=8, learning_rate=5e-4, checkpoint_every=100)
    shard_prompts: int = Field(4, ge=0)  # captions taken from the shards, sampled with their stored embeddings
    prompts: tuple[str, ...] = ()  # more prompts, encoded with the pipeline's clip_l / clip_g (/ t5) models
    negative_prompt: str | None = None  # None: all-zero conditioning, the unconditional the dropout taught
    sample_steps: PositiveInt = 28
    guidance_scale: float = Field(5.0, ge=1.0)
    sample_shift: float = Field(3.0, gt=0)
    seed: int = 0

    def check_models(self, models: dict[str, ModelSpec]) -> list[tuple[tuple[Any, ...], str]]:
        """Configured prompts are encoded here, so they need the CLIP encoders (T5 stays optional)."""
        missing = [role for role in ("clip_l", "clip_g") if role not in models]
        if self.prompts and missing:
            return [(("prompts",), f"encoding prompts needs the models {' and '.join(missing)}, not defined")]
        return []


def plan(config: ValidateConfig, upstream: StageDir | None) -> list[ShardTask]:
    """One task: the whole training-shard folder is the input."""
    assert upstream is not None
    return [ShardTask(0, (upstream.uri,))]


def _checkpoint_folder(context: WorkContext) -> str:
    """Checkpoints on local disk: beside the shards for a local run, in a temporary folder for a remote one."""
    if storage.is_local(context.run_uri):
        return storage.resolve(storage.join(context.run_uri, context.stage_name, "train"))[1]
    digest = hashlib.sha256(context.run_uri.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"curate-validate-{digest}")


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def process(config: ValidateConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    import torch

    from curate.encode.models import load_vae
    from curate.stages.validate_report import write_report
    from curate.train.data import ShardBatches
    from curate.train.loop import pick_device, train
    from curate.train.model import load_trained
    from curate.train.sample import decode, sample_latents
    from curate.train.settings import TrainConfig

    (shards,) = task.inputs
    train_config = TrainConfig(**config.train.model_dump(), output=_checkpoint_folder(context), shards=shards)
    data = ShardBatches(shards, train_config.batch_size, seed=train_config.seed)
    result = train(train_config, data, log=lambda _: None)
    assert result.checkpoint is not None
    device = pick_device(train_config.device)
    model = load_trained(result.checkpoint, ema=True).to(device)

    first_rows = _first_rows(shards, max(1, config.shard_prompts))
    prompts, sources, embeds, pooled = _conditions(config, context, first_rows, model.config.joint_attention_dim)
    rows: list[dict[str, Any]] = []
    images: list[Any] = []
    if prompts:
        negative, negative_pooled = _negative(config, context, embeds, pooled, model.config.joint_attention_dim)
        _, _, latent_height, latent_width = first_rows["latent"].shape  # the first bucket's size
        height, width = latent_height * 8, latent_width * 8
        latents = sample_latents(
            model,
            *(t.to(device, torch.float32) for t in (embeds, pooled, negative, negative_pooled)),
            height,
            width,
            steps=config.sample_steps,
            guidance_scale=config.guidance_scale,
            shift=config.sample_shift,
            seed=config.seed,
        )
        images = decode(load_vae(context.models["vae"], str(device)), latents)
        for prompt, source, image in zip(prompts, sources, images, strict=True):
            rows.append(
                {
                    "key": hashlib.sha256(f"{prompt}#{config.seed}".encode()).hexdigest()[:24],
                    "prompt": prompt,
                    "prompt_source": source,
                    "image": _png(image),
                    "width": image.width,
                    "height": image.height,
                    "seed": config.seed,
                    "status": "ok",
                    "error": None,
                }
            )
    write_report(context, config, result, prompts, images)
    first, last = result.losses[:10], result.losses[-10:]
    extra = {
        "steps": len(result.losses),
        "loss_first10": sum(first) / max(1, len(first)),
        "loss_last10": sum(last) / max(1, len(last)),
        "steps_per_second": result.steps_per_second,
    }
    return ShardOutput(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), extra)


def _first_rows(shards: str, count: int) -> dict[str, Any]:
    """The first rows of the first row group, in file order: a fixed set of shard prompts."""
    from curate.shards import ShardDataset

    return next(iter(ShardDataset(shards, batch_size=count, shuffle=False, synthetic=False)))


def _conditions(
    config: ValidateConfig, context: WorkContext, first_rows: dict[str, Any], width: int
) -> tuple[list[str], list[str], Any, Any]:
    """Prompts to sample and their joined SD3 conditioning: shard captions (stored embeddings) first."""
    import torch

    from curate.sd3 import join_sd3, text_embeddings

    prompts, sources, embeds, pooled = [], [], [], []
    if config.shard_prompts:
        joined, joined_pooled = join_sd3(text_embeddings(first_rows), width=width)
        prompts += [caption or "" for caption in first_rows["caption"]]
        sources += ["shards"] * len(first_rows["caption"])
        embeds.append(joined.float())
        pooled.append(joined_pooled.float())
    if config.prompts:
        joined, joined_pooled = _encode_prompts(context, list(config.prompts), width)
        prompts += list(config.prompts)
        sources += ["config"] * len(config.prompts)
        embeds.append(joined)
        pooled.append(joined_pooled)
    if not prompts:
        return [], [], None, None
    return prompts, sources, torch.cat(embeds), torch.cat(pooled)


def _encode_prompts(context: WorkContext, prompts: list[str], width: int) -> tuple[Any, Any]:
    """Prompts through the pipeline's own text encoders, joined the SD3 way."""
    from curate.encode.models import encode_text, load_text_encoders
    from curate.sd3 import join_sd3
    from curate.train.data import from_encoder_output

    out = encode_text(load_text_encoders(context.models, "cpu"), prompts)
    return join_sd3(from_encoder_output(out), width=width)


def _negative(config: ValidateConfig, context: WorkContext, embeds: Any, pooled: Any, width: int) -> tuple[Any, Any]:
    import torch

    if config.negative_prompt is None:
        return torch.zeros_like(embeds), torch.zeros_like(pooled)
    negative, negative_pooled = _encode_prompts(context, [config.negative_prompt], width)
    return negative.expand(embeds.shape[0], -1, -1), negative_pooled.expand(pooled.shape[0], -1)


def task_rows(config: ValidateConfig, task: ShardTask) -> int:
    """One row per sample (the shard prompts may be fewer when the first row group is smaller)."""
    return config.shard_prompts + len(config.prompts)


def describe(config: ValidateConfig) -> str:
    t = config.train
    return f"MMDiT depth {t.depth}, {t.steps} steps of batch {t.batch_size}; {config.shard_prompts} shard prompts"


SPEC = StageSpec(
    kind="validate",
    config=ValidateConfig,
    summary="train a small SD3-style MMDiT on the training shards, sample it, write a report",
    schema=SAMPLE_SCHEMA,
    plan=plan,
    process=process,
    describe_inputs=describe,
    task_rows=task_rows,
)
