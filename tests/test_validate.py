"""The validate stage trains on a run's training shards, samples, and writes its report into the run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from encode_helpers import ENCODE_STAGES, PIPELINE, models_yaml
from PIL import Image

from curate.inspect import read_stage
from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline

pytest_plugins = ["encode_helpers"]  # fixtures: tiny_sd3, encoded_run


def test_validate_trains_samples_and_reports(encoded_run, sample_images):
    run = encoded_run["run"]
    validate = """\
  - kind: validate
    input: encode16
    train: {depth: 2, steps: 12, batch_size: 4, learning_rate: 0.001, checkpoint_every: 6, log_every: 6}
    shard_prompts: 3
    prompts: ["a cat on a table"]
    negative_prompt: "blurry"
    sample_steps: 3
"""
    text = PIPELINE.format(
        out=run, images=sample_images, models=models_yaml(encoded_run["models"]), encode=ENCODE_STAGES + validate
    )
    records = run_pipeline(parse_pipeline(text), only=["validate"], log=lambda line: None)
    record = records["validate"]
    assert record["rows"] == 4 and record["status"] == {"ok": 4}
    assert record["extra"]["steps"] == 12

    samples = read_stage(run, "validate").to_pylist()
    assert [s["prompt_source"] for s in samples] == ["shards"] * 3 + ["config"]
    assert samples[3]["prompt"] == "a cat on a table"
    for sample in samples:
        image = np.asarray(Image.open(io.BytesIO(sample["image"])))
        assert image.shape == (sample["height"], sample["width"], 3) and sample["width"] % 16 == 0
    folder = Path(run) / "validate"
    report = (folder / "report.md").read_text()
    assert "## Data" in report and "| ingest | local | complete |" in report and "| encode16 | encode |" in report
    assert "![loss curve](loss.png)" in report and "![samples](samples.png)" in report
    assert "a cat on a table" in report and "negative prompt: 'blurry'" in report
    for picture in ("loss.png", "samples.png"):
        assert Image.open(folder / picture).size[0] > 100
    checkpoints = sorted(p.name for p in (folder / "train" / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-000006", "step-000012"]
