"""The reference trainer: SD3's MMDiT shape, rectified-flow math, conditioning, overfitting, exact resume,
and a sampler whose images equal StableDiffusion3Pipeline's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from curate.sd3 import TextEmbeddings, join_sd3
from curate.train.conditioning import drop_encoders, mix_captions
from curate.train.flow import resolution_shift, sample_timesteps, shift_timesteps
from curate.train.loop import MemoryBatches, TrainBatch, TrainConfig, flow_loss, train
from curate.train.model import build_mmdit, mmdit_config
from curate.train.sample import decode, sample_latents


def embeddings(batch: int, generator: torch.Generator, t5: bool = True, small: bool = False) -> TextEmbeddings:
    """Random embeddings of SD3's shapes; ``small`` shrinks every dimension for statistics over many samples."""
    tokens, l_dim, g_dim, t5_dim = (2, 3, 3, 4) if small else (77, 768, 1280, 4096)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return TextEmbeddings(
        randn(batch, tokens, l_dim),
        randn(batch, l_dim),
        randn(batch, tokens, g_dim),
        randn(batch, g_dim),
        randn(batch, tokens, t5_dim) if t5 else None,
    )


def test_mmdit_is_sized_by_depth_like_sd3():
    config = mmdit_config(depth=24)
    assert config["num_attention_heads"] == 24 and config["attention_head_dim"] == 64
    assert config["caption_projection_dim"] == 64 * 24 and config["num_layers"] == 24
    assert config["patch_size"] == 2 and config["in_channels"] == 16 and config["qk_norm"] == "rms_norm"
    model = build_mmdit(2, sample_size=8)
    block = model.transformer_blocks[0]
    assert model.config.num_attention_heads * model.config.attention_head_dim == 128
    assert block.attn.norm_q.__class__.__name__ == "RMSNorm"  # QK RMSNorm
    assert block.norm1 is not block.norm1_context  # separate weights per modality
    assert block.attn.add_q_proj is not None  # joint attention over both streams


def test_shift_and_timestep_densities():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    assert shift_timesteps(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert resolution_shift(1024, 1024) == pytest.approx(4.0) and resolution_shift(256, 256) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    logit = torch.logit(sample_timesteps(200_000, g, "logit_normal", mean=0.0, std=1.0))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1.0) < 0.01
    shifted = torch.logit(sample_timesteps(200_000, g, "logit_normal", mean=0.5, std=0.6))
    assert abs(shifted.mean().item() - 0.5) < 0.01 and abs(shifted.std().item() - 0.6) < 0.01
    for mode in ("mode", "uniform"):
        draws = sample_timesteps(10_000, g, mode)
        assert draws.min() >= 0 and draws.max() <= 1
    assert abs(sample_timesteps(200_000, g, "uniform").mean().item() - 0.5) < 0.01


def test_join_matches_the_sd3_layout():
    g = torch.Generator().manual_seed(0)
    text = embeddings(2, g)
    prompt, pooled = join_sd3(text)
    assert prompt.shape == (2, 154, 4096) and pooled.shape == (2, 2048)
    assert torch.equal(prompt[:, :77, :768], text.clip_l) and torch.equal(prompt[:, :77, 768:2048], text.clip_g)
    assert not prompt[:, :77, 2048:].any() and torch.equal(prompt[:, 77:], text.t5)
    assert torch.equal(pooled, torch.cat([text.clip_l_pooled, text.clip_g_pooled], -1))
    no_t5, _ = join_sd3(embeddings(2, g, t5=False))
    assert no_t5.shape == (2, 154, 4096) and not no_t5[:, 77:].any()


