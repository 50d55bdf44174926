"""A tiny random-weight Qwen2-VL captioner, saved in the real on-disk format, built without a model hub.

Tests and the offline demo load it by path through the same code as a real Qwen2-VL checkpoint:
`AutoProcessor.from_pretrained` + `AutoModelForImageTextToText.from_pretrained`. The tokenizer is a
byte-level BPE trained here on a few sentences (so any text encodes), with the special tokens Qwen2-VL's
chat template and image placeholder use; the image processor is Qwen2-VL's own with a small pixel budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Qwen2-VL's chat template, without the video/system-prompt branches the captioner never uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_CORPUS = [
    "The image shows a photograph of a cat sitting on a wooden table next to a window.",
    "A red rocket stands on the launch pad under a clear blue sky.",
    "An astronaut in a white suit holds a flag on the surface of the moon.",
    "A cup of coffee with latte art on a saucer, seen from above.",
    "Several old coins lie on a dark background; some are worn and scratched.",
    "A grey cat looks at the camera. The picture is slightly blurred, with warm light.",
    "Describe this image in detail. What is in the picture? Write one caption.",
]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


@dataclass(frozen=True)
class Qwen2VLSize:
    """Dimensions of a Qwen2-VL; TINY for tests, QWEN2_VL_2B the real 2B layout (for GPU benchmarks)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    vocab_size: int | None = None  # None: the tokenizer's; larger pads the embedding like real checkpoints
    vision_depth: int = 1
    vision_embed_dim: int = 32
    vision_heads: int = 2
    vision_mlp_ratio: int = 2


TINY = Qwen2VLSize()
QWEN2_VL_2B = Qwen2VLSize(
    hidden_size=1536,
    intermediate_size=8960,
    layers=28,
    heads=12,
    kv_heads=2,
    vocab_size=151936,
    vision_depth=32,
    vision_embed_dim=1280,
    vision_heads=16,
    vision_mlp_ratio=4,
)


def build_tiny_qwen2_vl(
    folder: str | Path,
    size: Qwen2VLSize = TINY,
    max_pixels: int = 28 * 28 * 16,
    initializer_range: float = 0.5,
    eos_scale: float = 2.0,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Save a random-weight Qwen2-VL (model + processor + chat template) into ``folder``; returns it.

    ``initializer_range`` is large so greedy decoding of random weights has clear winners: small
    floating-point differences (batched vs single, left padding) must not flip a token. The end-of-
    sequence row of the output layer is scaled by ``eos_scale`` so that some captions end early and
    others run to max_new_tokens: batches then hold sequences of different lengths, as real ones do.
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = size.hidden_size // size.heads // 2  # rotary frequencies per head
    quarter = 3 * half // 8  # Qwen2-VL splits them (temporal, height, width) = (16, 24, 24) of 64
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": max(size.vocab_size or 0, len(tokenizer)),
            "hidden_size": size.hidden_size,
            "intermediate_size": size.intermediate_size,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "max_position_embeddings": 32768,
            "initializer_range": initializer_range,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [half - 2 * quarter, quarter, quarter],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": size.vision_depth,
            "embed_dim": size.vision_embed_dim,
            "hidden_size": size.hidden_size,
            "num_heads": size.vision_heads,
            "mlp_ratio": size.vision_mlp_ratio,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": initializer_range,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[ids["<|im_end|>"]] *= eos_scale
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    size = {"shortest_edge": 28 * 28, "longest_edge": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=CHAT_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python -m curate.testing.tiny_vlm DIR: the offline demo's captioner
    import sys

    print(build_tiny_qwen2_vl(sys.argv[1] if len(sys.argv) > 1 else "demo-data/models/tiny-qwen2-vl"))
