"""Whether the caption stage can drive a configured captioner, told before any work (`curate check`).

Reads the model's `config.json` and its processor files (tokenizer, chat template, image processor), never
the weights, and runs the processor once on a small blank image with the stage's prompt, so a captioner that
would fail on the cluster fails here, naming the field:

- the architecture (`model_type`) is one this transformers knows, or `trust_remote_code` is set and the
  config maps its own code (`auto_map`);
- there is a model class for it: `AutoModelForImageTextToText` maps it, or `model_class` names one;
- the processor takes images;
- a prompt exists: a chat template, or the stage's `task_prompt`;
- the prompt with an image goes through the processor and carries the model's image tokens;
- a small image's prompt + image tokens fit the model's context with `max_new_tokens`.

A hub id is checked from the local Hugging Face cache only (no network is assumed where `curate check`
runs); one not cached there is checked when a worker loads it.
"""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any

from PIL import Image

from curate.caption.drive import (
    PromptError,
    context_window,
    image_token_id,
    input_limit,
    is_encoder_decoder,
    model_inputs,
    padding_side,
    render_prompt,
    text_kwargs,
)
from curate.caption.vlm import GenerationOptions, LoadOptions, load_source
from curate.config import ModelSpec

ROLE = "models.captioner"
PROBE_SIDE = 224  # the blank image the processor is tried on

Problem = tuple[tuple[Any, ...], str]


class NotCached(Exception):
    """A hub model whose files are not in the local cache: it cannot be checked here."""


@functools.lru_cache(maxsize=16)
def _load(source: str, common_json: str, processor_json: str, local_only: bool) -> tuple[dict[str, Any], Any, Any]:
    """(raw config dict, config object or the error, processor or the error) for one model source; cached, as
    a pipeline is parsed more than once in a process."""
    from transformers import AutoConfig, AutoProcessor, PretrainedConfig

    common = json.loads(common_json) | {"local_files_only": local_only}
    try:
        raw, _ = PretrainedConfig.get_config_dict(source, **common)
    except OSError as e:
        if local_only:
            raise NotCached(str(e)) from None
        raise
    try:
        config: Any = AutoConfig.from_pretrained(source, **common)
    except Exception as e:
        config = e
    try:
        processor: Any = AutoProcessor.from_pretrained(source, **common, **json.loads(processor_json))
    except Exception as e:
        processor = e
    return raw, config, processor


def _cached(spec: ModelSpec) -> bool:
    """Whether a hub model's config.json is in the local Hugging Face cache (cheap: no transformers import)."""
    from huggingface_hub import try_to_load_from_cache

    filename = f"{spec.subfolder}/config.json" if spec.subfolder else "config.json"
    return isinstance(try_to_load_from_cache(spec.id, filename, revision=spec.revision), str)


def _architecture_problems(raw: dict[str, Any], load: LoadOptions) -> list[Problem]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map") or {}
    remote = load.trust_remote_code and bool(auto_map)
    if model_type not in CONFIG_MAPPING_NAMES and not remote:
        if load.trust_remote_code:
            return [
                (
                    (),
                    f"{ROLE}: model_type {model_type!r} is not known to transformers {transformers.__version__}, "
                    "and trust_remote_code is set but its config.json maps no code of its own (no auto_map)",
                )
            ]
        return [
            (
                (),
                f"{ROLE}: model_type {model_type!r} (config.json) is not an architecture transformers "
                f"{transformers.__version__} knows; upgrade transformers, or, for a model that ships its own code, "
                "set trust_remote_code: true on the caption stage",
            )
        ]
    if load.model_class is not None:
        module, _, name = load.model_class.rpartition(".")
        try:
            getattr(importlib.import_module(module or "transformers"), name)
        except (ImportError, AttributeError) as e:
            return [(("model_class",), f"cannot import {load.model_class}: {e}")]
        return []
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return []
    if remote and "AutoModelForImageTextToText" in auto_map:
        return []
    return [
        (
            ("model_class",),
            f"{ROLE}: AutoModelForImageTextToText has no model for model_type {model_type!r}; name the class to load "
            "with model_class (e.g. transformers.LlavaForConditionalGeneration)",
        )
    ]


