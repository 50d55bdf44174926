"""Sampling: Euler on the flow with a shifted schedule and classifier-free guidance with a negative prompt.

The schedule and the Euler step are diffusers' FlowMatchEulerDiscreteScheduler (what SD3 ships with);
the loop, the guidance and the decode are ours and match StableDiffusion3Pipeline's, which a test checks.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    negative_embeds: torch.Tensor,
    negative_pooled: torch.Tensor,
    height: int,
    width: int,
    steps: int = 28,
    guidance_scale: float = 7.0,
    shift: float = 3.0,
    seed: int = 0,
    vae_scale: int = 8,
) -> torch.Tensor:
    """Latents in the model's (shifted and scaled) space, [B, C, height/8, width/8]."""
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=device)
    shape = (prompt_embeds.shape[0], transformer.config.in_channels, height // vae_scale, width // vae_scale)
    latents = randn_tensor(shape, generator=torch.Generator(device="cpu").manual_seed(seed), device=device, dtype=dtype)
    guided = guidance_scale > 1.0
    embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
    pooled_in = torch.cat([negative_pooled, pooled]) if guided else pooled
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        velocity = transformer(
            hidden_states=model_input,
            timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled_in,
            return_dict=False,
        )[0]
        if guided:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> list[Image.Image]:
    """Undo the training normalisation ((latent - shift) * scale) and decode to RGB images."""
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
