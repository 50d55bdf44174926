"""img2dataset's files beside each tar: `00000.parquet` (one row per input URL, failures included: key,
url, caption, status, error_message, sizes, sha256, extra columns) and `00000_stats.json` (counts).

A tar holds only the samples that succeeded; the sidecar is where the failed URLs are, so a source
reading the tar can still account for every URL of the original list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate import storage

SUCCESS = "success"


@dataclass(frozen=True)
class Sidecar:
    rows: list[dict[str, Any]]  # every row of the sidecar Parquet, as written
    stats: dict[str, Any] | None  # the _stats.json, when present


def sidecar_uris(tar_uri: str) -> tuple[str, str]:
    stem = tar_uri[: -len(".tar")] if tar_uri.lower().endswith(".tar") else tar_uri.rsplit(".", 1)[0]
    return stem + ".parquet", stem + "_stats.json"


def read_sidecar(tar_uri: str) -> Sidecar | None:
    """The sidecar of a tar, or None when there is none (a tar not written by img2dataset)."""
    parquet_uri, stats_uri = sidecar_uris(tar_uri)
    if not storage.exists(parquet_uri):
        return None
    table = storage.read_parquet(parquet_uri)
    if "key" not in table.column_names or "status" not in table.column_names:
        return None  # some other Parquet file that happens to share the name
    stats = storage.read_json(stats_uri) if storage.exists(stats_uri) else None
    return Sidecar(table.to_pylist(), stats)
