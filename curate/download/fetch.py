"""Download one shard's URLs with img2dataset's own machinery, and get one result per URL back.

img2dataset's `Downloader.download_shard` does the work (its thread pool, semaphore, retries,
X-Robots-Tag check, sha256 and its `Resizer`); we hand it:
- the shard's URLs as the Arrow IPC file it reads,
- a sample writer class that keeps results in memory instead of writing files,
- a resizer that first decodes with curate.images (so pixel limits, truncation, EXIF orientation and
  colour modes follow the same rules as every other stage) and then lets img2dataset's Resizer do
  the resizing and encoding,
- and, process-wide for the duration of the shard, the safe urllib opener of curate.download.net.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curate.download import net, robots
from curate.download.statuses import classify
from curate.images import ImageError, open_image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home otherwise

_ORIENTATION = 0x0112
_OPENER_LOCK = threading.Lock()  # the urllib opener is process-wide: one shard at a time per process


@dataclass(frozen=True)
class FetchSettings:
    """What img2dataset and the guards need; built from DownloadConfig, plain data."""

    image_size: int
    resize_mode: str
    resize_only_if_bigger: bool
    upscale_interpolation: str
    downscale_interpolation: str
    encode_format: str
    encode_quality: int
    skip_reencode: bool
    min_image_size: int
    max_aspect_ratio: float
    max_pixels: int
    timeout: float
    retries: int
    thread_count: int
    user_agent_token: str | None
    disallowed_header_directives: tuple[str, ...]
    respect_robots_txt: bool
    max_response_bytes: int
    allow_private_addresses: tuple[str, ...]


@dataclass
class Result:
    status: str
    error: str | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None


def _failure(status: str, message: str) -> tuple[None, None, None, None, None, str]:
    return None, None, None, None, None, f"curate:{status}: {message}"


class CheckedResizer:
    """img2dataset's Resizer behind curate.images' decode: one decode by Pillow decides what the pixels
    are (and refuses images over max_pixels, truncated or undecodable ones); img2dataset's Resizer gets
    those pixels losslessly (BMP) and does the geometry and encoding.

    min_image_size and max_aspect_ratio are checked here, on the true (EXIF-oriented) size, with
    img2dataset's rules and messages, so that a JPEG that will be downscaled can be decoded at a
    reduced DCT scale (never below the size the resize needs). With ``skip_reencode``, JPEG/WebP images
    that need no conversion are given to the Resizer as they came, so it can keep their bytes."""

    def __init__(self, inner: Any, settings: FetchSettings):
        self.inner = inner
        self.settings = settings

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list=None):
        from PIL import Image

        s = self.settings
        data = img_stream.getvalue()
        try:
            header = Image.open(io.BytesIO(data))
            width, height = header.size
        except Image.UnidentifiedImageError:
            return _failure("not_an_image", f"not a recognised image format ({len(data)} bytes)")
        except Exception as e:
            return _failure("decode_error", f"{type(e).__name__}: {e}")
        orientation = _orientation(header)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        keep_bytes = s.skip_reencode and orientation in (0, 1) and header.format in ("JPEG", "WEBP")
        try:
            decoded = open_image(data, s.max_pixels, None if keep_bytes else self.reduction(width, height))
        except ImageError as e:
            return _failure(e.status, e.message)
        if min(width, height) < s.min_image_size:
            return None, None, None, None, None, "image too small"
        if max(width, height) / min(width, height) > s.max_aspect_ratio:
            return None, None, None, None, None, "aspect ratio too large"
        if keep_bytes and decoded.mode == "RGB":
            feed = data
        else:
            buffer = io.BytesIO()
            decoded.image.save(buffer, format="BMP")
            feed = buffer.getvalue()
        image, out_width, out_height, _, _, error = self.inner(io.BytesIO(feed), blurring_bbox_list)
        return image, out_width, out_height, width, height, error

    def reduction(self, width: int, height: int) -> float | None:
        """The scale the resize will bring the image to, if it shrinks it (for a reduced JPEG decode)."""
        s = self.settings
        if s.resize_mode == "no":
            return None
        side = min(width, height) if s.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
        scale = s.image_size / side
        return scale if scale < 1 else None


def _orientation(header: Any) -> int:
    try:
        return int(header.getexif().get(_ORIENTATION, 1))
    except Exception:
        return 1


def _collector(results: dict[int, tuple[bytes | None, dict[str, Any]]]) -> type:
    """A sample writer class for img2dataset's Downloader that keeps each sample in ``results``."""

    class MemoryWriter:
        def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
            pass

        def write(self, img_str, key, caption, meta):
            results[int(key)] = (img_str, dict(meta))

        def close(self):
            pass

    return MemoryWriter


