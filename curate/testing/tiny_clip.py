"""A small random-weight open_clip model and score heads, in the formats the real ones ship in.

    FOLDER/clip/open_clip_config.json        open_clip's hub/folder layout ({"model_cfg", "preprocess_cfg"})
    FOLDER/clip/open_clip_model.safetensors  the weights
    FOLDER/clip-checkpoint/tiny-ViT-B-32.json  the same architecture as an open_clip model-config file
    FOLDER/clip-checkpoint/epoch_1.pt          the same weights as an open_clip training checkpoint
    FOLDER/heads/aesthetic.pth     LAION improved-aesthetic-predictor MLP (layers.0 ... layers.7, real
                                   hidden widths 1024/128/64/16) on the tiny model's embeddings
    FOLDER/heads/nsfw.pth          a Linear(D, 1) state dict (weight/bias), as sa_0_4_vit_l_14_linear.pth
    FOLDER/heads/watermark.safetensors  a Linear(D, 2) two-class head in safetensors

The architecture is open_clip's ViT-B-32 config with its widths, depths and image size shrunk (the real
CLIP vocabulary and context length are kept, so open_clip's own tokenizer is the model's tokenizer).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

TINY_CLIP_NAME = "tiny-ViT-B-32"


def tiny_clip_config(image_size: int = 64) -> dict[str, Any]:
    """open_clip's ViT-B-32 model config, narrow and shallow."""
    from curate.score.clip import builtin_config_file

    path = builtin_config_file("ViT-B-32")
    assert path is not None, "open_clip is not installed"
    config = copy.deepcopy(json.loads(path.read_text()))
    config["embed_dim"] = 64
    config["vision_cfg"].update(image_size=image_size, layers=2, width=64, patch_size=16, head_width=32)
    config["text_cfg"].update(width=64, heads=2, layers=2)
    return config


def laion_mlp(input_size: int) -> Any:
    """The MLP of LAION's improved-aesthetic-predictor (its `MLP` class without the Lightning parts)."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_size = input_size
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(input_size, 1024),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(1024, 128),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(64, 16),
                torch.nn.Linear(16, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    return MLP()


def build_tiny_clip(folder: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write the files listed in the module docstring under ``folder``; idempotent."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    root = Path(folder)
    paths = {
        "clip": root / "clip",
        "config_json": root / "clip-checkpoint" / f"{TINY_CLIP_NAME}.json",
        "checkpoint": root / "clip-checkpoint" / "epoch_1.pt",
        "aesthetic": root / "heads" / "aesthetic.pth",
        "nsfw": root / "heads" / "nsfw.pth",
        "watermark": root / "heads" / "watermark.safetensors",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    for p in paths.values():
        (p if p.suffix == "" else p.parent).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_clip_config()
    model = open_clip.CLIP(**copy.deepcopy(config)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (paths["clip"] / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": {}}, indent=2)
    )
    save_file(state, str(paths["clip"] / "open_clip_model.safetensors"))
    paths["config_json"].write_text(json.dumps(config, indent=2))
    torch.save({"epoch": 1, "name": TINY_CLIP_NAME, "state_dict": state}, paths["checkpoint"])

    width = config["embed_dim"]
    torch.save(laion_mlp(width).state_dict(), paths["aesthetic"])
    torch.save(torch.nn.Linear(width, 1).state_dict(), paths["nsfw"])
    save_file({k: v.contiguous() for k, v in torch.nn.Linear(width, 2).state_dict().items()}, str(paths["watermark"]))
    return paths
