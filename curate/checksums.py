"""Whole-file checksums of shards: CRC32C of every byte, computed while the file is written and checked by
streaming it back.

Why CRC32C: it is what object stores compute themselves (S3's `x-amz-checksum-crc32c`, GCS's object `crc32c`),
so a marker's value can be compared with the store's own where it kept one; it detects every burst error up
to 32 bits and random damage with probability 1 - 2^-32, and the file size is recorded beside it (it is not
a defence against someone forging a shard). Measured here on 256 MiB in memory, one core (bench/verify.py
and the numbers in docs/operations.md): the `crc32c` package (ICRAR; hardware CRC instructions, three
streams at once) 10 GB/s, xxh3-128 8.3, google-crc32c 6.0, zlib crc32 2.7, sha256 1.4, blake2b 0.6 GB/s.
Even at 10 GB/s, hashing in line would add 10-20% to writing a training shard whose tensors are stored
uncompressed (Parquet encodes those at 1-2 GB/s into the page cache), so the writer hands each buffer to one
hashing thread and goes on encoding: the package releases the GIL while it hashes, and the checksum costs CPU
time but almost no wall time. `crc32c` is LGPL-2.1-or-later, used unmodified as a separate package.
Parquet's own page checksums (`write_page_checksum`) cover data pages only, not the footer, and are checked
only by decoding the whole file.
"""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c

ALGORITHM = "crc32c"
CHUNK = 8 << 20  # bytes per read when checking: large enough for sequential disk and object-store throughput
TAIL = 1 << 20  # the last bytes of a file kept while checking it, so its Parquet footer needs no second read
AHEAD = 8  # buffers a writer may hand the hashing thread before it waits (pyarrow writes pages of ~1 MB)


@dataclass
class Digest:
    """A running CRC32C and byte count."""

    value: int = 0
    size: int = 0

    def update(self, data: Any) -> None:
        self.value = crc32c.crc32c(data, self.value)  # releases the GIL for buffers of 32 KiB and more
        self.size += len(data)

    def tagged(self) -> str:
        """The form a marker records: algorithm and hex value, so another algorithm can come later."""
        return f"{ALGORITHM}:{self.value:08x}"


class HashingSink:
    """A writable file object for pyarrow's writers: every buffer goes to the sink and, in order, to one hashing
    thread (pyarrow hands Python file objects fresh `bytes`, so they can be hashed after the write returns).
    `close()` waits for the hashing to end; at most `AHEAD` buffers wait for it."""

    closed = False

    def __init__(self, sink: Any, digest: Digest):
        self.sink, self.digest, self.position = sink, digest, 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="curate-crc32c")
        self.pending: list[Future[None]] = []

    def write(self, data: bytes) -> int:
        if len(self.pending) >= AHEAD:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self.digest.update, data))
        self.position += len(data)
        return self.sink.write(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.sink.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Wait for the last buffers' checksums (the caller closes the real sink)."""
        if not self.closed:
            self.closed = True
            self.pool.shutdown(wait=True)
            for future in self.pending:
                future.result()


@dataclass(frozen=True)
class Streamed:
    """What streaming a file gave: its size, checksum and last bytes (where its Parquet footer sits)."""

    size: int
    checksum: str
    tail: bytes


def stream_digest(stream: Any, chunk: int = CHUNK, tail: int = TAIL) -> Streamed:
    """Read an input stream to its end in ``chunk``-byte reads, the next read running on a thread while the last
    chunk is hashed (both release the GIL), so the disk or the network never waits for the CRC. Memory: about
    three chunks."""
    read = getattr(stream, "read_buffer", stream.read)  # pyarrow streams: no copy into a Python bytes object
    digest = Digest()
    previous: Any = b""
    last: Any = b""
    with ThreadPoolExecutor(1, thread_name_prefix="curate-read") as pool:
        ahead = pool.submit(read, chunk)
        while True:
            data = ahead.result()
            if not len(data):
                break
            ahead = pool.submit(read, chunk)
            digest.update(data)
            previous, last = last, data
    kept = bytes(previous) + bytes(last) if len(last) < tail else bytes(last)
    return Streamed(digest.size, digest.tagged(), kept[-tail:])


class TailFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only the last ones are known: enough for pyarrow to read a
    Parquet footer (it reads the end of a file only) without fetching the file again."""

    def __init__(self, tail: bytes, size: int):
        self.tail, self.size, self.start, self.position = tail, size, size - len(tail), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, n: int = -1) -> bytes:
        if self.position < self.start:
            raise OSError(f"byte {self.position} is before the {len(self.tail)} bytes kept of this file")
        end = self.size if n is None or n < 0 else min(self.size, self.position + n)
        data = self.tail[self.position - self.start : end - self.start]
        self.position = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
