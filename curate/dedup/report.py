"""The dedup report: fraction removed, cluster sizes, and SD3's threshold analysis (table + plots)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from curate import storage
from curate.dedup.cluster import DedupParams, Pairs, greedy, range_search_members

DEFAULT_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def analysed_clusters(
    nearest_sizes: np.ndarray, member_sizes: np.ndarray, sample_clusters: int, max_rows: int, seed: int = 0
) -> np.ndarray:
    """The clusters of the threshold analysis: a random sample of those that are some row's nearest and have at
    most ``max_rows`` members (searched whole by one task)."""
    clusters = np.flatnonzero((nearest_sizes > 0) & (member_sizes <= max_rows))
    if not len(clusters):
        return clusters
    rng = np.random.default_rng(seed)
    return rng.choice(clusters, min(sample_clusters, len(clusters)), replace=False)


def threshold_analysis(
    x: np.ndarray,
    cluster: np.ndarray,
    rank: np.ndarray,
    chosen: np.ndarray,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
) -> list[dict[str, Any]]:
    """How much SD3's greedy rule would remove at each threshold, over the rows of the ``chosen`` clusters
    (``x``, ``cluster``, ``rank``: those rows' vectors, nearest cluster and keep rank, in row order).

    Pairs are searched once at the lowest threshold inside each chosen cluster, then filtered."""
    if not len(chosen):
        return [{"threshold": t, "items": 0, "removed": 0, "fraction_removed": 0.0} for t in thresholds]
    local = np.asarray(x, np.float32)
    found = []
    for c in chosen:
        inside = np.flatnonzero(cluster == c)
        if len(inside) > 1:
            found.append(range_search_members(local, inside, min(thresholds)))
    pairs = Pairs.empty()
    if found:
        pairs = Pairs(*(np.concatenate([getattr(p, f) for p in found]) for f in ("i", "j", "sim")))
    rows = []
    for t in thresholds:
        mask = pairs.sim > t
        keep, _, _ = greedy(len(local), Pairs(pairs.i[mask], pairs.j[mask], pairs.sim[mask]), rank)
        removed = int((~keep).sum())
        rows.append(
            {
                "threshold": float(t),
                "clusters": len(chosen),
                "items": len(local),
                "removed": removed,
                "fraction_removed": removed / max(1, len(local)),
            }
        )
    return rows


def method(params: DedupParams, order: str) -> dict[str, Any]:
    """The settings that decided the rows, as both global-step paths report them."""
    return {
        "max_neighbors": params.max_neighbors,
        "threshold": params.threshold,
        "metric": "cosine similarity of L2-normalised SSCD embeddings (inner product), strictly greater",
        "order": order,
        "assign_top": params.assign_top,
        "rounds": params.rounds,
    }


def cluster_size_stats(sizes: np.ndarray) -> dict[str, Any]:
    """Percentiles of the clusters' sizes (rows whose nearest centroid it is)."""
    k = len(sizes)
    if not k:
        return {"clusters": 0}
    percentiles = {f"p{p}": float(np.percentile(sizes, p)) for p in (0, 10, 50, 90, 99, 100)}
    return {"clusters": int(k), "empty": int((sizes == 0).sum()), "mean": float(sizes.mean()), **percentiles}


def _plot(analysis: list[dict[str, Any]], sizes: np.ndarray, threshold: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    ts = [r["threshold"] for r in analysis]
    left.plot(ts, [100 * r["fraction_removed"] for r in analysis], marker="o")
    left.axvline(threshold, color="grey", linestyle="--", label=f"configured {threshold:g}")
    left.set_xlabel("cosine similarity threshold (SSCD)")
    left.set_ylabel("% removed (sampled clusters)")
    left.set_title("Threshold analysis (SD3 App. E.2)")
    left.legend()
    right.hist(sizes, bins=min(50, max(1, len(np.unique(sizes)))), color="tab:orange")
    right.set_xlabel("cluster size")
    right.set_ylabel("clusters")
    right.set_title(f"{len(sizes)} clusters")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Dedup report",
        "",
        f"- rows: {report['rows']:,} ({report['ok']:,} with an embedding)",
        f"- removed: {report['removed']:,} = {100 * report['fraction_removed']:.2f}% of embedded rows "
        f"({report['exact_duplicates']:,} exact, {report['near_duplicates']:,} near "
        f"at cosine > {report['threshold']:g}"
        + (f"; {report['against_removed']:,} matched a reference first" if report.get("against_removed") else "")
        + ")",
        f"- clusters: {report['clusters']['clusters']:,}; sizes {json.dumps(report['clusters'])}",
        f"- keep order: {report['order']}; assignment top-{report['assign_top']}; "
        f"at most {report.get('max_neighbors', 0) or 'all'} earlier neighbours per row "
        f"({report.get('bounded', 0):,} kept rows had more: their decision could differ from the unbounded rule)",
        f"- global step: {report.get('path', 'single-process')}",
        f"- seconds: {json.dumps(report['seconds'])}",
        "",
        "## Threshold analysis (sampled clusters)",
        "",
        "| threshold | items | removed | % removed |",
        "|---:|---:|---:|---:|",
    ]
    for row in report["threshold_analysis"]:
        lines.append(
            f"| {row['threshold']:.2f} | {row['items']:,} | {row['removed']:,} | {100 * row['fraction_removed']:.2f} |"
        )
    lines += ["", "![threshold analysis and cluster sizes](dedup_report.png)", ""]
    return "\n".join(lines)


def write_report(folder: str, report: dict[str, Any], sizes: np.ndarray, extra: list[str] | None = None) -> None:
    """``extra``: Markdown lines appended (the references' sections, curate.dedup.against_report)."""
    storage.write_json(storage.join(folder, "dedup_report.json"), report)
    text = markdown(report) + ("\n".join(extra) + "\n" if extra else "")
    storage.write_atomic(storage.join(folder, "dedup_report.md"), text.encode())
    storage.write_atomic(
        storage.join(folder, "dedup_report.png"), _plot(report["threshold_analysis"], sizes, report["threshold"])
    )
