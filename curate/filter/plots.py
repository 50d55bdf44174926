"""The filter report's pictures: histograms with thresholds marked, and thumbnails of images near them."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from curate import storage
from curate.runfolder import StageDir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _pyplot().close(fig)
    return buffer.getvalue()


def plot_histogram(ax, measure: str, info: dict[str, Any], top_fraction: dict[str, Any] | None = None) -> None:
    """One measure's histogram (from the report's JSON) with the configured threshold and top-fraction cutoff."""
    edges = np.array(info["histogram"]["edges"])
    ax.stairs(info["histogram"]["counts"], edges, fill=True, color="tab:blue", alpha=0.7)
    if info["configured"] is not None:
        ax.axvline(info["configured"], color="tab:red", linestyle="--", label=f"{info['rule']} {info['configured']:g}")
    if measure == "clip_score" and top_fraction and top_fraction.get("cutoff_score") is not None:
        cutoff = top_fraction["cutoff_score"]
        ax.axvline(cutoff, color="tab:purple", linestyle=":", label=f"top {top_fraction['fraction']:g}: {cutoff:.3f}")
    ax.set_title(f"{measure} ({info['population']:,} rows)", fontsize=9)
    ax.set_ylabel("rows")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def histograms_png(report: dict[str, Any]) -> bytes:
    plt = _pyplot()
    measures = list(report["measures"].items())
    columns = min(3, len(measures))
    lines = math.ceil(len(measures) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.0 * lines), squeeze=False)
    for ax, (measure, info) in zip(axes.flat, measures, strict=False):
        plot_histogram(ax, measure, info, report.get("top_fraction"))
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def load_thumbnails(upstream: StageDir, rows: list[dict[str, Any]], size: int = 160) -> dict[str, Any]:
    """key -> thumbnail for the given rows (each with `key` and `shard`), reading each image shard once."""
    from curate.images import thumbnail

    out: dict[str, Any] = {}
    for shard in sorted({r["shard"] for r in rows}):
        wanted = {r["key"] for r in rows if r["shard"] == shard}
        table = storage.read_parquet(upstream.shard(shard), columns=["key", "image"])
        for key, data in zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True):
            if key in wanted and data:
                try:
                    out[key] = thumbnail(data, size)
                except Exception:  # an image this process cannot open is shown as missing, not fatal
                    continue
    return out


def examples_png(measure: str, groups: list[dict[str, Any]], upstream: StageDir) -> bytes | None:
    """A grid: one line per example threshold, the rows nearest it ordered by value, captioned with the
    value and whether the filter kept them."""
    plt = _pyplot()
    thumbs = load_thumbnails(upstream, [r for g in groups for r in g["rows"]])
    columns = max((len(g["rows"]) for g in groups), default=0)
    if not columns or not thumbs:
        return None
    fig, axes = plt.subplots(len(groups), columns, figsize=(1.9 * columns, 2.2 * len(groups)), squeeze=False)
    for line, group in zip(axes, groups, strict=True):
        line[0].set_ylabel(f"near {group['threshold']:.3g}", fontsize=9)
        for ax, row in zip(line, group["rows"] + [None] * columns, strict=False):
            ax.set_xticks([])
            ax.set_yticks([])
            if row is None:
                ax.axis("off")
                continue
            if row["key"] in thumbs:
                ax.imshow(thumbs[row["key"]])
            verdict = "kept" if not row["removed_by"] else row["removed_by"]
            ax.set_title(f"{row['value']:.3g} {verdict}\n{row['key'][:10]}", fontsize=7)
    fig.suptitle(f"{measure}: images near each threshold", fontsize=10)
    fig.tight_layout()
    return _png(fig)
