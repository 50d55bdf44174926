"""Small random-weight SD3 model sets of the real architectures, saved in the diffusers folder layout.

No machine here reaches a model hub, so tests, the offline demo and the reference trainer build their
models here and load them by path through the same code the real checkpoints go through:

    FOLDER/tokenizer/        CLIPTokenizer with the real CLIP BPE vocabulary (from open_clip's package)
    FOLDER/tokenizer_2/      the same vocabulary, padded with "!" as OpenCLIP bigG's tokenizer is in SD3
    FOLDER/tokenizer_3/      a T5 tokenizer around a SentencePiece unigram model trained here on a few lines
    FOLDER/text_encoder/     CLIPTextModelWithProjection shaped like CLIP-L/14 (narrower unless full size)
    FOLDER/text_encoder_2/   CLIPTextModelWithProjection shaped like OpenCLIP bigG/14
    FOLDER/text_encoder_3/   T5EncoderModel shaped like T5-v1.1 (gated GELU)
    FOLDER/vae/              AutoencoderKL with SD3's published VAE config (16 channels, factor 8)

`size="full"` gives the published widths and depths (CLIP-L 768/12, bigG 1280/32, T5-XXL 4096/24, VAE
[128, 256, 512, 512]); "tiny" keeps the layer types and shrinks widths so a CPU test takes seconds; a
`TinySizes` gives any other shape (bench/gpu.py's dry run: full widths, T5 cut to two layers). `device` and
`dtype` build the full set where it will run (T5-XXL is 19 GB in float32 on a CPU, 9.5 GB in bf16 on a GPU).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

# SD3 Medium's VAE config (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json).
SD3_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}

_T5_CORPUS = [
    "a photograph of a cat sitting on a red sofa next to a window",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit with apples, oranges and bananas on a wooden table",
    "the skyline of a city at night with bright lights reflected in the river",
    "a watercolor painting of mountains and a lake in autumn",
    "close-up portrait of an old man with a grey beard and a hat",
    "a small boat on a calm sea under a cloudy sky at sunset",
    "text that says hello world written on a blackboard with chalk",
    "a dog running through a field of flowers in spring",
    "a plate of pasta with tomato sauce and basil leaves",
]


@dataclass(frozen=True)
class TinySizes:
    clip_l: tuple[int, int, int]  # hidden, layers, heads
    clip_g: tuple[int, int, int]
    t5: tuple[int, int, int, int]  # d_model, layers, heads, d_ff
    vae_channels: tuple[int, ...]


SIZES = {
    "tiny": TinySizes((32, 2, 2), (48, 2, 2), (128, 2, 4, 256), (32, 32, 64, 64)),
    "full": TinySizes((768, 12, 12), (1280, 32, 20), (4096, 24, 64, 10240), (128, 256, 512, 512)),
}


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary and merges exactly as open_clip's SimpleTokenizer builds them."""
    import open_clip.tokenizer as oct

    path = Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, pairs


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def t5_tokenizer(vocab_size: int = 400):
    """A T5 tokenizer (unigram SentencePiece, pad 0, eos 1, unk 2, 100 sentinel ids) trained on a few lines."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        Path(corpus).write_text("\n".join(_T5_CORPUS * 4) + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        proto = model_pb2.ModelProto()
        proto.ParseFromString(Path(prefix + ".model").read_bytes())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    return T5Tokenizer(
        vocab=vocab,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        extra_ids=100,
        model_max_length=512,
    )


def clip_text_encoder(hidden: int, layers: int, heads: int, act: str, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def t5_encoder(vocab_size: int, d_model: int, layers: int, heads: int, d_ff: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )
    return T5EncoderModel(config).eval()


def sd3_vae(channels: tuple[int, ...] = (128, 256, 512, 512), seed: int = 0):
    """AutoencoderKL with SD3's published config; `channels` narrows it for fast tests."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**SD3_VAE_CONFIG, "block_out_channels": list(channels)}).eval()


def build_tiny_sd3(
    folder: str | os.PathLike[str],
    size: Literal["tiny", "full"] | TinySizes = "tiny",
    with_t5: bool = True,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a complete SD3 text-encoder + VAE set into ``folder`` (diffusers layout); returns the folder. Models
    are built on ``device`` and saved in ``dtype``.

    Idempotent: a folder holding `curate_tiny_sd3.json` with the same settings is left as it is.
    """
    import torch

    folder = Path(folder)
    sizes = SIZES[size] if isinstance(size, str) else size
    settings = {"size": size if isinstance(size, str) else asdict(size), "with_t5": with_t5, "seed": seed}
    if dtype != "float32":
        settings["dtype"] = dtype
    stamp = folder / "curate_tiny_sd3.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return folder
    cast = getattr(torch, dtype)
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    clip_tokenizer(pad_token="!").save_pretrained(folder / "tokenizer_2")
    with torch.device(device) if device != "cpu" else contextlib.nullcontext():
        clip_l = clip_text_encoder(*sizes.clip_l, act="quick_gelu", seed=seed)
        clip_l.to(cast).save_pretrained(folder / "text_encoder")
        del clip_l
        clip_g = clip_text_encoder(*sizes.clip_g, act="gelu", seed=seed + 1)
        clip_g.to(cast).save_pretrained(folder / "text_encoder_2")
        del clip_g
        if with_t5:
            tokenizer = t5_tokenizer()
            tokenizer.save_pretrained(folder / "tokenizer_3")
            t5 = t5_encoder(len(tokenizer), *sizes.t5, seed=seed + 2)
            t5.to(cast).save_pretrained(folder / "text_encoder_3")
            del t5
        sd3_vae(sizes.vae_channels, seed=seed + 3).to(cast).save_pretrained(folder / "vae")
    stamp.write_text(json.dumps(settings))
    return folder


def model_specs(folder: str | os.PathLike[str], with_t5: bool = True) -> dict[str, dict[str, str]]:
    """The pipeline `models:` entries (role -> {path, subfolder}) for a folder from `build_tiny_sd3`."""
    roles = {"vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    if with_t5:
        roles["t5"] = "text_encoder_3"
    return {role: {"path": str(folder), "subfolder": sub} for role, sub in roles.items()}
