"""`curate train` with `distributed:`: a real two-worker Ray Train TorchTrainer (CPU, gloo) on the test
session's Ray, checked against the same steps taken in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curate.cli import main
from curate.config import ConfigError
from curate.train.commands import load_train_config
from curate.train.data import ShardBatches
from curate.train.distributed import SHARED_CHECK, _check_shared, train_distributed
from curate.train.loop import TrainConfig, flow_loss, train
from curate.train.model import build_mmdit
from curate.train.replica import rank_seed

pytest_plugins = ["encode_helpers"]  # fixtures: tiny_sd3, encoded_run

WORKERS = 2


def settings(output: Path, shards: str, **overrides) -> TrainConfig:
    base = dict(
        output=str(output),
        shards=shards,
        depth=2,
        batch_size=2,
        learning_rate=1e-3,
        checkpoint_every=2,
        log_every=1,
        device="cpu",
        distributed={"workers": WORKERS, "use_gpu": False},
    )
    return TrainConfig(**{**base, **overrides})


def data_parallel_reference(config: TrainConfig, steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same steps in one process: each rank's batches and random stream, gradients averaged over ranks."""
    readers = [
        ShardBatches(config.shards, config.batch_size, seed=config.seed, rank=r, world_size=WORKERS)
        for r in range(WORKERS)
    ]
    model = build_mmdit(
        config.depth,
        seed=config.seed,
        in_channels=readers[0].latent_channels,
        joint_attention_dim=readers[0].joint_attention_dim,
        pooled_projection_dim=readers[0].pooled_dim,
    ).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay
    )
    generators = [torch.Generator().manual_seed(rank_seed(config.seed, r)) for r in range(WORKERS)]
    batches = [iter(reader) for reader in readers]
    cpu = torch.device("cpu")
    losses = []
    for _ in range(steps):
        per_rank = [
            flow_loss(model, next(b), config, g, readers[0].scaling_factor, readers[0].shift_factor, cpu)
            for b, g in zip(batches, generators, strict=True)
        ]
        loss = sum(per_rank) / WORKERS
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_workers_train_like_one_process_with_averaged_gradients_and_resume_in_either_mode(
    encoded_run, ray_cluster, tmp_path
):
    shards = str(Path(encoded_run["run"]) / "encode16")
    output = tmp_path / "train"
    lines: list[str] = []
    first = train_distributed(settings(output, shards, steps=2), log=lines.append)
    assert first.checkpoint == output / "checkpoints" / "step-000002" and len(first.losses) == 2
    assert "2 CPU workers" in lines[0]
    # the second run resumes rank 0's checkpoint on both workers, each with its own random stream and data place
    second = train_distributed(settings(output, shards, steps=4), log=lines.append)
    assert second.checkpoint == output / "checkpoints" / "step-000004"
    assert second.losses[:2] == first.losses

    expected, expected_losses = data_parallel_reference(settings(output, shards), steps=4)
    trained = weights(second.checkpoint)
    initial = build_mmdit(2, seed=0, **_widths(shards)).state_dict()
    assert max_difference(trained, expected) < 1e-6 < max_difference(trained, initial) / 1000
    assert second.losses == pytest.approx(expected_losses, rel=1e-6)

    # rank 0 alone logs (one line a step) and writes checkpoints, in the single-process layout
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert [entry["loss"] for entry in log] == second.losses
    state = json.loads((second.checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == WORKERS and len(set(state["generators"])) == WORKERS
    ray_state = json.loads((output / "checkpoint_manager_snapshot.json").read_text())
    assert [c["checkpoint_dir_name"] for c in ray_state["checkpoint_results"]] == [
        "checkpoints/step-000002",
        "checkpoints/step-000004",
    ]

    # the same output resumes in one process: same weights, step and loss history
    single = settings(output, shards, steps=5, distributed=None)
    resumed_lines: list[str] = []
    resumed = train(single, ShardBatches(shards, 2, seed=0), log=resumed_lines.append)
    assert "resuming from step-000004 at step 4" in "\n".join(resumed_lines)
    assert resumed.losses[:4] == second.losses and len(resumed.losses) == 5


def _widths(shards: str) -> dict[str, int]:
    reader = ShardBatches(shards, 2)
    return {
        "in_channels": reader.latent_channels,
        "joint_attention_dim": reader.joint_attention_dim,
        "pooled_projection_dim": reader.pooled_dim,
    }


def test_distributed_settings_are_checked_before_any_work(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("output: out\nshards: s\ndevice: cpu\ndistributed:\n  workers: 8\n  use_gpu: true\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(str(config))
    assert "device: cpu conflicts with distributed.use_gpu: true" in str(info.value)
    config.write_text("output: out\nshards: s\ndistributed:\n  workers: 0\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(str(config))
    assert "train.yaml:4: distributed.workers:" in str(info.value)
    config.write_text("output: out\nshards: s\n")
    assert main(["train", str(config), "--address", "127.0.0.1:6379"]) == 2
    assert "add `distributed: {workers: N}`" in capsys.readouterr().err


def test_a_worker_that_does_not_see_the_output_folder_stops_at_once(tmp_path):
    (tmp_path / SHARED_CHECK).write_text("the token of another run")
    with pytest.raises(RuntimeError, match="must be on storage every node of the cluster mounts"):
        _check_shared(tmp_path, "this run's token")
    with pytest.raises(RuntimeError, match="must be on storage"):
        _check_shared(tmp_path / "missing", "this run's token")
