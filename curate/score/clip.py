"""An open_clip model for the `score` stage, from wherever its weights live, with its own preprocessing.

The `clip_scorer` model spec maps onto open_clip's own loading paths (``create_model_and_transforms``):

- ``architecture`` + ``id`` without a slash: an open_clip pretrained tag, exactly
  ``create_model_and_transforms(architecture, pretrained=id)`` (``ViT-L-14-quickgelu`` + ``openai``);
- ``id`` alone: a hub repository holding ``open_clip_config.json`` and weights -> ``hf-hub:<id>``;
- ``architecture`` + ``id`` of a hub repository: its weights (``revision``/``subfolder`` honoured) loaded into
  that architecture, with open_clip's default preprocessing (what a tag does minus the tag's mean/std);
- ``path`` to a folder in that layout -> ``local-dir:<folder>``;
- ``path`` to a checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``: an open_clip training checkpoint,
  OpenAI's ``ViT-L-14.pt``) + ``architecture``.

``architecture`` is an open_clip model name or a model-config JSON file (``embed_dim``, ``vision_cfg``,
``text_cfg``), registered with ``open_clip.add_model_config``. The image transform is the validation
transform open_clip returns for the model and the tokenizer is ``open_clip.get_tokenizer`` for the same name,
so the stage sees exactly what a direct open_clip user sees. The helpers before `ClipScorer` read configs
without importing torch (`curate check` uses them), except that checking a pretrained tag imports open_clip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate import storage
from curate.config import ModelSpec

FOLDER_CONFIG = "open_clip_config.json"
PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def builtin_config_file(name: str) -> Path | None:
    """The JSON open_clip ships for a built-in architecture name, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{name.replace('/', '-')}.json"
    return candidate if candidate.is_file() else None


def is_config_file(architecture: str) -> bool:
    return architecture.endswith(".json")


def is_tag(spec: ModelSpec) -> bool:
    """An `id` without a slash next to an architecture is an open_clip pretrained tag (hub ids are org/name)."""
    return spec.id is not None and spec.architecture is not None and "/" not in spec.id


def is_folder(spec: ModelSpec) -> bool:
    return spec.path is not None and storage.is_local(spec.path) and os.path.isdir(_local(spec))


def _local(spec: ModelSpec) -> str:
    assert spec.path is not None
    path = storage.resolve(spec.path)[1] if storage.is_local(spec.path) else spec.path
    return os.path.join(path, spec.subfolder) if spec.subfolder else path


def architecture_config(architecture: str) -> dict[str, Any] | None:
    """The model config of a built-in name or JSON file, or None when there is none."""
    path = Path(architecture) if is_config_file(architecture) else builtin_config_file(architecture)
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def source_problems(spec: ModelSpec) -> list[str]:
    """What is wrong with a clip_scorer model spec, before any work (messages name the field)."""
    if importlib.util.find_spec("open_clip") is None:
        return ["models.clip_scorer: the score stage needs open_clip: pip install 'curate[score]'"]
    arch = spec.architecture
    if arch is not None:
        try:
            config = architecture_config(arch)
        except (OSError, ValueError) as e:
            return [f"models.clip_scorer.architecture: cannot read {arch}: {e}"]
        if config is None:
            what = "no such model-config file" if is_config_file(arch) else "not an open_clip model name"
            return [f"models.clip_scorer.architecture: {what}: {arch} (see open_clip.list_models())"]
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            return [f"models.clip_scorer.architecture: {arch} is no open_clip model config (no {', '.join(missing)})"]
    if is_tag(spec):
        return _tag_problems(spec)
    if spec.id is not None:
        if arch is None and (spec.revision or spec.subfolder):
            return [
                "models.clip_scorer: open_clip loads a hub model's own config from the repository root at its main "
                "revision; give `architecture` to load a pinned revision or subfolder's weights into it"
            ]
        return []
    if is_folder(spec):
        problems = []
        if not os.path.isfile(os.path.join(_local(spec), FOLDER_CONFIG)):
            problems.append(f"models.clip_scorer.path: {_local(spec)} has no {FOLDER_CONFIG} (open_clip's layout)")
        if arch is not None:
            problems.append(f"models.clip_scorer.architecture: a folder brings its own ({FOLDER_CONFIG}); remove it")
        return problems
    if spec.subfolder:
        return ["models.clip_scorer.subfolder: only used with a folder `path` or a hub `id`"]
    if arch is None:
        return [
            f"models.clip_scorer.architecture: required with a checkpoint file ({spec.path}): an open_clip model "
            "name such as ViT-L-14-quickgelu, or a model-config JSON file"
        ]
    return []


