"""The encode stage: every row accounted for, and shards that rebuild exactly what SD3's diffusers
pipeline computes (text conditioning and VAE latents)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from encode_helpers import PIPELINE, models_yaml
from PIL import Image

from curate import storage
from curate.encode.models import encode_images
from curate.runfolder import RunDir
from curate.shards import ShardDataset, sd3_conditioning, sd3_latents

pytest_plugins = ["encode_helpers"]  # fixtures: tiny_sd3, full_sd3_vae, encoded_run


def sd3_pipeline(models, with_t5: bool = True, dtype=torch.float32):
    """diffusers' StableDiffusion3Pipeline around the same encoders (tiny transformer and VAE)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=128,
        caption_projection_dim=16,
        pooled_projection_dim=80,
        out_channels=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL.from_pretrained(models, subfolder="vae"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(models, subfolder="text_encoder", dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(models, subfolder="tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(models, subfolder="text_encoder_2", dtype=dtype),
        tokenizer_2=AutoTokenizer.from_pretrained(models, subfolder="tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(models, subfolder="text_encoder_3", dtype=dtype)
        if with_t5
        else None,
        tokenizer_3=AutoTokenizer.from_pretrained(models, subfolder="tokenizer_3") if with_t5 else None,
    )


def reference(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_prompt one prompt at a time (the fp32 stage encodes with batch_size 1)."""
    embeds, pooled = [], []
    for prompt in prompts:
        with torch.inference_mode():
            e, _, p, _ = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=prompt,
                prompt_3=prompt,
                max_sequence_length=77,
                do_classifier_free_guidance=False,
            )
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def all_batches(stage_uri: str, batch_size: int = 64) -> list[dict]:
    return list(ShardDataset(stage_uri, batch_size=batch_size, shuffle=False))


def test_every_row_accounted_for(encoded_run):
    run = RunDir(encoded_run["run"])
    ingest = run.stage("ingest")
    for name in ("encode32", "encode16", "encodebf"):
        stage = run.stage(name)
        assert stage.done_shards() == ingest.done_shards()
        for index in sorted(ingest.done_shards()):
            images = storage.read_parquet(ingest.shard(index)).to_pylist()
            encoded = {r["key"]: r for r in storage.read_parquet(stage.shard(index)).to_pylist()}
            assert sorted(encoded) == sorted(r["key"] for r in images)  # 1:1 with the image shard
            for image in images:
                row = encoded[image["key"]]
                if image["status"] != "ok":
                    assert (row["status"], row["error"]) == (image["status"], image["error"])
                elif image["key"] in encoded_run["dropped"]:
                    assert row["status"] == "skipped_duplicate" and row["latent"] is None
                elif row["status"] == "ok":
                    assert (
                        row["latent"] is not None and row["bucket"] == f"{row['bucket_width']}x{row['bucket_height']}"
                    )
                    assert (row["clip_l"] is None) == (row["caption"] is None)
                    assert (row["clip_l_synthetic"] is None) == (row["caption_synthetic"] is None)
                else:
                    assert row["status"] in {"no_bucket", "too_small"} and row["error"] and row["latent"] is None
        record = encoded_run["records"][name]
        assert record["rows"] == sum(s.rows for s in ingest.shard_stats())
        assert record["status"]["skipped_duplicate"] == len(encoded_run["dropped"])
        assert record["status"]["ok"] == record["extra"]["encoded"] > 0


def test_bytes_per_sample_in_stage_report(encoded_run):
    records = encoded_run["records"]
    # per-row sizes follow from the shapes: 77 tokens x width x bytes per element
    assert records["encode32"]["bytes_per_sample"]["clip_l"] == 77 * 32 * 4
    assert records["encode16"]["bytes_per_sample"]["clip_g"] == 77 * 48 * 2
    assert records["encode16"]["bytes_per_sample"]["t5"] == 77 * 128 * 2
    assert records["encode16"]["bytes_per_sample"]["pooled"] == 80 * 2
    assert "t5" not in records["encodebf"]["bytes_per_sample"]  # no T5: nothing stored, zeros rebuilt
    assert records["encodebf"]["bytes_per_sample"]["clip_l"] == 77 * 32 * 2


def test_shards_stream_by_bucket_and_carry_sd3_metadata(encoded_run):
    stage = RunDir(encoded_run["run"]).stage("encode16")
    for uri in stage.shard_uris():
        f = storage.parquet_file(uri)
        buckets = f.read(columns=["bucket"])["bucket"].to_pylist()
        start = 0
        for i in range(f.metadata.num_row_groups):  # no row group spans two buckets
            rows = f.metadata.row_group(i).num_rows
            assert len(set(buckets[start : start + rows])) == 1
            start += rows
        schema = f.schema_arrow
        assert schema.field("latent").metadata[b"curate.dtype"] == b"float16"
        assert b'"scaling_factor": 1.5305' in schema.metadata[b"curate.encode"]
        assert b'"shift_factor": 0.0609' in schema.metadata[b"curate.encode"]
        assert pq.ParquetFile(uri).metadata.row_group(0).column(0).path_in_schema == "key"


def test_fp32_shards_rebuild_encode_prompt_exactly(encoded_run):
    pipe = sd3_pipeline(encoded_run["models"])
    checked = 0
    for synthetic in (False, True):
        for batch in all_batches(RunDir(encoded_run["run"]).stage("encode32").uri):
            embeds, pooled = sd3_conditioning(batch, synthetic=synthetic)
            assert embeds.shape[1:] == (154, 128) and pooled.shape[1:] == (80,)
            captions = batch["caption_synthetic"] if synthetic else batch["caption"]
            rows = [i for i, c in enumerate(captions) if c is not None]
            if not rows:
                continue
            ref_embeds, ref_pooled = reference(pipe, [captions[i] for i in rows])
            assert torch.equal(embeds[rows], ref_embeds)
            assert torch.equal(pooled[rows], ref_pooled)
            checked += len(rows)
    assert checked >= 10


def close(stored: torch.Tensor, ref: torch.Tensor, eps: float) -> bool:
    """Equal within the rounding of the stored dtype (relative eps, and eps of the largest value)."""
    diff = (stored.float() - ref.float()).abs()
    return bool((diff <= eps * ref.abs() + eps * ref.abs().max()).all())


@pytest.mark.parametrize(("stage", "with_t5", "eps"), [("encode16", True, 2**-10), ("encodebf", False, 2**-7)])
def test_half_precision_shards_match_encode_prompt_within_rounding(encoded_run, stage, with_t5, eps):
    pipe = sd3_pipeline(encoded_run["models"], with_t5=with_t5)
    for batch in all_batches(RunDir(encoded_run["run"]).stage(stage).uri):
        embeds, pooled = sd3_conditioning(batch)
        rows = [i for i, c in enumerate(batch["caption"]) if c is not None]
        if not rows:
            continue
        ref_embeds, ref_pooled = reference(pipe, [batch["caption"][i] for i in rows])
        assert embeds.dtype == (torch.float16 if stage == "encode16" else torch.bfloat16)
        assert close(embeds[rows], ref_embeds, eps) and close(pooled[rows], ref_pooled, eps)
        if not with_t5:  # diffusers' zeros in T5's place, at T5's sequence length and width
            assert not embeds[:, 77:].any() and embeds.shape[1:] == (154, 128)


def test_sd3_vae_256_to_16x32x32_and_back(ray_cluster, tiny_sd3, full_sd3_vae, tmp_path, sample_images):
    """SD3's VAE at its published config (random weights): a 256x256 image becomes a 16x32x32 latent
    whose stored copy decodes to what diffusers decodes from its own encoding of the same image."""
    from diffusers import AutoencoderKL

    from curate.pipeline import parse_pipeline
    from curate.runner import run_pipeline

    images = tmp_path / "images"
    images.mkdir()
    source = Image.open(sample_images / "astronaut.jpg").convert("RGB").resize((256, 256))
    source.save(images / "square.png")
    encode = "  - kind: encode\n    input: ingest\n    dtype: float32\n    t5: false\n    base_resolution: 256\n"
    text = PIPELINE.format(
        out=tmp_path / "run", images=images, models=models_yaml(tiny_sd3, t5=False, vae=full_sd3_vae), encode=encode
    )
    text = text.replace(f"  - kind: local\n    name: dedup\n    path: {images}\n", "").replace(
        f"  - kind: local\n    name: caption\n    path: {images}\n", ""
    )
    run_pipeline(parse_pipeline(text), log=lambda line: None)
    (batch,) = all_batches(RunDir(str(tmp_path / "run")).stage("encode").uri)
    assert batch["bucket"] == "256x256" and batch["latent"].shape == (1, 16, 32, 32)

    vae = AutoencoderKL.from_pretrained(full_sd3_vae)
    scaling, shift = vae.config.scaling_factor, vae.config.shift_factor
    # bit for bit what the stage's code computes in an actor (torch with one thread there: num_cpus 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        same_path, _ = encode_images(vae, np.array(source)[None])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch["latent"], same_path)
    pixels = torch.from_numpy(np.array(source)).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        mean = vae.encode(pixels * 2 - 1).latent_dist.mean
        # diffusers called here, with other threads and memory layout: float sums reduce in another
        # order, and 84M random weights amplify that to ~1e-4 of the latents' range
        assert torch.allclose(batch["latent"], mean, atol=1e-3 * float(mean.abs().max()))
        trained_on = sd3_latents(batch, scaling=scaling, shift=shift)  # what the trainer diffuses
        ours = trained_on / scaling + shift  # what StableDiffusion3Pipeline does before vae.decode
        decoded = vae.decode(torch.cat([ours, mean])).sample
    assert decoded.shape == (2, 3, 256, 256)
    assert torch.allclose(decoded[0], decoded[1], atol=1e-3 * float(decoded[1].abs().max()))
