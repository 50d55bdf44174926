"""Aspect-ratio buckets of about equal area, SD3/SDXL style, and the resize + centre crop into one.

Every image of a run is trained at one of a few sizes whose area is about ``base**2``; an image goes to
the bucket whose aspect ratio is closest on a log scale (so 2:1 and 1:2 are equally far from 1:1), is
resized to cover it and centre-cropped. The crop box and original size are recorded for the trainer
(SDXL-style size/crop conditioning) and for audits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def log_ratio(self) -> float:
        return math.log(self.width / self.height)


def make_buckets(base: int, multiple: int = 64, max_aspect: float = 4.0) -> list[Bucket]:
    """Buckets with area close to base*base, sides multiples of ``multiple``, aspect within max_aspect.

    For each height (a multiple of ``multiple``) the width is the multiple closest to base**2 / height;
    both orientations are kept, so the set is symmetric. Sorted by aspect ratio, widest last.
    """
    area = base * base
    found: set[tuple[int, int]] = set()
    height = multiple
    while height <= base:
        width = max(multiple, round(area / height / multiple) * multiple)
        if max(width / height, height / width) <= max_aspect * (1 + 1e-9):
            found.add((width, height))
            found.add((height, width))
        height += multiple
    return sorted((Bucket(w, h) for w, h in found), key=lambda b: (b.log_ratio, b.width))


@dataclass(frozen=True)
class Placement:
    """Where an image lands: its bucket, the size it is resized to and the crop box inside that size."""

    bucket: Bucket
    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int
    scale: float


def choose_bucket(
    width: int, height: int, buckets: list[Bucket], aspect_tolerance: float = 0.25
) -> tuple[Bucket | None, str | None]:
    """The bucket of closest log aspect ratio, or (None, reason) when the image is beyond the extreme
    buckets by more than ``aspect_tolerance`` (0.25: up to 5:1 goes to a 4:1 bucket; 6:1 does not)."""
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(b.log_ratio - ratio), -b.width * b.height))
    beyond = max(ratio - buckets[-1].log_ratio, buckets[0].log_ratio - ratio)
    if beyond > math.log(1 + aspect_tolerance):
        return (
            None,
            f"aspect ratio {width}:{height} is beyond the buckets' range ({buckets[0].name} .. {buckets[-1].name})",
        )
    return best, None


def place(width: int, height: int, bucket: Bucket) -> Placement:
    """Resize to cover the bucket (keeping aspect), then centre-crop to exactly the bucket's size."""
    scale = max(bucket.width / width, bucket.height / height)
    resized_w = max(bucket.width, round(width * scale))
    resized_h = max(bucket.height, round(height * scale))
    left = (resized_w - bucket.width) // 2
    top = (resized_h - bucket.height) // 2
    return Placement(bucket, resized_w, resized_h, left, top, scale)


def resize_and_crop(image: Image.Image, placement: Placement) -> np.ndarray:
    """RGB uint8 array (height, width, 3) of exactly the bucket's size."""
    if image.size != (placement.resized_width, placement.resized_height):
        image = image.resize((placement.resized_width, placement.resized_height), Image.Resampling.BICUBIC)
    box = (
        placement.crop_left,
        placement.crop_top,
        placement.crop_left + placement.bucket.width,
        placement.crop_top + placement.bucket.height,
    )
    return np.asarray(image.convert("RGB").crop(box))
