"""The report's image folder, `RUN/_report/img/`: thumbnails, charts and copies of the stages' own pictures.

Images are files beside the page rather than data URIs inside it: the runner rebuilds the page after every
stage, and a thumbnail already written (named by its key) is reused instead of being decoded again; the page
stays small; `aws s3 cp --recursive RUN/_report .` brings everything. Files no longer shown are deleted at
the end of a build, so the folder stays bounded by what one page shows.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import defaultdict
from typing import Any

from curate import storage
from curate.images import thumbnail
from curate.report.samples import rows_with_keys
from curate.runfolder import StageDir

THUMB_SIZE = 128
FOLDER = "img"


def safe_name(text: str) -> str:
    """A file name for a key (keys are hex; anything else is hashed)."""
    return text if re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", text) else hashlib.sha1(text.encode()).hexdigest()[:24]


def jpeg(image: Any, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class ImageFolder:
    """What one build writes under `_report/img/`; `src(...)` values are paths relative to index.html."""

    def __init__(self, report_uri: str):
        self.uri = storage.join(report_uri, FOLDER)
        self.existing = set(storage.list_names(self.uri))
        self.used: set[str] = set()
        self.written = 0

    def put(self, name: str, data: bytes) -> str:
        storage.write_atomic(storage.join(self.uri, name), data)
        self.existing.add(name)
        self.used.add(name)
        self.written += 1
        return f"{FOLDER}/{name}"

    def reuse(self, name: str) -> str | None:
        if name in self.existing:
            self.used.add(name)
            return f"{FOLDER}/{name}"
        return None

    def copy(self, source_uri: str, name: str) -> str | None:
        """A stage's own picture (the filter's histograms, the dedup plot, the loss curve), if it exists."""
        if not storage.exists(source_uri):
            return None
        return self.put(name, storage.read_bytes(source_uri))

    def thumbnails(self, stage: StageDir, rows: list[tuple[int, str]], size: int = THUMB_SIZE) -> dict[str, str]:
        """key -> thumbnail path for (shard, key) rows of an image stage; each shard's image column is read only
        in the row groups holding the keys still missing. Rows without a decodable image get no entry."""
        out: dict[str, str] = {}
        missing: dict[int, set[str]] = defaultdict(set)
        for shard, key in rows:
            name = f"{safe_name(key)}.jpg"
            found = self.reuse(name)
            if found:
                out[key] = found
            else:
                missing[shard].add(key)
        for shard, keys in sorted(missing.items()):
            uri = stage.shard(shard)
            if not storage.exists(uri):
                continue
            for key, row in rows_with_keys(uri, keys, ["image"]).items():
                if not row.get("image"):
                    continue
                try:
                    small = thumbnail(row["image"], size)
                except Exception:  # an undecodable image is shown as missing; its status says why
                    continue
                out[key] = self.put(f"{safe_name(key)}.jpg", jpeg(small))
        return out

    def prune(self) -> int:
        """Delete files of earlier builds that this page no longer shows."""
        stale = sorted(n for n in self.existing - self.used if not n.startswith("."))
        fs, base = storage.resolve(self.uri)
        for name in stale:
            fs.delete_file(f"{base}/{name}")
        return len(stale)


__all__ = ["ImageFolder", "jpeg", "safe_name"]
