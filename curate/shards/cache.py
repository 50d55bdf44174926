"""Row groups of encode shards decoded once and gathered into batch arrays, for `curate.shards`.

Where the reader's time goes (bench/encode.py, SD3-sized rows): decoding a row group is one copy
(Parquet page -> Arrow buffer) and a shuffled batch is one more (gather), about equal in cost; a numpy
memmap read is one. So: a row group is read once and serves every batch drawn from it; the next one is
decoded on a background thread while the current one is gathered (pyarrow releases the GIL), which is
what can bring the two copies' wall time toward one where a second core and memory bandwidth are free;
and batch arrays come from Arrow's memory pool, which keeps freed blocks for the next batch (fresh
multi-megabyte numpy arrays page-faulted on every batch, halving the gather speed).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import storage
from curate.runfolder import verify_shard_file
from curate.shards.index import RowGroup, ShardInfo
from curate.tensors import column_view

SCALARS = ("key", "caption", "caption_synthetic", "original_width", "original_height", "crop_left", "crop_top")


class RowGroupCache:
    """Row groups read once (tensor columns as numpy views over Arrow's buffers, the few scalar columns
    as lists), dropped when their last planned row has been served.

    ``order`` is the order in which the plan first needs each row group: with ``prefetch`` > 0 that
    many row groups ahead are read on one background thread (the only thread that touches the files).
    """

    def __init__(
        self,
        groups: list[RowGroup],
        columns: list[str],
        info: ShardInfo,
        remaining: dict[int, int],
        order: Sequence[int],
        prefetch: int = 1,
        use_threads: bool = True,
        files: dict[str, pq.ParquetFile] | None = None,
        verify: bool = False,
    ):
        self.groups, self.columns, self.info, self.remaining = groups, columns, info, remaining
        self.order, self.prefetch, self.use_threads, self.verify = list(order), prefetch, use_threads, verify
        self.tables: dict[int, dict[str, Any]] = {}
        # opened files (memory maps) may come from the previous epoch: mapping them again costs a page
        # fault per few pages; they are this object's alone until close()
        self.files: dict[str, pq.ParquetFile] = {} if files is None else files
        self.pending: dict[int, Future[dict[str, Any]]] = {}
        self.next = 0  # index in `order` of the first row group not yet requested from the reader thread
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="curate-shards") if prefetch > 0 else None

    def get(self, g: int) -> dict[str, Any]:
        if g not in self.tables:
            if self.executor is None:
                self.tables[g] = self._read(g)
            else:
                self._schedule(g)
                self.tables[g] = self.pending.pop(g).result()
                self._schedule(None)
        return self.tables[g]

    def served(self, g: int, n: int) -> None:
        self.remaining[g] -= n
        if self.remaining[g] <= 0:
            self.tables.pop(g, None)

    def close(self) -> None:
        """Stop the reader thread (waiting for a read in flight, so no thread outlives an epoch: a
        DataLoader forking workers next must not copy a thread holding Arrow's locks)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.tables.clear()
        self.pending.clear()

    def _schedule(self, needed: int | None) -> None:
        """Submit the read of ``needed`` (asked for now) and of up to ``prefetch`` row groups beyond."""
        assert self.executor is not None
        if needed is not None and needed not in self.pending:
            self.pending[needed] = self.executor.submit(self._read, needed)
        while self.next < len(self.order) and len(self.pending) < self.prefetch:
            g = self.order[self.next]
            self.next += 1
            if g not in self.tables and g not in self.pending:
                self.pending[g] = self.executor.submit(self._read, g)

    def _read(self, g: int) -> dict[str, Any]:
        group = self.groups[g]
        if group.file not in self.files:
            if self.verify:
                verify_shard_file(group.file)
            self.files[group.file] = open_shard(group.file)
        table = self.files[group.file].read_row_group(group.index, columns=self.columns, use_threads=self.use_threads)
        if table.num_rows != group.rows:
            raise ValueError(f"{group.file} row group {group.index}: {table.num_rows} rows, metadata says {group.rows}")
        views: dict[str, Any] = {}
        for name in self.columns:
            if name in SCALARS:
                views[name] = table[name].to_pylist()
            else:
                views[name] = column_view(table[name], self.info.dtype, tensor_shape(self.info, name, group))
        return views


def open_shard(uri: str) -> pq.ParquetFile:
    """Local files are memory-mapped: pages are decoded straight from the page cache (one copy fewer,
    about twice the read speed measured on uncompressed tensor blobs)."""
    if storage.is_local(uri):
        _, path = storage.resolve(uri)
        return pq.ParquetFile(path, memory_map=True)
    return storage.parquet_file(uri)


def tensor_shape(info: ShardInfo, name: str, group: RowGroup) -> tuple[int, ...]:
    factor = int(info.encode["vae_factor"])
    dims = {"bucket_height/8": group.height // factor, "bucket_width/8": group.width // factor}
    return tuple(int(dims.get(d, d)) for d in info.shapes[name])


def batch_buffer(shape: tuple[int, ...], dtype: Any, stored: str, shared: bool) -> tuple[Any, np.ndarray]:
    """(torch tensor of the stored dtype, writable numpy array over the same memory) for one batch column.

    In a DataLoader worker (``shared``) the memory is shared memory, as torch's default_collate allocates
    it: the tensor then crosses to the main process without the copy torch makes of ordinary memory.
    Otherwise it comes from Arrow's memory pool, which keeps freed blocks for the next batch instead of
    returning them to the OS (fresh multi-megabyte numpy arrays page-faulted on every batch, halving the
    gather speed); the tensor keeps the block alive."""
    import torch

    count = int(np.prod(shape))
    if shared:
        storage = torch.UntypedStorage._new_shared(count * np.dtype(dtype).itemsize)
        tensor = torch.empty(0, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).set_(storage, 0, shape)
        array = tensor.numpy()
    else:
        buffer = pa.allocate_buffer(count * np.dtype(dtype).itemsize, memory_pool=pa.default_memory_pool())
        array = np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)
        tensor = torch.from_numpy(array)
    return (tensor.view(torch.bfloat16) if stored == "bfloat16" else tensor), array


def contiguous(parts: Sequence[tuple[np.ndarray, Sequence[int]]]) -> np.ndarray | None:
    """The batch as a view (no copy) when it is one run of consecutive rows of one row group."""
    if len(parts) != 1:
        return None
    view, rows = parts[0]
    first = rows[0]
    if rows[-1] - first + 1 == len(rows) and list(rows) == list(range(first, first + len(rows))):
        return view[first : first + len(rows)]
    return None


def gather(parts: Sequence[tuple[np.ndarray, Sequence[int]]], out: np.ndarray) -> None:
    """Rows ``rows`` of each ``view``, in order, copied into ``out`` (one copy)."""
    at = 0
    for view, rows in parts:
        index = np.asarray(rows, dtype=np.intp)
        if len(index) and (index.min() < 0 or index.max() >= len(view)):
            raise IndexError(f"rows {index.min()}..{index.max()} outside a row group of {len(view)}")
        # mode="clip" after the bounds check: with the default mode="raise" numpy gathers into a
        # temporary and copies that into `out` (a second copy of the batch)
        np.take(view, index, axis=0, out=out[at : at + len(index)], mode="clip")
        at += len(index)
    if at != len(out):
        raise ValueError(f"{at} rows gathered into a batch of {len(out)}")
