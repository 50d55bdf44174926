"""Tiny random-weight captioners of every vision-language family the caption stage drives, built without a hub.

One builder per family writes a folder in the real on-disk format: the model's `config.json`, safetensors
weights and `generation_config.json`, and the processor's files (its own image processor class, a tokenizer
with the family's special tokens, and the family's chat template where the family has one). Tests, the
benchmark and the demo load the folder through the stage's own loading path (`AutoProcessor` +
`AutoModelForImageTextToText`), exactly as they would a hub checkpoint. `BUILDERS` is keyed by the
`model_type` each folder's config.json names. Images are small (32-64 px tiles); the language model is
`Size` wide (32 by default) with 2 layers, its vision tower one layer of width 32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from curate.testing.tiny_vlm import Qwen2VLSize, build_tiny_qwen2_vl
from curate.testing.vlm_parts import (
    CHATML,
    CHATML_SYSTEM,
    INIT,
    TINY,
    Size,
    bpe_tokenizer,
    chat_template,
    ids,
    save,
    text_config,
    vision_config,
)

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def build_qwen2_vl(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    shape = Qwen2VLSize(
        hidden_size=size.hidden, intermediate_size=2 * size.hidden, layers=size.layers, heads=size.heads
    )
    return build_tiny_qwen2_vl(folder, shape, seed=seed)


def _qwen(size: Size, head_dim: int, mrope: dict, vision: dict, processor_class: str, video_class: str, patch: int):
    """Qwen2.5-VL and Qwen3-VL: ChatML, dynamic resolution (images of 1 to 16 merged patches of 2x2)."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    merged = (2 * patch) ** 2
    pixels = {"shortest_edge": merged, "longest_edge": merged * 16}
    processor = getattr(tf, processor_class)(
        image_processor=tf.Qwen2VLImageProcessor(size=pixels, patch_size=patch),
        tokenizer=tokenizer,
        video_processor=getattr(tf, video_class)(size=pixels, patch_size=patch),
        chat_template=chat_template(**CHATML, image=QWEN_IMAGE, system=CHATML_SYSTEM),
    )
    image, video, start, end = ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    rope = {"rope_type": "default", "rope_theta": 1e6, **mrope}
    text = text_config("", tokenizer, size, head_dim=head_dim, rope_parameters=rope)
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": patch} | vision
    ids_ = {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }
    return tokenizer, processor, text, vision | {"out_hidden_size": size.hidden}, ids_


