"""Whole-file checksums of shards: CRC32C of every byte, computed while the file is written and checked by
streaming it back.

Why CRC32C: it is what object stores compute themselves (S3's `x-amz-checksum-crc32c`, GCS's object `crc32c`),
so a marker's value can be compared with the store's own where it kept one; it detects every burst error up
to 32 bits and random damage with probability 1 - 2^-32, and the file size is recorded beside it (it is not
a defence against someone forging a shard). Measured here, one core (bench/verify.py, docs/operations.md): the
`crc32c` package (ICRAR; hardware CRC instructions, three streams at once) 21 GB/s on data in cache and 10 GB/s
from memory; from memory xxh3-128 8.3, google-crc32c 6.0, zlib crc32 2.7, sha256 1.4, blake2b 0.6 GB/s.
`crc32c` is LGPL-2.1-or-later, used unmodified as a separate package. Parquet's own page checksums
(`write_page_checksum`) cover data pages only, not the footer, and are checked only by decoding the whole file.

Writing: pyarrow writes a Parquet file to a native stream without Python seeing the bytes; handing it a Python
file object instead (`HashingSink`) costs a copy of every page into a new `bytes` (pyarrow writes a column
chunk's pages in one call, 20-60 MB for tensor and image columns). So on a local disk the file is written
natively and `FileFollower` hashes it from the page cache on a thread as it grows (mmap, no copy; the file's
size grows page by page even during one large write, so the thread keeps up and only the last bytes, 0.2-23 MB
of a 208 MB shard, are hashed after the writer closes the file). Measured on this project's 2-core VM at load
6 (a 208 MB encode-shaped shard, medians of 16 interleaved writes): plain 0.18 s, `FileFollower` +29% and
`HashingSink` +39% wall time; the follower's thread spends 22-28 ms of CPU a shard, about the CRC of 208 MB
read from memory, which a write only hides when a core is free (bench/verify.py, docs/operations.md). Object
stores, where the bytes never reach a local page cache, keep `HashingSink`: the upload, not the copy, is what
limits their writes.

Reading: local files with large sequential reads into one reused buffer, announced with
posix_fadvise(SEQUENTIAL) (the kernel doubles its read-ahead), hashed in line (the kernel reads ahead while
the CRC runs); other filesystems through their pyarrow stream with the next read on a thread.
"""

from __future__ import annotations

import io
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c

ALGORITHM = "crc32c"
CHUNK = 8 << 20  # bytes per read when checking: large enough for sequential disk and object-store throughput
TAIL = 1 << 20  # the last bytes of a file kept while checking it, so its Parquet footer needs no second read
AHEAD = 8  # buffers a writer may hand the hashing thread before it waits
MAP = 16 << 20  # bytes a FileFollower maps and hashes at a time
POLL = 0.002  # seconds between a FileFollower's looks at the file's size


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


class FileFollower:
    """Hashes a local file that another thread of this process is writing, from the page cache, as it grows:
    `finish()` after the writer closed the file hashes what is left and checks that every byte was hashed.

    It maps only bytes below a size the file had already reached (a mapped page past the end of a file would
    kill the process with SIGBUS), which is safe because the file is a temporary one that only its writer
    appends to. Memory: one mapping of up to MAP bytes of page cache at a time."""

    def __init__(self, path: str, digest: Digest):
        self.path, self.digest = path, digest
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.fd = os.open(path, os.O_RDONLY)
        self.thread = threading.Thread(target=self._run, name="curate-crc32c", daemon=True)
        self.thread.start()

    def _hash_to(self, end: int, final: bool) -> None:
        digest = self.digest
        while end - digest.size >= (1 if final else mmap.PAGESIZE):
            start = digest.size - digest.size % mmap.ALLOCATIONGRANULARITY  # mappings start on a page boundary
            stop = min(end, start + MAP)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            with mmap.mmap(self.fd, stop - start, flags=flags, prot=mmap.PROT_READ, offset=start) as mapped:
                view = memoryview(mapped)
                try:
                    digest.update(view[digest.size - start :])
                finally:
                    view.release()

    def _run(self) -> None:
        try:
            while not self.done.is_set():
                self._hash_to(os.fstat(self.fd).st_size, final=False)
                self.done.wait(POLL)
            self._hash_to(os.fstat(self.fd).st_size, final=True)
        except BaseException as error:  # handed to the writer by finish()
            self.error = error

    def finish(self) -> None:
        """Wait for the last bytes (the writer has closed the file) and check that the digest saw all of them."""
        self.done.set()
        self.thread.join()
        try:
            if self.error is not None:
                raise OSError(f"hashing {self.path} as it was written failed: {self.error}") from self.error
            size = os.fstat(self.fd).st_size
            if self.digest.size != size:
                raise OSError(f"hashed {self.digest.size:,} bytes of {self.path}, which has {size:,}")
        finally:
            os.close(self.fd)

    def abandon(self) -> None:
        """The write failed: stop hashing (the digest is then meaningless)."""
        self.done.set()
        self.thread.join()
        os.close(self.fd)


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


def file_digest(path: str, chunk: int = CHUNK, tail: int = TAIL) -> Streamed:
    """A local file read to its end in ``chunk``-byte reads into one reused buffer and hashed in line. The
    posix_fadvise(SEQUENTIAL) hint doubles the kernel's read-ahead, which runs while the CRC does, so the disk
    never waits for it; reusing the buffer spares a fresh allocation (and its page faults) per read. Only the
    last ``tail`` bytes (by the size when opened) are copied out, for the footer. Memory: ``chunk`` + ``tail``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        keep_from = os.fstat(fd).st_size - tail
        buffer = memoryview(bytearray(chunk))
        digest = Digest()
        kept: list[bytes] = []
        while n := os.readv(fd, [buffer]):
            data = buffer[:n]
            digest.update(data)
            if digest.size > keep_from:
                kept.append(bytes(data[max(0, n - (digest.size - keep_from)) :]))
    finally:
        os.close(fd)
    return Streamed(digest.size, digest.tagged(), b"".join(kept)[-tail:])


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
