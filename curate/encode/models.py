"""Load SD3's VAE and text encoders the way diffusers does, and run them on batches.

Models come from `ModelSpec`s (hub id or local folder, optional subfolder/revision/dtype). The
tokenizer of a text encoder lives in the sibling subfolder of the diffusers layout
(text_encoder -> tokenizer, text_encoder_2 -> tokenizer_2, text_encoder_3 -> tokenizer_3); a role
`<role>_tokenizer` in the pipeline's models overrides that.

The text path repeats `StableDiffusion3Pipeline._get_clip_prompt_embeds` / `_get_t5_prompt_embeds`
call for call (same tokenizer arguments, penultimate hidden state, pooled projection, T5 without an
attention mask), so the stored tensors rebuild exactly what `encode_prompt` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.config import ModelSpec

TOKENIZER_SUBFOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def pick_device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _torch_dtype(spec: ModelSpec, device: str) -> Any:
    import torch

    if spec.dtype:
        return getattr(torch, spec.dtype)
    return torch.float16 if device == "cuda" else torch.float32


def _source(spec: ModelSpec) -> dict[str, Any]:
    where = spec.id if spec.id is not None else spec.path
    kwargs: dict[str, Any] = {"pretrained_model_name_or_path": where}
    if spec.subfolder:
        kwargs["subfolder"] = spec.subfolder
    if spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs


def tokenizer_spec(spec: ModelSpec, override: ModelSpec | None) -> ModelSpec:
    if override is not None:
        return override
    sub = TOKENIZER_SUBFOLDERS.get(spec.subfolder or "")
    if sub is None:
        return spec  # a folder holding both model and tokenizer (e.g. openai/clip-vit-large-patch14)
    return spec.model_copy(update={"subfolder": sub, "dtype": None})


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(**_source(spec))


@dataclass
class TextEncoders:
    clip_l: Any
    clip_g: Any
    t5: Any | None
    tokenizer_l: Any
    tokenizer_g: Any
    tokenizer_t5: Any | None
    device: str


@dataclass
class TextOutput:
    clip_l: Any  # [N, 77, 768] penultimate hidden state, in clip_l's dtype (as diffusers casts it)
    clip_g: Any  # [N, 77, 1280] penultimate hidden state, also cast to clip_l's dtype
    pooled: Any  # [N, 768 + 1280] the two pooled projections, concatenated
    t5: Any | None  # [N, max_sequence_length, 4096] or None without T5


def load_text_encoders(models: dict[str, ModelSpec], device: str) -> TextEncoders:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    def load(cls: Any, role: str) -> Any:
        spec = models[role]
        model = cls.from_pretrained(**_source(spec), dtype=_torch_dtype(spec, device))
        return model.to(device).eval().requires_grad_(False)

    t5_spec = models.get("t5")
    return TextEncoders(
        clip_l=load(CLIPTextModelWithProjection, "clip_l"),
        clip_g=load(CLIPTextModelWithProjection, "clip_g"),
        t5=load(T5EncoderModel, "t5") if t5_spec is not None else None,
        tokenizer_l=load_tokenizer(tokenizer_spec(models["clip_l"], models.get("clip_l_tokenizer"))),
        tokenizer_g=load_tokenizer(tokenizer_spec(models["clip_g"], models.get("clip_g_tokenizer"))),
        tokenizer_t5=load_tokenizer(tokenizer_spec(t5_spec, models.get("t5_tokenizer"))) if t5_spec else None,
        device=device,
    )


def encode_text(enc: TextEncoders, prompts: list[str], max_sequence_length: int = 77) -> TextOutput:
    """SD3's three text encoders on a batch of prompts, as StableDiffusion3Pipeline.encode_prompt runs them."""
    import torch

    max_length = enc.tokenizer_l.model_max_length  # diffusers: tokenizer_max_length, from the first tokenizer
    with torch.inference_mode():
        hidden, pooled = [], []
        for tokenizer, model in ((enc.tokenizer_l, enc.clip_l), (enc.tokenizer_g, enc.clip_g)):
            ids = tokenizer(
                prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = model(ids.to(enc.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype=enc.clip_l.dtype))
        t5 = None
        if enc.t5 is not None:
            ids = enc.tokenizer_t5(
                prompts,
                padding="max_length",
                max_length=max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            t5 = enc.t5(ids.to(enc.device))[0].to(dtype=enc.t5.dtype)
        return TextOutput(hidden[0], hidden[1], torch.cat(pooled, dim=-1), t5)


def load_vae(spec: ModelSpec, device: str) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(**_source(spec), torch_dtype=_torch_dtype(spec, device))
    return vae.to(device).eval().requires_grad_(False)


def encode_images(vae: Any, pixels: Any) -> tuple[Any, Any]:
    """uint8 [N, H, W, 3] (numpy) -> latent distribution (mean, std), each [N, C, H/f, W/f].

    Pixels are normalised as diffusers' VaeImageProcessor does (x / 255 * 2 - 1)."""
    import numpy as np
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(vae.device).permute(0, 3, 1, 2).float() / 255.0
        x = (x * 2.0 - 1.0).to(vae.dtype)
        dist = vae.encode(x).latent_dist
        return dist.mean, dist.std
