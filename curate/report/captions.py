"""The captions section: thumbnail, original and synthetic caption side by side; caption lengths; the rows the
captioner could not caption (`too_long`, `caption_error`, `oom`, ...).

Bounded sample: the caption columns (no images) of at most CAPTION_SHARDS shards spread over the stage, with
the original captions of the same shards of its input (1:1 lineage). Lengths are counted over those rows;
SIDE_BY_SIDE ok rows spread over them are shown. The failed rows are the funnel's examples of each status
(found through the markers, so a rare status in a late shard is still shown).
"""

from __future__ import annotations

from typing import Any

from curate.report.charts import lengths_png
from curate.report.funnel import Stage
from curate.report.pictures import ImageFolder
from curate.report.samples import done_shards, image_stage, read_columns, spread
from curate.runfolder import RunDir

CAPTION_SHARDS = 4
SIDE_BY_SIDE = 12
OWN_COLUMNS = ["key", "caption_synthetic", "status", "error", "tokens_generated", "truncated", "captioner"]
NOT_CAPTIONER_FAILURES = {"ok", "skipped_duplicate", "skipped_filtered", "not_ok_upstream"}


def _words(text: str | None) -> int | None:
    return len(text.split()) if text and text.strip() else None


def caption_section(run: RunDir, info: Stage, pictures: ImageFolder) -> dict[str, Any]:
    name = info.name
    stage = run.stage(name)
    source = image_stage(run, name)
    upstream = info.record.get("upstream") or source
    shards = spread(done_shards(stage), CAPTION_SHARDS)
    rows: list[dict[str, Any]] = []
    for shard in shards:
        own = read_columns(stage.shard(shard), OWN_COLUMNS).to_pylist()
        originals: dict[str, Any] = {}
        if upstream:
            table = read_columns(run.stage(upstream).shard(shard), ["key", "caption"])
            if "caption" in table.column_names:
                originals = dict(zip(table["key"].to_pylist(), table["caption"].to_pylist(), strict=True))
        for row in own:
            rows.append({**row, "caption": originals.get(row["key"]), "shard": shard})
    ok = [r for r in rows if r.get("status") == "ok"]
    shown = [ok[i] for i in spread(list(range(len(ok))), SIDE_BY_SIDE)]
    failures = [
        {"status": s.status, "count": s.count, "messages": s.messages, "examples": s.examples}
        for s in info.statuses
        if s.status not in NOT_CAPTIONER_FAILURES
    ]
    wanted = [(r["shard"], r["key"]) for r in shown]
    wanted += [(e["shard"], e["key"]) for f in failures for e in f["examples"]]
    thumbs = pictures.thumbnails(run.stage(source), wanted) if source else {}
    for r in shown:
        r["src"] = thumbs.get(r["key"])
    for f in failures:
        for e in f["examples"]:
            e["src"] = thumbs.get(e["key"])
    lengths = {
        "original": [n for n in (_words(r["caption"]) for r in rows) if n is not None],
        "synthetic": [n for n in (_words(r.get("caption_synthetic")) for r in ok) if n is not None],
    }
    chart = None
    if any(lengths.values()):
        chart = pictures.put(f"{name}-caption-lengths.png", lengths_png(lengths))
    captioner = next((r.get("captioner") for r in ok if r.get("captioner")), None)
    return {
        "name": name,
        "captioner": captioner,
        "sampled_shards": len(shards),
        "sampled_rows": len(rows),
        "rows": shown,
        "failures": failures,
        "lengths": {k: len(v) for k, v in lengths.items()},
        "lengths_chart": chart,
        "truncated": sum(1 for r in ok if r.get("truncated")),
        "ok_in_sample": len(ok),
    }


__all__ = ["caption_section"]
