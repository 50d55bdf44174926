"""WebDataset tar shards read member by member, every member accounted for.

A WebDataset sample is a run of consecutive members sharing a key (`000012.jpg`, `000012.txt`,
`000012.json`): the key is the member's path up to the first dot of its file name, the rest is the
extension, as webdataset's own `base_plus_ext` splits it (same regular expression). A member whose
extension already appears in the current sample starts a new sample with the same key, and a key met
again later is a duplicate, as webdataset's `group_by_keys` would see it.

Why Python's `tarfile` header by header rather than the `webdataset` library's iterators: those stop
at the first damaged member or hand it to an error handler that can only skip it, and `tarfile`'s own
iteration ends silently at a truncated or corrupt header. Here every header is parsed by tarfile
(`TarInfo.fromtarfile`: ustar, GNU and pax) in stream mode, but the loop is ours, so a member cut by
the end of the file, a header cut in half, bytes that are not tar headers (skipped block by block until
the next valid header, as `tar --ignore-zeros` resynchronises) and data after the end-of-archive marker
each become a reported region instead of a lost remainder.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from curate import storage

BLOCK = tarfile.BLOCKSIZE
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


def split_name(name: str) -> tuple[str, str]:
    """(key, lower-case extension) of a member name; a name without a dot is its own key, extension ''."""
    found = _KEY.match(name)
    return (found.group(1), found.group(2).lower()) if found else (name, "")


@dataclass
class Member:
    name: str
    offset: int  # byte offset of its (first) header in the tar file
    data: bytes | None  # None when cut by the end of the file
    problem: str | None = None


@dataclass
class Sample:
    key: str
    offset: int  # offset of its first member
    members: list[Member] = field(default_factory=list)
    duplicate_of: int | None = None  # offset of the earlier sample with this key (-1: in an earlier part)

    def extensions(self) -> dict[str, Member]:
        """Extension -> member (first of each)."""
        out: dict[str, Member] = {}
        for member in self.members:
            out.setdefault(split_name(member.name)[1], member)
        return out


@dataclass
class Region:
    """Bytes of the tar that are no member: a header cut in half, non-header bytes, data after the end."""

    offset: int
    status: str  # truncated_tar | corrupt_tar | not_a_tar
    error: str


@dataclass
class TarContents:
    samples: list[Sample]
    regions: list[Region]
    end: str  # complete | no_end_marker | part_end | truncated | unreadable
    non_file_members: int = 0  # directories, links: no data, not part of any sample
    bytes_read: int = 0


class _Limited:
    """A file object that ends at ``length`` bytes (one part of a split tar)."""

    def __init__(self, raw: Any, length: int):
        self.raw = raw
        self.left = length

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.raw.close()


READ_BUFFER = 8 << 20  # tarfile reads 10 KiB at a time; on an object store each unbuffered read is a request


def _open(uri: str, start: int, end: int | None) -> tuple[Any, str]:
    import pyarrow as pa

    fs, path = storage.resolve(uri)
    if start == 0 and end is None:  # sequential; gzip-compressed tars too
        return fs.open_input_stream(path, compression=None, buffer_size=READ_BUFFER), "r|*"
    raw = fs.open_input_file(path)
    length = (end if end is not None else raw.size()) - start
    raw.seek(start)
    return _Limited(pa.BufferedInputStream(raw, min(READ_BUFFER, max(length, 1))), length), "r|"


def read_tar(uri: str, start: int = 0, end: int | None = None, earlier_keys: Iterable[str] = ()) -> TarContents:
    """The samples of a tar (or of bytes [start, end) of it, which must begin at a member header), with
    every member's data, and the regions that held no readable member. OSErrors (the file cannot be
    opened or read) are raised, so the shard is retried; everything about the tar's content is reported."""
    stream, mode = _open(uri, start, end)
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode=mode)  # noqa: SIM115 (closed with the stream below)
        except tarfile.ReadError as e:
            message = "empty file (0 bytes)" if "empty file" in str(e) else f"not a tar file: {e}"
            if "end of file header" in str(e):  # a valid tar with no member at all
                return TarContents([], [], "complete")
            return TarContents([], [Region(start, "not_a_tar", message)], "unreadable")
        members, regions, end_state, others = _members(tar, start, end is not None)
        samples = group(members, earlier_keys)
        return TarContents(samples, regions, end_state, others, _position(tar))
    finally:
        stream.close()


