"""Fixtures and helpers shared by the encode and shard-reader tests: tiny SD3 models, joined stages."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from curate import storage
from curate.runfolder import RunDir, ShardStats, summarize
from curate.schema import parquet_options


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """Tiny CLIP-L / bigG / T5 encoders, tokenizers and an SD3-config VAE in the diffusers layout."""
    from curate.testing.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def full_sd3_vae(tmp_path_factory) -> Path:
    """SD3's VAE at its published size (random weights), saved in the diffusers layout once per session."""
    from curate.testing.tiny_sd3 import sd3_vae

    folder = tmp_path_factory.mktemp("sd3-vae-full")
    sd3_vae().save_pretrained(folder)
    return folder


def models_yaml(folder: Path, t5: bool = True, vae: Path | None = None) -> str:
    lines = [
        f"  vae: {{path: {vae or folder}{'' if vae else ', subfolder: vae'}}}",
        f"  clip_l: {{path: {folder}, subfolder: text_encoder}}",
        f"  clip_g: {{path: {folder}, subfolder: text_encoder_2}}",
    ]
    if t5:
        lines.append(f"  t5: {{path: {folder}, subfolder: text_encoder_3}}")
    return "models:\n" + "\n".join(lines) + "\n"


def write_stage_like_runner(run_uri: str, name: str, kind: str, tables: dict[int, pa.Table]) -> None:
    """Write a finished stage exactly as curate.runner does: shards atomically, then markers, then
    _SUCCESS.json (how the dedup and caption stages' outputs look to a stage that joins them)."""
    stage = RunDir(run_uri).stage(name)
    stats = []
    for index, table in sorted(tables.items()):
        table = table.replace_schema_metadata({b"curate.stage": name.encode(), b"curate.kind": kind.encode()})
        size = storage.write_parquet_atomic(stage.shard(index), table, **parquet_options(table))
        status = Counter(table["status"].to_pylist())
        s = ShardStats(index, table.num_rows, dict(status), 0.01, size, {})
        stage.write_marker(s)
        stats.append(s)
    storage.write_json(stage.success_uri, {"stage": name, "kind": kind, **summarize(stats)})


PIPELINE = """\
name: encode-test
output: {out}
{models}stages:
  - kind: local
    name: ingest
    path: {images}
    shard_size: 8
  # stand-ins for the dedup and caption stages: their shards are written by the test as the runner
  # writes them (key, keep / caption_synthetic, status), so `join` reads real stage outputs
  - kind: local
    name: dedup
    path: {images}
  - kind: local
    name: caption
    path: {images}
{encode}"""

ENCODE_STAGES = """\
  - kind: encode
    name: encode32
    input: ingest
    join: [dedup, caption]
    keep_from: dedup
    dtype: float32
    base_resolution: 256
    resources: {batch_size: 1}
  - kind: encode
    name: encode16
    input: ingest
    join: [dedup, caption]
    keep_from: dedup
    dtype: float16
    base_resolution: 256
    row_group_bytes: 200000
    resources: {batch_size: 4}
  - kind: encode
    name: encodebf
    input: ingest
    join: [dedup, caption]
    keep_from: dedup
    dtype: bfloat16
    t5: false
    joint_attention_dim: 128
    base_resolution: 256
    resources: {batch_size: 4}
"""


@pytest.fixture(scope="session")
def encoded_run(ray_cluster, sample_images, tiny_sd3, tmp_path_factory) -> dict:
    """A run with ingest, keep flags (two rows dropped), synthetic captions for every other row, and
    three encode stages (float32 with T5, float16 with T5, bfloat16 without T5)."""
    from curate.pipeline import parse_pipeline
    from curate.runner import run_pipeline

    out = tmp_path_factory.mktemp("encode-run") / "run"
    text = PIPELINE.format(out=out, images=sample_images, models=models_yaml(tiny_sd3), encode=ENCODE_STAGES)
    pipeline = parse_pipeline(text)
    run_pipeline(pipeline, only=["ingest"], log=lambda line: None)
    ingest = RunDir(str(out)).stage("ingest")
    dropped, keep_tables, caption_tables = [], {}, {}
    for index in sorted(ingest.done_shards()):
        keys = storage.read_parquet(ingest.shard(index), columns=["key"])["key"].to_pylist()
        keep = [not (index == 0 and i < 2) for i in range(len(keys))]
        dropped += [k for k, flag in zip(keys, keep, strict=True) if not flag]
        keep_tables[index] = pa.table({"key": keys, "keep": keep, "status": ["ok"] * len(keys)})
        synthetic = [f"synthetic caption number {index}-{i}" if i % 2 == 0 else None for i in range(len(keys))]
        caption_tables[index] = pa.table(
            {"key": keys, "caption_synthetic": synthetic, "status": ["ok" if s else "skipped" for s in synthetic]}
        )
    write_stage_like_runner(str(out), "dedup", "dedup", keep_tables)
    write_stage_like_runner(str(out), "caption", "caption", caption_tables)
    records = run_pipeline(pipeline, only=["encode32", "encode16", "encodebf"], log=lambda line: None)
    return {"run": str(out), "records": records, "dropped": set(dropped), "models": tiny_sd3}