def build_qwen2_5_vl(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    import transformers as tf

    head_dim = size.hidden // size.heads
    quarter = 3 * head_dim // 16  # (temporal, height, width) rotary sections, as (16, 24, 24) of 64
    mrope = {"mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}
    vision = {"window_size": 56, "fullatt_block_indexes": [0]}
    tokenizer, processor, text, vision, token_ids = _qwen(
        size, head_dim, mrope, vision, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14
    )
    config = tf.Qwen2_5_VLConfig(
        text_config=text | {"model_type": "qwen2_5_vl_text"}, vision_config=vision, **token_ids
    )
    return save(tf.Qwen2_5_VLForConditionalGeneration, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


# Qwen/Qwen2.5-VL-3B-Instruct's published config.json and preprocessor_config.json: the captioner bench/gpu.py
# measures at real size (random weights; the tokenizer is the tiny BPE with Qwen's special tokens, the embedding
# padded to the real vocabulary as checkpoints pad it).
QWEN2_5_VL_3B_TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
QWEN2_5_VL_3B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}
QWEN2_5_VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}  # min_pixels / max_pixels


def build_qwen2_5_vl_3b(
    folder: Path,
    device: str = "cpu",
    dtype: str = "bfloat16",
    text_layers: int | None = None,
    vision_depth: int | None = None,
    seed: int = 0,
) -> Path:
    """Qwen2.5-VL-3B's architecture with random weights, built on ``device`` in ``dtype`` and saved with its
    processor. ``text_layers`` / ``vision_depth`` cut the depth (every width stays the published one), for a
    machine that cannot hold 3.75B parameters (bench/gpu.py's dry run)."""
    import torch
    import transformers as tf

    size = Size(hidden=QWEN2_5_VL_3B_TEXT["hidden_size"], layers=1, heads=QWEN2_5_VL_3B_TEXT["num_attention_heads"])
    tokenizer, _, _, _, token_ids = _qwen(size, 128, {}, {}, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14)
    processor = tf.Qwen2_5_VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(size=QWEN2_5_VL_PIXELS, patch_size=14),
        tokenizer=tokenizer,
        video_processor=tf.Qwen2VLVideoProcessor(size=QWEN2_5_VL_PIXELS, patch_size=14),
        chat_template=chat_template(**CHATML, image=QWEN_IMAGE, system=CHATML_SYSTEM),
    )
    text = {
        **QWEN2_5_VL_3B_TEXT,
        "model_type": "qwen2_5_vl_text",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.pad_token_id,
    }
    vision = dict(QWEN2_5_VL_3B_VISION)
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_qwen3_vl(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    import transformers as tf

    mrope = {"mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision = {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    tokenizer, processor, text, vision, token_ids = _qwen(
        size, 16, mrope, vision, "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16
    )
    config = tf.Qwen3VLConfig(text_config=text | {"model_type": "qwen3_vl_text"}, vision_config=vision, **token_ids)
    return save(tf.Qwen3VLForConditionalGeneration, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


IDEFICS3_TILES = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _idefics3(prefix: str, size: Size, seed: int, folder: Path) -> Path:
    """Idefics3 (SmolVLM v1 checkpoints) and SmolVLM2: images split into 64-px tiles (up to 256 px) plus a
    global image, 16-px patches, pixel shuffle by 2 (4 image tokens per tile), `User:`/`Assistant:` turns."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *IDEFICS3_TILES],
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        bos="<|im_start|>",
        named={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>"},
    )
    template = chat_template(
        user="<|im_start|>User:",
        end="<end_of_utterance>\n",
        assistant="<|im_start|>Assistant:",
        image="<image>",
        system="<|im_start|>System:",
    )
    tile, patch = 64, 16
    sizes = {"size": {"longest_edge": 4 * tile}, "max_image_size": {"longest_edge": tile}}
    parts = [getattr(tf, f"{prefix}ImageProcessor")(**sizes), tokenizer]
    if prefix == "SmolVLM":
        parts.append(tf.SmolVLMVideoProcessor(**sizes))
    processor = getattr(tf, f"{prefix}Processor")(
        *parts, image_seq_len=(tile // patch) ** 2 // 4, chat_template=template
    )
    config = getattr(tf, f"{prefix}Config")(
        text_config=text_config("llama", tokenizer, size),
        vision_config=vision_config(tile, patch),
        scale_factor=2,
        image_token_id=processor.image_token_id,
    )
    model_class = getattr(tf, f"{prefix}ForConditionalGeneration")
    return save(model_class, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


def build_idefics3(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    return _idefics3("Idefics3", size, seed, folder)


def build_smolvlm(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    return _idefics3("SmolVLM", size, seed, folder)


ANYRES_TILE, ANYRES_PATCH = 32, 8
PINPOINTS = [[ANYRES_TILE * h, ANYRES_TILE * w] for h in (1, 2, 3) for w in (1, 2, 3)]  # any-resolution grids


def build_llava_onevision(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP tiles on an any-resolution grid, a Qwen2 language model, ChatML."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"},
    )
    tile = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    processor = tf.LlavaOnevisionProcessor(
        tf.LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=PINPOINTS),
        tokenizer,
        tf.LlavaOnevisionVideoProcessor(size=tile),
        num_image_tokens=(ANYRES_TILE // ANYRES_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chat_template(**CHATML, image="<image>\n", system=CHATML_SYSTEM),
    )
    image, video = ids(tokenizer, "<image>", "<video>")
    config = tf.LlavaOnevisionConfig(
        text_config=text_config("qwen2", tokenizer, size),
        vision_config=vision_config(ANYRES_TILE, ANYRES_PATCH, model_type="siglip_vision_model", vision_use_head=False),
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model_class = tf.LlavaOnevisionForConditionalGeneration
    return save(model_class, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


def build_llava_next(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): CLIP tiles on an any-resolution grid, a Mistral language model, `[INST]` prompts."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<image>"], eos="</s>", pad="<unk>", bos="<s>", unk="<unk>", named={"image_token": "<image>"}, add_bos=True
    )  # Mistral's tokenizer adds <s>, and its chat template writes it too
    crop = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    processor = tf.LlavaNextProcessor(
        tf.LlavaNextImageProcessor(size={"shortest_edge": ANYRES_TILE}, crop_size=crop, image_grid_pinpoints=PINPOINTS),
        tokenizer,
        patch_size=ANYRES_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template(bos="<s>", user="[INST] ", end=" [/INST]", assistant="", image="<image>\n"),
    )
    vision = vision_config(ANYRES_TILE, ANYRES_PATCH, model_type="clip_vision_model", projection_dim=32)
    config = tf.LlavaNextConfig(
        text_config=text_config("mistral", tokenizer, size),
        vision_config=vision | {"num_hidden_layers": 2},  # LLaVA reads the second-to-last layer
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=(ANYRES_TILE // ANYRES_PATCH) ** 2,
    )
    return save(tf.LlavaNextForConditionalGeneration, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


def build_gemma3(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """Gemma 3: SigLIP features pooled to a fixed number of soft tokens between <start_of_image> and
    <end_of_image>; turns end with <end_of_turn>. As Gemma's own, the tokenizer adds <bos> and the chat template
    writes it as well (apply_chat_template(tokenize=True) keeps one)."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        unk="<unk>",
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        add_bos=True,
    )
    image_size, patch, tokens = 64, 16, 4  # 4x4 patches pooled to 2x2 soft tokens
    template = chat_template(
        bos="<bos>",
        user="<start_of_turn>user\n",
        end="<end_of_turn>\n",
        assistant="<start_of_turn>model\n",
        image="<start_of_image>",
    )
    processor = tf.Gemma3Processor(
        tf.Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer,
        chat_template=template,
        image_seq_length=tokens,
    )
    boi, eoi, soft, end_of_turn = ids(
        tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>"
    )
    config = tf.Gemma3Config(
        text_config=text_config(
            "gemma3_text", tokenizer, size, head_dim=16, query_pre_attn_scalar=16, sliding_window=512
        ),
        vision_config=vision_config(image_size, patch, model_type="siglip_vision_model", vision_use_head=False),
        mm_tokens_per_image=tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
        initializer_range=INIT,
    )
    model_class = tf.Gemma3ForConditionalGeneration
    return save(model_class, config, processor, folder, seed=seed, eos=end_of_turn, embed_scale=0.03)


def build_internvl(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """InternVL 3 in the transformers format (-hf checkpoints): images cropped into up to 6 tiles of 32 px
    plus a thumbnail, pixel shuffle by 2, a Qwen2 language model, ChatML."""
    import transformers as tf

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
    tokens = (tile // patch) ** 2 // 4
    processor = tf.InternVLProcessor(
        tf.GotOcr2ImageProcessor(size={"height": tile, "width": tile}, crop_to_patches=True, max_patches=6),
        tokenizer,
        tf.InternVLVideoProcessor(size={"height": tile, "width": tile}),
        image_seq_length=tokens,
        chat_template=chat_template(**CHATML, image="<IMG_CONTEXT>\n", system=CHATML_SYSTEM),
    )
    config = tf.InternVLConfig(
        text_config=text_config("qwen2", tokenizer, size),
        vision_config=vision_config([tile, tile], [patch, patch]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens,
        downsample_ratio=0.5,
    )
    return save(tf.InternVLForConditionalGeneration, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


def build_blip_2(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """BLIP-2: a ViT, a Q-Former with 4 learned queries, an OPT language model; no chat template."""
    import transformers as tf

    # the processor adds its own <image> token (BLIP-2 checkpoints' tokenizers do not name one)
    tokenizer = bpe_tokenizer([], eos="</s>", pad="<pad>", bos="</s>", unk="<unk>", add_bos=True)
    queries = 4
    processor = tf.Blip2Processor(
        tf.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=queries
    )
    qformer = vision_config(None, None, encoder_hidden_size=32, vocab_size=100)
    text = {
        "model_type": "opt",
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden,
        "word_embed_proj_dim": size.hidden,
        "ffn_dim": 2 * size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "init_std": INIT,
        "max_position_embeddings": 512,
        **{f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("eos", "bos", "pad")},
    }
    config = tf.Blip2Config(
        vision_config=vision_config(32, 8),
        qformer_config={k: v for k, v in qformer.items() if v is not None},
        text_config=text,
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT,
        tie_word_embeddings=False,
    )
    return save(tf.Blip2ForConditionalGeneration, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id)


def build_paligemma(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """PaliGemma 2: SigLIP, a Gemma 2 language model attending to image + task prompt as a prefix; no chat
    template (task prompts such as `<image>caption en`)."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<image>"], eos="<eos>", pad="<pad>", bos="<bos>", unk="<unk>", named={"image_token": "<image>"}
    )
    image_size, patch = 32, 8
    pixels = {"height": image_size, "width": image_size}
    image_processor = tf.SiglipImageProcessor(size=pixels, image_seq_length=(image_size // patch) ** 2)
    processor = tf.PaliGemmaProcessor(image_processor, tokenizer)  # adds <loc>/<seg> tokens to the tokenizer
    text = text_config("gemma2", tokenizer, size, head_dim=16, query_pre_attn_scalar=16, sliding_window=512)
    config = tf.PaliGemmaConfig(
        text_config=text,
        vision_config=vision_config(image_size, patch, model_type="siglip_vision_model", vision_use_head=False),
        image_token_index=processor.image_token_id,
        projection_dim=size.hidden,
        hidden_size=size.hidden,
        vocab_size=len(tokenizer),
    )
    model_class = tf.PaliGemmaForConditionalGeneration
    return save(model_class, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id, embed_scale=0.1)


def build_florence2(folder: Path, size: Size = TINY, seed: int = 0) -> Path:
    """Florence-2: a DaViT encoder and a BART encoder-decoder; task-token prompts (`<MORE_DETAILED_CAPTION>`). Its
    generation config forces the end token at the last step, as BART's (and the real checkpoints') does."""
    import transformers as tf

    tokenizer = bpe_tokenizer(
        ["<image>"], eos="</s>", pad="<pad>", bos="<s>", unk="<unk>", named={"image_token": "<image>"}
    )
    side = 64  # DaViT strides 4*2*2*2: a 2x2 grid of features, plus one pooled token
    pixels = {"height": side, "width": side}
    image_processor = tf.CLIPImageProcessor(
        size=pixels, crop_size=pixels, do_center_crop=False, image_seq_length=(side // 32) ** 2 + 1
    )
    processor = tf.Florence2Processor(image_processor, tokenizer)
    vision = {
        "depths": [1, 1, 1, 1],
        "embed_dim": [16, 16, 32, 32],
        "num_heads": [1, 1, 2, 2],
        "num_groups": [1, 1, 2, 2],
        "window_size": 2,
        "projection_dim": size.hidden,
        "drop_path_rate": 0.0,
    }
    text = {
        "model_type": "bart",
        "vocab_size": len(tokenizer),
        "d_model": size.hidden,
        **{f"{part}_layers": max(1, size.layers // 2) for part in ("encoder", "decoder")},
        **{f"{part}_attention_heads": size.heads for part in ("encoder", "decoder")},
        **{f"{part}_ffn_dim": 2 * size.hidden for part in ("encoder", "decoder")},
        "max_position_embeddings": 256,
        "init_std": INIT,
        "dropout": 0.0,
        **{f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("eos", "bos", "pad")},
        "decoder_start_token_id": tokenizer.eos_token_id,
        "forced_eos_token_id": None,
    }
    config = tf.Florence2Config(vision_config=vision, text_config=text, image_token_id=processor.image_token_id)
    model_class = tf.Florence2ForConditionalGeneration
    return save(model_class, config, processor, folder, seed=seed, eos=tokenizer.eos_token_id, forced_eos=True)


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


def build_tiny_vlms(folder: str | Path, families: list[str] | None = None, size: Size = TINY) -> dict[str, Path]:
    """<folder>/<model_type> for each family (all by default); returns model_type -> folder."""
    root = Path(folder)
    return {name: BUILDERS[name](root / name, size) for name in families or list(BUILDERS)}


if __name__ == "__main__":  # python -m curate.testing.tiny_vlms DIR [model_type ...]
    import sys

    for name, path in build_tiny_vlms(sys.argv[1] if len(sys.argv) > 1 else "tiny-vlms", sys.argv[2:] or None).items():
        print(name, path)
