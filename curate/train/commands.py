"""`curate train CONFIG` and `curate sample CHECKPOINT`: the trainer and sampler from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from curate.config import ConfigError, ModelSpec, load_yaml, pydantic_problems
from curate.train.settings import TrainConfig


def load_train_config(path: str) -> TrainConfig:
    """A trainer YAML (TrainConfig's fields), validated with the pipeline's error messages."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(path, [f"{path}: no such trainer config"])
    data, source = load_yaml(file.read_text(), path)
    try:
        config = TrainConfig(**(data or {}))
    except ValidationError as e:
        raise ConfigError(path, pydantic_problems(e, (), source, TrainConfig.model_fields)) from None
    if config.shards is None:
        raise ConfigError(path, [f"{source.where(())}: shards: required by `curate train` (an encode stage folder)"])
    return config


def train_command(path: str, address: str | None = None, log: Any = print) -> int:
    """Train in this process, or on Ray Train workers when the config has `distributed:`."""
    from curate.train.data import ShardBatches
    from curate.train.loop import train

    config = load_train_config(path)
    assert config.shards is not None
    if address and config.distributed is None:
        raise ConfigError(path, [f"{path}: --address trains on a Ray cluster: add `distributed: {{workers: N}}`"])
    if config.distributed is not None:
        from curate.train.distributed import train_distributed

        result = train_distributed(config, address=address, log=log)
    else:
        data = ShardBatches(config.shards, config.batch_size, seed=config.seed, num_workers=config.num_workers)
        result = train(config, data, log=log)
    log(f"[train] done: {len(result.losses)} steps, last loss {result.losses[-1]:.4f}, checkpoint {result.checkpoint}")
    return 0


def models_of_run(run: str) -> dict[str, ModelSpec]:
    """The models a run was made with (from its saved, resolved pipeline.yaml)."""
    from curate import storage
    from curate.runfolder import RunDir

    saved = yaml.safe_load(storage.read_text(RunDir(storage.absolute(run)).pipeline_uri)) or {}
    return {role: ModelSpec(**spec) for role, spec in (saved.get("models") or {}).items()}


def sample_command(
    checkpoint: str,
    prompts: list[str],
    negative_prompt: str | None,
    run: str,
    output: str,
    size: tuple[int, int] = (256, 256),
    steps: int = 28,
    guidance_scale: float = 5.0,
    shift: float = 3.0,
    seed: int = 0,
    ema: bool = True,
) -> list[str]:
    """Encode prompts with the run's text encoders, sample the checkpoint, decode with the run's VAE."""
    import torch

    from curate.encode.models import encode_text, load_text_encoders, load_vae
    from curate.sd3 import join_sd3
    from curate.train.data import from_encoder_output
    from curate.train.loop import pick_device
    from curate.train.model import load_trained
    from curate.train.sample import decode, sample_latents

    models = models_of_run(run)
    device = pick_device("auto")
    encoders = load_text_encoders(models, str(device))
    model = load_trained(Path(checkpoint), ema=ema).to(device)

    def condition(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text = from_encoder_output(encode_text(encoders, texts))
        return join_sd3(text, width=model.config.joint_attention_dim)

    embeds, pooled = condition(prompts)
    if negative_prompt is None:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = (t.expand(len(prompts), *t.shape[1:]) for t in condition([negative_prompt]))
    height, width = size
    latents = sample_latents(
        model,
        *(t.to(device) for t in (embeds, pooled, negative, negative_pooled)),
        height,
        width,
        steps=steps,
        guidance_scale=guidance_scale,
        shift=shift,
        seed=seed,
    )
    images = decode(load_vae(models["vae"], str(device)), latents)
    out = Path(output)
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(str(path))
    return paths
