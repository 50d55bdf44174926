"""The pieces every tiny random-weight VLM in `curate.testing.tiny_vlms` is made of, built without a hub.

- `bpe_tokenizer`: a byte-level BPE trained here on a few sentences (any text encodes) with the family's
  special tokens, named for its processor the way the real tokenizer_config.json names them;
- `chat_template`: a Jinja chat template in a family's turn layout (ChatML, Gemma, Mistral, Idefics3);
- `text_config` / `vision_config`: small sub-configs (width ``size.hidden``, ``size.layers`` layers);
- `save`: instantiate the model from its config with random weights, make them route the image into the
  text, set greedy generation defaults and save model and processor in their real on-disk formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.testing.tiny_vlm import _CORPUS

INIT = 0.5  # initializer range: large, so greedy decoding of random weights has clear winners
EOS_SCALE = 2.0  # the end-of-sequence logit row is scaled: captions end at different lengths


@dataclass(frozen=True)
class Size:
    """The language model's width and depth (vision towers stay tiny: their cost is not what is measured)."""

    hidden: int = 32
    layers: int = 2
    heads: int = 2


TINY = Size()
SMALL = Size(hidden=128, layers=2)  # the CPU benchmark: generation is less Python-bound than at TINY


def bpe_tokenizer(
    special: list[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    named: dict[str, str] | None = None,
    add_bos: bool = False,
    vocab_size: int = 400,
):
    """A transformers fast tokenizer. ``named`` gives special tokens the names processors look up
    (``{"image_token": "<image>"}``, `extra_special_tokens` in tokenizer_config.json); ``add_bos``
    prepends ``bos`` to every encoded text, as Llama/Mistral/OPT tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys([t for t in (pad, bos, eos, unk) if t] + special)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos and bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    tokens = {"eos_token": eos, "pad_token": pad, "bos_token": bos, "unk_token": unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        extra_special_tokens=named or {},
        padding_side="left",
        **{k: v for k, v in tokens.items() if v is not None},
    )


def chat_template(*, user: str, end: str, assistant: str, image: str, bos: str = "", system: str | None = None) -> str:
    """``user`` / ``system`` open a turn (``{role}`` becomes the role), ``end`` closes it, an image part
    renders as ``image`` and the generation prompt is ``assistant``. Without ``system`` (Gemma, Mistral) a
    system message is put at the start of the first user turn, as those families' templates do."""
    part = (
        "{% for content in message['content'] %}"
        f"{{% if content['type'] == 'image' %}}{image}"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    )
    body = "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + part + "{% endif %}"
    if system is None:
        loop = (
            "{% set sys = namespace(text='') %}"
            "{% for message in messages %}{% if message['role'] == 'system' %}"
            "{% set sys.text = message['content'][0]['text'] + '\\n\\n' %}"
            f"{{% else %}}{user}{{{{ sys.text }}}}{{% set sys.text = '' %}}{body}{end}{{% endif %}}{{% endfor %}}"
        )
    else:
        opening = "{% if message['role'] == 'system' %}" + system + "{% else %}" + user + "{% endif %}"
        loop = "{% for message in messages %}" + opening + body + end + "{% endfor %}"
    generation = "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    return bos + loop.replace("{role}", "{{ message['role'] }}") + generation


CHATML = {"user": "<|im_start|>{role}\n", "end": "<|im_end|>\n", "assistant": "<|im_start|>assistant\n"}
CHATML_SYSTEM = "<|im_start|>system\n"


def ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def text_config(kind: str, tokenizer, size: Size, **extra: Any) -> dict[str, Any]:
    """A decoder config of ``kind`` (llama, qwen2, mistral, gemma2, gemma3_text, ...)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return {
        "model_type": kind,
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden,
        "intermediate_size": 2 * size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "initializer_range": INIT,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": bos,
        "tie_word_embeddings": False,
        **extra,
    }


def vision_config(image_size: Any, patch: Any, **extra: Any) -> dict[str, Any]:
    """A one-layer ViT of width 32 (SigLIP, CLIP, InternViT, BLIP-2's ViT, Idefics3's, ...)."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
        "initializer_range": INIT,
        **extra,
    }


def save(
    model_class: Any,
    config: Any,
    processor: Any,
    folder: Path,
    *,
    seed: int,
    eos: int,
    embed_scale: float = 1.0,
    forced_eos: bool = False,
) -> Path:
    """Random weights for ``config``, made to route the image into the text, saved with the processor.

    Matrices the architecture initialises to zero (Gemma 3's image projection) are drawn at random, and for
    families that multiply token embeddings by sqrt(hidden) (Gemma) the embeddings are scaled by
    ``embed_scale``: otherwise the last prompt token decides every caption and the image none. ``forced_eos``:
    the generation config forces the end token at the last step (`forced_eos_token_id`, BART's)."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, INIT)
        model.get_input_embeddings().weight.mul_(embed_scale)
        model.get_output_embeddings().weight[eos] *= EOS_SCALE
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.do_sample = False
    if forced_eos:
        model.generation_config.forced_eos_token_id = eos
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
