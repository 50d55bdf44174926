"""Every stage sees the same image: EXIF-oriented, 8-bit RGB by documented rules, within max_pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curate.images import ImageError, open_image, to_rgb


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # red band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    decoded = open_image(encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif))
    assert decoded.image.size == (20, 40)
    top = np.asarray(decoded.image)[:8].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60  # the left band is now on top


def test_rgba_and_palette_transparency_composite_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = encode(palette, "GIF", transparency=1)
    assert open_image(data).image.getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_keeps_top_bits():
    array = np.full((4, 4), 0xABCD, np.uint16)
    decoded = open_image(encode(Image.fromarray(array), "PNG"))
    assert decoded.mode.startswith("I")
    assert decoded.image.getpixel((0, 0)) == (0xAB, 0xAB, 0xAB)


def test_float_and_cmyk_and_one_bit():
    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")).getpixel((0, 0)) == (128, 128, 128)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    red = open_image(encode(cmyk, "JPEG", quality=100)).image.getpixel((1, 1))
    assert red[0] > 230 and red[1] < 30 and red[2] < 30
    one_bit = Image.new("1", (3, 3), 1)
    assert open_image(encode(one_bit, "PNG")).image.getpixel((0, 0)) == (255, 255, 255)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert open_image(data).image.getpixel((0, 0))[0] > 200


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", "empty_file"),
        (b"<html>not an image</html>", "decode_error"),
    ],
)
def test_bad_bytes_get_a_status(data, status):
    with pytest.raises(ImageError) as info:
        open_image(data)
    assert info.value.status == status


def test_truncated_jpeg():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageError) as info:
        open_image(data[: len(data) // 2])
    assert info.value.status == "truncated"


def test_pixel_limit_is_checked_from_the_header():
    data = encode(Image.new("L", (300, 200)), "PNG")
    assert open_image(data, max_pixels=60_000).image.size == (300, 200)
    with pytest.raises(ImageError) as info:
        open_image(data, max_pixels=59_999)
    assert info.value.status == "too_large" and "60000 pixels" in info.value.message
