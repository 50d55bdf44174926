"""The report's gallery of matched pairs per reference: the new image beside the reference image, with their
similarity, in bands around the reference's threshold, so a user can choose the threshold by looking.

Pairs come from the resolve phase's deterministic sample (curate.dedup.resolve): matches above the threshold,
near misses of sampled rows below it. Images are read by row id (``shard << 32 | row``; image shards line up
with the sscd and dedup shards), one Parquet row group per image, from this run's image stage and from the
reference run's (its index manifest names it): a bounded number of reads, never a scan of either run.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup.layout import codes_of
from curate.dedup.order import keys_from_codes
from curate.dedup.resolve import band_labels
from curate.runfolder import shard_name

THUMBNAIL = 160  # pixels, longest side


def choose(candidates: pa.Table | None, per_band: int) -> pa.Table | None:
    """The ``per_band`` pairs with the smallest id hash in each (reference, band) over all map groups."""
    if candidates is None or not candidates.num_rows:
        return None
    table = candidates.sort_by([("reference", "ascending"), ("band", "ascending"), ("hash", "ascending"),
                                ("id", "ascending")])  # fmt: skip
    ref, band = table["reference"].to_numpy(), table["band"].to_numpy()
    start = np.flatnonzero(np.r_[True, (ref[1:] != ref[:-1]) | (band[1:] != band[:-1])])
    place = np.arange(len(ref)) - np.repeat(start, np.diff(np.r_[start, len(ref)]))
    return table.filter(pa.array(place < per_band))


def read_row(stage_uri: str | None, row_id: int, columns: list[str]) -> dict[str, Any] | None:
    """``columns`` of one row of a stage by row id, reading only the row group that holds it; None when the stage
    or the row is not there (a reference run whose images were deleted)."""
    if not stage_uri:
        return None
    shard, row = int(row_id) >> 32, int(row_id) & 0xFFFFFFFF
    uri = storage.join(stage_uri, shard_name(shard) + ".parquet")
    try:
        if not storage.exists(uri):
            return None
        file = storage.parquet_file(uri)
        start = 0
        for g in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(g).num_rows
            if row < start + rows:
                return file.read_row_group(g, columns=columns).slice(row - start, 1).to_pylist()[0]
            start += rows
    except (OSError, KeyError, pa.ArrowInvalid):
        return None
    return None


def _thumbnail(data: bytes | None, uri: str) -> bool:
    from curate.images import ImageError, thumbnail

    if not data:
        return False
    try:
        image = thumbnail(data, THUMBNAIL)
    except (ImageError, OSError, ValueError):
        return False
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=85)
    storage.write_atomic(uri, buffer.getvalue())
    return True


def write(report_uri: str, refs: list[dict[str, Any]], chosen: pa.Table | None, images: str | None,
          upstream: str) -> list[dict[str, Any]]:  # fmt: skip
    """Thumbnails of the chosen pairs under ``<report>/gallery/<reference>/`` and their description per
    reference and band (relative image paths, keys, similarity), for the report's JSON and Markdown."""
    out = []
    for i, info in enumerate(refs):
        labels = band_labels(info["threshold"])
        bands: list[dict[str, Any]] = [{"band": label, "above_threshold": b >= 3, "pairs": []}
                                       for b, label in enumerate(labels)]  # fmt: skip
        if chosen is not None:
            mine = chosen.filter(pa.array(chosen["reference"].to_numpy() == i))
            ref_keys = keys_from_codes(codes_of(mine, "ref_")[:, 1:]) if mine.num_rows else []
            for j, row in enumerate(mine.to_pylist()):
                stem = f"gallery/{info['name']}/{labels[row['band']]}-{j:02d}"
                new = read_row(images, row["id"], ["key", "image"]) or read_row(upstream, row["id"], ["key"]) or {}
                ref_images = (info.get("source") or {}).get("images")
                ref = read_row(ref_images, row["ref_id"], ["key", "image"]) or {}
                new_bytes, ref_key, ref_bytes = new.get("image"), ref.get("key"), ref.get("image")
                pair = {
                    "similarity": round(float(row["similarity"]), 4),
                    "key": new.get("key"),
                    "reference_key": ref_keys[j],
                    "new_image": stem + "-new.jpg"
                    if _thumbnail(new_bytes, storage.join(report_uri, stem + "-new.jpg")) else None,
                    "reference_image": stem + "-ref.jpg"
                    if _thumbnail(ref_bytes, storage.join(report_uri, stem + "-ref.jpg")) else None,
                }  # fmt: skip
                if ref_key is not None and ref_key != ref_keys[j]:  # the reference's image shards changed since
                    pair["reference_image"] = None
                bands[row["band"]]["pairs"].append(pair)
        out.append({"reference": info["name"], "threshold": info["threshold"], "bands": bands})
    return out


def markdown(gallery: list[dict[str, Any]]) -> list[str]:
    lines = []
    for entry in gallery:
        lines += [
            "",
            f"## Matched pairs: {entry['reference']} (threshold {entry['threshold']:g})",
            "",
            "Above the threshold a row was removed; below it, a sampled row's most similar reference image (kept).",
            "",
            "| band | similarity | new | reference |",
            "|---|---:|---|---|",
        ]
        for band in entry["bands"]:
            for pair in band["pairs"]:
                new = f"![new]({pair['new_image']})" if pair["new_image"] else f"`{pair['key']}`"
                ref = (
                    f"![reference]({pair['reference_image']})"
                    if pair["reference_image"]
                    else f"`{pair['reference_key']}`"
                )
                lines.append(f"| {band['band']} | {pair['similarity']:.3f} | {new} | {ref} |")
    return lines