def user_agent(token: str | None) -> str:
    """The User-Agent img2dataset sends (same string), also used for robots.txt."""
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if token:
        agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return agent


def build_opener(settings: FetchSettings, counter: net.ByteCounter) -> net.SafeOpener:
    policy = net.AddressPolicy(net.parse_networks(settings.allow_private_addresses))
    extra = []
    if settings.respect_robots_txt:
        token = (settings.user_agent_token or "*").strip().lower()
        extra.append(
            robots.RobotsHandler(token, user_agent(settings.user_agent_token), min(settings.timeout, 10.0), policy)
        )
    return net.build_opener(policy, settings.timeout, settings.max_response_bytes, counter, extra)


def fetch(urls: Sequence[str], settings: FetchSettings) -> tuple[list[Result], dict[str, int]]:
    """One Result per URL, in order, plus network counters. URLs must be non-empty strings."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    if not urls:
        return [], {"bytes_received": 0, "connections": 0}
    resizer = CheckedResizer(
        Resizer(
            image_size=settings.image_size,
            resize_mode=settings.resize_mode,
            resize_only_if_bigger=settings.resize_only_if_bigger,
            upscale_interpolation=settings.upscale_interpolation,
            downscale_interpolation=settings.downscale_interpolation,
            encode_quality=settings.encode_quality,
            encode_format=settings.encode_format,
            skip_reencode=settings.skip_reencode,
        ),
        settings,
    )
    collected: dict[int, tuple[bytes | None, dict[str, Any]]] = {}
    counter = net.ByteCounter()
    with tempfile.TemporaryDirectory(prefix="curate-download-") as folder:
        shard_file = os.path.join(folder, "urls.arrow")
        table = pa.table({"url": pa.array(list(urls), pa.string())})
        with pa.OSFile(shard_file, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        downloader = Downloader(
            sample_writer_class=_collector(collected),
            resizer=resizer,
            thread_count=settings.thread_count,
            save_caption=False,
            extract_exif=False,
            output_folder=folder,
            column_list=["url"],
            timeout=settings.timeout,
            number_sample_per_shard=max(len(urls), 2),
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=settings.encode_format,
            retries=settings.retries,
            user_agent_token=settings.user_agent_token,
            disallowed_header_directives=list(settings.disallowed_header_directives) or None,
        )
        with _OPENER_LOCK, net.installed(build_opener(settings, counter)):
            downloader.download_shard((0, shard_file))
    results = [_result(collected.get(i)) for i in range(len(urls))]
    return results, {"bytes_received": counter.received, "connections": counter.connections}


def _result(sample: tuple[bytes | None, dict[str, Any]] | None) -> Result:
    if sample is None:
        return Result("internal_error", "img2dataset returned no result for this URL (see the worker's log)")
    image, meta = sample
    message = meta.get("error_message")
    if meta.get("status") == "success" and image is not None:
        return Result(
            "ok",
            None,
            image,
            meta.get("width"),
            meta.get("height"),
            meta.get("original_width"),
            meta.get("original_height"),
            meta.get("sha256"),
        )
    stage = "resize" if meta.get("status") == "failed_to_resize" else "download"
    message = str(message or meta.get("status") or "unknown error")
    return Result(classify(message, stage), message)
