"""Does the new data still fit an earlier run's clustering? The report's drift section for each reference searched
by clusters.

Two measured signals:
- **fit**: how far the new rows sit from their nearest frozen centroid, against how far the reference's own kept
  rows sit from theirs (both as histograms of the similarity to the nearest round-0 centroid). If the new data
  looks like the old, about 5% of new rows fall below the reference's 5th percentile; far more means the new rows
  live between the old centroids, where a pair is more often split by a boundary.
- **where matches were found**: the probe rank (0 = the nearest cluster) at which each matched row was first
  found. If the last probes still find a sizeable share, more probes would find more: a geometric tail fitted to
  the last ranks estimates the share missed and the probes that would hold it under 1%.

From these, the report says whether a fresh clustering would be cheaper: the search costs about
``rounds x (K + probes x rows per cluster)`` vector products per new row; a full dedup of old + new rows costs
about ``rounds' x (passes x K' + top'^2 x rows per cluster')`` products per row of old + new (the cost model of
docs/dedup.md). When the probes needed to keep recall make the first larger than the second per new row, the
report says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from curate.dedup.cluster import default_clusters, default_search

TAIL_TARGET = 0.01  # estimated share of matches missed that the advice allows
MIN_MATCHES = 50  # fewer matched rows than this: too few to fit the tail


def quantiles(histogram: list[int] | np.ndarray, qs: tuple[float, ...] = (0.05, 0.5, 0.95)) -> list[float | None]:
    """Quantiles of a histogram over [-1, 1] (upper bin edges)."""
    counts = np.asarray(histogram, np.float64)
    if not counts.sum():
        return [None] * len(qs)
    edges = np.linspace(-1.0, 1.0, len(counts) + 1)[1:]
    cumulative = np.cumsum(counts) / counts.sum()
    return [round(float(edges[min(len(edges) - 1, np.searchsorted(cumulative, q))]), 3) for q in qs]


def share_below(histogram: list[int] | np.ndarray, value: float | None) -> float | None:
    counts = np.asarray(histogram, np.float64)
    if value is None or not counts.sum():
        return None
    edges = np.linspace(-1.0, 1.0, len(counts) + 1)[1:]
    return round(float(counts[edges <= value + 1e-9].sum() / counts.sum()), 4)


def tail(by_rank: list[int]) -> dict[str, Any]:
    """Share of matched rows found only at the last probe rank, and a geometric tail fitted to the last ranks:
    the estimated share missed beyond them and the probes that would hold it under TAIL_TARGET."""
    counts = np.asarray(by_rank, np.float64)
    total = counts.sum()
    p = len(counts)
    out: dict[str, Any] = {"matched_rows": int(total), "by_probe_rank": [int(c) for c in counts]}
    if total < MIN_MATCHES or p < 3:
        out["estimate"] = "too few matched rows to estimate the share missed" if total < MIN_MATCHES else None
        return out
    out["last_probe_share"] = round(float(counts[-1] / total), 4)
    a, b = counts[-3] + counts[-2], counts[-2] + counts[-1]
    q = b / a if a > 0 else 0.0
    missed = float(counts[-1] * q / (1 - q) / total) if 0 < q < 1 else (0.0 if q <= 0 else float("inf"))
    out["ratio_per_probe"] = round(q, 3)
    out["estimated_missed_share"] = round(missed, 4) if math.isfinite(missed) else None
    if missed > TAIL_TARGET and 0 < q < 1:
        # smallest extra probes e with counts[-1] * q^(e+1) / (1 - q) < TAIL_TARGET * total
        extra = math.log(TAIL_TARGET * total * (1 - q) / counts[-1]) / math.log(q) - 1
        out["probes_needed"] = int(p + max(1, math.ceil(extra)))
    elif missed <= TAIL_TARGET:
        out["probes_needed"] = p
    return out


def products_per_new_row(rounds: int, k: int, probes: int, index_rows: int) -> float:
    """Vector products per new row of a clusters search: the centroids of every round, then the probed clusters'
    rows."""
    return rounds * (k + probes * index_rows / max(1, k))


def fresh_products_per_new_row(old: int, new: int, passes: int = 3) -> float:
    """Vector products per new row of a full dedup of old + new rows with the defaults (each round: ``passes``
    nearest-centroid passes over every row, and every row in ``top`` clusters of N/K rows searched)."""
    n = old + new
    k = default_clusters(n)
    top, rounds = default_search(n)
    per_row = rounds * (passes * k + top * top * n / max(1, k))
    return per_row * n / max(1, new)


def summary(info: dict[str, Any], new_histogram: list[int], by_rank: list[int], new_rows: int) -> dict[str, Any]:
    """The drift section of one reference searched by clusters."""
    reference = info.get("nearest_similarity") or []
    ref_q = quantiles(reference)
    new_q = quantiles(new_histogram)
    below = share_below(new_histogram, ref_q[0])
    found = tail(by_rank)
    now = products_per_new_row(info["rounds"], info["k"], info["probes"], info["rows"])
    needed_probes = found.get("probes_needed") or info["probes"]
    needed = products_per_new_row(info["rounds"], info["k"], needed_probes, info["rows"])
    fresh = fresh_products_per_new_row(info["rows"], new_rows)
    drifted = (below is not None and below > 0.25) or (found.get("estimated_missed_share") or 0) > TAIL_TARGET
    if not drifted:
        advice = (
            f"the new rows fit the reference's clustering ({_pct(below)} of them sit farther from their nearest "
            f"centroid than the reference's 5th percentile; about 5% is expected)"
        )
    else:
        advice = (
            f"drift: {_pct(below)} of the new rows sit farther from their nearest centroid than the reference's "
            f"5th percentile (about 5% expected)"
        )
        if found.get("estimated_missed_share") is not None:
            advice += f"; an estimated {_pct(found['estimated_missed_share'])} of matches lie beyond the last probe"
        if needed > fresh:
            advice += (
                f". Holding recall would take ~{needed_probes} probes ({needed:,.0f} products per new row), more than "
                f"a fresh clustering of old + new rows ({fresh:,.0f} per new row): re-run the dedup over both"
            )
        else:
            advice += f". Raise `probes` to ~{needed_probes} (still cheaper than a fresh clustering)"
    return {
        "nearest_similarity_new": dict(zip(("p5", "p50", "p95"), new_q, strict=True)),
        "nearest_similarity_reference": dict(zip(("p5", "p50", "p95"), ref_q, strict=True)),
        "new_below_reference_p5": below,
        "matches": found,
        "products_per_new_row": round(now),
        "products_per_new_row_at_probes_needed": round(needed),
        "fresh_clustering_products_per_new_row": round(fresh),
        "drift": bool(drifted),
        "fresh_clustering_cheaper": bool(drifted and needed > fresh),
        "advice": advice,
    }


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}%"
