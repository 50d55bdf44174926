"""A transformers vision-language model wrapped for batched, greedy captioning.

Loaded the way its users load it: `AutoProcessor` + `AutoModelForImageTextToText` (or a class named in
the config) from a hub id or a local folder. How to prompt and pad it is read from its own files
(`curate.caption.drive`). Two steps, so the caller can overlap them:

- `prepare(images)`: the prompt (chat template or task prompt), tokenization padded on the model's side
  and image preprocessing, on CPU (runs in a background thread while the model generates the previous
  batch); `too_long(inputs)` then names the rows whose prompt + image tokens exceed the limit;
- `generate(inputs)`: `model.generate` and decoding of the new tokens only (the prompt is not echoed).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from curate.caption.drive import (
    input_limit,
    is_encoder_decoder,
    model_inputs,
    padding_side,
    render_prompt,
    text_kwargs,
)
from curate.config import ModelSpec


@dataclass(frozen=True)
class GenerationOptions:
    prompt: str
    system_prompt: str | None = None
    task_prompt: str | None = None  # used as it is, without a chat template (PaliGemma, Florence-2, BLIP-2)
    max_input_tokens: int | None = None  # rows with more prompt + image tokens get `too_long`
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class LoadOptions:
    attn_implementation: str | None = None
    model_class: str | None = None  # e.g. "transformers.LlavaForConditionalGeneration"; default: the Auto class
    trust_remote_code: bool = False
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. Qwen2-VL's min_pixels/max_pixels
    device: str | None = None  # default: cuda when a GPU is visible, else cpu


@dataclass(frozen=True)
class Generated:
    text: str  # decoded new tokens, special tokens skipped, not cleaned
    tokens: int | None  # new tokens up to (not including) the end-of-sequence token; None: not reported
    truncated: bool  # the token budget ran out: max_new_tokens generated without an end token of the model's choice


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), another backend's out-of-memory RuntimeError (MPS, XPU), or the CPU
    allocator's "not enough memory"."""
    text = str(error).lower()
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in text or "not enough memory" in text


def _torch_dtype(name: str | None, device: str):
    import torch

    if name is not None:
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _resolve_class(dotted: str | None):
    if dotted is None:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module or "transformers"), name)


def describe_model(spec: ModelSpec, revision: str | None) -> str:
    """`id@commit` (the revision as given when it could not be resolved) or the local path: what the
    `captioner` column records."""
    where = spec.id if spec.id is not None else str(spec.path)
    if spec.subfolder:
        where += f"/{spec.subfolder}"
    return f"{where}@{revision}" if revision else where


def pin_revision(spec: ModelSpec) -> str | None:
    """The commit a hub id's revision points to now (None/branch names resolved once), so every actor and
    both the processor and the model load the same files, and the `captioner` column names that commit.
    Local folders, or no hub access: the revision as given."""
    if spec.id is None:
        return spec.revision
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(spec.id, spec.revision)
    except Exception:
        return spec.revision
    return getattr(resolved, "resolved", None) or (str(resolved) if resolved is not None else None)


