"""Tensors as Parquet binary blobs: one row's tensor is its raw little-endian bytes, C order.

Arrow has no bfloat16, and fixed-shape tensor columns read several times slower than binary blobs for
large tensors (NOTES.md), so every tensor column is `binary`, with the element type and per-row shape
in the field's metadata (`curate.dtype`, `curate.shape`). bfloat16 values are stored as their 16 bits
(what `torch.Tensor.view(torch.int16)` gives) with dtype tag "bfloat16".
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

DTYPES = ("float32", "float16", "bfloat16")
_NUMPY_VIEW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def numpy_view_dtype(dtype: str) -> Any:
    """The numpy dtype whose bytes equal a stored element (uint16 for bfloat16)."""
    return _NUMPY_VIEW[dtype]


def to_blobs(tensor: Any, dtype: str) -> list[bytes]:
    """A torch tensor [N, ...] -> N byte strings of elements in ``dtype``."""
    import torch

    t = tensor.detach().to(device="cpu", dtype=getattr(torch, dtype)).contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    array = t.numpy()
    return [row.tobytes() for row in array]


def field_metadata(dtype: str, shape: list[Any]) -> dict[bytes, bytes]:
    return {b"curate.dtype": dtype.encode(), b"curate.shape": json.dumps(shape).encode()}


def column_view(column: pa.Array | pa.ChunkedArray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """[N, *shape] numpy array over a binary column without copying when its rows are contiguous
    (no nulls, one chunk); null rows come back as zeros (copying)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    view = numpy_view_dtype(dtype)
    per_row = int(np.prod(shape)) * np.dtype(view).itemsize
    n = len(column)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=column.offset * 4)
    data = column.buffers()[2]
    start = int(offsets[0])
    if column.null_count == 0 and int(offsets[-1]) - start == n * per_row:
        buffer = np.frombuffer(data, dtype=np.uint8, count=n * per_row, offset=start)
        return buffer.view(view).reshape(n, *shape)
    out = np.zeros((n, *shape), dtype=view)
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    for i in range(n):
        if valid[i]:
            out[i] = raw[offsets[i] : offsets[i + 1]].view(view).reshape(shape)
    return out


def to_torch(array: np.ndarray, dtype: str) -> Any:
    """Numpy view -> torch tensor sharing its memory (bfloat16 reinterpreted from the stored bits)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow buffers are read-only; torch warns but shares them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