def _position(tar: tarfile.TarFile) -> int:
    try:
        return int(tar.fileobj.tell())
    except Exception:
        return 0


def _members(tar: tarfile.TarFile, base: int, is_part: bool) -> tuple[list[Member], list[Region], str, int]:
    members: list[Member] = []
    regions: list[Region] = []
    others = 0
    info: tarfile.TarInfo | None = tar.firstmember
    tar.firstmember = None
    corrupt_from: int | None = None
    end_state = "complete"
    while True:
        if info is not None:
            if corrupt_from is not None:
                regions.append(_corrupt(base, corrupt_from, info.offset))
                corrupt_from = None
            if not info.isreg():
                others += 1
            else:
                members.append(_read_member(tar, info, base))
                if members[-1].data is None:
                    end_state = "truncated"
                    break
        info = None
        if not _at_offset(tar):  # the padding after the last member is cut: nothing of a member is lost
            end_state = "part_end" if is_part else "no_end_marker"
            break
        try:
            info = tar.tarinfo.fromtarfile(tar)
            continue
        except tarfile.EOFHeaderError:
            if corrupt_from is not None:  # a zero block inside a corrupt region: keep looking
                tar.offset += BLOCK
                continue
            end_state = _after_end_marker(tar, base, regions)
        except tarfile.EmptyHeaderError:
            end_state = "part_end" if is_part else "no_end_marker"
        except tarfile.TruncatedHeaderError:
            end_state = "truncated"
            start = corrupt_from if corrupt_from is not None else tar.offset
            corrupt_from = None
            message = f"the tar ends inside a member header at byte {base + start}"
            regions.append(Region(base + start, "truncated_tar", message))
        except (tarfile.InvalidHeaderError, tarfile.SubsequentHeaderError, tarfile.HeaderError):
            if corrupt_from is None:
                corrupt_from = tar.offset
            tar.offset += BLOCK  # resynchronise: try the next block
            continue
        break
    if corrupt_from is not None:
        regions.append(_corrupt(base, corrupt_from, tar.offset))
    return members, regions, end_state, others


def _at_offset(tar: tarfile.TarFile) -> bool:
    """Move the stream to tar.offset; False when the file ended before it."""
    if tar.offset == tar.fileobj.tell():
        return True
    tar.fileobj.seek(tar.offset - 1)
    return bool(tar.fileobj.read(1))


def _corrupt(base: int, start: int, stop: int) -> Region:
    return Region(
        base + start, "corrupt_tar", f"bytes {base + start}..{base + stop} of the tar are not tar members (skipped)"
    )


def _after_end_marker(tar: tarfile.TarFile, base: int, regions: list[Region]) -> str:
    """After the end-of-archive block only zeros (padding) may follow."""
    position = tar.offset
    while True:
        chunk = tar.fileobj.read(1 << 16)
        if not chunk:
            return "complete"
        if chunk.count(0) != len(chunk):
            message = f"data after the end-of-archive marker at byte {base + position}"
            regions.append(Region(base + position, "corrupt_tar", message))
            return "complete"


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, base: int) -> Member:
    handle = tar.extractfile(info)
    assert handle is not None
    try:
        data = handle.read()
    except tarfile.ReadError:
        return Member(
            info.name,
            base + info.offset,
            None,
            f"member {info.name} ({info.size:,} bytes) is cut by the end of the tar",
        )
    return Member(info.name, base + info.offset, data)


def group(members: list[Member], earlier_keys: Iterable[str] = ()) -> list[Sample]:
    """Consecutive members with one key make a sample; a repeated extension or a key seen before (here or in
    ``earlier_keys``, those of earlier parts) makes a duplicate sample."""
    first: dict[str, int] = dict.fromkeys(earlier_keys, -1)
    samples: list[Sample] = []
    current: Sample | None = None
    seen_extensions: set[str] = set()
    for member in members:
        key, extension = split_name(member.name)
        if current is None or key != current.key or extension in seen_extensions:
            current = Sample(key, member.offset, duplicate_of=first.get(key))
            first.setdefault(key, member.offset)
            seen_extensions = set()
            samples.append(current)
        seen_extensions.add(extension)
        current.members.append(member)
    return samples
