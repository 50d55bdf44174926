"""Tiny random-weight captioners of every vision-language family the caption stage drives, built without a hub.

One builder per family writes a folder in the real on-disk format: the model's `config.json` and
safetensors weights, the processor's files (its image processor, a tokenizer with the family's special
tokens, and the family's chat template where the family has one), and a `generation_config.json`.
Tests, the benchmark and the demo load the folder through the stage's own loading path
(`AutoProcessor` + `AutoModelForImageTextToText`), exactly as they would a hub checkpoint.

The tokenizers are byte-level BPEs trained here on a few sentences (any text encodes). Models are a few
layers of width 32-64 with tiny vision towers and small image sizes; the weights are initialised with a
large range so greedy decoding has clear winners (batched and one-by-one results must agree), and the
end-of-sequence row of the output layer is scaled so captions end at different lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.testing.tiny_vlm import _CORPUS, build_tiny_qwen2_vl

INIT = 0.5  # initializer range: large, so random greedy decoding is not decided by rounding
EOS_SCALE = 2.0


# ----------------------------------------------------------------------------------------------------
# tokenizers and chat templates


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
    """A byte-level BPE trained on a few sentences, with ``special`` tokens, as a transformers fast tokenizer.
    ``named`` gives processor-facing names to special tokens (``{"image_token": "<image>"}``), as the
    family's real tokenizer_config.json does with `extra_special_tokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    ordered = list(dict.fromkeys([t for t in (pad, bos, eos, unk) if t] + special))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ordered,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos and bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    kwargs: dict[str, Any] = {"eos_token": eos, "pad_token": pad, "padding_side": "left"}
    if bos:
        kwargs["bos_token"] = bos
    if unk:
        kwargs["unk_token"] = unk
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens=named or {}, **kwargs)


def chat_template(*, user: str, end: str, assistant: str, image: str, bos: str = "", system: str | None = None) -> str:
    """A Jinja chat template in the common layout: ``user`` / ``system`` open a turn (``{role}`` is
    replaced by the role), ``end`` closes it, an image part renders as ``image``, and the generation
    prompt is ``assistant``. Without ``system``, a system message is prepended to the first user turn."""
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
    return (
        bos
        + loop.replace("{role}", "{{ message['role'] }}")
        + "{% if add_generation_prompt %}"
        + assistant
        + "{% endif %}"
    )


CHATML = {"user": "<|im_start|>{role}\n", "end": "<|im_end|>\n", "assistant": "<|im_start|>assistant\n"}
CHATML_SYSTEM = "<|im_start|>system\n"


# ----------------------------------------------------------------------------------------------------
# saving


