"""Training settings, kept free of torch so pipelines can be validated without importing it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from curate.config import ModelSpec, Strict

TimestepSampling = Literal["logit_normal", "mode", "uniform"]


class TrainSettings(Strict):
    """How to train; shared by `curate train` and the `validate` stage."""

    depth: PositiveInt = 2  # MMDiT depth: hidden 64*depth, depth heads, depth blocks
    pretrained: ModelSpec | None = None  # fine-tune this SD3 transformer instead of a fresh MMDiT
    steps: PositiveInt = 200
    batch_size: PositiveInt = 8
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    timestep_sampling: TimestepSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: float | Literal["auto"] = "auto"  # "auto": sqrt(pixels / 256^2); SD3 used 3.0 at 1024^2
    encoder_dropout: float = Field(0.464, ge=0, le=1)  # per text encoder, independently (SD3: 46.4%)
    synthetic_ratio: float = Field(0.5, ge=0, le=1)  # share of samples trained on the synthetic caption
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 on GPUs that support it
    seed: int = 0
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 100
    device: str = "auto"


class TrainConfig(TrainSettings):
    """`curate train CONFIG`: settings plus where the shards are and where checkpoints go."""

    output: str  # a local folder: checkpoints, log.jsonl
    shards: str | None = None  # an encode stage folder (RUN/encode) or a shard file
    num_workers: int = Field(0, ge=0)  # DataLoader workers reading the shards
