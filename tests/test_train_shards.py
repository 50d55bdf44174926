"""The trainer on real training shards: exact resume through the shard reader, and the train/sample commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image

from curate.cli import main
from curate.config import ConfigError
from curate.train.commands import load_train_config
from curate.train.data import ShardBatches
from curate.train.loop import TrainConfig, train

pytest_plugins = ["encode_helpers"]  # fixtures: tiny_sd3, encoded_run


def settings(output: Path, shards: str, **overrides) -> TrainConfig:
    base = dict(
        output=str(output),
        shards=shards,
        depth=2,
        steps=8,
        batch_size=2,
        learning_rate=1e-3,
        checkpoint_every=4,
        log_every=4,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def test_resume_from_shards_gives_the_same_losses(encoded_run, tmp_path):
    shards = str(Path(encoded_run["run"]) / "encode16")
    straight = train(settings(tmp_path / "a", shards), ShardBatches(shards, 2), log=lambda line: None)
    config = settings(tmp_path / "b", shards)
    train(config, ShardBatches(shards, 2), log=lambda line: None, stop_after=3)
    resumed = train(config, ShardBatches(shards, 2), log=lambda line: None)
    assert len(straight.losses) == 8 and resumed.losses == straight.losses


def test_resume_at_the_end_of_an_epoch_goes_on_with_the_next(encoded_run):
    shards = str(Path(encoded_run["run"]) / "encode16")
    straight = iter(ShardBatches(shards, 2, seed=1))
    interrupted = ShardBatches(shards, 2, seed=1)
    batches = iter(interrupted)
    for _ in range(len(interrupted.loader)):  # the whole first epoch, stopped right after its last batch
        next(straight), next(batches)
    resumed = ShardBatches(shards, 2, seed=1)
    resumed.load_state_dict(interrupted.state_dict())
    assert torch.equal(next(iter(resumed)).latent, next(straight).latent)


def test_train_and_sample_commands(encoded_run, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "shards": str(Path(encoded_run["run"]) / "encode32"),
                "output": str(tmp_path / "out"),
                "depth": 2,
                "steps": 4,
                "batch_size": 2,
                "checkpoint_every": 2,
                "log_every": 2,
                "device": "cpu",
            }
        )
    )
    assert main(["train", str(config)]) == 0
    checkpoint = tmp_path / "out" / "checkpoints" / "step-000004"
    assert (checkpoint / "transformer_ema" / "diffusion_pytorch_model.safetensors").is_file()
    out = tmp_path / "sample.png"
    assert (
        main(
            [
                "sample",
                str(checkpoint),
                "--run",
                encoded_run["run"],
                "--prompt",
                "a cat",
                "--prompt",
                "a dog",
                "--negative-prompt",
                "blurry",
                "--size",
                "64x32",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    paths = capsys.readouterr().out.split()[-2:]
    assert [Path(p).name for p in paths] == ["sample-0.png", "sample-1.png"]
    assert Image.open(paths[0]).size == (64, 32)


def test_shipped_trainer_configs_parse(tmp_path):
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        assert load_train_config(str(path)).steps > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\nshards: y\nstepz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(str(bad))
    assert "bad.yaml:3: stepz: unknown key" in str(info.value)
