"""Aspect-ratio buckets: SD3-style equal-area sizes, nearest aspect ratio, recorded crops, no silent drops."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from curate.encode.buckets import choose_bucket, make_buckets, place, resize_and_crop


@pytest.mark.parametrize("base", [256, 512, 1024])
def test_bucket_sets_have_equal_area_and_multiple_of_64_sides(base):
    buckets = make_buckets(base)
    assert any(b.width == b.height == base for b in buckets)
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert max(b.width / b.height, b.height / b.width) <= 4.0
        assert abs(b.width * b.height / base**2 - 1) < 0.25
    names = {b.name for b in buckets}
    assert all(f"{b.height}x{b.width}" in names for b in buckets)  # both orientations
    assert math.isclose(buckets[0].log_ratio, -buckets[-1].log_ratio)


def test_1024_buckets_span_1_to_4_and_4_to_1():
    buckets = make_buckets(1024)
    assert (buckets[0].name, buckets[-1].name) == ("512x2048", "2048x512")
    assert {"1024x1024", "1152x896", "896x1152", "1344x768", "768x1344"} <= {b.name for b in buckets}


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1000, 4000, "512x2048"),  # 1:4
        (1000, 3000, "576x1792"),  # 1:3
        (1000, 2000, "704x1472"),  # 1:2
        (900, 1600, "768x1344"),  # 9:16
        (1000, 1000, "1024x1024"),  # 1:1
        (1600, 900, "1344x768"),  # 16:9
        (2000, 1000, "1472x704"),  # 2:1
        (3000, 1000, "1792x576"),  # 3:1
        (4000, 1000, "2048x512"),  # 4:1
        (4900, 1000, "2048x512"),  # a little beyond 4:1 still fits the widest bucket
    ],
)
def test_aspect_ratios_land_in_the_nearest_bucket(width, height, expected):
    buckets = make_buckets(1024)
    bucket, reason = choose_bucket(width, height, buckets)
    assert reason is None and bucket is not None
    nearest = min(buckets, key=lambda b: abs(math.log(width / height) - b.log_ratio))
    assert bucket == nearest
    assert bucket.name == expected


@pytest.mark.parametrize(("width", "height"), [(6000, 1000), (1000, 6000), (100, 1000)])
def test_beyond_the_extreme_buckets_is_no_bucket_with_a_reason(width, height):
    bucket, reason = choose_bucket(width, height, make_buckets(1024))
    assert bucket is None and "beyond" in reason


def test_every_ratio_from_1_4_to_4_1_gets_a_bucket():
    buckets = make_buckets(512)
    for i in range(-100, 101):
        ratio = 4 ** (i / 100)
        bucket, _ = choose_bucket(round(1000 * ratio), 1000, buckets)
        assert bucket is not None


def test_resize_covers_the_bucket_and_crops_the_centre():
    bucket, _ = choose_bucket(1600, 900, make_buckets(1024))
    placement = place(1600, 900, bucket)
    assert placement.resized_width >= bucket.width and placement.resized_height >= bucket.height
    assert placement.crop_left == (placement.resized_width - bucket.width) // 2
    assert placement.crop_top == (placement.resized_height - bucket.height) // 2
    image = Image.new("RGB", (1600, 900), (10, 20, 30))
    pixels = resize_and_crop(image, placement)
    assert pixels.shape == (bucket.height, bucket.width, 3) and pixels.dtype.name == "uint8"
    assert (pixels == (10, 20, 30)).all()
