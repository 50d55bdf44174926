"""A run folder of many shards written through the real writers (run folder records, markers, Parquet shards in
the stages' schemas, the filter and dedup stages' own report writers), without running a model: what the run
report's test and bench (bench/report.py) read at a shard count no real run of this machine could make quickly.

Stages, in pipeline order: `ingest` (kind local: small JPEGs, every 97th row a decode error), `prefilter`
(kind filter, `min_side: 24`), `dedup` (every 7th row a near copy of the row before, every 31st an exact copy),
and `caption` (kind caption, left in progress: markers but no `_SUCCESS.json`, every 113th row `too_long`).
"""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from curate import storage
from curate.dedup.report import cluster_size_stats
from curate.dedup.report import write_report as write_dedup_report
from curate.filter.report import write_report as write_filter_report
from curate.filter.rules import FilterRules
from curate.runfolder import RunDir, ShardStats, ShardTask, StageDir, summarize
from curate.schema import DEDUP_SCHEMA, FILTER_SCHEMA, IMAGE_SCHEMA, make_key

STAGES = (
    ("ingest", "local", None),
    ("prefilter", "filter", "ingest"),
    ("dedup", "dedup", "ingest"),
    ("caption", "caption", "ingest"),
)
THRESHOLD = 0.75


def _jpegs(n: int = 16) -> list[bytes]:
    out = []
    for i in range(n):
        array = np.zeros((32, 48, 3), np.uint8)
        array[..., 0], array[..., 1], array[..., 2] = 16 * i, 255 - 16 * i, (40 * i) % 256
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=70)
        out.append(buffer.getvalue())
    return out


def _rows(g: int, keys: Callable[[int], str], jpegs: list[bytes]) -> dict[str, dict[str, Any]]:
    """Every stage's row for the row with global index ``g``."""
    key = keys(g)
    ok = g % 97 != 5
    exact = ok and g % 31 == 30 and g >= 2 and (g - 2) % 97 != 5
    near = ok and not exact and g % 7 == 6 and (g - 1) % 97 != 5
    width = 16 + (g * 7) % 48
    ingest = {
        "key": key,
        "url": f"file:///bench/{g}.jpg",
        "caption": f"a bench image number {g} of many",
        "image": jpegs[g % len(jpegs)] if ok else None,
        "format": "JPEG" if ok else None,
        "width": width if ok else None,
        "height": 32 if ok else None,
        "original_width": width if ok else None,
        "original_height": 32 if ok else None,
        "sha256": None,
        "status": "ok" if ok else "decode_error",
        "error": None if ok else "not a recognised image format",
    }
    small = ok and min(width, 32) < 24
    prefilter = {
        "key": key,
        "keep": ok and not small,
        "removed_by": "" if ok and not small else ("min_side" if ok else "not_ok_upstream"),
        "status": ("filtered" if small else "ok") if ok else "decode_error",
        "width": width if ok else None,
        "height": 32 if ok else None,
        "caption_words": 7,
        "caption_chars": 30,
    }
    dup_of = keys(g - 2) if exact else keys(g - 1) if near else None
    similarity = 1.0 if exact else (THRESHOLD + 0.005 + (g % 25) / 100) if near else None
    dedup = {
        "key": key,
        "cluster": g % 50 if ok else -1,
        "keep": ok and dup_of is None,
        "dup_of": dup_of,
        "similarity": similarity,
        "reason": "exact_duplicate" if exact else "near_duplicate" if near else "kept" if ok else "not_ok",
        "status": ingest["status"],
    }
    status = "not_ok_upstream" if not ok else "skipped_duplicate" if dup_of else "too_long" if g % 113 == 7 else "ok"
    caption = {
        "key": key,
        "caption_synthetic": f"a synthetic caption of image {g}" if status == "ok" else None,
        "caption_raw": None,
        "captioner": "bench",
        "prompt": "Describe the image.",
        "tokens_generated": 7 if status == "ok" else None,
        "truncated": False if status == "ok" else None,
        "status": status,
        "error": None if status == "ok" else f"{status}: <bench row {g}> & more",  # markup a page must escape
    }
    return {"ingest": ingest, "prefilter": prefilter, "dedup": dedup, "caption": caption}


