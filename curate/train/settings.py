"""Training settings, kept free of torch so pipelines can be validated without importing it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

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


class Distributed(Strict):
    """Data-parallel training: the same loop in every worker of a Ray Train TorchTrainer, gradients all-reduced."""

    workers: PositiveInt = 2  # training processes (one per GPU with use_gpu); the global batch is workers * batch_size
    use_gpu: bool | None = None  # None: GPU workers with device cuda, or auto on a cluster with GPUs
    resources_per_worker: dict[str, PositiveFloat] | None = None  # e.g. {CPU: 8, GPU: 1}; default 1 CPU (+1 GPU)
    address: str | None = None  # Ray cluster; `--address` and RAY_ADDRESS take precedence; default a local Ray


class TrainConfig(TrainSettings):
    """`curate train CONFIG`: settings plus where the shards are and where checkpoints go."""

    output: str  # a local folder: checkpoints, log.jsonl (shared by all nodes when distributed)
    shards: str | None = None  # an encode stage folder (RUN/encode) or a shard file
    num_workers: int = Field(0, ge=0)  # DataLoader workers reading the shards (per training worker)
    distributed: Distributed | None = None  # train through Ray Train; None: in this process

    @model_validator(mode="after")
    def _device_fits_workers(self) -> TrainConfig:
        use_gpu = self.distributed.use_gpu if self.distributed is not None else None
        if (use_gpu is True and self.device == "cpu") or (use_gpu is False and self.device.startswith("cuda")):
            raise ValueError(
                f"device: {self.device} conflicts with distributed.use_gpu: {str(use_gpu).lower()} "
                "(leave device at auto: each worker uses the device Ray Train gives it)"
            )
        return self