def test_encoder_dropout_and_caption_mix_rates_match_the_config():
    g = torch.Generator().manual_seed(1)
    text = embeddings(4000, g, small=True)
    dropped, mask = drop_encoders(text, 0.464, g)
    rates = mask.float().mean(0)
    assert torch.allclose(rates, torch.full((3,), 0.464), atol=0.025)
    all_three = mask.all(1).float().mean().item()
    assert all_three == pytest.approx(0.464**3, abs=0.015)  # independent per encoder
    assert not dropped.clip_l[mask[:, 0]].any() and dropped.clip_l[~mask[:, 0]].abs().sum() > 0
    assert not dropped.clip_g_pooled[mask[:, 1]].any() and not dropped.t5[mask[:, 2]].any()

    synthetic = embeddings(4000, g, small=True)
    has = torch.arange(4000) % 4 != 0  # a quarter of the samples have no synthetic caption
    chosen, used = mix_captions(text, synthetic, has, 0.5, g)
    assert not used[~has].any()
    assert used[has].float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(chosen.clip_l[used], synthetic.clip_l[used])
    assert torch.equal(chosen.t5[~used], text.t5[~used])


def _overfit_config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        output=str(tmp_path / "train"),
        depth=2,
        steps=200,
        learning_rate=2e-3,
        encoder_dropout=0.0,
        synthetic_ratio=0.0,
        log_every=50,
        checkpoint_every=1000,
        ema_decay=0.9,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


def test_tiny_mmdit_overfits_a_handful_of_latents(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(torch.randn(4, 16, 4, 4, generator=g) + 0.06, embeddings(4, g, t5=False))
    config = _overfit_config(tmp_path, steps=100, learning_rate=3e-3)

    def evaluate(model) -> float:  # the same timesteps and noise before and after training
        fixed = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        flow_loss(model, batch, config, fixed, 1.5305, 0.0609, torch.device("cpu")).item()
                        for _ in range(20)
                    ]
                )
            )

    before = evaluate(build_mmdit(2, seed=config.seed))
    result = train(config, MemoryBatches([batch]), log=lambda line: None)
    after = evaluate(SD3Transformer2DModel.from_pretrained(str(result.checkpoint / "transformer")))
    assert after < before / 3, (before, after)
    assert np.mean(result.losses[-20:]) < np.mean(result.losses[:20]) / 1.5


def test_resumed_run_continues_with_the_same_losses(tmp_path):
    g = torch.Generator().manual_seed(3)
    batches = [
        TrainBatch(
            torch.randn(2, 16, 4, 4, generator=g), embeddings(2, g), embeddings(2, g), torch.tensor([True, False])
        )
        for _ in range(3)
    ]
    common = dict(steps=12, encoder_dropout=0.464, synthetic_ratio=0.5, learning_rate=1e-3, checkpoint_every=5)
    straight = train(_overfit_config(tmp_path / "a", **common), MemoryBatches(batches), log=lambda line: None)
    interrupted = _overfit_config(tmp_path / "b", **common)
    first = train(interrupted, MemoryBatches(batches), log=lambda line: None, stop_after=7)
    assert len(first.losses) == 7
    lines = []
    resumed = train(interrupted, MemoryBatches(batches), log=lines.append)
    assert "resuming from step-000007 at step 7" in lines[0]
    assert resumed.losses == straight.losses  # exactly: same weights, optimizer, RNG and data position
    assert sorted(p.name for p in (tmp_path / "b" / "train" / "checkpoints").iterdir()) == [
        "latest",
        "step-000005",
        "step-000007",
        "step-000010",
        "step-000012",
    ]


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def test_sampler_equals_stable_diffusion_3_pipeline():
    transformer = build_mmdit(2, sample_size=8, seed=5).eval()
    vae = _tiny_vae()
    g = torch.Generator().manual_seed(9)
    prompt, pooled = join_sd3(embeddings(2, g))
    negative, negative_pooled = join_sd3(embeddings(2, g, t5=False))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    expected = pipe(
        prompt_embeds=prompt,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    ).images
    latents = sample_latents(
        transformer, prompt, pooled, negative, negative_pooled, 64, 64, steps=6, guidance_scale=5.0, shift=3.0, seed=11
    )
    ours = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in decode(vae, latents)])
    assert ours.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6  # equal up to our uint8 rounding
    assert not math.isclose(float(np.abs(expected[0] - expected[1]).max()), 0.0)  # prompts give different images
