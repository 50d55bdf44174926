"""Which tars (and which byte ranges of large ones) make which output shard.

One shard per tar by default. A tar larger than ``max_part_bytes`` is split into parts that begin at
sample boundaries: its member headers are read once at planning (seeking over the data, so a local or
shared file costs a few milliseconds per thousand members; on an object store one small ranged read per
member) and the plan records each part's byte range and the keys earlier parts already hold, so a key
repeated across parts is still reported as a duplicate. Tars at or below the limit are never opened
while planning: their sizes come from one listing per folder.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field

from curate import storage
from curate.ingest.tars import split_name


@dataclass(frozen=True)
class TarPart:
    uri: str
    start: int = 0
    end: int | None = None  # None: to the end of the file
    part: int = 0  # 0 for the first part (it also carries the sidecar's rows)
    earlier_keys: tuple[str, ...] = ()  # keys of this part that earlier parts already hold
    later_keys: tuple[str, ...] = field(default=())  # part 0 only: every key of the later parts

    def encode(self) -> str:
        data = {"tar": self.uri}
        if self.end is not None or self.start:
            data.update(start=self.start, end=self.end, part=self.part)
        if self.earlier_keys:
            data["earlier_keys"] = list(self.earlier_keys)
        if self.later_keys:
            data["later_keys"] = list(self.later_keys)
        return json.dumps(data, separators=(",", ":"))

    @staticmethod
    def decode(text: str) -> TarPart:
        data = json.loads(text)
        return TarPart(
            data["tar"],
            data.get("start", 0),
            data.get("end"),
            data.get("part", 0),
            tuple(data.get("earlier_keys", ())),
            tuple(data.get("later_keys", ())),
        )

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None


def sizes(uris: list[str]) -> dict[str, int]:
    """File sizes, one listing per folder (brace lists name thousands of files in one folder)."""
    by_folder: dict[str, list[str]] = {}
    for uri in uris:
        by_folder.setdefault(posixpath.dirname(uri) if storage.has_scheme(uri) else _local_dir(uri), []).append(uri)
    found: dict[str, int] = {}
    for folder, members in by_folder.items():
        listed = {entry.uri: entry.size for entry in storage.list_files(folder, recursive=False)}
        for uri in members:
            if uri not in listed:
                raise FileNotFoundError(f"no such file: {uri}")
            found[uri] = listed[uri]
    return found


def _local_dir(uri: str) -> str:
    import os

    return os.path.dirname(uri)


def plan_tars(uris: list[str], max_part_bytes: int) -> list[TarPart]:
    """Every tar as one part, or a large plain tar cut into parts of about ``max_part_bytes``."""
    found = sizes(uris)
    parts: list[TarPart] = []
    for uri in uris:
        size = found[uri]
        if size > max_part_bytes and _splittable(uri):
            parts.extend(split(uri, size, max_part_bytes))
        else:
            parts.append(TarPart(uri))
    return parts


def _splittable(uri: str) -> bool:
    return uri.lower().endswith(".tar")  # compressed tars can only be read from the start


def member_headers(uri: str) -> list[tuple[int, str]]:
    """(header offset, name) of every regular member, reading headers only (tarfile seeks over the data)."""
    fs, path = storage.resolve(uri)
    out: list[tuple[int, str]] = []
    with fs.open_input_file(path) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                while True:
                    info = tar.next()
                    if info is None:
                        break
                    if info.isreg():
                        out.append((info.offset, info.name))
        except tarfile.ReadError:
            pass  # unreadable from here on: the last part reads it and reports what it finds
    return out


def split(uri: str, size: int, max_part_bytes: int) -> list[TarPart]:
    headers = member_headers(uri)
    starts = [0]  # byte offsets where parts begin, always at the first member of a sample
    previous_key = None
    for offset, name in headers:
        key = split_name(name)[0]
        if key != previous_key and offset - starts[-1] >= max_part_bytes and offset > 0:
            starts.append(offset)
        previous_key = key
    if len(starts) == 1:
        return [TarPart(uri)]
    ends = [*starts[1:], None]
    keys_of = [[split_name(name)[0] for offset, name in headers if s <= offset and (e is None or offset < e)]
               for s, e in zip(starts, ends, strict=True)]  # fmt: skip
    parts = []
    seen: set[str] = set()
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        mine = dict.fromkeys(keys_of[i])
        earlier = tuple(k for k in mine if k in seen)
        later = tuple(dict.fromkeys(k for ks in keys_of[1:] for k in ks)) if i == 0 else ()
        parts.append(TarPart(uri, start, end if end is not None else size, i, earlier, later))
        seen.update(mine)
    return parts
