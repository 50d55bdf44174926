"""SD3's text conditioning layout, shared by the training-shard reader and the trainer.

prompt_embeds = concat_seq( pad_channels( concat_channels(CLIP-L 77x768, bigG 77x1280), 4096 ), T5 Lx4096 )
pooled        = concat( CLIP-L pooled 768, bigG pooled 1280 )

exactly as diffusers' StableDiffusion3Pipeline.encode_prompt joins them (T5 absent: zeros).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

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


def text_embeddings(batch: dict[str, Any], suffix: str = "") -> TextEmbeddings:
    """Split the stored pooled vector, concat(CLIP-L, bigG), at CLIP-L's width: SD3's CLIP projections have
    their encoder's hidden size (768 and 1280), so the split point is the width of the CLIP-L states."""
    pooled = batch["pooled" + suffix]
    clip_l = batch["clip_l" + suffix]
    return TextEmbeddings(
        clip_l=clip_l,
        clip_l_pooled=pooled[:, : clip_l.shape[-1]],
        clip_g=batch["clip_g" + suffix],
        clip_g_pooled=pooled[:, clip_l.shape[-1] :],
        t5=batch.get("t5" + suffix),
    )
