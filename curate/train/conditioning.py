"""SD3's training-time text conditioning: per-encoder dropout and the 50/50 original/synthetic caption mix.

During training each encoder's contribution is zeroed independently per sample with probability p (SD3:
46.4%), which teaches the model to work with any subset of encoders and gives classifier-free guidance its
unconditional branch. The join of the three encoders is `curate.sd3.join_sd3`, shared with the shard reader.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from curate.sd3 import TextEmbeddings


def _zero_where(tensor: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor | None:
    if tensor is None:
        return None
    keep = (~drop).to(tensor.dtype).view(-1, *([1] * (tensor.dim() - 1)))
    return tensor * keep


def drop_encoders(text: TextEmbeddings, p: float, generator: torch.Generator) -> tuple[TextEmbeddings, torch.Tensor]:
    """Zero each encoder's embeddings (sequence and pooled) independently per sample with probability p.

    Returns the embeddings and the [B, 3] drop mask (CLIP-L, bigG, T5) for statistics."""
    batch = text.clip_l.shape[0]
    drop = torch.rand(batch, 3, generator=generator) < p
    drop = drop.to(text.clip_l.device)
    dropped = TextEmbeddings(
        clip_l=_zero_where(text.clip_l, drop[:, 0]),
        clip_l_pooled=_zero_where(text.clip_l_pooled, drop[:, 0]),
        clip_g=_zero_where(text.clip_g, drop[:, 1]),
        clip_g_pooled=_zero_where(text.clip_g_pooled, drop[:, 1]),
        t5=_zero_where(text.t5, drop[:, 2]),
    )
    return dropped, drop


def mix_captions(
    original: TextEmbeddings,
    synthetic: TextEmbeddings | None,
    has_synthetic: torch.Tensor | None,
    ratio: float,
    generator: torch.Generator,
) -> tuple[TextEmbeddings, torch.Tensor]:
    """Per sample, the synthetic caption's embeddings with probability ``ratio`` (SD3: 0.5) where one exists.

    Returns the chosen embeddings and the [B] mask of samples that use the synthetic caption."""
    batch = original.clip_l.shape[0]
    draw = torch.rand(batch, generator=generator) < ratio
    if synthetic is None:
        return original, torch.zeros(batch, dtype=torch.bool)
    use = draw & (has_synthetic.cpu() if has_synthetic is not None else torch.ones(batch, dtype=torch.bool))
    mask = use.to(original.clip_l.device)

    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or b is None:  # an encoder absent from the run is absent for both captions
            return a
        return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), b.to(a.dtype), a)

    chosen = TextEmbeddings(
        **{f.name: pick(getattr(original, f.name), getattr(synthetic, f.name)) for f in fields(original)}
    )
    return chosen, use
