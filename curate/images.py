"""Decode any image the way every stage sees it: oriented by EXIF, 8-bit RGB, within a pixel budget.

The conversion rules (documented in docs/schema.md) are applied in one place so the image a model
embeds, captions and encodes is the same image whichever stage looks at it:

- EXIF orientation is applied (``ImageOps.exif_transpose``); width/height are those of the result.
- Transparency (RGBA, LA, PA, P with a transparency key) is composited over white.
- CMYK and other colour spaces go to sRGB through their embedded ICC profile when there is one,
  otherwise through Pillow's standard conversion.
- 16-bit and 32-bit greyscale (I;16*, I) keep their top 8 bits; float greyscale (F) in [0, 1] is
  scaled to 0..255, otherwise clipped to 0..255. Greyscale and 1-bit images are replicated to RGB.
- Animated images (GIF, WebP) contribute their first frame.
- An image larger than ``max_pixels`` is refused from its header, before its pixels are decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold

# Pillow's global limit is disabled; the per-call max_pixels check below replaces it, so one worker can
# serve stages configured with different limits.
Image.MAX_IMAGE_PIXELS = None


class ImageError(Exception):
    """An image that cannot be used, with a status code that ends up in the row's ``status`` column."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, oriented
    format: str  # "JPEG", "PNG", ... as Pillow names it
    mode: str  # the mode before conversion


_SRGB = ImageCms.createProfile("sRGB")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, reduce: float | None = None) -> Decoded:
    """Decode bytes into an oriented RGB image, or raise ImageError with a status code.

    ``reduce`` < 1 lets a JPEG be decoded at a reduced scale (libjpeg's DCT scaling, 1/2 .. 1/8) no
    smaller than ``reduce`` times its size: a caller that will downscale anyway saves most of the
    decode. All the data is still read, so truncation is still detected."""
    if not data:
        raise ImageError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
            if reduce is not None and reduce < 1 and fmt == "JPEG":
                image.draft(image.mode, (math.ceil(width * reduce), math.ceil(height * reduce)))
            image.load()
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("decode_error", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", str(e)) from None
    except OSError as e:
        text = str(e)
        status = "truncated" if "truncated" in text or "broken data stream" in text else "decode_error"
        raise ImageError(status, text) from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None
    mode = image.mode
    with contextlib.suppress(Exception):  # a malformed EXIF block must not lose an otherwise good image
        image = ImageOps.exif_transpose(image)
    return Decoded(to_rgb(image), fmt, mode)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image).astype(np.int64)
        if mode == "I" and array.max(initial=0) <= 255:
            return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L").convert("RGB")
        return Image.fromarray(np.clip(array >> 8, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if np.nanmax(array, initial=0.0) <= 1.0:
            array = array * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8), "L").convert("RGB")
    profile = image.info.get("icc_profile")
    if profile and mode in ("CMYK", "LAB", "RGBX"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
        except Exception:
            pass
    return image.convert("RGB")


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG", "WEBP"):
        image.save(buffer, format="JPEG" if fmt.upper() == "JPG" else fmt.upper(), quality=quality)
    else:
        image.save(buffer, format=fmt.upper())
    return buffer.getvalue()


def thumbnail(data: bytes, size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A small RGB preview for notebooks and reports."""
    image = open_image(data, max_pixels).image
    image.thumbnail((size, size))
    return image
