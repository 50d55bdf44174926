"""How to drive a transformers vision-language model, read from its own files rather than from its name.

Every family the caption stage supports (Qwen2/2.5/3-VL, SmolVLM / Idefics3, LLaVA-NeXT / OneVision,
Gemma 3, InternVL, BLIP-2, PaliGemma 2, Florence-2) goes through the same four decisions:

- the prompt: the processor's (or tokenizer's) chat template applied to one user turn holding the image
  and the instruction; or, for models trained on fixed task prompts (PaliGemma, Florence-2, BLIP-2) and
  having no chat template, the stage's `task_prompt` used as it is;
- the padding side: left for decoder-only models (the prompt must end where generation starts), right
  for encoder-decoders (Florence-2's BART encoder has learned absolute positions);
- where the image goes: the chat template places the family's image placeholder, and the processor
  expands it into the image's tokens (or, with a task prompt, inserts them itself);
- the context window: the language model's `max_position_embeddings`, which bounds prompt + image tokens
  (+ the new tokens for a decoder-only model).

Special tokens follow `ProcessorMixin.apply_chat_template(tokenize=True)`: a rendered chat prompt that already
starts with the tokenizer's BOS (Gemma's and Mistral's templates write it) is tokenized without the tokenizer's
own special tokens, so the model never sees two BOS tokens; any other prompt is tokenized with them, as the
processor does by default. `pixel_budget` reads the most pixels a model's image processor keeps, so an image sent
to a server can be downscaled to it before it is encoded.

Shared by the captioner (`curate.caption.vlm`) and the check before any work (`curate.caption.preflight`).
"""

from __future__ import annotations

from typing import Any


class PromptError(ValueError):
    """The model cannot be prompted with the given settings (no chat template and no task prompt)."""


def chat_template(processor: Any) -> str | None:
    tokenizer = getattr(processor, "tokenizer", None)
    return getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None) or None


def known_tasks(processor: Any) -> list[str]:
    """Task tokens a task-prompted processor defines (Florence-2's `task_prompts_without_inputs`)."""
    return sorted(getattr(processor, "task_prompts_without_inputs", None) or {})


def render_prompt(processor: Any, prompt: str, system_prompt: str | None, task_prompt: str | None) -> str:
    """The text given to the processor with each image."""
    if task_prompt is not None:
        return task_prompt
    if not chat_template(processor):
        tasks = known_tasks(processor)
        hint = f" (its processor knows the tasks {', '.join(tasks)})" if tasks else ""
        raise PromptError(
            f"the model has no chat template; give `task_prompt`, the prompt it was trained with{hint}, "
            "with the model's image token where its processor expects one"
        )
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    # older checkpoints keep the template in tokenizer_config.json only: apply it there
    owner = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def text_kwargs(processor: Any, text: str, from_template: bool) -> dict[str, Any]:
    """Tokenizer arguments for a prompt, by `apply_chat_template(tokenize=True)`'s rule: a template's output that
    starts with BOS gets no special tokens added (the template wrote them); anything else the processor's default."""
    tokenizer = getattr(processor, "tokenizer", None) or processor
    bos = getattr(tokenizer, "bos_token", None)
    return {"add_special_tokens": False} if from_template and bos and text.startswith(bos) else {}


def pixel_budget(image_processor: dict[str, Any]) -> int | None:
    """The most pixels a model's image processor keeps of one image, from its `preprocessor_config.json`: Qwen-VL's
    `max_pixels` (or `size.longest_edge`, a pixel count there), a fixed `size` (height x width, times
    `max_patches` for InternVL-style cropping), the largest any-resolution grid (LLaVA-NeXT / OneVision), or a
    longest side (Idefics3 / SmolVLM, squared). None when it states none of these."""
    size = image_processor.get("size") or {}
    kind = str(image_processor.get("image_processor_type", ""))
    if isinstance(image_processor.get("max_pixels"), int):
        return int(image_processor["max_pixels"])
    if "Qwen" in kind and isinstance(size.get("longest_edge"), int):
        return int(size["longest_edge"])
    grids = image_processor.get("image_grid_pinpoints")
    if grids:
        return max(int(h) * int(w) for h, w in grids)
    if isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
        patches = int(image_processor.get("max_patches") or 1) if image_processor.get("crop_to_patches") else 1
        return int(size["height"]) * int(size["width"]) * (patches + (patches > 1))
    if isinstance(size.get("longest_edge"), int):
        return int(size["longest_edge"]) ** 2
    return None


def model_pixel_budget(source: str) -> int | None:
    """`pixel_budget` of a model given as a local folder or a hub id in the local Hugging Face cache (the files of
    a server's model, read where the client runs): its `preprocessor_config.json`, or the image processor inside
    `processor_config.json` (as transformers 5 saves it). None when neither is here."""
    import json
    import os

    def find(name: str) -> str | None:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            return path
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, name)
        except Exception:
            return None
        return cached if isinstance(cached, str) else None

    for name, inner in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = find(name)
        if path is None:
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        data = data.get(inner) if inner else data
        if isinstance(data, dict):
            return pixel_budget(data)
    return None


def is_encoder_decoder(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def padding_side(config: Any) -> str:
    return "right" if is_encoder_decoder(config) else "left"


def context_window(config: Any) -> int | None:
    """The language model's position limit, if its config states one."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "max_position_embeddings", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def input_limit(config: Any, max_new_tokens: int, max_input_tokens: int | None) -> int | None:
    """The most prompt + image tokens one row may have: the context window (less the new tokens for a
    decoder-only model, whose output extends the same sequence), or ``max_input_tokens`` if lower."""
    window = context_window(config)
    own = None if window is None else (window if is_encoder_decoder(config) else window - max_new_tokens)
    limits = [n for n in (own, max_input_tokens) if n is not None]
    return min(limits) if limits else None


def image_token_id(processor: Any, config: Any) -> int | None:
    """The token id the processor expands each image into, where the processor or config names it."""
    for owner, name in ((processor, "image_token_id"), (config, "image_token_id"), (config, "image_token_index")):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    return None


def model_inputs(inputs: Any) -> Any:
    """Drop what processors return for training only (PaliGemma's `labels`): generation never takes it."""
    inputs.pop("labels", None)
    return inputs
