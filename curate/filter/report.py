"""The filter report (`<stage>/_report/`): rows removed per rule, a histogram of every value a rule compares
with the thresholds marked, how many rows would pass each rule at other thresholds, and thumbnails of images
near the thresholds, so thresholds can be chosen before a `--redo`.

Built from the stage's own shards (which keep every compared value) one shard at a time: counts and
histograms are exact at any scale; quantiles and top-fraction cutoffs come from a uniform sample of at most
SAMPLE_CAP values per measure (exact below that); example images come from the first EXAMPLE_SHARDS shards
only, so the report reads few image bytes. A rule's population is the rows that reached it: rows not removed
by an earlier rule in `curate.filter.rules.RULES` order, with a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.filter import prompt_report
from curate.filter.rules import ORDER, RULES, SCORE_COLUMNS, FilterRules, position
from curate.runfolder import StageDir

SAMPLE_CAP = 200_000
EXAMPLE_SHARDS = 4
TOP_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class Measure:
    """A value a rule compares: its rule, config field, direction, histogram range and report thresholds."""

    name: str
    rule: str
    field: str
    kind: str  # "min": rows with value >= threshold pass; "max": value <= threshold pass
    bins: tuple[float, float, int]
    thresholds: tuple[float, ...]


MEASURES = (
    Measure("min_side", "min_side", "min_side", "min", (0, 2048, 64), (64, 128, 256, 384, 512, 768, 1024)),
    Measure("aspect_ratio", "aspect_ratio", "max_aspect_ratio", "max", (1, 6, 50), (1.5, 2, 2.5, 3, 4, 5)),
    Measure("caption_words", "caption_words", "min_caption_words", "min", (0, 80, 80), (1, 2, 3, 5, 8, 12)),
    Measure(
        "clip_score", "clip_score_min", "clip_score_min", "min", (-0.1, 0.5, 60), (0.15, 0.2, 0.25, 0.28, 0.3, 0.35)
    ),
    Measure("aesthetic", "aesthetic_min", "aesthetic_min", "min", (0, 10, 50), (4, 4.5, 5, 5.5, 6, 6.5)),
    Measure("nsfw", "nsfw_max", "nsfw_max", "max", (0, 1, 50), (0.1, 0.3, 0.5, 0.7, 0.9)),
    Measure("watermark", "watermark_max", "watermark_max", "max", (0, 1, 50), (0.1, 0.3, 0.5, 0.7, 0.8, 0.9)),
)
CHEAP_FIELDS_OF = {"caption_words": ("min_caption_words", "max_caption_words")}
COLUMNS = ["key", "keep", "removed_by", "width", "height", "caption_words", *SCORE_COLUMNS]


def measure_values(table: pa.Table) -> dict[str, np.ndarray]:
    """Each measure of a filter shard as float64, nan where null."""

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy(zero_copy_only=False).astype(np.float64)

    width, height = col("width"), col("height")
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.fmax(width, height) / np.fmin(width, height)
    values = {"min_side": np.fmin(width, height), "aspect_ratio": aspect, "caption_words": col("caption_words")}
    return values | {m: col(m) for m in SCORE_COLUMNS}


def positions(removed_by: pa.ChunkedArray) -> np.ndarray:
    """Rule position of every row (dictionary-decoded once per distinct value, not per row)."""
    encoded = removed_by.combine_chunks().dictionary_encode()
    lookup = np.array([position(v) for v in encoded.dictionary.to_pylist()] or [0], np.int64)
    return lookup[encoded.indices.to_numpy(zero_copy_only=False)]


@dataclass
class Accumulator:
    """Exact counts and histograms, and a bounded sample, of one measure over the shards seen so far."""

    measure: Measure
    thresholds: list[float]
    population: int = 0
    passing: np.ndarray | None = None
    histogram: np.ndarray | None = None
    sample: list[np.ndarray] | None = None

    def add(self, values: np.ndarray, keep_probability: float, rng: np.random.Generator) -> None:
        lo, hi, bins = self.measure.bins
        counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
        t = np.array(self.thresholds)[:, None]
        passing = (values[None, :] >= t if self.measure.kind == "min" else values[None, :] <= t).sum(axis=1)
        self.population += len(values)
        self.histogram = counts if self.histogram is None else self.histogram + counts
        self.passing = passing if self.passing is None else self.passing + passing
        self.sample = (self.sample or []) + [values[rng.random(len(values)) < keep_probability]]

    def summary(self, configured: float | None) -> dict[str, Any]:
        lo, hi, bins = self.measure.bins
        sample = np.concatenate(self.sample) if self.sample else np.zeros(0)
        passing = self.passing if self.passing is not None else np.zeros(len(self.thresholds), np.int64)
        out: dict[str, Any] = {
            "rule": self.measure.rule,
            "kind": self.measure.kind,
            "configured": configured,
            "population": self.population,
            "table": [
                {"threshold": t, "passing": int(p), "fraction_passing": int(p) / max(1, self.population)}
                for t, p in zip(self.thresholds, passing.tolist(), strict=True)
            ],
            "histogram": {
                "edges": np.linspace(lo, hi, bins + 1).tolist(),
                "counts": (self.histogram if self.histogram is not None else np.zeros(bins, np.int64)).tolist(),
            },
            "sample_size": len(sample),
            "quantiles": {str(q): float(np.quantile(sample, q)) for q in QUANTILES} if len(sample) else {},
        }
        if self.measure.name == "clip_score" and len(sample):
            out["top_fraction_cutoffs"] = [
                {"fraction": f, "cutoff": float(np.quantile(sample, 1 - f))} for f in TOP_FRACTIONS
            ]
        return out


def _examples(examples: int, measures: dict[str, dict[str, Any]], rows: pa.Table) -> dict[str, list[dict]]:
    """Rows nearest each example threshold (the configured one, then the population's quantiles), per
    measure, from the first shards' rows; each threshold's rows are its nearest below and above."""
    out: dict[str, list[dict]] = {}
    if examples == 0 or rows.num_rows == 0:
        return out
    values = measure_values(rows)
    pos = positions(rows["removed_by"])
    keys, removed = rows["key"].to_pylist(), rows["removed_by"].to_pylist()
    shard = rows["_shard"].to_numpy()
    for m in MEASURES:
        info = measures.get(m.name)
        if info is None or m.name == "caption_words":
            continue
        reach = np.flatnonzero((pos >= ORDER[m.rule]) & ~np.isnan(values[m.name]))
        if not len(reach):
            continue
        targets = ([info["configured"]] if info["configured"] is not None else []) + list(info["quantiles"].values())
        groups = []
        for target in dict.fromkeys(round(float(t), 6) for t in targets):
            v = values[m.name][reach]
            below = reach[v < target][np.argsort(target - v[v < target])][: examples // 2]
            above = reach[v >= target][np.argsort(v[v >= target] - target)][: examples - len(below)]
            chosen = sorted(np.concatenate([below, above]).tolist(), key=lambda i: values[m.name][i])
            groups.append(
                {
                    "threshold": target,
                    "rows": [
                        {"key": keys[i], "value": float(values[m.name][i]), "removed_by": removed[i]}
                        | {"shard": int(shard[i])}
                        for i in chosen
                    ],
                }
            )
        out[m.name] = groups
    return out


def shown(config: FilterRules, measure: Measure) -> bool:
    """Scores are reported whenever a score stage is joined (to choose thresholds); cheap measures when their
    rule is configured."""
    if measure.name in SCORE_COLUMNS:
        return config.score_from is not None
    return any(getattr(config, f) is not None for f in CHEAP_FIELDS_OF.get(measure.name, (measure.field,)))


def collect(
    config: FilterRules, stage: StageDir, settings: dict[str, Any], examples: int = 6, seed: int = 0
) -> dict[str, Any]:
    """The report's numbers over every shard of the stage, with example rows from its first shards."""
    stats = stage.shard_stats()
    total = sum(s.rows for s in stats)
    keep_probability = min(1.0, SAMPLE_CAP / max(1, total))
    rng = np.random.default_rng(seed)
    accumulators = {}
    for m in MEASURES:
        configured = getattr(config, m.field)
        extra = [configured] if configured is not None else []
        accumulators[m.name] = Accumulator(m, sorted({*m.thresholds, *extra}))
    removed: dict[str, int] = {}
    rows = kept = 0
    first: list[pa.Table] = []
    matches = prompt_report.PromptMatches(examples) if config.prompts is not None else None
    columns = COLUMNS
    if matches is not None:
        prompt_report.check_one_index({s.shard: s.extra.get("prompt_index") for s in stats})
        columns = COLUMNS + prompt_report.COLUMNS
    for index in sorted(stage.done_shards()):
        table = storage.read_parquet(stage.shard(index), columns=columns)
        if matches is not None:
            matches.add(table, index)
        rows += table.num_rows
        kept += int(np.asarray(table["keep"].to_numpy(zero_copy_only=False)).sum())
        counted = table["removed_by"].value_counts().to_pylist()
        for item in counted:
            if item["values"]:
                removed[item["values"]] = removed.get(item["values"], 0) + int(item["counts"])
        pos = positions(table["removed_by"])
        values = measure_values(table)
        for m in MEASURES:
            v = values[m.name][(pos >= ORDER[m.rule]) & ~np.isnan(values[m.name])]
            if len(v):
                accumulators[m.name].add(v, keep_probability, rng)
        if len(first) < EXAMPLE_SHARDS:
            first.append(table.append_column("_shard", pa.array(np.full(table.num_rows, index, np.int64))))
    measures = {
        name: acc.summary(getattr(config, acc.measure.field))
        for name, acc in accumulators.items()
        if acc.population and shown(config, acc.measure)
    }
    top = None
    if config.clip_score_top_fraction is not None:
        top = storage.read_json(storage.join(stage.global_uri, "top_fraction.json"))
    warnings = [
        f"{m.field} is set but no row reaching it has a {m.name} value: is the score stage configured for it?"
        for m in MEASURES
        if getattr(config, m.field) is not None and m.name not in measures and removed.get("no_score")
    ]
    report = {
        "rows": rows,
        "kept": kept,
        "fraction_kept": kept / max(1, rows),
        "removed": {name: removed[name] for name in sorted(removed, key=lambda r: (position(r), r))},
        "rule_order": [name for name, _ in RULES],
        "settings": settings,
        "top_fraction": top,
        "measures": measures,
        "warnings": warnings,
        "prompt_matches": matches.summary() if matches is not None else None,
    }
    report["examples"] = _examples(examples, measures, pa.concat_tables(first) if first else pa.table({}))
    return report


def markdown(report: dict[str, Any], name: str, pictures: dict[str, str]) -> str:
    rows = report["rows"]
    lines = [
        f"# Filter report: {name}",
        "",
        f"- rows: {rows:,}; kept {report['kept']:,} ({100 * report['fraction_kept']:.2f}%)",
    ]
    top = report["top_fraction"]
    if top:
        score = "none" if top["cutoff_score"] is None else f"{top['cutoff_score']:.4f}"
        lines.append(
            f"- CLIP-score top fraction {top['fraction']:g}: kept {top['kept']:,} of {top['candidates']:,} "
            f"candidates; cutoff cosine {score} (ties broken by key at {top['cutoff_key']})"
        )
    lines += [f"- warning: {w}" for w in report["warnings"]]
    lines += ["", "## Rows removed, by the first rule they failed", "", "| rule | rows | % of all |", "|---|---:|---:|"]
    for rule, count in report["removed"].items():
        lines.append(f"| `{rule}` | {count:,} | {100 * count / max(1, rows):.2f} |")
    lines.append(f"| kept | {report['kept']:,} | {100 * report['fraction_kept']:.2f} |")
    if report.get("prompt_matches") is not None:
        lines += prompt_report.markdown(report["prompt_matches"])
    if "histograms" in pictures:
        lines += ["", f"![histograms]({pictures['histograms']})"]
    for measure, info in report["measures"].items():
        passing = "at or above" if info["kind"] == "min" else "at or below"
        configured = "" if info["configured"] is None else f"; configured `{info['rule']}` = {info['configured']:g}"
        lines += [
            "",
            f"## {measure}",
            "",
            f"{info['population']:,} rows reached `{info['rule']}`{configured}. Rows {passing} each threshold:",
            "",
            "| threshold | rows passing | % passing |",
            "|---:|---:|---:|",
        ]
        for row in info["table"]:
            lines.append(f"| {row['threshold']:g} | {row['passing']:,} | {100 * row['fraction_passing']:.2f} |")
        if info.get("top_fraction_cutoffs"):
            lines += ["", "| keep top fraction | cutoff |", "|---:|---:|"]
            lines += [f"| {c['fraction']:g} | {c['cutoff']:.4f} |" for c in info["top_fraction_cutoffs"]]
        if measure in pictures:
            lines += ["", f"Images near the thresholds: ![{measure} examples]({pictures[measure]})"]
    return "\n".join(lines) + "\n"


def write_report(
    config: FilterRules, upstream: StageDir, stage: StageDir, settings: dict[str, Any], examples: int = 6
) -> dict[str, Any]:
    """Write filter_report.{json,md} and the PNGs under `<stage>/_report/`; returns the record's summary."""
    from curate.filter.plots import examples_png, histograms_png

    folder = storage.join(stage.uri, "_report")
    report = collect(config, stage, settings, examples)
    pictures: dict[str, str] = {}
    if report["measures"]:
        storage.write_atomic(storage.join(folder, "filter_histograms.png"), histograms_png(report))
        pictures["histograms"] = "filter_histograms.png"
    for measure, groups in report["examples"].items():
        png = examples_png(measure, groups, upstream)
        if png is not None:
            pictures[measure] = f"filter_examples_{measure}.png"
            storage.write_atomic(storage.join(folder, pictures[measure]), png)
    storage.write_json(storage.join(folder, "filter_report.json"), report)
    text = markdown(report, stage_name(stage), pictures)
    storage.write_atomic(storage.join(folder, "filter_report.md"), text.encode())
    return {"kept": report["kept"], "removed": report["removed"], "report": storage.join(folder, "filter_report.md")}


def stage_name(stage: StageDir) -> str:
    return stage.uri.rstrip("/").rsplit("/", 1)[-1]


__all__ = ["MEASURES", "collect", "markdown", "write_report"]
