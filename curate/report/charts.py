"""The report's own charts as PNG (matplotlib, already a dependency). Figures are made with matplotlib's object
API (`Figure`, its Agg canvas), not pyplot: no global figure state, so a build may run in a background thread.

The stages' own pictures (filter histograms with thresholds, dedup threshold analysis, loss curve) are copied,
not redrawn; these are the charts no stage draws: the funnel, caption lengths and the bucket distribution.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def funnel_png(stages: Sequence[tuple[str, int, int]]) -> bytes:
    """(stage, rows, ok) per stage: ok rows and the rest, one bar each, in pipeline order."""
    names = [s[0] for s in stages]
    ok = np.array([s[2] for s in stages])
    rest = np.array([s[1] for s in stages]) - ok
    fig, ax = _figure(7, 0.35 * len(stages) + 0.9)
    y = np.arange(len(stages))[::-1]
    ax.barh(y, ok, color="tab:green", label="ok")
    ax.barh(y, rest, left=ok, color="tab:gray", label="not ok (status)")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("rows")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def lengths_png(series: dict[str, list[int]], unit: str = "words") -> bytes:
    """Overlaid histograms of caption lengths (original vs synthetic), same bins."""
    fig, ax = _figure(6, 2.8)
    top = max((max(v) for v in series.values() if v), default=1)
    bins = np.linspace(0, max(top, 1) + 1, min(40, max(top, 1) + 2))
    for name, values in series.items():
        if values:
            mean = float(np.mean(values))
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({len(values)} rows, mean {mean:.1f})")
    ax.set_xlabel(f"caption length ({unit})")
    ax.set_ylabel("rows")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def buckets_png(counts: dict[str, int]) -> bytes:
    """Rows per aspect-ratio bucket (WIDTHxHEIGHT), ordered from tall to wide."""

    def aspect(name: str) -> float:
        w, _, h = name.partition("x")
        return int(w) / max(1, int(h)) if w.isdigit() and h.isdigit() else 0.0

    names = sorted(counts, key=aspect)
    fig, ax = _figure(max(4, 0.45 * len(names) + 1.5), 2.8)
    ax.bar(range(len(names)), [counts[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax.set_ylabel("rows")
    ax.set_title("rows per bucket (tall to wide)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


__all__ = ["buckets_png", "funnel_png", "lengths_png"]