SCHEMAS = {"ingest": IMAGE_SCHEMA, "prefilter": FILTER_SCHEMA, "dedup": DEDUP_SCHEMA, "caption": None}


def fabricate_run(root: str, shards: int, rows_per_shard: int = 1) -> RunDir:
    """Write the run folder under ``root``; returns it."""
    run = RunDir(storage.absolute(root))
    storage.makedirs(run.uri)
    pipeline = {"name": "fabricated", "output": run.uri, "stages": [{"kind": k, "name": n} for n, k, _ in STAGES]}
    storage.write_atomic(run.pipeline_uri, yaml.safe_dump(pipeline).encode())
    jpegs = _jpegs()
    keys = lambda g: make_key(f"fabricated#{g}")  # noqa: E731
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    dirs = {name: run.stage(name) for name, _, _ in STAGES}
    for name, kind, upstream in STAGES:
        tasks = [ShardTask(i, (f"bench-input-{i}",)) for i in range(shards)]
        config = {"kind": kind, "resources": {"num_cpus": 1.0}}
        dirs[name].write_plan(
            tasks,
            {
                "kind": kind,
                "fingerprint": f"fabricated-{kind}",
                "config": config,
                "upstream": upstream,
                "planned_at": now,
            },
        )
    stats: dict[str, list[ShardStats]] = {name: [] for name in dirs}
    reasons: Counter[str] = Counter()
    for shard in range(shards):
        rows = [_rows(shard * rows_per_shard + j, keys, jpegs) for j in range(rows_per_shard)]
        for name, stage in dirs.items():
            table = pa.Table.from_pylist([r[name] for r in rows], schema=SCHEMAS[name])
            size = storage.write_parquet_atomic(stage.shard(shard), table)
            status = Counter(table["status"].to_pylist())
            if name == "dedup":
                reasons.update(table["reason"].to_pylist())
            extra = {"encoded": 0} if name != "caption" else {"captioned": status.get("ok", 0)}
            marker = ShardStats(shard, table.num_rows, dict(status), 0.01, size, extra)
            stage.write_marker(marker)
            stats[name].append(marker)
    for name, kind, _ in STAGES[:-1]:  # caption stays in progress
        if kind == "filter":
            write_filter_report(FilterRules(min_side=24), dirs["ingest"], dirs[name], {"min_side": 24})
        if kind == "dedup":
            _dedup_report(dirs[name], reasons, shards * rows_per_shard)
        record = {"stage": name, "kind": kind, "completed_at": now, "wall_seconds_last_run": 1.0}
        storage.write_json(dirs[name].success_uri, {**record, **summarize(stats[name])})
    return run


def _dedup_report(stage: StageDir, reasons: Counter[str], rows: int) -> None:
    """The dedup report as the stage writes it (curate.dedup.report.write_report), from the fabricated counts."""
    ok = rows - reasons["not_ok"]
    exact = reasons["exact_duplicate"]
    removed = exact + reasons["near_duplicate"]
    sizes = np.bincount(np.arange(ok) % 50, minlength=50)
    analysis = [
        {"threshold": t, "clusters": 50, "items": ok, "removed": removed, "fraction_removed": removed / max(1, ok)}
        for t in (0.7, 0.75, 0.8)
    ]
    report = {
        "rows": rows,
        "ok": ok,
        "removed": removed,
        "fraction_removed": removed / max(1, ok),
        "exact_duplicates": exact,
        "near_duplicates": removed - exact,
        "pairs_found": removed,
        "bounded": 0,
        "max_neighbors": 0,
        "threshold": THRESHOLD,
        "metric": "cosine",
        "order": "largest_first",
        "assign_top": 1,
        "rounds": 1,
        "k": 50,
        "clusters": cluster_size_stats(sizes),
        "threshold_analysis": analysis,
        "path": "fabricated",
        "seconds": {"total": 0.0},
    }
    write_dedup_report(storage.join(stage.uri, "_report"), report, sizes)


__all__ = ["fabricate_run"]
