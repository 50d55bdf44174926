"""The training loop: AdamW on the rectified-flow loss, EMA, gradient clipping, checkpoints, exact resume.

All randomness of a step (caption choice, encoder dropout, timesteps, noise) comes from one CPU
generator whose state is checkpointed, and the data source reports its position, so a resumed run
produces the same losses as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from curate.sd3 import TextEmbeddings, join_sd3
from curate.train.checkpoint import (
    generator_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_generator_state,
)
from curate.train.conditioning import drop_encoders, mix_captions
from curate.train.ema import make_ema, update_ema
from curate.train.flow import (
    flow_target,
    noisy_latents,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
)
from curate.train.model import build_mmdit, load_transformer
from curate.train.replica import Replica, rank_seed, unwrap
from curate.train.settings import TrainConfig

SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


@dataclass
class TrainBatch:
    """One bucket's worth of training samples: raw VAE latent means and both captions' embeddings."""

    latent: torch.Tensor  # [B, 16, h, w], as the VAE encoder's mean (not yet shifted and scaled)
    original: TextEmbeddings
    synthetic: TextEmbeddings | None = None
    has_synthetic: torch.Tensor | None = None  # [B] bool


class BatchSource(Protocol):
    """What the loop reads from: an endless iterator of batches with a resumable position."""

    scaling_factor: float
    shift_factor: float
    joint_attention_dim: int  # width of the joint text sequence (T5's d_model; 4096 for SD3)
    pooled_dim: int  # width of the pooled text vector (2048 for SD3)
    latent_channels: int

    def __iter__(self) -> Iterator[TrainBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MemoryBatches:
    """Batches already in memory, cycled: the reference the shard reader is benchmarked against."""

    def __init__(
        self,
        batches: list[TrainBatch],
        scaling_factor: float = SD3_SCALING_FACTOR,
        shift_factor: float = SD3_SHIFT_FACTOR,
    ):
        self.batches = batches
        self.position = 0
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        first = batches[0].original
        self.joint_attention_dim = first.t5.shape[-1] if first.t5 is not None else 4096
        self.pooled_dim = first.clip_l_pooled.shape[-1] + first.clip_g_pooled.shape[-1]
        self.latent_channels = batches[0].latent.shape[1]

    def __iter__(self) -> Iterator[TrainBatch]:
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.mixed_precision == "no":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return supported if config.mixed_precision == "auto" else True


def flow_loss(
    model: torch.nn.Module,
    batch: TrainBatch,
    config: TrainConfig,
    generator: torch.Generator,
    scaling_factor: float,
    shift_factor: float,
    device: torch.device,
    bf16: bool = False,
) -> torch.Tensor:
    """The rectified-flow loss of one batch, with SD3's caption mixing, encoder dropout and timestep density."""
    x0 = (batch.latent.to(device, torch.float32) - shift_factor) * scaling_factor
    size = x0.shape[0]
    text, _ = mix_captions(batch.original, batch.synthetic, batch.has_synthetic, config.synthetic_ratio, generator)
    text, _ = drop_encoders(text, config.encoder_dropout, generator)
    width = unwrap(model).config.joint_attention_dim
    prompt_embeds, pooled = join_sd3(text.to(device, torch.float32), width=width)
    t = sample_timesteps(
        size, generator, config.timestep_sampling, config.logit_mean, config.logit_std, config.mode_scale
    )
    shift = config.shift if config.shift != "auto" else resolution_shift(x0.shape[-2] * 8, x0.shape[-1] * 8)
    t = shift_timesteps(t, shift).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        prediction = model(
            hidden_states=noisy_latents(x0, noise, t),
            timestep=t * 1000,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    return torch.nn.functional.mse_loss(prediction.float(), flow_target(x0, noise))


@dataclass
class TrainResult:
    losses: list[float]  # one per step, from step 0 (a resumed run includes the earlier steps)
    checkpoint: Path | None
    steps_per_second: float


def _resume(
    output: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    data: BatchSource,
    config: TrainConfig,
    replica: Replica,
    log: Callable[[str], None],
) -> tuple[int, list[float], Path | None]:
    """Load the newest checkpoint into every rank (the same one: output must be shared storage)."""
    previous = latest_checkpoint(output)
    found = replica.gather(previous.name if previous is not None else None)
    if len(set(found)) > 1:
        raise RuntimeError(
            f"ranks found different checkpoints in {output} ({found}): `output` must be storage every "
            "training worker sees (a shared file system on a multi-node cluster)"
        )
    if previous is None:
        return 0, [], None
    saved = load_checkpoint(previous, model, ema, optimizer, generator)
    data_state = dict(saved.data_state)
    if saved.world_size == replica.world_size:
        if saved.generators:
            set_generator_state(generator, saved.generators[replica.rank])
    else:
        # another world size plans other batches per rank: keep the epoch and the share of it already seen
        if "position" in data_state:
            data_state["position"] = int(data_state["position"]) * saved.world_size // replica.world_size
        if replica.rank > 0:
            generator.manual_seed(rank_seed(config.seed, replica.rank, saved.step))
        log(f"[train] checkpoint written by {saved.world_size} ranks, resuming on {replica.world_size}")
    data.load_state_dict(data_state)
    log(f"[train] resuming from {previous.name} at step {saved.step}")
    return saved.step, list(saved.losses), previous


def train(
    config: TrainConfig,
    data: BatchSource,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    replica: Replica | None = None,
) -> TrainResult:
    """Train (or resume) to ``config.steps``; ``stop_after`` ends early after that step, as an interruption would.

    ``replica``: this process's rank in a data-parallel run (``data`` must then read this rank's share).
    """
    replica = replica or Replica()
    device = replica.device or pick_device(config.device)
    bf16 = use_bf16(config, device)
    if config.pretrained is not None:
        model = load_transformer(config.pretrained)
    else:
        model = build_mmdit(
            config.depth,
            seed=config.seed,
            in_channels=data.latent_channels,
            joint_attention_dim=data.joint_attention_dim,
            pooled_projection_dim=data.pooled_dim,
        )
    model.to(device).train()
    ema = make_ema(model) if replica.main else None
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(rank_seed(config.seed, replica.rank))
    output = Path(config.output)
    if replica.main:
        output.mkdir(parents=True, exist_ok=True)
    step, losses, checkpoint = _resume(output, model, ema, optimizer, generator, data, config, replica, log)
    network = replica.wrap(model)

    batches = iter(data)
    started, first_step = time.perf_counter(), step
    with open(output / "log.jsonl", "a") if replica.main else contextlib.nullcontext() as log_file:
        while step < config.steps:
            lr = (
                config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)
                if config.warmup_steps
                else config.learning_rate
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = flow_loss(
                network, next(batches), config, generator, data.scaling_factor, data.shift_factor, device, bf16
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, config.ema_decay)
            step += 1
            losses.append(replica.mean(loss))
            metrics = {"step": step, "loss": losses[-1], "lr": lr, "grad_norm": grad_norm}
            if log_file is not None:
                log_file.write(json.dumps(metrics) + "\n")
            logging_now = step % config.log_every == 0 or step == config.steps
            if logging_now:
                rate = metrics["steps_per_second"] = (step - first_step) / (time.perf_counter() - started)
                if log_file is not None:
                    log_file.flush()
                log(f"[train] step {step}/{config.steps}  loss {losses[-1]:.4f}  {rate:.2f} steps/s")
            stopping = stop_after is not None and step >= stop_after
            saving = step % config.checkpoint_every == 0 or step == config.steps or stopping
            if saving:
                generators = replica.gather(generator_state(generator))
                if ema is not None:
                    checkpoint = save_checkpoint(
                        output, step, model, ema, optimizer, generator, data.state_dict(), losses, generators
                    )
            if logging_now or saving:
                replica.report(metrics, checkpoint if saving and replica.main else None)
            if stopping:
                break
    elapsed = time.perf_counter() - started
    return TrainResult(losses, checkpoint, (step - first_step) / elapsed if elapsed > 0 else 0.0)
