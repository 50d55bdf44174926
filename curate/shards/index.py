"""Where the training shards' rows are, from Parquet footers alone: row groups (one bucket each), the SD3
constants and tensor shapes, and the batch plan of one (epoch, rank, worker) slot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate import storage
from curate.runfolder import StageDir

ENCODE_TENSORS = (
    "latent",
    "latent_std",
    *(name + suffix for suffix in ("", "_synthetic") for name in ("clip_l", "clip_g", "pooled", "t5")),
)


@dataclass(frozen=True)
class RowGroup:
    """A row group of encoded rows (one bucket) in one shard file."""

    file: str
    index: int  # row group number inside the file
    bucket: str
    width: int
    height: int
    rows: int


@dataclass(frozen=True)
class ShardInfo:
    """What the shards' metadata says: SD3 constants, dtype and tensor shapes."""

    encode: dict[str, Any]  # the `curate.encode` schema metadata of the first file
    shapes: dict[str, list[Any]]  # tensor column -> per-row shape (latents: strings for the bucket dims)
    columns: tuple[str, ...]  # tensor columns that hold data

    @property
    def dtype(self) -> str:
        return str(self.encode["dtype"])


def shard_files(source: str | list[str]) -> list[str]:
    """The shard files of an encode stage folder (completed shards only), a single file, or a list."""
    if isinstance(source, list):
        return source
    if storage.exists(storage.join(source, "_shards")):
        return StageDir(source).shard_uris()
    if source.endswith(".parquet"):
        return [source]
    return [f.uri for f in storage.list_files(source, "shard-*.parquet", recursive=False)]


def index_shards(files: list[str]) -> tuple[list[RowGroup], ShardInfo]:
    """Row groups of encoded rows in file order, from each file's footer (no data read)."""
    groups: list[RowGroup] = []
    info: ShardInfo | None = None
    for uri in files:
        schema = storage.parquet_file(uri).schema_arrow
        encode = json.loads(schema.metadata[b"curate.encode"])
        shapes = {
            f.name: json.loads(f.metadata[b"curate.shape"])
            for f in schema
            if f.metadata and b"curate.shape" in f.metadata
        }
        if info is None:
            info = ShardInfo(encode, {}, ())
        info.shapes.update(shapes)  # a column empty in one file (no synthetic captions there) may hold data in another
        for i, group in enumerate(encode["row_groups"]):
            if group["bucket"] is None:
                continue
            width, height = (int(x) for x in group["bucket"].split("x"))
            groups.append(RowGroup(uri, i, group["bucket"], width, height, int(group["rows"])))
    if info is None:
        raise FileNotFoundError(f"no encode shards in {files!r}")
    return groups, ShardInfo(info.encode, info.shapes, tuple(n for n in ENCODE_TENSORS if n in info.shapes))


Part = tuple[int, tuple[int, ...]]  # (row group id, rows inside it)
Batch = tuple[Part, ...]  # a row group appears at most once in a batch


def plan_slot(
    groups: list[RowGroup], order: list[int], batch_size: int, drop_last: bool, rng: np.random.Generator | None
) -> list[Batch]:
    """Batches of one bucket from row groups taken in ``order``: rows of a row group (permuted by
    ``rng``; None keeps file order) fill that bucket's buffer, and a full buffer is a batch."""
    buffers: dict[str, list[Part]] = {}
    filled: dict[str, int] = {}
    batches: list[Batch] = []
    for g in order:
        n, bucket = groups[g].rows, groups[g].bucket
        rows = rng.permutation(n) if rng is not None else np.arange(n)
        buffer = buffers.setdefault(bucket, [])
        at = 0
        while at < n:
            take = min(batch_size - filled.get(bucket, 0), n - at)
            buffer.append((g, tuple(rows[at : at + take].tolist())))
            at += take
            filled[bucket] = filled.get(bucket, 0) + take
            if filled[bucket] == batch_size:
                batches.append(tuple(buffer))
                buffer.clear()
                filled[bucket] = 0
    if not drop_last:
        batches += [tuple(b) for _, b in sorted(buffers.items()) if b]
    return batches


def dataloader_skips(counts: list[int], consumed: int) -> list[int]:
    """How many batches each DataLoader worker had delivered after ``consumed`` batches.

    torch's DataLoader (in order) yields worker 0's first batch, worker 1's first, ..., then the second
    of each, skipping workers that are exhausted; that is the order of (local index, worker)."""
    skips = [0] * len(counts)
    left = consumed
    round_ = 0
    while left > 0 and any(c > round_ for c in counts):
        for w, c in enumerate(counts):
            if left > 0 and c > round_:
                skips[w] += 1
                left -= 1
        round_ += 1
    return skips
