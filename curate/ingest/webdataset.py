"""One tar (or one part of a large tar) into image-shard rows: one row per sample, per region of the tar that
held no readable member, and (with img2dataset's sidecar) per URL that img2dataset failed to download or
that its sidecar lists but the tar lacks.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from curate.ingest.rows import check_image
from curate.ingest.sidecar import SUCCESS, Sidecar, read_sidecar
from curate.ingest.tar_plan import TarPart
from curate.ingest.tars import Sample, read_tar
from curate.schema import make_key

# (img2dataset status, error message) -> a row status, e.g. the download stage's http_404 / timeout mapping
Classify = Callable[[str, str], str]


@dataclass(frozen=True)
class TarSettings:
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption: str = "txt"  # txt | json | none
    caption_field: str = "caption"  # the JSON field when caption == "json"
    url_field: str = "url"  # the JSON field holding the sample's source URL, if any
    max_pixels: int = 89_478_485
    threads: int = 4
    sidecar: bool = True  # read img2dataset's <tar>.parquet beside the tar


@dataclass
class PartRows:
    rows: list[dict[str, Any]]  # fixed columns
    metadata: list[dict[str, Any] | None]  # per row: the sample's JSON (or sidecar row), for extra columns
    counters: dict[str, Any]


def sample_key(tar_uri: str, sample: Sample) -> str:
    """First occurrence: make_key("<tar>#<member key>"); a duplicate adds "@<byte offset>" (unique in the tar)."""
    suffix = "" if sample.duplicate_of is None else f"@{sample.offset}"
    return make_key(f"{tar_uri}#{sample.key}{suffix}")


def read_part(part: TarPart, settings: TarSettings, classify: Classify) -> PartRows:
    started = time.perf_counter()
    contents = read_tar(part.uri, part.start, part.end, part.earlier_keys)
    read_seconds = time.perf_counter() - started
    described = [_describe(part.uri, sample, settings) for sample in contents.samples]
    images = [d.pop("_image", None) for d in described]
    with ThreadPoolExecutor(max(1, settings.threads)) as pool:
        checked = list(pool.map(lambda data: check_image(data, settings.max_pixels), images))
    rows: list[dict[str, Any]] = []
    metadata: list[dict[str, Any] | None] = []
    for row, image in zip(described, checked, strict=True):
        meta = row.pop("_meta")
        if row["status"] is None:  # no problem with the sample itself: the image decides
            original = (row.pop("original_width", None), row.pop("original_height", None))
            row.update(image)
            if image["status"] == "ok" and all(isinstance(v, int) for v in original):
                row["original_width"], row["original_height"] = original
        else:
            row.pop("original_width", None)
            row.pop("original_height", None)
        rows.append(row)
        metadata.append(meta)
    for region in contents.regions:
        rows.append(
            {
                "key": make_key(f"{part.uri}@{region.offset}"),
                "url": f"{part.uri}@{region.offset}",
                "status": region.status,
                "error": region.error,
                "source": part.uri,
                "source_members": [],
            }
        )
        metadata.append(None)
    counters: Counter[str] = Counter()
    if part.part == 0 and settings.sidecar:
        sidecar = read_sidecar(part.uri)
        if sidecar is not None:
            tar_keys = {s.key for s in contents.samples} | set(part.later_keys)
            _sidecar_rows(part.uri, sidecar, tar_keys, classify, rows, metadata, counters)
    counters.update(
        samples=len(contents.samples),
        members=sum(len(s.members) for s in contents.samples),
        image_bytes=sum(len(r["image"]) for r in rows if r.get("image") is not None),
        non_file_members=contents.non_file_members,
    )
    counters[f"tar_end_{contents.end}"] += 1
    return PartRows(rows, metadata, {**counters, "read_seconds": round(read_seconds, 3)})


def _describe(tar_uri: str, sample: Sample, settings: TarSettings) -> dict[str, Any]:
    """The row of a sample before its image is checked: key, caption, URL, metadata, and any problem with
    the sample itself (status None when there is none)."""
    by_extension = sample.extensions()
    meta, meta_error = _json(by_extension.get("json"))
    image_member = next((by_extension[e] for e in settings.image_extensions if e in by_extension), None)
    first = sample.members[0].name
    url = meta.get(settings.url_field) if meta else None
    row: dict[str, Any] = {
        "key": sample_key(tar_uri, sample),
        "url": url if isinstance(url, str) else f"{tar_uri}#{first}",
        "caption": _caption(by_extension, meta, settings),
        "source": tar_uri,
        "source_key": sample.key,
        "source_members": [m.name for m in sample.members],
        "status": None,
        "error": None,
        "_meta": meta,
        "_image": image_member.data if image_member is not None else None,
    }
    if meta:
        row["original_width"], row["original_height"] = meta.get("original_width"), meta.get("original_height")
    cut = [m for m in sample.members if m.data is None]
    if cut:
        row.update(status="truncated_tar", error=cut[0].problem, _image=None)
    elif sample.duplicate_of is not None:
        where = "an earlier part of the tar" if sample.duplicate_of < 0 else f"byte {sample.duplicate_of} of the tar"
        row.update(status="duplicate_key", error=f"key {sample.key!r} already appeared at {where}", _image=None)
    elif image_member is None:
        names = ", ".join(m.name for m in sample.members)
        wanted = ", ".join(settings.image_extensions)
        row.update(status="no_image", error=f"no image member ({wanted}) for key {sample.key!r}; members: {names}")
    elif meta_error:
        row["_meta"] = {"json_error": meta_error}
    return row


def _json(member: Any) -> tuple[dict[str, Any] | None, str | None]:
    if member is None or member.data is None:
        return None, None
    try:
        value = json.loads(member.data)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{member.name}: {e}"
    return (value, None) if isinstance(value, dict) else (None, f"{member.name}: not a JSON object")


def _caption(by_extension: dict[str, Any], meta: dict[str, Any] | None, settings: TarSettings) -> str | None:
    if settings.caption == "txt":
        member = by_extension.get("txt")
        if member is None or member.data is None:
            return None
        return member.data.decode("utf-8", errors="replace").strip()
    if settings.caption == "json" and meta is not None:
        value = meta.get(settings.caption_field)
        return None if value is None else str(value)
    return None


def _sidecar_rows(
    tar_uri: str,
    sidecar: Sidecar,
    tar_keys: set[str],
    classify: Classify,
    rows: list[dict[str, Any]],
    metadata: list[dict[str, Any] | None],
    counters: Counter[str],
) -> None:
    """Rows for the URLs img2dataset failed (its sidecar's failures) and for successes missing from the tar."""
    for record in sidecar.rows:
        key = record.get("key")
        status = record.get("status")
        if key is None or status is None:
            continue
        if status == SUCCESS:
            if str(key) in tar_keys:
                continue
            row_status, error = "missing_from_tar", f"img2dataset's {tar_uri.rsplit('/', 1)[-1]} sidecar lists it"
            counters["missing_from_tar"] += 1
        else:
            if str(key) in tar_keys:
                counters["sidecar_conflicts"] += 1  # the tar has the sample after all: the tar wins
                continue
            message = str(record.get("error_message") or status)
            row_status, error = classify(str(status), message), message
            counters["img2dataset_failures"] += 1
        rows.append(
            {
                "key": make_key(f"{tar_uri}#{key}"),
                "url": record.get("url"),
                "caption": record.get("caption"),
                "source": tar_uri,
                "source_key": str(key),
                "source_members": [],
                "status": row_status,
                "error": error,
            }
        )
        metadata.append(record)
    if sidecar.stats:
        counters["img2dataset_count"] += int(sidecar.stats.get("count", 0) or 0)
        counters["img2dataset_successes"] += int(sidecar.stats.get("successes", 0) or 0)
