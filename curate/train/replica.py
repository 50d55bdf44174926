"""A process's place in data-parallel training: its rank, device, DDP wrapper and the collectives the loop needs.

The loop uses it the same way in one process (rank 0 of 1, no collectives) and in every worker of a Ray
Train run (`curate.train.distributed`), so both share one code path.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def _keep(model: torch.nn.Module) -> torch.nn.Module:
    return model


def _no_report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
    return None


@dataclass
class Replica:
    """This process's part of a data-parallel run; the default is the whole run in one process.

    With world_size > 1 the torch.distributed process group must be up (Ray Train's TorchTrainer starts
    it): gradients are averaged by ``wrap`` (DDP), the step's loss is averaged across ranks, and rank 0
    alone keeps the EMA and writes the log and the checkpoints.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: from config.device
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = _keep  # e.g. ray.train.torch.prepare_model (DDP)
    report: Callable[[dict[str, Any], Path | None], None] = _no_report  # at log and checkpoint steps, on every rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """The value averaged over ranks (gloo has no AVG: sum, then divide)."""
        if self.world_size == 1:
            return float(value.item())
        total = value.detach().float().reshape(1).clone()
        torch.distributed.all_reduce(total)
        return float(total.item()) / self.world_size

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Each rank's own random stream; rank 0 of a fresh run uses the seed itself, as one process does."""
    return seed if rank == 0 and step == 0 else random.Random(f"{seed}:{rank}:{step}").getrandbits(63)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (what is saved and averaged into the EMA)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
