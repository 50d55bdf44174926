"""The references' part of the dedup report: per reference what was searched and removed, drift for references
searched by clusters (curate.dedup.drift), and the gallery of matched pairs (curate.dedup.gallery). Both
global-step paths build it from the same plain counts."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from curate.dedup import drift, gallery
from curate.dedup.against import CLUSTERS


def section(refs: list[dict[str, Any]], counts: list[dict[str, Any]], searched: list[dict[str, Any]],
            histograms: list[list[int]], by_rank: list[list[int]], new_rows: int) -> list[dict[str, Any]]:  # fmt: skip
    """One entry per reference: settings, rows matched and removed (attributed to it), clusters touched and
    index rows read, and drift."""
    out = []
    for info, count, done, hist, ranks in zip(refs, counts, searched, histograms, by_rank, strict=True):
        entry = {
            "name": info["name"],
            "path": info["path"],
            "reason": info["reason"],
            "threshold": info["threshold"],
            "search": info["search"],
            "probes": info["probes"],
            "rounds": info["rounds"],
            "clusters": info["k"],
            "indexed_rows": info["rows"],
            "created_at": info.get("created_at"),
            "its_references": info.get("references") or [],
            "matched": count["matched"],
            "removed": count["removed"],
            "clusters_touched": done.get("touched", []),
            "index_rows_read": done.get("index_rows_read", info["rows"] if info["search"] != CLUSTERS else 0),
            "probe_entries": done.get("entries", 0),
            "products": done.get("products", 0),
        }
        if info["search"] == CLUSTERS:
            entry["drift"] = drift.summary(info, hist, ranks, new_rows)
        out.append(entry)
    return out


def markdown(references: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[str]:
    if not references:
        return []
    lines = [
        "",
        "## References (`against`)",
        "",
        "Rows with a copy in a reference are removed before the run's own dedup (reason `seen_before` or "
        "`eval_overlap`, `dup_reference` names the reference); a row matched by several is named after the first "
        "listed.",
        "",
        "| reference | reason | search | threshold | indexed rows | matched | removed | clusters touched | "
        "index rows read |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in references:
        search = f"clusters, {r['probes']} probes x {r['rounds']} rounds" if r["search"] == CLUSTERS else "exact"
        touched = ", ".join(f"{t:,}" for t in r["clusters_touched"]) + f" of {r['clusters']:,}" if r[
            "clusters_touched"] else "-"  # fmt: skip
        lines.append(
            f"| {r['name']} | {r['reason']} | {search} | {r['threshold']:g} | {r['indexed_rows']:,} | "
            f"{r['matched']:,} | {r['removed']:,} | {touched} | {r['index_rows_read']:,} |"
        )
    for r in references:
        if "drift" not in r:
            continue
        d = r["drift"]
        lines += [
            "",
            f"### Drift: {r['name']}",
            "",
            f"- {d['advice']}",
            f"- similarity to the nearest centroid (p5 / p50 / p95): new rows {_q(d['nearest_similarity_new'])}, "
            f"the reference's own rows {_q(d['nearest_similarity_reference'])}",
            f"- matched rows by the probe rank that first found them: {d['matches']['by_probe_rank']}"
            + (
                f" (estimated share missed beyond the last probe: {d['matches']['estimated_missed_share']})"
                if d["matches"].get("estimated_missed_share") is not None
                else ""
            ),
            f"- vector products per new row: {d['products_per_new_row']:,} now, "
            f"{d['products_per_new_row_at_probes_needed']:,} at the probes needed, "
            f"{d['fresh_clustering_products_per_new_row']:,} for a fresh clustering of old + new",
        ]
    return lines + gallery.markdown(pairs)


def _q(q: dict[str, Any]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in q.values())


def build(report: dict[str, Any], refs: list[dict[str, Any]], counts, searched, histograms, by_rank, new_rows: int,
          report_uri: str, candidates: pa.Table | None, images: str | None, upstream: str,
          per_band: int) -> list[str]:  # fmt: skip
    """Adds ``references`` and ``gallery`` to ``report``; returns the Markdown lines for them."""
    if not refs:
        return []
    report["references"] = section(refs, counts, searched, histograms, by_rank, new_rows)
    report["gallery"] = gallery.write(report_uri, refs, gallery.choose(candidates, per_band), images, upstream)
    return markdown(report["references"], report["gallery"])