def _prompt_field(options: GenerationOptions) -> tuple[str, ...]:
    return ("task_prompt",) if options.task_prompt is not None else ("prompt",)


def _probe(processor: Any, config: Any, options: GenerationOptions, side: int) -> tuple[list[Problem], int | None]:
    """Run the processor on a blank image with the stage's prompt: problems, and the input length."""
    field = _prompt_field(options)
    try:
        text = render_prompt(processor, options.prompt, options.system_prompt, options.task_prompt)
    except PromptError as e:
        return [(("task_prompt",), f"{ROLE}: {e}")], None
    except Exception as e:  # the template itself refuses (e.g. no system role)
        where = ("system_prompt",) if options.system_prompt else field
        return [(where, f"{ROLE}: its chat template fails on this prompt: {type(e).__name__}: {e}")], None
    image = Image.new("RGB", (side, side), (127, 127, 127))
    try:
        inputs = model_inputs(
            processor(
                images=[[image]],
                text=[text],
                padding=True,
                padding_side=padding_side(config),
                return_tensors="pt",
                **text_kwargs(processor, text, options.task_prompt is None),
            )
        )
    except Exception as e:
        return [(field, f"{ROLE}: its processor refuses this prompt with an image: {type(e).__name__}: {e}")], None
    ids = inputs.get("input_ids")
    if ids is None:
        return [((), f"{ROLE}: its processor gives no input_ids for a prompt and an image")], None
    token = image_token_id(processor, config)
    if token is not None and not bool((ids == token).any()):
        image_token = getattr(processor, "image_token", None)
        hint = f" (its image token is {image_token!r})" if isinstance(image_token, str) else ""
        return [(field, f"{ROLE}: the prompt carries no image: the processor placed no image token{hint}")], None
    return [], int(ids.shape[1])


def drivable_problems(
    spec: ModelSpec, load: LoadOptions, options: GenerationOptions, max_image_side: int | None
) -> list[Problem]:
    """What keeps the caption stage from driving ``spec``: (field path under the stage, message)."""
    if spec.id is not None and not _cached(spec):
        return []
    source, common = load_source(spec, spec.revision, load.trust_remote_code)
    try:
        raw, config, processor = _load(
            source,
            json.dumps(common, sort_keys=True),
            json.dumps(load.processor_kwargs, sort_keys=True),
            spec.id is not None,
        )
    except NotCached:
        return []
    except Exception as e:
        return [((), f"{ROLE}: cannot read its config.json: {type(e).__name__}: {e}")]
    problems = _architecture_problems(raw, load)
    if problems:
        return problems
    if isinstance(config, Exception):
        return [((), f"{ROLE}: transformers cannot read its config: {type(config).__name__}: {config}")]
    if isinstance(processor, Exception):
        return [((), f"{ROLE}: AutoProcessor cannot load its processor: {type(processor).__name__}: {processor}")]
    if getattr(processor, "image_processor", None) is None:
        return [((), f"{ROLE}: its processor ({type(processor).__name__}) takes no images")]
    problems, length = _probe(processor, config, options, min(PROBE_SIDE, max_image_side or PROBE_SIDE))
    return problems + _length_problems(config, options, length)


def _length_problems(config: Any, options: GenerationOptions, length: int | None) -> list[Problem]:
    window = context_window(config)
    if window is None:
        return []
    if options.max_new_tokens >= window:
        return [
            (
                ("max_new_tokens",),
                f"{ROLE}: {options.max_new_tokens} new tokens do not fit its context window of {window}",
            )
        ]
    limit = input_limit(config, options.max_new_tokens, options.max_input_tokens)
    if length is None or limit is None or length <= limit:
        return []
    own = window if is_encoder_decoder(config) else window - options.max_new_tokens
    field, why = (
        ("max_input_tokens", f"max_input_tokens {options.max_input_tokens}")
        if options.max_input_tokens is not None and options.max_input_tokens < own
        else (
            "max_new_tokens",
            f"its context window of {window}"
            + ("" if is_encoder_decoder(config) else f" less {options.max_new_tokens} new tokens"),
        )
    )
    return [
        (
            (field,),
            f"{ROLE}: a {PROBE_SIDE}-px image and the prompt already take {length} tokens, "
            f"over the limit of {limit} ({why})",
        )
    ]