def _tag_problems(spec: ModelSpec) -> list[str]:
    import open_clip

    assert spec.architecture is not None and spec.id is not None
    if is_config_file(spec.architecture):
        return ["models.clip_scorer: a pretrained tag needs a built-in architecture name, not a config file"]
    tag = open_clip.get_pretrained_cfg(spec.architecture, spec.id)
    if not tag:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(spec.architecture)) or "none"
        return [f"models.clip_scorer.id: {spec.id!r} is not a pretrained tag of {spec.architecture} (tags: {known})"]
    config = architecture_config(spec.architecture) or {}
    if bool(tag.get("quick_gelu", False)) != bool(config.get("quick_gelu", False)):
        want = "a -quickgelu" if tag.get("quick_gelu") else "a GELU (non -quickgelu)"
        return [
            f"models.clip_scorer.architecture: the {spec.id!r} weights were trained with "
            f"{'QuickGELU' if tag.get('quick_gelu') else 'GELU'}; {spec.architecture} differs and would give wrong "
            f"embeddings: use {want} architecture (e.g. ViT-L-14-quickgelu for openai)"
        ]
    return []


def embedding_width(spec: ModelSpec) -> int | None:
    """The model's embedding width from its config, when it can be read locally (not hub configs)."""
    try:
        if spec.architecture is not None:
            config = architecture_config(spec.architecture)
        elif is_folder(spec):
            config = json.loads(Path(_local(spec), FOLDER_CONFIG).read_text())["model_cfg"]
        else:
            return None
        return None if config is None else int(config["embed_dim"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def open_clip_source(spec: ModelSpec) -> tuple[str, str | None]:
    """(model name, pretrained tag or checkpoint file or None) to hand to open_clip for a model spec."""
    import open_clip

    from curate.model_paths import local_model_file

    name = spec.architecture
    if name is not None and is_config_file(name):
        open_clip.add_model_config(Path(name))  # registered under the file's stem
        name = Path(name).stem
    if spec.id is not None:
        if name is None:
            return f"hf-hub:{spec.id}", None
        if is_tag(spec):
            return name, spec.id
        from open_clip.pretrained import HF_WEIGHTS_NAME, download_pretrained_from_hf

        filename = posixpath.join(spec.subfolder, HF_WEIGHTS_NAME) if spec.subfolder else None
        return name, download_pretrained_from_hf(spec.id, filename=filename, revision=spec.revision)
    if is_folder(spec):
        return f"local-dir:{_local(spec)}", None
    assert name is not None and spec.path is not None, "checked with the config"
    return name, local_model_file(spec.path)


@dataclass
class ClipScorer:
    """The loaded model, its validation transform and tokenizer, and where it runs."""

    model: Any  # open_clip.CLIP (or CustomTextCLIP)
    transform: Any  # PIL image -> CHW float tensor
    tokenizer: Any  # list[str] -> (N, context_length) int tensor
    device: str
    input_dtype: Any  # torch dtype of the pixels the model takes
    width: int  # embedding width
    name: str

    def encode(self, pixels: Any, tokens: Any | None) -> tuple[Any, Any | None]:
        """L2-normalised float32 image (and text) embeddings of a preprocessed batch."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            image = self.model.encode_image(pixels.to(self.device, self.input_dtype, non_blocking=True))
            image = F.normalize(image.float(), dim=-1)
            text = None
            if tokens is not None and len(tokens):
                text = F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)
        return image, text


def load_clip_scorer(spec: ModelSpec, device: str | None = None) -> ClipScorer:
    """Load the model once per worker; fp16 on CUDA and fp32 on CPU unless the spec's `dtype` says otherwise."""
    import open_clip
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = PRECISION[spec.dtype] if spec.dtype else ("fp16" if device.startswith("cuda") else "fp32")
    name, pretrained = open_clip_source(spec)
    model, _, transform = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, precision=precision, device=device, require_pretrained=True
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.inference_mode():  # the joint embedding width, whatever the towers' classes
        width = int(model.encode_text(tokenizer([""]).to(device)).shape[-1])
    input_dtype = open_clip.get_input_dtype(precision) or torch.float32
    return ClipScorer(model, transform, tokenizer, device, input_dtype, width, name)
