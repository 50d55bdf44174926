"""The funnel and the per-stage table: rows per stage by status, what each stage removed and why.

Counts come from the stage records only: `_SUCCESS.json` for a complete stage, the markers for one in progress
(`curate.inspect.stage_summary`). Error messages and example keys need rows: for each non-ok status, the shards
whose markers (at most MARKER_SCAN, spread over the stage) count that status are read, columns key / status /
error only, at most SHARDS_PER_STATUS per status and STATUS_SHARDS per stage. A status found in none of the
scanned markers is shown with its count and no examples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from curate import storage
from curate.inspect import stage_summary
from curate.report.samples import read_columns, sample_markers
from curate.runfolder import RunDir, ShardStats, StageDir

SHARDS_PER_STATUS = 2
STATUS_SHARDS = 12
EXAMPLE_KEYS = 5
TOP_MESSAGES = 3
MESSAGE_CHARS = 300
STAGE_REPORTS = ("_report/filter_report.md", "_report/dedup_report.md", "report.md")


@dataclass
class StatusRow:
    """One status of one stage: its count, and what a bounded sample of its rows says."""

    status: str
    count: int
    fraction: float
    examples: list[dict[str, Any]] = field(default_factory=list)  # {key, shard, error}
    messages: list[tuple[str, int]] = field(default_factory=list)  # (message, rows in the sample)
    sampled_rows: int = 0


@dataclass(eq=False)
class Stage:
    name: str
    kind: str
    state: str
    summary: dict[str, Any]
    record: dict[str, Any]
    statuses: list[StatusRow]
    markers: list[ShardStats]
    global_step: dict[str, Any] | None
    links: list[tuple[str, str]]
    removed_here: list[tuple[str, int]] = field(default_factory=list)  # (reason, rows) this stage itself removed

    @property
    def rows(self) -> int:
        return int(self.summary.get("rows", 0))

    @property
    def ok(self) -> int:
        return int(self.summary.get("status", {}).get("ok", 0))

    @property
    def resources(self) -> str:
        res = (self.record.get("config") or {}).get("resources") or {}
        return ", ".join(f"{k}={v}" for k, v in res.items() if v not in (None, 0, 0.0)) or "-"

    @property
    def removed(self) -> dict[str, int]:
        """Rows this stage's own output counts as not ok, by status (what it and the stages before removed)."""
        return {s.status: s.count for s in self.statuses if s.status != "ok"}


def status_examples(stage: StageDir, markers: list[ShardStats], statuses: list[str]) -> dict[str, dict[str, Any]]:
    """status -> {examples, messages, sampled_rows} from the shards the scanned markers say hold it."""
    chosen: list[int] = []
    for status in statuses:
        holding = [m.shard for m in markers if m.status.get(status)]
        for shard in holding[:SHARDS_PER_STATUS]:
            if shard not in chosen and len(chosen) < STATUS_SHARDS:
                chosen.append(shard)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    messages: dict[str, Counter[str]] = defaultdict(Counter)
    wanted = set(statuses)
    for shard in sorted(chosen):
        table = read_columns(stage.shard(shard), ["key", "status", "error"])
        if "status" not in table.column_names:
            continue
        errors = table["error"].to_pylist() if "error" in table.column_names else [None] * table.num_rows
        for key, status, error in zip(table["key"].to_pylist(), table["status"].to_pylist(), errors, strict=True):
            if status not in wanted:
                continue
            messages[status][(error or "")[:MESSAGE_CHARS]] += 1
            if len(examples[status]) < EXAMPLE_KEYS:
                examples[status].append({"key": key, "shard": shard, "error": error})
    return {
        s: {
            "examples": examples.get(s, []),
            "messages": [(m, n) for m, n in messages[s].most_common(TOP_MESSAGES) if m],
            "sampled_rows": sum(messages[s].values()),
        }
        for s in statuses
    }


def stage_links(stage: StageDir, name: str) -> list[tuple[str, str]]:
    """(label, href relative to RUN/_report/) of the stage's own reports that exist."""
    return [
        (path.rsplit("/", 1)[-1], f"../{name}/{path}")
        for path in STAGE_REPORTS
        if storage.exists(storage.join(stage.uri, path))
    ]


def stage_info(run: RunDir, name: str) -> Stage:
    stage = run.stage(name)
    summary = stage_summary(run.uri, name)
    record = stage.read_record() if storage.exists(stage.record_uri) else {}
    markers = sample_markers(stage) if summary.get("shards") else []
    rows = int(summary.get("rows", 0))
    counts = sorted(summary.get("status", {}).items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    found = status_examples(stage, markers, [s for s, _ in counts if s != "ok"])
    statuses = [
        StatusRow(status, int(count), count / rows if rows else 0.0, **found.get(status, {}))
        for status, count in counts
    ]
    global_step = storage.read_json(stage.global_marker_uri) if storage.exists(stage.global_marker_uri) else None
    return Stage(
        name,
        summary.get("kind") or record.get("kind") or "-",
        summary["state"],
        summary,
        record,
        statuses,
        markers,
        global_step,
        stage_links(stage, name),
    )


PASSED_ON = ("skipped_", "not_ok_upstream", "keep_from:")  # removals by an earlier stage, carried as a status


def removed_here(stages: list[Stage], filter_removed: dict[str, dict[str, int]], dedup: dict[str, dict]) -> None:
    """What each stage itself removed, and why: a filter's rules (its report), dedup's exact and near copies (its
    report: their status stays `ok`, `keep` is false), a source's non-ok statuses, and for any other stage the
    statuses it has more of than the stage it reads (a captioner's `too_long`, an encoder's `no_bucket`)."""
    by_name = {s.name: s for s in stages}
    for stage in stages:
        upstream = by_name.get(stage.record.get("upstream") or "")
        if stage.name in filter_removed:
            found = filter_removed[stage.name].items()
        elif stage.name in dedup:
            found = [(k, int(dedup[stage.name].get(f"{k}s", 0))) for k in ("exact_duplicate", "near_duplicate")]
        else:
            before = {s.status: s.count for s in upstream.statuses} if upstream else {}
            found = [(s.status, s.count - before.get(s.status, 0)) for s in stage.statuses if s.status != "ok"]
        stage.removed_here = [(k, n) for k, n in found if n > 0 and not k.startswith(PASSED_ON)]


__all__ = ["Stage", "StatusRow", "removed_here", "stage_info", "status_examples"]
