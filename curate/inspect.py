"""Read a run folder or a shard back: per-stage progress, status breakdowns, schema and sample rows.

Used by `curate inspect` and by the notebooks; reads only markers, records and Parquet footers except
when sample rows are asked for.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import yaml

from curate import storage
from curate.lease import describe, read_lease
from curate.runfolder import RunDir, StageDir, summarize


def stage_names(run_uri: str) -> list[str]:
    """Stages in pipeline order (from the saved pipeline), then any other stage folders found."""
    run = RunDir(run_uri)
    names: list[str] = []
    if storage.exists(run.pipeline_uri):
        saved = yaml.safe_load(storage.read_text(run.pipeline_uri)) or {}
        names = [s.get("name") or s["kind"] for s in saved.get("stages", [])]
    for name in storage.list_names(run_uri):
        if name not in names and storage.exists(run.stage(name).record_uri):
            names.append(name)
    return names


def stage_summary(run_uri: str, name: str) -> dict[str, Any]:
    stage = RunDir(run_uri).stage(name)
    if not storage.exists(stage.record_uri):
        return {"stage": name, "state": "not started", "shards_planned": 0, "shards": 0, "rows": 0, "status": {}}
    record = stage.read_record()
    if stage.is_complete():
        summary = storage.read_json(stage.success_uri)
        state = "complete"
    else:
        summary = summarize(stage.shard_stats())
        state = "in progress" if summary["shards"] else "planned"
    return {
        **summary,
        "stage": name,
        "kind": record.get("kind"),
        "state": state,
        "shards_planned": record.get("shards", 0),
    }


def run_summary(run_uri: str) -> list[dict[str, Any]]:
    run_uri = storage.absolute(run_uri)
    return [stage_summary(run_uri, name) for name in stage_names(run_uri)]


def read_stage(run_uri: str, name: str, columns: list[str] | None = None) -> pa.Table:
    """All completed shards of a stage as one table (for notebooks on small runs). Shards of a source may carry
    different extra columns (each tar's metadata fields): a column a shard lacks is null in its rows."""
    uris = StageDir(storage.join(storage.absolute(run_uri), name)).shard_uris()
    tables = [storage.read_parquet(u, columns=columns) for u in uris]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def first_shard(run_uri: str, name: str) -> str | None:
    uris = StageDir(storage.join(storage.absolute(run_uri), name)).shard_uris()
    return uris[0] if uris else None


def shard_summary(uri: str, sample: int = 3) -> dict[str, Any]:
    file = storage.parquet_file(uri)
    columns = file.schema_arrow.names
    status: dict[str, int] = {}
    if "status" in columns:
        status = dict(Counter(file.read(columns=["status"])["status"].to_pylist()))
    head = file.read_row_group(0).slice(0, sample).to_pylist() if file.metadata.num_row_groups else []
    metadata = {
        k.decode(): v.decode() for k, v in (file.schema_arrow.metadata or {}).items() if k.startswith(b"curate.")
    }
    return {
        "uri": uri,
        "rows": file.metadata.num_rows,
        "row_groups": file.metadata.num_row_groups,
        "schema": file.schema_arrow,
        "status": status,
        "metadata": metadata,
        "sample": head,
    }


# ---------------------------------------------------------------------------------------------------- text


def _cell(value: Any, width: int = 60) -> str:
    if isinstance(value, bytes | bytearray):
        return f"<{len(value):,} bytes>"
    if isinstance(value, list) and len(value) > 8:
        return f"<list of {len(value)}>"
    text = "" if value is None else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_status(status: dict[str, int]) -> str:
    total = sum(status.values())
    if not total:
        return "-"
    parts = sorted(status.items(), key=lambda kv: (kv[0] != "ok", -kv[1]))
    return ", ".join(f"{k} {v:,} ({100 * v / total:.1f}%)" for k, v in parts)


def _stage_table(summaries: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'stage':<14} {'kind':<10} {'state':<12} {'shards':>11} {'rows':>10} {'rows/s/worker':>14}  status"]
    for s in summaries:
        shards = f"{s['shards']}/{s['shards_planned']}"
        rate = s.get("rows_per_worker_second")
        lines.append(
            f"  {s['stage']:<14} {s.get('kind') or '-':<10} {s['state']:<12} {shards:>11} {s['rows']:>10,} "
            f"{(f'{rate:,.1f}' if rate else '-'):>14}  {format_status(s['status'])}"
        )
    return lines


def _span_seconds(run_uri: str, name: str) -> float | None:
    """First shard start to last shard end, from the markers' `span` (download stages)."""
    spans = [s.extra.get("span") for s in RunDir(run_uri).stage(name).shard_stats()]
    spans = [s for s in spans if isinstance(s, dict) and "started_at" in s and "finished_at" in s]
    if not spans:
        return None
    return max(s["finished_at"] for s in spans) - min(s["started_at"] for s in spans)


def download_lines(summary: dict[str, Any], span_seconds: float | None = None) -> list[str]:
    """Download statistics from the shard markers' counters (stages whose markers carry `urls`)."""
    extra = summary.get("extra") or {}
    urls = extra.get("urls")
    if not urls:
        return []
    ok = extra.get("ok", 0)
    seconds = extra.get("download_seconds", 0) or 0
    rate = f"{ok / seconds:,.1f} images/s per worker" if seconds else "- images/s"
    if span_seconds:
        rate += f", {ok / span_seconds:,.1f} images/s overall (first shard start to last shard end)"
    errors = sorted(((k, v) for k, v in summary["status"].items() if k != "ok"), key=lambda kv: -kv[1])
    return [
        f"  {summary['stage']}: {ok:,} of {urls:,} URLs ok ({100 * ok / urls:.1f}%), {rate}, "
        f"{extra.get('bytes_received', 0) / 1e6:,.1f} MB received over {extra.get('connections', 0):,} connections, "
        f"robots.txt fetched {extra.get('robots_fetches', 0):,} times",
        "    errors by reason: " + (", ".join(f"{k} {v:,}" for k, v in errors) or "none"),
    ]


def _sample_lines(run_uri: str, name: str, sample: int) -> list[str]:
    shard = first_shard(run_uri, name)
    if shard is None:
        return []
    return [
        "",
        f"stage {name}: schema and {sample} sample rows of {shard}",
        *_shard_lines(shard_summary(shard, sample)),
    ]


def format_run(run_uri: str, sample: int = 3, only: str | None = None) -> str:
    run_uri = storage.absolute(run_uri)
    summaries = [s for s in run_summary(run_uri) if only is None or s["stage"] == only]
    lines = [f"run {run_uri}", lease_line(run_uri)]
    if not summaries:
        return "\n".join(lines) + "\n  (no stages found)"
    lines += _stage_table(summaries)
    for s in summaries:
        if (s.get("extra") or {}).get("urls"):
            lines += download_lines(s, _span_seconds(run_uri, s["stage"]))
    for s in summaries:
        lines += _sample_lines(run_uri, s["stage"], sample)
    return "\n".join(lines)


def lease_line(run_uri: str) -> str:
    """Who holds the run folder's lease (curate.lease): a run in progress, one that stopped renewing, or none."""
    try:
        record = read_lease(run_uri)
    except Exception as e:  # inspecting must not fail on a store that refuses the lease read
        return f"  lease: could not be read ({e})"
    if record is None:
        return "  lease: free (no run holds this folder)"
    state = "EXPIRED, the next run takes it over" if record.expired else "held"
    return f"  lease: {state}: {describe(record)}"


def _shard_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["  schema:"]
    for field in summary["schema"]:
        lines.append(f"    {field.name:<20} {field.type}")
    for i, row in enumerate(summary["sample"]):
        lines.append(f"  row {i}:")
        for name, value in row.items():
            lines.append(f"    {name:<20} {_cell(value)}")
    return lines


def format_shard(uri: str, sample: int = 3) -> str:
    summary = shard_summary(uri, sample)
    lines = [
        f"shard {uri}",
        f"  rows {summary['rows']:,} in {summary['row_groups']} row groups",
        f"  status: {format_status(summary['status'])}",
    ]
    if summary["metadata"]:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in summary["metadata"].items()))
    return "\n".join(lines + _shard_lines(summary))


def format_any(target: str, sample: int = 3) -> str:
    """A run folder, one stage's folder inside it, or a single shard file."""
    target = storage.absolute(target).rstrip("/")
    if not storage.is_dir(target):
        return format_shard(target, sample)
    if storage.exists(storage.join(target, "_stage.json")):
        run_uri, name = target.rsplit("/", 1)
        return format_run(run_uri, sample, only=name)
    return format_run(target, sample)
