"""A few training-shard latents as pictures: every channel as a grey tile (always, numpy only), and decoded
back to pixels with the run's own VAE where one is configured.

Decoding is kept cheap and bounded whatever the bucket: at most LATENTS rows, each centre-cropped to at most
DECODE_CROP x DECODE_CROP latent pixels (256 x 256 image pixels at SD3's factor 8) before the VAE decoder runs on
the CPU, and the result is cached under `_report/img/` by key, so the VAE is loaded by the first build that
shows a latent and never again for the same rows. Stored latents are the VAE's unscaled distribution mean
(docs/schema.md), which is what `AutoencoderKL.decode` takes.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from curate import storage
from curate.tensors import column_view

LATENTS = 4
DECODE_CROP = 32
TILE_SCALE = 4


def read_latents(uri: str, limit: int = LATENTS) -> list[dict[str, Any]]:
    """The first ``limit`` encoded rows of a training shard, from its first row group only (encoded rows come
    first, grouped by bucket): key, bucket and the latent as a float32 array (C, h, w)."""
    file = storage.parquet_file(uri)
    if not file.metadata.num_row_groups or "latent" not in file.schema_arrow.names:
        return []
    field = file.schema_arrow.field("latent")
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    dtype = meta.get("curate.dtype", "float16")
    channels = int(json.loads(meta.get("curate.shape", "[16]"))[0])
    table = file.read_row_group(0, columns=["key", "bucket", "bucket_width", "bucket_height", "latent", "status"])
    table = table.filter(pc.equal(table["status"], "ok")).slice(0, limit)
    out = []
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        shape = (channels, row["bucket_height"][0].as_py() // 8, row["bucket_width"][0].as_py() // 8)
        array = column_view(row["latent"], dtype, shape)[0]
        out.append({"key": row["key"][0].as_py(), "bucket": row["bucket"][0].as_py(), "latent": _float32(array, dtype)})
    return out


def _float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # stored as the top 16 bits of float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def channels_png(latent: np.ndarray, columns: int = 4) -> bytes:
    """Each channel min-max scaled to grey, tiles in a grid, enlarged TILE_SCALE x (nearest)."""
    c, h, w = latent.shape
    rows = -(-c // columns)
    grid = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), 255, np.uint8)
    for i in range(c):
        tile = latent[i]
        lo, hi = float(tile.min()), float(tile.max())
        scaled = np.zeros_like(tile) if hi <= lo else (tile - lo) / (hi - lo)
        r, k = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = (scaled * 255).round().astype(np.uint8)
    image = Image.fromarray(grid).resize((grid.shape[1] * TILE_SCALE, grid.shape[0] * TILE_SCALE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def centre_crop(latent: np.ndarray, size: int = DECODE_CROP) -> np.ndarray:
    _, h, w = latent.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return latent[:, top : top + size, left : left + size]


def decode_png(vae: Any, latent: np.ndarray) -> bytes:
    """One (C, h, w) unscaled latent -> PNG through the VAE decoder (diffusers' AutoencoderKL.decode)."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(latent))[None].to(vae.device, vae.dtype)
        pixels = vae.decode(x, return_dict=False)[0][0]
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["LATENTS", "centre_crop", "channels_png", "decode_png", "read_latents"]
