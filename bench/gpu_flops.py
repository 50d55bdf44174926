"""FLOPs per item of every model bench/gpu.py measures, counted with torch.utils.flop_counter.FlopCounterMode on the
meta device (shapes only: a 4.8B-parameter T5 is counted in a second, on any machine). The rows use these counts
for their utilisation; `python bench/gpu.py --size real --flops-only` prints them with each model's floor: the
GPU-hours per 1e8 items if it ran at the chip's whole bf16 peak, below which no run can go.

The VLM captioner is not here: generation's cost depends on the image's tokens and the cache, so its row counts a
real `generate` of one image on the loaded model instead."""

from __future__ import annotations

from typing import Any

from gpu_common import Sizes, count_flops

T5_VOCAB = 32128  # T5-v1.1's; the embedding lookup costs no FLOPs, so the tiny tokenizer's vocabulary would do too


def sscd_flops(s: Sizes) -> tuple[float, int]:
    import torch

    from curate.testing.tiny_sscd import sscd_module

    with torch.device("meta"):
        model = sscd_module(s.sscd_trunk)  # type: ignore[arg-type]
        flops = count_flops(lambda: model(torch.empty(1, 3, s.sscd_size, s.sscd_size)))
    return flops, _parameters(model)


def clip_meta(s: Sizes) -> Any:
    """The score stage's open_clip architecture on the meta device."""
    import open_clip
    import torch

    from curate.testing.tiny_clip import tiny_clip_config

    with torch.device("meta"):
        if s.clip == "tiny":
            return open_clip.CLIP(**tiny_clip_config())
        return open_clip.create_model(s.clip, device="meta")


def score_flops(s: Sizes) -> tuple[float, int]:
    """One image through the image tower and one caption (77 tokens, open_clip's context) through the text tower."""
    import torch

    model = clip_meta(s)
    side = model.visual.image_size
    side = side[0] if isinstance(side, tuple | list) else side
    tokens = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with torch.device("meta"):
        flops = count_flops(lambda: (model.encode_image(torch.empty(1, 3, side, side)), model.encode_text(tokens)))
    return flops, _parameters(model)


def encode_flops(s: Sizes) -> dict[str, tuple[float, int]]:
    """The SD3 VAE encoder at each of the row's resolutions (square) and each text encoder on 77 tokens."""
    import torch

    from curate.testing.tiny_sd3 import SIZES, clip_text_encoder, sd3_vae, t5_encoder

    sizes = SIZES[s.sd3] if isinstance(s.sd3, str) else s.sd3
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    out = {}
    with torch.device("meta"):
        vae = sd3_vae(sizes.vae_channels)
        for resolution, _, _ in s.encode:
            x = torch.empty(1, 3, resolution, resolution)
            out[f"vae{resolution}"] = (count_flops(lambda x=x: vae.encode(x).latent_dist.mean), _parameters(vae))
        encoders = {
            "clip_l": clip_text_encoder(*sizes.clip_l, act="quick_gelu", seed=0),
            "clip_g": clip_text_encoder(*sizes.clip_g, act="gelu", seed=0),
            "t5": t5_encoder(T5_VOCAB, *sizes.t5, seed=0),
        }
        for role, model in encoders.items():
            kwargs = {} if role == "t5" else {"output_hidden_states": True}
            out[role] = (count_flops(lambda m=model, k=kwargs: m(ids, **k)), _parameters(model))
    return out


def train_flops(s: Sizes, joint: int = 4096, pooled: int = 2048) -> tuple[float, int]:
    """One training step's forward and backward at the row's batch and resolution (optimizer and EMA aside)."""
    import torch

    from curate.train.model import build_mmdit

    batch, f = s.train_batch, s.train_resolution // 8
    with torch.device("meta"):
        model = build_mmdit(s.mmdit_depth, joint_attention_dim=joint, pooled_projection_dim=pooled)

        def step() -> None:
            out = model(
                hidden_states=torch.empty(batch, 16, f, f),
                timestep=torch.ones(batch),
                encoder_hidden_states=torch.empty(batch, 154, joint),
                pooled_projections=torch.empty(batch, pooled),
                return_dict=False,
            )[0]
            out.float().pow(2).mean().backward()

        flops = count_flops(step)
    return flops, _parameters(model)


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def all_flops(s: Sizes) -> list[tuple[str, str, float, int]]:
    """(row, unit, FLOPs per item, parameters) for every model counted on meta."""
    rows = [("sscd", "image", *sscd_flops(s)), ("score", "image", *score_flops(s))]
    for name, (flops, parameters) in encode_flops(s).items():
        rows.append((name, "image" if name.startswith("vae") else "prompt", flops, parameters))
    step, parameters = train_flops(s)
    rows.append(("train", f"sample (step of {s.train_batch})", step / s.train_batch, parameters))
    return rows
