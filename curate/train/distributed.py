"""`curate train` on many GPUs and nodes: the same loop in every worker of a Ray Train TorchTrainer.

Each worker reads its rank's share of the shards (whole row groups, the same number of batches on every
rank), wraps the model in DDP through `ray.train.torch.prepare_model` (gloo on CPU workers, NCCL on GPU
workers, as TorchTrainer sets up), and steps the same optimizer on the averaged gradients. Rank 0 keeps
the EMA, writes `log.jsonl` and the checkpoints in the single-process layout, straight into `output`
(which every node must see), and hands each one to Ray Train by reference, so Ray tracks it without
copying gigabytes. The run resumes from `output` like a single-process one, in either mode.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate import storage
from curate.config import RayConfig
from curate.train.settings import TrainConfig

if TYPE_CHECKING:
    from curate.train.loop import TrainResult

SHARED_CHECK = ".curate-train-run"  # written by the driver, read by every worker


class TrainingFailed(RuntimeError):
    """A worker failed; the message carries its error."""


def train_distributed(
    config: TrainConfig, address: str | None = None, log: Callable[[str], None] = print
) -> TrainResult:
    """Run ``config`` on ``config.distributed.workers`` Ray Train workers; returns the loop's TrainResult."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from curate.cluster import ray_session, resolve_address
    from curate.train.loop import TrainResult

    settings = config.distributed
    assert settings is not None and config.shards is not None
    # workers run in other folders (and on other nodes): absolute paths
    output = Path(config.output).expanduser().absolute()
    config = config.model_copy(update={"output": str(output), "shards": storage.absolute(config.shards)})
    output.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (output / SHARED_CHECK).write_text(token)
    cluster = RayConfig(address=settings.address)
    with ray_session(resolve_address(address, cluster), RayConfig()) as where:
        use_gpu = settings.use_gpu
        if use_gpu is None:  # device cuda asks for GPU workers even before an autoscaler has added GPU nodes
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpus > 0)
        log(f"[train] {settings.workers} {'GPU' if use_gpu else 'CPU'} workers on {where}")
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"config": config.model_dump(mode="json"), "token": token},
            scaling_config=ScalingConfig(
                num_workers=settings.workers, use_gpu=use_gpu, resources_per_worker=settings.resources_per_worker
            ),
            # Ray Train's run folder is `output` itself: it registers only checkpoints inside its run folder
            run_config=RunConfig(storage_path=str(output.parent), name=output.name),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingFailed(f"training failed on the Ray Train workers: {e}") from None
    metrics = result.metrics or {}
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    losses = json.loads((checkpoint / "trainer_state.json").read_text())["losses"] if checkpoint else []
    return TrainResult(losses, checkpoint, float(metrics.get("steps_per_second", 0.0)))


def worker_loop(payload: dict[str, Any]) -> None:
    """The training function of one Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from curate.train.data import ShardBatches
    from curate.train.loop import train
    from curate.train.replica import Replica

    config = TrainConfig(**payload["config"])
    assert config.shards is not None
    _check_shared(Path(config.output), payload["token"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives before prepare_model (the resume check) use it
    data = ShardBatches(
        config.shards,
        config.batch_size,
        seed=config.seed,
        num_workers=config.num_workers,
        rank=rank,
        world_size=world_size,
    )
    replica = Replica(
        rank=rank,
        world_size=world_size,
        device=device,
        wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=device),
        report=report,
    )
    train(config, data, log=_to_stderr if rank == 0 else _silent, replica=replica)


def _check_shared(output: Path, token: str) -> None:
    """Fail before any work when this worker's node does not see the driver's `output` folder."""
    marker = output / SHARED_CHECK
    seen = marker.read_text() if marker.is_file() else None
    if seen != token:
        raise RuntimeError(
            f"{output} on this worker's node is not the folder `curate train` prepared: `output` must be "
            "on storage every node of the cluster mounts at the same path (NFS, Lustre, a mounted bucket)"
        )


def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
    """`ray.train.report` from every rank (it is a barrier); rank 0 names the checkpoint it just wrote."""
    import ray.train

    if checkpoint is None:
        ray.train.report(metrics)
        return
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
        checkpoint_dir_name=checkpoint.name,
        checkpoint_upload_fn=_in_place,
        delete_local_checkpoint_after_upload=False,
    )


def _in_place(checkpoint: Any, name: str) -> Any:
    """The checkpoint is already where it belongs (`output` on shared storage): register, do not copy."""
    return checkpoint


def _to_stderr(line: str) -> None:
    """Straight to the worker's stderr, which Ray forwards to the driver (Ray Train's patched print would
    send each line twice)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _silent(line: str) -> None:
    return None
