"""Images of a shard through the CLIP scorer in batches: prepared on CPU threads, scored with split-on-failure.

The `score` stage's worker side (curate.stages.score holds the config and the shard's rows). Images of a
batch are decoded and transformed in parallel on a thread pool; a batch whose model call raises (out of
memory, a bad image state) is retried by halves down to single rows, so one row cannot lose a shard.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curate.images import ImageError, open_image


@dataclass
class ScoreState:
    scorer: Any  # curate.score.clip.ClipScorer
    heads: list[Any]  # curate.score.heads.Head, in HEAD_NAMES order
    pool: ThreadPoolExecutor  # decodes and transforms single images
    assembler: ThreadPoolExecutor  # one thread: prepares whole batches in order, fanning images out to `pool`

    def prefetch(self, prefetch_batches: int | None) -> int:
        """Batches prepared ahead: on a GPU 2, on a CPU none (preparing would share the model's cores)."""
        if prefetch_batches is not None:
            return prefetch_batches
        return 2 if self.scorer.device.startswith("cuda") else 0


# ----------------------------------------------------------------------------------------------------
# preparing batches on CPU threads


@dataclass
class Prepared:
    """A batch ready for the model: pixels of the rows that decoded, tokens of those with a caption."""

    rows: list[int]  # upstream rows whose pixels are in `pixels`, in order
    pixels: Any  # (len(rows), 3, H, W) float tensor, or None when no row decoded
    text_positions: list[int]  # positions in `rows` that have a caption
    tokens: Any  # (len(text_positions), context) int tensor, or None
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (row, status, error)


def has_text(caption: str | None) -> bool:
    return caption is not None and bool(caption.strip())


def _decode(scorer: Any, row: int, fetch: Callable[[int], bytes | None], max_pixels: int) -> Any:
    """One image's pixels as the model takes them, or (status, error) when it cannot be used."""
    try:
        return scorer.transform(open_image(fetch(row) or b"", max_pixels).image)
    except ImageError as e:
        return (e.status, e.message)
    except Exception as e:  # a Pillow or transform bug on one file must not lose the shard
        return ("decode_error", f"{type(e).__name__}: {e}"[:2000])


def prepare(
    state: ScoreState,
    rows: list[int],
    fetch: Callable[[int], bytes | None],
    captions: list[str | None],
    max_pixels: int,
) -> Prepared:
    """Decode and transform one batch's images in parallel on the pool, then stack, cast and tokenize."""
    import torch

    scorer = state.scorer
    tensors, decoded = [], []
    failures: list[tuple[int, str, str]] = []
    for row, result in zip(rows, state.pool.map(lambda r: _decode(scorer, r, fetch, max_pixels), rows), strict=True):
        if isinstance(result, tuple):
            failures.append((row, *result))
        else:
            tensors.append(result)
            decoded.append(row)
    positions = [i for i, row in enumerate(decoded) if has_text(captions[row])]
    tokens = scorer.tokenizer([captions[decoded[i]] for i in positions]) if positions else None
    pixels = None
    if tensors:  # cast (fp16 halves the copy) and pin here, off the model's thread
        pixels = torch.stack(tensors).to(scorer.input_dtype)
        if scorer.device.startswith("cuda"):
            pixels = pixels.pin_memory()
    return Prepared(decoded, pixels, positions, tokens, failures)


def prepared_batches(
    state: ScoreState,
    rows: list[int],
    fetch: Callable[[int], bytes | None],
    captions: list[str | None],
    batch_size: int,
    max_pixels: int,
    prefetch_batches: int | None = None,
) -> Iterator[Prepared]:
    """Batches in order; up to `prefetch` of them are prepared ahead of the one the consumer is on."""
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    ahead = state.prefetch(prefetch_batches)
    pending: deque[Future[Prepared]] = deque()
    position = 0
    try:
        while position < len(chunks) or pending:
            while position < len(chunks) and len(pending) <= ahead:
                pending.append(state.assembler.submit(prepare, state, chunks[position], fetch, captions, max_pixels))
                position += 1
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


# ----------------------------------------------------------------------------------------------------
# the model


@dataclass
class Scores:
    """Per scored row (positions in Prepared.rows): embeddings and scores, numpy, float32."""

    embeddings: np.ndarray  # (N, D)
    columns: dict[str, np.ndarray]  # column -> (N,) values; clip_score NaN where there is no caption


def run_model(state: ScoreState, batch: Prepared) -> Scores:
    scorer = state.scorer
    image, text = scorer.encode(batch.pixels, batch.tokens)
    n = image.shape[0]
    clip = np.full(n, np.nan, np.float32)
    if text is not None:
        clip[batch.text_positions] = (image[batch.text_positions] * text).sum(dim=-1).cpu().numpy()
    columns = {"clip_score": clip}
    for head in state.heads:
        columns[head.name] = head.score(image).cpu().numpy().astype(np.float32)
    return Scores(image.cpu().numpy(), columns)


def score_batch(state: ScoreState, batch: Prepared) -> list[tuple[Prepared, Scores | str]]:
    """Scores of a batch; when the model raises, retried by halves down to single rows, which then get the
    error (a bad batch-level state such as running out of memory must not lose the whole shard)."""
    try:
        return [(batch, run_model(state, batch))]
    except Exception as e:
        if len(batch.rows) == 1:
            return [(batch, f"{type(e).__name__}: {e}"[:2000])]
        _free_accelerator_memory()
        half, n = len(batch.rows) // 2, len(batch.rows)
        return [*score_batch(state, _subset(batch, 0, half)), *score_batch(state, _subset(batch, half, n))]


def _subset(batch: Prepared, start: int, stop: int) -> Prepared:
    positions = [p for p in batch.text_positions if start <= p < stop]
    tokens = None
    if positions:
        first = batch.text_positions.index(positions[0])
        tokens = batch.tokens[first : first + len(positions)]
    return Prepared(batch.rows[start:stop], batch.pixels[start:stop], [p - start for p in positions], tokens)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