def _finish(model, processor, folder: Path, eos_id: int, pad_id: int, embed_scale: float = 1.0) -> Path:
    """Make the random weights route the image into the text, set greedy generation defaults, and save
    model and processor in their real formats.

    Matrices the architecture initialises to zero (Gemma 3's image projection) are drawn at random, and
    for families that multiply token embeddings by sqrt(hidden) (Gemma) the embeddings are scaled by
    ``embed_scale``: otherwise the last prompt token decides every caption and the image none. The end-of-
    sequence row of the output layer is scaled so that captions end at different lengths."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, INIT)
        model.get_input_embeddings().weight.mul_(embed_scale)
        model.get_output_embeddings().weight[eos_id] *= EOS_SCALE
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _llm(kind: str, tokenizer, hidden: int = 32, layers: int = 2, heads: int = 2, **extra: Any) -> dict[str, Any]:
    """A text config for ``kind`` (llama, qwen2, mistral, gemma2, gemma3_text, opt, ...), tiny."""
    config = {
        "model_type": kind,
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "initializer_range": INIT,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    config.update(extra)
    return config


def _siglip(image_size: int, patch: int, hidden: int = 32, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
        **extra,
    }


# ----------------------------------------------------------------------------------------------------
# the families


def build_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    return build_tiny_qwen2_vl(folder, seed=seed)


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_tokenizer():
    return bpe_tokenizer(
        [*QWEN_SPECIAL, "<|image_pad|>", "<|video_pad|>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _qwen_ids(tokenizer) -> dict[str, int]:
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }


def build_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    hidden, heads = 32, 2
    half = hidden // heads // 2
    quarter = 3 * half // 8
    config = Qwen2_5_VLConfig(
        text_config=_llm(
            "qwen2_5_vl_text",
            tokenizer,
            hidden,
            heads=heads,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [half - 2 * quarter, quarter, quarter],
            },
        ),
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "window_size": 56,
            "fullatt_block_indexes": [0],
            "initializer_range": INIT,
        },
        **_qwen_ids(tokenizer),
    )
    _seeded(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 16}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=chat_template(**CHATML, image=QWEN_IMAGE, system=CHATML_SYSTEM),
    )
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_qwen3_vl(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    hidden, head_dim = 32, 16
    half = head_dim // 2
    config = Qwen3VLConfig(
        text_config=_llm(
            "qwen3_vl_text",
            tokenizer,
            hidden,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [half - 4, 2, 2],
                "mrope_interleaved": True,
            },
        ),
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
            "initializer_range": INIT,
        },
        **_qwen_ids(tokenizer),
    )
    _seeded(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    size = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 16}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=16),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16),
        chat_template=chat_template(**CHATML, image=QWEN_IMAGE, system=CHATML_SYSTEM),
    )
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


IDEFICS3_TILES = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _idefics3_parts(video: bool):
    """Tokenizer, processor pieces and configs shared by Idefics3 (SmolVLM v1) and SmolVLM2: 64-px tiles
    of 16-px patches, pixel shuffle by 2, so 4 image tokens per tile; images are split into tiles up to
    256 px, plus a downscaled global image."""
    tokenizer = bpe_tokenizer(
        ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *IDEFICS3_TILES],
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        bos="<|im_start|>",
        named={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
    )
    template = chat_template(
        user="<|im_start|>User:",
        end="<end_of_utterance>\n",
        assistant="<|im_start|>Assistant:",
        image="<image>",
        system="<|im_start|>System:",
    )
    tile, patch, scale = 64, 16, 2
    return tokenizer, template, tile, patch, scale


def build_idefics3(folder: Path, seed: int = 0) -> Path:
    """Idefics3, the architecture of SmolVLM (v1) checkpoints."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokenizer, template, tile, patch, scale = _idefics3_parts(video=False)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile})
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=(tile // patch) ** 2 // scale**2, chat_template=template
    )
    config = Idefics3Config(
        text_config=_llm("llama", tokenizer),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
            "initializer_range": INIT,
        },
        scale_factor=scale,
        image_token_id=processor.image_token_id,
    )
    _seeded(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_smolvlm(folder: Path, seed: int = 0) -> Path:
    """SmolVLM2."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tokenizer, template, tile, patch, scale = _idefics3_parts(video=True)
    size, max_size = {"longest_edge": 4 * tile}, {"longest_edge": tile}
    processor = SmolVLMProcessor(
        SmolVLMImageProcessor(size=size, max_image_size=max_size),
        tokenizer,
        SmolVLMVideoProcessor(size=size, max_image_size=max_size),
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=template,
    )
    config = SmolVLMConfig(
        text_config=_llm("llama", tokenizer),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
            "initializer_range": INIT,
        },
        scale_factor=scale,
        image_token_id=processor.image_token_id,
    )
    _seeded(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _anyres_pinpoints(tile: int) -> list[list[int]]:
    return [[tile * h, tile * w] for h in (1, 2, 3) for w in (1, 2, 3)]


def build_llava_onevision(folder: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision (SigLIP tiles, Qwen2 language model, any-resolution grid)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = bpe_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"},
    )
    tile, patch = 32, 8
    pinpoints = _anyres_pinpoints(tile)
    size = {"height": tile, "width": tile}
    processor = LlavaOnevisionProcessor(
        LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer,
        LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chat_template(**CHATML, image="<image>\n", system=CHATML_SYSTEM),
    )
    image, video = _ids(tokenizer, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        text_config=_llm("qwen2", tokenizer),
        vision_config=_siglip(tile, patch, vision_use_head=False),
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    _seeded(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_llava_next(folder: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT (LLaVA-1.6: CLIP tiles, a Mistral language model, any-resolution grid, [INST] prompts)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = bpe_tokenizer(
        ["<image>"], eos="</s>", pad="<unk>", bos="<s>", unk="<unk>", named={"image_token": "<image>"}, add_bos=True
    )
    tile, patch = 32, 8
    pinpoints = _anyres_pinpoints(tile)
    processor = LlavaNextProcessor(
        LlavaNextImageProcessor(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
        ),
        tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template(user="[INST] ", end=" [/INST]", assistant="", image="<image>\n"),
    )
    config = LlavaNextConfig(
        text_config=_llm("mistral", tokenizer),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
            "projection_dim": 32,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(tile // patch) ** 2,
    )
    _seeded(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_gemma3(folder: Path, seed: int = 0) -> Path:
    """Gemma 3 (SigLIP encoder, pooled to a fixed number of soft tokens between <start_of_image> and
    <end_of_image>; turns end with <end_of_turn>)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = bpe_tokenizer(
        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        unk="<unk>",
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    image_size, patch, tokens = 64, 16, 4  # 4x4 patches pooled to 2x2 soft tokens
    processor = Gemma3Processor(
        Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer,
        chat_template=chat_template(
            bos="<bos>",
            user="<start_of_turn>user\n",
            end="<end_of_turn>\n",
            assistant="<start_of_turn>model\n",
            image="<start_of_image>",
        ),
        image_seq_length=tokens,
    )
    boi, eoi, soft, end_of_turn = _ids(
        tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>"
    )
    config = Gemma3Config(
        text_config=_llm("gemma3_text", tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=512),
        vision_config=_siglip(image_size, patch, vision_use_head=False),
        mm_tokens_per_image=tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
        initializer_range=INIT,
    )
    _seeded(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, end_of_turn, tokenizer.pad_token_id, embed_scale=0.03)


def build_internvl(folder: Path, seed: int = 0) -> Path:
    """InternVL 3 in the transformers format (-hf checkpoints): 32-px tiles, images cropped into up to 6 tiles
    plus a thumbnail, pixel shuffle by 2, a Qwen2 language model."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = bpe_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tile, patch = 32, 8
    size = {"height": tile, "width": tile}
    processor = InternVLProcessor(
        GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=6),
        tokenizer,
        InternVLVideoProcessor(size=size),
        image_seq_length=(tile // patch) ** 2 // 4,
        chat_template=chat_template(**CHATML, image="<IMG_CONTEXT>\n", system=CHATML_SYSTEM),
    )
    config = InternVLConfig(
        text_config=_llm("qwen2", tokenizer),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": [tile, tile],
            "patch_size": [patch, patch],
            "initializer_range": INIT,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(tile // patch) ** 2 // 4,
        downsample_ratio=0.5,
    )
    _seeded(seed)
    model = InternVLForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_blip_2(folder: Path, seed: int = 0) -> Path:
    """BLIP-2 (ViT, Q-Former with learned queries, OPT language model); no chat template: prompted with a
    plain text prefix."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    # the processor adds its own <image> token (BLIP-2 checkpoints' tokenizers do not name one)
    tokenizer = bpe_tokenizer([], eos="</s>", pad="<pad>", bos="</s>", unk="<unk>", add_bos=True)
    queries = 4
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=queries
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": INIT,
        },
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "vocab_size": 100,
            "initializer_range": INIT,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 32,
            "init_std": INIT,
            "max_position_embeddings": 512,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT,
        tie_word_embeddings=False,
    )
    _seeded(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_paligemma(folder: Path, seed: int = 0) -> Path:
    """PaliGemma 2 (SigLIP, a Gemma 2 language model, a prefix-LM over image + task prompt); no chat template:
    prompted with a task such as `caption en`."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = bpe_tokenizer(
        ["<image>"], eos="<eos>", pad="<pad>", bos="<bos>", unk="<unk>", named={"image_token": "<image>"}
    )
    image_size, patch = 32, 8
    tokens = (image_size // patch) ** 2
    processor = PaliGemmaProcessor(
        SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_seq_length=tokens), tokenizer
    )
    hidden = 32
    config = PaliGemmaConfig(
        text_config=_llm("gemma2", tokenizer, hidden, head_dim=16, query_pre_attn_scalar=16, sliding_window=512),
        vision_config=_siglip(image_size, patch, projection_dim=hidden, vision_use_head=False),
        image_token_index=processor.image_token_id,
        projection_dim=hidden,
        hidden_size=hidden,
        vocab_size=len(tokenizer),
    )
    _seeded(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id, embed_scale=0.1)


def build_florence2(folder: Path, seed: int = 0) -> Path:
    """Florence-2 (DaViT encoder, BART encoder-decoder); task-token prompts (`<MORE_DETAILED_CAPTION>`)."""
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tokenizer = bpe_tokenizer(
        ["<image>"], eos="</s>", pad="<pad>", bos="<s>", unk="<unk>", named={"image_token": "<image>"}
    )
    image_size = 64  # strides 4*2*2*2: a 2x2 grid, plus one pooled token
    tokens = (image_size // 32) ** 2 + 1
    processor = Florence2Processor(
        CLIPImageProcessor(
            size={"height": image_size, "width": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_seq_length=tokens,
        ),
        tokenizer,
    )
    hidden = 32
    config = Florence2Config(
        vision_config={
            "depths": [1, 1, 1, 1],
            "embed_dim": [16, 16, 32, 32],
            "num_heads": [1, 1, 2, 2],
            "num_groups": [1, 1, 2, 2],
            "window_size": 2,
            "projection_dim": hidden,
            "drop_path_rate": 0.0,
            "initializer_range": INIT,
        },
        text_config={
            "model_type": "bart",
            "vocab_size": len(tokenizer),
            "d_model": hidden,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 256,
            "init_std": INIT,
            "dropout": 0.0,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": None,
        },
        image_token_id=processor.image_token_id,
    )
    _seeded(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    return _finish(model, processor, folder, tokenizer.eos_token_id, tokenizer.pad_token_id)


# model_type (as config.json names it) -> builder
BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "llava_onevision": build_llava_onevision,
    "llava_next": build_llava_next,
    "gemma3": build_gemma3,
    "internvl": build_internvl,
    "blip-2": build_blip_2,
    "paligemma": build_paligemma,
    "florence2": build_florence2,
}


def build_tiny_vlms(folder: str | Path, families: list[str] | None = None) -> dict[str, Path]:
    """<folder>/<model_type> for each family (all by default); returns model_type -> folder."""
    root = Path(folder)
    return {name: BUILDERS[name](root / name) for name in families or list(BUILDERS)}


if __name__ == "__main__":  # python -m curate.testing.tiny_vlms DIR [model_type ...]
    import sys

    for name, path in build_tiny_vlms(sys.argv[1] if len(sys.argv) > 1 else "tiny-vlms", sys.argv[2:] or None).items():
        print(name, path)
