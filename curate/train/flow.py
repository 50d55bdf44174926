"""Rectified flow as SD3 trains it: z_t = (1 - t) x0 + t eps, the model predicts eps - x0.

Timesteps are drawn from a density that puts more weight on the middle of the path (logit-normal by
default, SD3 Sec. 3.1), then shifted towards noise for larger images (SD3 Sec. 5.3.2).
"""

from __future__ import annotations

import math

import torch

from curate.train.settings import TimestepSampling


def sample_timesteps(
    n: int,
    generator: torch.Generator,
    sampling: TimestepSampling = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """t in (0, 1): logit-normal(m, s), SD3's mode sampling with heavy tails, or uniform."""
    if sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    u = torch.rand(n, generator=generator)
    if sampling == "uniform":
        return u
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    raise ValueError(f"unknown timestep sampling {sampling!r}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = a t / (1 + (a - 1) t): more time near noise for larger images (a = 1 leaves t unchanged)."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, base_pixels: int = 256 * 256) -> float:
    """SD3's a = sqrt(m / n): m pixels at this resolution, n at the base resolution the schedule was set for.

    The formula gives 4.0 at 1024^2 from a 256^2 base; SD3 settled on 3.0 at 1024^2 by preference, which
    a config can set directly (`shift: 3.0`).
    """
    return math.sqrt(height * width / base_pixels)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0