def load_source(spec: ModelSpec, revision: str | None, trust_remote_code: bool) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` reads the model, and the arguments every file of it is read with."""
    source = spec.id if spec.id is not None else str(spec.path)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if spec.subfolder:
        common["subfolder"] = spec.subfolder
    return source, common


class Captioner:
    """Processor + model loaded once per worker."""

    def __init__(self, spec: ModelSpec, load: LoadOptions, options: GenerationOptions):
        import torch
        from transformers import AutoProcessor

        self.options = options
        self.device = load.device or ("cuda" if torch.cuda.is_available() else "cpu")
        revision = pin_revision(spec)
        source, common = load_source(spec, revision, load.trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(source, **common, **load.processor_kwargs)
        self.tokenizer = getattr(self.processor, "tokenizer", None) or self.processor
        model_kwargs: dict[str, Any] = {"dtype": _torch_dtype(spec.dtype, self.device), **common}
        if load.attn_implementation:
            model_kwargs["attn_implementation"] = load.attn_implementation
        self.model = _resolve_class(load.model_class).from_pretrained(source, **model_kwargs).to(self.device).eval()
        config = self.model.config
        # Decoder-only models need the prompts flush right (pad on the left); encoder-decoders the reverse.
        self.padding_side = padding_side(config)
        self.tokenizer.padding_side = self.padding_side
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.encoder_decoder = is_encoder_decoder(config)
        self.input_limit = input_limit(config, options.max_new_tokens, options.max_input_tokens)
        self.name = describe_model(spec, revision)
        self.generation_config = self._generation_config()
        self.eos_ids = _ids(self.generation_config.eos_token_id)
        # an end token the generation config forces at the last step (BART's, so Florence-2's) is not the model's
        # choice: a caption ending there ran out of tokens
        self.forced_eos_ids = _ids(getattr(self.generation_config, "forced_eos_token_id", None))
        self.text_prompt = render_prompt(self.processor, options.prompt, options.system_prompt, options.task_prompt)
        self.from_template = options.task_prompt is None

    def _generation_config(self):
        """The model's own generation config with the stage's settings on top (greedy unless asked)."""
        o = self.options
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = o.max_new_tokens
        config.do_sample = o.do_sample
        config.num_beams = o.num_beams
        if o.do_sample:
            for name in ("temperature", "top_p", "top_k"):
                if getattr(o, name) is not None:
                    setattr(config, name, getattr(o, name))
        else:  # sampling knobs of the model's config would only raise warnings under greedy decoding
            config.temperature, config.top_p, config.top_k = None, None, None
        if o.repetition_penalty is not None:
            config.repetition_penalty = o.repetition_penalty
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def render_prompt(self, prompt: str, system_prompt: str | None = None) -> str:
        """A chat prompt for one image through the model's template (the OpenAI-compatible test server)."""
        return render_prompt(self.processor, prompt, system_prompt, None)

    def prepare(self, images: list[Image.Image], text_prompt: str | None = None) -> Any:
        """Model inputs for a batch, on CPU (pinned when going to a GPU). Each image is its own sample, so
        processors that tile or resize per image (any-resolution, image splitting) see it alone. Special tokens as
        `apply_chat_template(tokenize=True)` adds them (`drive.text_kwargs`)."""
        text = text_prompt or self.text_prompt
        inputs = self.processor(
            images=[[image] for image in images],
            text=[text] * len(images),
            padding=True,
            padding_side=self.padding_side,
            return_tensors="pt",
            **text_kwargs(self.processor, text, text_prompt is not None or self.from_template),
        )
        inputs = model_inputs(inputs)
        if self.device.startswith("cuda"):
            inputs = {k: (v.pin_memory() if hasattr(v, "pin_memory") else v) for k, v in inputs.items()}
        return inputs

    def input_lengths(self, inputs: Any) -> list[int]:
        """Prompt + image tokens of each row (padding not counted)."""
        mask = inputs.get("attention_mask")
        if mask is None:
            ids = inputs["input_ids"]
            return [int(ids.shape[1])] * int(ids.shape[0])
        return [int(n) for n in mask.sum(dim=1).tolist()]

    def too_long(self, inputs: Any) -> dict[int, str]:
        """Rows of a prepared batch over the input limit, with the reason."""
        if self.input_limit is None:
            return {}
        return {
            row: f"{length} prompt + image tokens exceed the limit of {self.input_limit}"
            for row, length in enumerate(self.input_lengths(inputs))
            if length > self.input_limit
        }

    def generate(self, inputs: Any, max_new_tokens: int | None = None) -> list[Generated]:
        import torch

        config = self.generation_config
        if max_new_tokens is not None and max_new_tokens != config.max_new_tokens:
            config = copy.deepcopy(config)
            config.max_new_tokens = max_new_tokens

        dtype = self.model.dtype
        moved = {}
        for k, v in dict(inputs).items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(dtype)
            moved[k] = v
        # decoder-only models return prompt + new tokens; encoder-decoders (Florence-2) the decoder start
        # token + new tokens: either way only the new tokens are decoded, so the prompt is never echoed
        start = 1 if self.encoder_decoder else moved["input_ids"].shape[1]
        with torch.inference_mode():
            out = self.model.generate(**moved, generation_config=config)
        new = out[:, start:].cpu().tolist()
        results = []
        budget = config.max_new_tokens
        for ids in new:
            end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
            kept = ids if end is None else ids[:end]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            used = len(ids) if end is None else end + 1
            forced = end == budget - 1 and ids[end] in self.forced_eos_ids
            results.append(Generated(text, len(kept), used >= budget and (end is None or forced)))
        return results


def _ids(value: Any) -> set[int]:
    """Token ids of a generation config entry (an id, a list of ids, or None)."""
    return set(value if isinstance(value, list) else [value] if value is not None else [])
