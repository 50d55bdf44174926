"""SD3's text conditioning from per-encoder embeddings, with per-encoder dropout and caption mixing.

prompt_embeds = concat_seq( pad_channels( concat_channels(CLIP-L 77x768, bigG 77x1280), 4096 ), T5 Lx4096 )
pooled        = concat( CLIP-L pooled 768, bigG pooled 1280 )

exactly as diffusers' StableDiffusion3Pipeline.encode_prompt joins them (T5 absent: zeros). During
training each encoder's contribution is zeroed independently per sample with probability p (SD3: 46.4%),
which teaches the model to work with any subset of encoders and gives classifier-free guidance its
unconditional branch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TextEmbeddings:
    """One caption's embeddings from the three SD3 text encoders, batched."""

    clip_l: torch.Tensor  # [B, 77, 768] penultimate hidden states
    clip_l_pooled: torch.Tensor  # [B, 768]
    clip_g: torch.Tensor  # [B, 77, 1280]
    clip_g_pooled: torch.Tensor  # [B, 1280]
    t5: torch.Tensor | None  # [B, L, 4096], or None when no T5 was used

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbeddings:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TextEmbeddings(**{k: None if v is None else v.to(device, dtype) for k, v in moved.items()})


def join_sd3(text: TextEmbeddings, t5_tokens: int = 77, width: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77 + t5_tokens, W], pooled [B, L + G]) as encode_prompt returns them.

    W is T5's width when T5 is present, else ``width`` (the transformer's joint_attention_dim, 4096 for
    SD3), which is also what the CLIP states are zero-padded to."""
    if text.t5 is not None:
        width = text.t5.shape[-1]
    clip = torch.cat([text.clip_l, text.clip_g], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    t5 = text.t5
    if t5 is None:
        t5 = torch.zeros(clip.shape[0], t5_tokens, width, dtype=clip.dtype, device=clip.device)
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([text.clip_l_pooled, text.clip_g_pooled], dim=-1)


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
