"""Real sample images for offline runs, from the images scikit-image and scikit-learn ship.

`curate samples DIR` writes them as the kind of folder users point the `local` source at: JPEG, PNG,
WebP and GIF files in the modes real collections contain (greyscale, 1-bit, 16-bit, RGBA, palette
with transparency, CMYK, an EXIF-rotated photo), same-named .txt captions, a few near-duplicate copies
(crops, re-encodes) for the dedup stage, and three broken files whose rows must come out with a
status instead of stopping the run. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (loader, caption). Captions describe the images as a person would; they are the "original"
# captions the demo pipeline carries through every stage.
CAPTIONS = {
    "astronaut": "Portrait of an astronaut in a white spacesuit holding a helmet, an American flag behind her.",
    "coffee": "A cup of coffee with latte art on a saucer, seen from above on a wooden table.",
    "chelsea": "A tabby cat with green eyes lying down and looking to the side.",
    "rocket": "A rocket standing on its launch pad under a clear sky.",
    "hubble_deep_field": "Deep space photograph full of distant galaxies of many shapes and colours.",
    "immunohistochemistry": "Microscope image of a tissue sample stained brown and blue.",
    "cat": "A cat resting, the same photograph as chelsea (an exact duplicate in the sample set).",
    "colorwheel": "A colour wheel showing the full range of hues around a circle.",
    "retina": "Medical photograph of the retina at the back of a human eye.",
    "camera": "Black and white photo of a man with a camera on a tripod in a park.",
    "coins": "Greek coins of different sizes laid out in rows, black and white.",
    "moon": "Black and white photograph of the cratered surface of the moon.",
    "page": "A scanned page of printed text, in black and white.",
    "text": "Photograph of handwritten and printed words on a sign, greyscale.",
    "brick": "Texture of a brick wall with mortar lines, greyscale.",
    "grass": "Texture of dense grass blades, greyscale.",
    "gravel": "Texture of small gravel stones, greyscale.",
    "clock": "A wall clock photographed at an angle, black and white.",
    "cell": "Microscope image of a single cell, greyscale.",
    "logo": "The scikit-image logo, a snake over a blue and green square, on a transparent background.",
    "horse": "Black silhouette of a horse on a white background.",
    "china": "A Chinese temple with a curved red roof among trees.",
    "flower": "A close-up of a pink flower with yellow stamens.",
}


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


def _fit(image: Image.Image, max_side: int = 640) -> Image.Image:
    image = image.copy()
    image.thumbnail((max_side, max_side))
    return image


def _save(image: Image.Image, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def write_samples(folder: str | Path, broken: bool = True, duplicates: bool = True) -> list[Path]:
    """Write the sample set into ``folder``; returns the image files written (broken ones included)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sources = []

    def put(name: str, image: Image.Image, suffix: str, caption: str | None, origin: str, **options) -> None:
        path = out / f"{name}{suffix}"
        _save(image, path, **options)
        written.append(path)
        if caption is not None:
            (out / f"{name}.txt").write_text(caption + "\n")
        sources.append({"file": path.name, "origin": origin})

    rgb_jpeg = ["astronaut", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "cat", "retina"]
    for name in rgb_jpeg:
        image = _fit(Image.fromarray(_skimage(name)()))
        put(name, image, ".jpg", CAPTIONS[name], f"skimage.data.{name}", quality=92)
    put(
        "rocket",
        _fit(Image.fromarray(_skimage("rocket")())),
        ".webp",
        CAPTIONS["rocket"],
        "skimage.data.rocket",
        quality=90,
    )
    put(
        "colorwheel",
        Image.fromarray(_skimage("colorwheel")()),
        ".png",
        CAPTIONS["colorwheel"],
        "skimage.data.colorwheel",
    )
    for name in ["camera", "coins", "page", "text", "brick", "grass", "gravel", "clock", "cell"]:
        image = _fit(Image.fromarray(_skimage(name)()))
        put(name, image, ".png", CAPTIONS[name], f"skimage.data.{name}")
    # 16-bit greyscale PNG (I;16)
    moon16 = (_skimage("moon")().astype(np.uint16) * 257).astype(np.uint16)
    put("moon", Image.fromarray(moon16), ".png", CAPTIONS["moon"], "skimage.data.moon as 16-bit")
    # RGBA PNG and a palette GIF with a transparent index
    logo = Image.fromarray(_skimage("logo")(), "RGBA")
    put("logo", logo, ".png", CAPTIONS["logo"], "skimage.data.logo")
    palette = logo.convert("RGB").quantize(colors=64)
    transparent = np.asarray(logo)[..., 3] < 128
    indices = np.asarray(palette).copy()
    indices[transparent] = 63
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette(palette.getpalette())
    put(
        "logo-palette",
        palette_image,
        ".gif",
        CAPTIONS["logo"],
        "skimage.data.logo, palette with transparency",
        transparency=63,
    )
    # 1-bit PNG
    horse = Image.fromarray(_skimage("horse")()).convert("1")
    put("horse", horse, ".png", CAPTIONS["horse"], "skimage.data.horse as 1-bit")
    # CMYK JPEG
    put(
        "coffee-cmyk",
        _fit(Image.fromarray(_skimage("coffee")())).convert("CMYK"),
        ".jpg",
        CAPTIONS["coffee"],
        "skimage.data.coffee in CMYK",
        quality=92,
    )
    # A photo stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)
    chelsea = _fit(Image.fromarray(_skimage("chelsea")()))
    exif = Image.Exif()
    exif[0x0112] = 6
    put(
        "chelsea-exif",
        chelsea.transpose(Image.Transpose.ROTATE_90),
        ".jpg",
        CAPTIONS["chelsea"],
        "skimage.data.chelsea stored rotated, EXIF orientation 6",
        quality=92,
        exif=exif,
    )
    for index, name in enumerate(["china", "flower"]):
        put(
            name,
            _fit(Image.fromarray(_sklearn(index)())),
            ".jpg",
            CAPTIONS[name],
            f"sklearn.datasets.load_sample_images()[{index}]",
            quality=92,
        )

    if duplicates:
        astronaut = _fit(Image.fromarray(_skimage("astronaut")()))
        w, h = astronaut.size
        put(
            "astronaut-crop",
            astronaut.crop((w // 10, h // 10, w - w // 12, h - h // 12)),
            ".jpg",
            "An astronaut portrait, cropped.",
            "crop of skimage.data.astronaut",
            quality=85,
        )
        coffee = _fit(Image.fromarray(_skimage("coffee")()), 400)
        put("coffee-small", coffee, ".jpg", None, "skimage.data.coffee resized, JPEG quality 40", quality=40)

    if broken:
        (out / "empty.jpg").write_bytes(b"")
        written.append(out / "empty.jpg")
        (out / "empty.txt").write_text("An image file with no bytes in it.\n")
        buffer = io.BytesIO()
        _fit(Image.fromarray(_skimage("astronaut")())).save(buffer, "JPEG", quality=90)
        (out / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
        written.append(out / "truncated.jpg")
        (out / "truncated.txt").write_text("A JPEG cut off after its first third.\n")
        (out / "not-an-image.jpg").write_bytes(b"<!doctype html><html><body>404 Not Found</body></html>\n")
        written.append(out / "not-an-image.jpg")
        sources += [
            {"file": "empty.jpg", "origin": "zero bytes"},
            {"file": "truncated.jpg", "origin": "first third of a JPEG"},
            {"file": "not-an-image.jpg", "origin": "an HTML page saved as .jpg"},
        ]

    with open(out / "SOURCES.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "origin"])
        writer.writeheader()
        writer.writerows(sources)
    return written
