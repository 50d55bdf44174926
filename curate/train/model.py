"""The MMDiT: diffusers' SD3Transformer2DModel, the model SD3 itself uses, sized by depth.

SD3's family is parameterised by depth d: hidden size 64*d, d attention heads of 64 channels, d joint
blocks, patch 2, separate weights per modality, joint attention, adaLN-Zero from timestep + pooled text,
and (SD3.5) QK RMSNorm. Using diffusers' model rather than a copy means the same trainer fine-tunes a
real SD3 transformer and the sampler's output is comparable with StableDiffusion3Pipeline's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from curate.config import ModelSpec


def mmdit_config(
    depth: int,
    sample_size: int = 32,
    in_channels: int = 16,
    joint_attention_dim: int = 4096,
    pooled_projection_dim: int = 2048,
    qk_norm: str | None = "rms_norm",
    pos_embed_max_size: int | None = None,
) -> dict[str, Any]:
    """SD3Transformer2DModel arguments for depth ``depth`` (SD3 Medium is depth 24, SD3 8B depth 38)."""
    return {
        "sample_size": sample_size,
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": depth,
        "attention_head_dim": 64,
        "num_attention_heads": depth,
        "joint_attention_dim": joint_attention_dim,
        "caption_projection_dim": 64 * depth,
        "pooled_projection_dim": pooled_projection_dim,
        "pos_embed_max_size": pos_embed_max_size or max(96, sample_size),
        "qk_norm": qk_norm,
    }


def build_mmdit(depth: int, seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A freshly initialised MMDiT (deterministic for a seed)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**mmdit_config(depth, **overrides))


def load_transformer(spec: ModelSpec) -> SD3Transformer2DModel:
    """A pretrained SD3 transformer to fine-tune: hub id (subfolder `transformer`) or a local folder."""
    source = spec.id if spec.id is not None else spec.path
    subfolder = spec.subfolder if spec.subfolder is not None else ("transformer" if spec.id else None)
    return SD3Transformer2DModel.from_pretrained(source, subfolder=subfolder, revision=spec.revision)


def load_trained(checkpoint: Path, ema: bool = True) -> SD3Transformer2DModel:
    """A transformer from one of our checkpoints (its EMA weights by default), ready to sample."""
    return SD3Transformer2DModel.from_pretrained(str(checkpoint / ("transformer_ema" if ema else "transformer"))).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
