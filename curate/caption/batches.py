"""A shard's images through an in-process model in batches: decoded on a thread pool, prepared a batch ahead,
generated, and retried by halves when a batch fails, so one odd image costs only its own row.

Inside an actor, images are decoded in a thread pool about two batches ahead and each batch is preprocessed in a
background thread while the model generates the previous one. Rows whose prompt + image tokens exceed the model's
input limit get `too_long` before the model sees them. A batch that raises is retried by halves down to single
images; a single image that still fails gets a status (`caption_error`, `oom`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from curate.caption.client import Answer
from curate.caption.vlm import Captioner, Generated, is_out_of_memory
from curate.images import ImageError, open_image


@dataclass
class Item:
    row: int  # index in the upstream shard
    image: Image.Image | None = None
    status: str | None = None  # set when the image could not be decoded here
    error: str | None = None


def decode(fetch: Callable[[int], bytes], row: int, max_pixels: int, max_side: int | None) -> Item:
    """Bytes of one row (fetched here, so a shard's images are not all copied out of Arrow at once) into
    the size-capped RGB image the model sees (at most ``max_side`` on its longer side); any failure becomes the
    row's status (``max_pixels``: the decode limit, `curate.images`)."""
    try:
        image = open_image(fetch(row), max_pixels).image
        if max_side and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    except ImageError as e:
        return Item(row, status=e.status, error=e.message)
    except Exception as e:
        return Item(row, status="decode_error", error=f"{type(e).__name__}: {e}"[:2000])
    return Item(row, image)


@dataclass
class Batch:
    items: list[Item]
    inputs: Any = None  # the processor's output
    failed: BaseException | None = None  # the exception the processor raised
    too_long: list[Item] = field(default_factory=list)  # taken out of the batch: over the input limit


def prepare_batch(captioner: Captioner, items: list[Item]) -> Batch:
    """The processor's inputs for a batch. Rows over the input limit are taken out, with their status set,
    and the rest prepared again (their padding changes), so the model never sees an over-long row."""
    try:
        inputs = captioner.prepare([i.image for i in items])
        over = captioner.too_long(inputs)
        if not over:
            return Batch(items, inputs)
        long = [items[row] for row in sorted(over)]
        for row, item in zip(sorted(over), long, strict=True):
            item.status, item.error = "too_long", over[row]
        rest = [item for row, item in enumerate(items) if row not in over]
        batch = prepare_batch(captioner, rest) if rest else Batch([])
        batch.too_long = long + batch.too_long
        return batch
    except Exception as e:  # a processor error: retried by halves like a generation error
        return Batch(items, failed=e)


def prepared_batches(
    captioner: Captioner,
    load: Callable[[int], Item],
    rows: list[int],
    batch_size: int,
    pool: ThreadPoolExecutor,
) -> Iterator[Batch | Item]:
    """Decoded images grouped into prepared batches, produced ahead of the consumer.

    Decoding runs on ``pool`` about two batches ahead; the processor call for batch k+1 runs in its own
    thread while the caller generates batch k. Images that fail to decode are yielded as plain Items."""
    ahead = 2 * batch_size
    decoded: list[Future[Item]] = []
    prep = ThreadPoolExecutor(1, thread_name_prefix="caption-prepare")
    pending: Future[Batch] | None = None
    position = 0
    try:
        while position < len(rows) or decoded or pending is not None:
            while position < len(rows) and len(decoded) < ahead + batch_size:
                decoded.append(pool.submit(load, rows[position]))
                position += 1
            items: list[Item] = []
            while decoded and len(items) < batch_size:
                item = decoded.pop(0).result()
                if item.image is None:
                    yield item
                else:
                    items.append(item)
            following = prep.submit(prepare_batch, captioner, items) if items else None
            if pending is not None:
                yield pending.result()
            pending = following
    finally:
        prep.shutdown(wait=True, cancel_futures=True)


@dataclass
class Outcome:
    generated: Generated | None
    status: str
    error: str | None


def run_batch(captioner: Captioner, batch: Batch) -> list[tuple[Item, Outcome]]:
    """Generate for a prepared batch; on an exception retry by halves down to single images. Rows taken
    out as too long come back with their status."""
    done = [(item, Outcome(None, item.status or "too_long", item.error)) for item in batch.too_long]
    if not batch.items:
        return done
    try:
        if batch.failed is not None:
            raise batch.failed
        outcomes = [outcome_of(result) for result in captioner.generate(batch.inputs)]
        return done + list(zip(batch.items, outcomes, strict=True))
    except Exception as e:
        oom = is_out_of_memory(e)
        batch.inputs = None  # free the failed batch's tensors before retrying
        if oom:
            _free_accelerator_memory()
        if len(batch.items) == 1:
            return [
                *done,
                (batch.items[0], Outcome(None, "oom" if oom else "caption_error", f"{type(e).__name__}: {e}"[:2000])),
            ]
        half = len(batch.items) // 2
        return [
            *done,
            *run_batch(captioner, prepare_batch(captioner, batch.items[:half])),
            *run_batch(captioner, prepare_batch(captioner, batch.items[half:])),
        ]


def outcome_of(result: Generated | Answer) -> Outcome:
    if isinstance(result, Answer):  # a server's answer, or why there is none
        if result.error is not None:
            return Outcome(None, result.error.status, str(result.error)[:2000])
        assert result.generated is not None
        result = result.generated
    return Outcome(result, "ok", None)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def by_size(upstream: pa.Table, rows: list[int]) -> list[int]:
    """Rows ordered by image area (then aspect), so a batch holds images with similar numbers of visual
    tokens and little padding (Qwen2-VL and other dynamic-resolution models). Greedy captions do not
    depend on batch composition, and output rows keep the shard's order."""
    if "width" not in upstream.column_names or "height" not in upstream.column_names:
        return rows
    widths, heights = upstream["width"].to_pylist(), upstream["height"].to_pylist()

    def size(i: int) -> tuple[int, float]:
        w, h = widths[i] or 0, heights[i] or 0
        return (w * h, w / h if h else 0.0)

    return sorted(rows, key=size)
