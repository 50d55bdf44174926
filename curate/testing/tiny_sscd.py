"""SSCD's `sscd_disc_mixup` architecture with random weights, saved as TorchScript like Meta's official files.

As sscd/models/model.py defines it: a torchvision ResNet-50 trunk (no avgpool/fc), GeM pooling (p=3), a linear
projection 2048 -> 512 and L2 normalisation. ``trunk="resnet18"`` keeps every part but the trunk's depth and width
(512 features) for fast CPU runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Trunk = Literal["resnet50", "resnet18"]
FEATURES = {"resnet50": 2048, "resnet18": 512}


def sscd_module(trunk: Trunk = "resnet50", dims: int = 512) -> Any:
    """The eager module (built on the current default device: ``with torch.device("meta")`` counts FLOPs)."""
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
            resnet = getattr(torchvision.models, trunk)(weights=None)
            self.backbone = torch.nn.Sequential(*list(resnet.children())[:-2])
            self.embeddings = torch.nn.Sequential(GeM(3.0), torch.nn.Linear(FEATURES[trunk], dims), L2Norm())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embeddings(self.backbone(x))

    return SSCD().eval()


def build_sscd_torchscript(path: str | Path, trunk: Trunk = "resnet50", seed: int = 0) -> Path:
    """Script the module and save it where ``path`` says (the format the sscd stage loads)."""
    import torch

    torch.manual_seed(seed)
    scripted = torch.jit.script(sscd_module(trunk))
    scripted.save(str(path))
    return Path(path)
