"""Keep order as compact integers: who survives a duplicate group, comparable across tasks without strings.

A row's place in keep order is the tuple (code[0], code[1], code[2], code[3], row id), compared left to right:
- ``largest_first``: code[0] = ~pixels (most pixels first), code[1:4] = the key's UTF-8 bytes, zero-padded to
  24 and read as three big-endian uint64 (so they order like the key strings; curate's keys are 24 hex
  characters, so the code is the key itself and can be turned back into it);
- ``input_order``: code[0] = the row id, so upstream shard, then row decides (SD3's loop order).
code[1:4] hold the key in both orders, so a dup_of key is read back from its code. Row ids are
``shard << 32 | row``. The single-process and the distributed global step both order by these
tuples, which is what makes their decisions identical.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Order = Literal["largest_first", "input_order"]
KEY_BYTES = 24  # curate's keys: 24 hex characters (96 bits of SHA-256)
CODE_COLUMNS = ("o0", "o1", "o2", "o3")


def row_ids(shard: int, rows: int) -> np.ndarray:
    return (np.int64(shard) << np.int64(32)) | np.arange(rows, dtype=np.int64)


def shard_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, np.int64) >> np.int64(32)


def key_codes(keys: list[str]) -> np.ndarray:
    """(n, 3) uint64 codes that order like the key strings (UTF-8 byte order equals code point order)."""
    encoded = [k.encode("utf-8") for k in keys]
    longest = max((len(e) for e in encoded), default=0)
    if longest > KEY_BYTES:
        bad = next(k for k, e in zip(keys, encoded, strict=True) if len(e) > KEY_BYTES)
        raise ValueError(
            f"dedup orders rows by key and needs keys of at most {KEY_BYTES} bytes (curate's keys are 24 hex "
            f"characters); got {bad!r} ({longest} bytes)"
        )
    raw = np.array(encoded, dtype=f"S{KEY_BYTES}") if encoded else np.zeros(0, f"S{KEY_BYTES}")
    return np.frombuffer(raw.tobytes(), dtype=">u8").reshape(-1, 3).astype(np.uint64)


def keys_from_codes(codes: np.ndarray) -> list[str]:
    """The keys back from their (n, 3) codes (keys hold no NUL bytes)."""
    raw = np.ascontiguousarray(np.asarray(codes, np.uint64).astype(">u8")).tobytes()
    return [raw[i : i + KEY_BYTES].rstrip(b"\0").decode("utf-8") for i in range(0, len(raw), KEY_BYTES)]


def order_codes(order: Order, keys: list[str], width: np.ndarray, height: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n, 4) uint64 codes of each row's place in keep order (see the module docstring)."""
    n = len(keys)
    codes = np.zeros((n, 4), np.uint64)
    codes[:, 1:] = key_codes(keys)
    if order == "largest_first":
        w = np.nan_to_num(np.asarray(width, np.float64)).astype(np.int64)
        h = np.nan_to_num(np.asarray(height, np.float64)).astype(np.int64)
        codes[:, 0] = ~np.maximum(w * h, 0).astype(np.uint64)
    else:
        codes[:, 0] = np.asarray(ids, np.int64).astype(np.uint64)
    return codes


def sort_order(codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices that sort rows into keep order."""
    return np.lexsort((ids, codes[:, 3], codes[:, 2], codes[:, 1], codes[:, 0]))


def dense_rank(codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row's position in keep order (0 is kept first)."""
    rank = np.empty(len(ids), np.int64)
    rank[sort_order(codes, ids)] = np.arange(len(ids))
    return rank
