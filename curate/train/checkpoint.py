"""Checkpoints as safetensors: the transformer and its EMA in diffusers' layout, the optimizer, the RNG.

    OUT/checkpoints/step-000200/
      transformer/                 save_pretrained: config.json + diffusion_pytorch_model.safetensors
      transformer_ema/             the EMA weights, same layout (what `curate sample` loads)
      optimizer.safetensors        every optimizer state tensor; param groups and scalars in its metadata
      trainer_state.json           step, data position, generator state(s), losses so far, world size
    OUT/checkpoints/latest         the name of the newest complete checkpoint (written last)

A checkpoint is written under a temporary name and renamed, so `latest` never names a partial one.
Distributed runs write the same layout from rank 0, with every rank's generator state beside rank 0's
(`generators`), so either mode resumes the other's checkpoints.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Saved:
    step: int
    data_state: dict[str, Any]
    losses: list[float]
    world_size: int = 1  # ranks of the run that wrote it (the data position counts one rank's batches)
    generators: list[str] | None = None  # every rank's generator state, when world_size > 1


def generator_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def set_generator_state(generator: torch.Generator, state: str) -> None:
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"state.{index}.{name}"] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata["scalars"]).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})


def save_checkpoint(
    folder: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    data_state: dict[str, Any],
    losses: list[float],
    generators: list[str] | None = None,
) -> Path:
    root = Path(folder) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "transformer")
    ema.save_pretrained(tmp / "transformer_ema")
    tensors, metadata = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=metadata)
    state = {
        "step": step,
        "data_state": data_state,
        "generator": generator_state(generator),
        "losses": losses,
        "world_size": len(generators) if generators else 1,
    }
    if generators and len(generators) > 1:
        state["generators"] = generators
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / ".latest.tmp").write_text(final.name)
    (root / ".latest.tmp").rename(root / "latest")
    return final


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    pointer = Path(folder) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> Saved:
    """Load the weights, optimizer and rank 0's generator state; ``ema=None`` skips the EMA weights."""
    from diffusers.models.model_loading_utils import load_state_dict

    model.load_state_dict(load_state_dict(str(path / "transformer" / "diffusion_pytorch_model.safetensors")))
    if ema is not None:
        ema.load_state_dict(load_state_dict(str(path / "transformer_ema" / "diffusion_pytorch_model.safetensors")))
    _load_optimizer(optimizer, path / "optimizer.safetensors")
    state = json.loads((path / "trainer_state.json").read_text())
    set_generator_state(generator, state["generator"])
    return Saved(
        state["step"], state["data_state"], state["losses"], state.get("world_size", 1), state.get("generators")
    )
