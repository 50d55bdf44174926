"""The `filter` stage: each rule removes exactly the rows it should, the first failing rule is recorded,
the top-fraction cutoff is exact, missing scores are recorded, keep sources chain, and new thresholds are
applied with `--redo` without touching the score stage.

The score stage kind is built on another branch: here a stage named `score` is declared (as a `local`
stage that is never run) and its shards are written the way the runner writes them, with the score
stage's columns, so the filter reads real stage outputs through `join`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _dedup_support import ONNX_SSCD
from encode_helpers import write_stage_like_runner

from curate import storage
from curate.config import ConfigError
from curate.filter.rules import RULES, FilterRules, Rows, apply_top_fraction, evaluate, position
from curate.filter.top_fraction import Candidates, cutoff, keep_count
from curate.keep import NOT_OK_UPSTREAM, SKIPPED_DUPLICATE, SKIPPED_FILTERED, read_keep, select_rows
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir
from curate.runner import RunError, redo_stages, run_pipeline
from curate.stages.filter import FilterConfig

NAN = float("nan")


def config(**settings) -> FilterRules:
    """Rules as the stage hands them to the filter package, validated by the stage's config first."""
    join = tuple(s for s in (settings.get("keep_from"), settings.get("score_from")) if s)
    return FilterConfig(kind="filter", join=join, **settings).rules()


def rows(n: int, **columns) -> Rows:
    defaults = {
        "key": [f"k{i:02d}" for i in range(n)],
        "image_status": ["ok"] * n,
        "width": np.full(n, 512.0),
        "height": np.full(n, 512.0),
        "caption": ["a photo of a red fox in the snow"] * n,
    }
    return Rows(**(defaults | columns))


def with_scores(base: Rows, ok=None, **scores) -> Rows:
    n = len(base.key)
    base.score_ok = np.ones(n, bool) if ok is None else np.array(ok, bool)
    base.scores = {c: np.array(scores.get(c, [0.5] * n), np.float32) for c in ("clip_score", "aesthetic", "nsfw")}
    base.scores["watermark"] = np.array(scores.get("watermark", [0.1] * n), np.float32)
    return base


# ----------------------------------------------------------------------------------------------------
# the rules, one at a time and in order


def test_each_cheap_rule_removes_exactly_its_rows():
    r = rows(
        6,
        image_status=["ok", "ok", "ok", "decode_error", "ok", "ok"],
        width=np.array([512, 200, 1200, NAN, 512, 512]),
        height=np.array([512, 512, 300, NAN, 512, 512]),
        caption=["a red fox in the snow", "a red fox", "a red fox in snow", None, "fox", None],
    )
    assert list(evaluate(config(min_side=256), r).removed_by) == ["", "min_side", "", "not_ok_upstream", "", ""]
    aspect = evaluate(config(max_aspect_ratio=3.0), r)
    assert list(aspect.removed_by) == ["", "", "aspect_ratio", "not_ok_upstream", "", ""]
    words = evaluate(config(min_caption_words=2, max_caption_words=4), r)
    out = "caption_words"
    assert list(words.removed_by) == [out, "", out, "not_ok_upstream", out, out]  # 6 > 4, 3, 5 > 4, -, 1 < 2, 0 < 2
    assert words.caption_words.tolist() == [6, 3, 5, 0, 1, 0]
    chars = evaluate(config(min_caption_chars=10), r)
    assert list(chars.removed_by) == ["", "caption_chars", "", "not_ok_upstream", "caption_chars", "caption_chars"]
    # unknown sizes fail size rules rather than pass them (here the row is not ok anyway)
    unknown = rows(1, width=np.array([NAN]), height=np.array([NAN]))
    assert list(evaluate(config(min_side=1), unknown).removed_by) == ["min_side"]


def test_the_first_failing_rule_is_recorded():
    r = rows(
        4,
        width=np.array([100.0, 1000, 1000, 1000]),
        height=np.array([100.0, 240, 1000, 1000]),
        caption=["x", "x", "x", "a caption long enough"],
    )
    r = with_scores(r, clip_score=[0.0, 0.0, 0.0, 0.1], nsfw=[0.9, 0.9, 0.9, 0.9])
    settings = config(min_side=200, max_aspect_ratio=4.0, min_caption_words=2, score_from="s", clip_score_min=0.2)
    # every row fails the score rule too; each is attributed to its first failure in RULES order
    assert list(evaluate(settings, r).removed_by) == ["min_side", "aspect_ratio", "caption_words", "clip_score_min"]
    assert [name for name, _ in RULES].index("min_side") < [name for name, _ in RULES].index("clip_score_min")
    assert position("keep_from:prefilter") == 1 and position("") == len(RULES)


def test_score_thresholds_compare_inclusively():
    r = with_scores(
        rows(5),
        clip_score=[0.27, 0.28, 0.35, 0.35, 0.35],
        aesthetic=[9, 9, 4.9, 5.0, 9],
        nsfw=[0, 0, 0, 0, 0.5],
        watermark=[0, 0, 0, 0, 0.81],
    )
    settings = config(score_from="s", clip_score_min=0.28, aesthetic_min=5.0, nsfw_max=0.5, watermark_max=0.8)
    # scores are stored as float32 and compared widened to float64: float32(0.28) = 0.2800000012 passes 0.28,
    # float32(0.1) = 0.1000000015 passes 0.1, float32(0.35) = 0.3499999940 fails 0.35
    expected = ["clip_score_min", "", "aesthetic_min", "", "watermark_max"]
    assert list(evaluate(settings, r).removed_by) == expected
    assert list(evaluate(config(score_from="s", nsfw_max=0.4), r).removed_by) == ["", "", "", "", "nsfw_max"]
    edge = with_scores(rows(2), clip_score=[0.1, 0.35])
    assert list(evaluate(config(score_from="s", clip_score_min=0.1), edge).removed_by) == ["", ""]
    assert list(evaluate(config(score_from="s", clip_score_min=0.35), edge).removed_by) == ["clip_score_min"] * 2


def test_missing_scores_are_removed_as_no_score():
    r = with_scores(rows(4), ok=[True, False, True, True], clip_score=[0.3, 0.3, NAN, 0.3], aesthetic=[NAN, 5, 5, 5])
    # only the configured scores count: a null aesthetic does not matter to a clip-only filter
    assert list(evaluate(config(score_from="s", clip_score_min=0.2), r).removed_by) == ["", "no_score", "no_score", ""]
    both = config(score_from="s", clip_score_min=0.2, aesthetic_min=4)
    assert list(evaluate(both, r).removed_by) == ["no_score", "no_score", "no_score", ""]
    top = config(score_from="s", clip_score_top_fraction=0.5)
    assert list(evaluate(top, r).removed_by) == ["", "no_score", "no_score", ""]


def test_keep_from_comes_before_every_other_rule():
    r = rows(3, width=np.array([10.0, 512, 512]))
    r.kept_by_source = np.array([False, False, True])
    assert list(evaluate(config(keep_from="prefilter", min_side=64), r).removed_by) == [
        "keep_from:prefilter",
        "keep_from:prefilter",
        "",
    ]


def test_language_rule_removes_only_confident_other_languages():
    pytest.importorskip("py3langid")
    captions = [
        "a photograph of a red fox in the snow",
        "Ein Foto eines roten Fuchses im Schnee",
        "une photo d'un renard roux dans la neige",
        "Vintage 1950s Dress",  # too short to be sure of: kept
        None,
        "雪の中の赤いキツネの写真",
    ]
    r = rows(6, caption=captions)
    decision = evaluate(config(languages=("en",), language_confidence=0.5), r)
    assert list(decision.removed_by) == ["", "language", "language", "", "", "language"]
    assert decision.language[:3] == ["en", "de", "fr"] and decision.language[4] is None
    assert decision.language_prob[0] > 0.5 and decision.language_prob[3] < 0.5
    assert list(evaluate(config(languages=("en", "de")), r).removed_by)[1] == ""
    # rows an earlier rule removed are not identified at all
    early = evaluate(config(min_caption_words=5, languages=("en",)), r)
    assert early.language[1] == "de" and early.language[3] is None and np.isnan(early.language_prob[3])


# ----------------------------------------------------------------------------------------------------
# keep the top fraction


def test_top_fraction_cutoff_is_exact_with_ties_across_shards():
    assert keep_count(0.3, 10) == 3 and keep_count(0.3, 11) == 4 and keep_count(1.0, 7) == 7
    # three shards, 20 candidates; scores tied at the cutoff in two shards
    scores = {
        0: ([0.9, 0.5, 0.5, 0.1, 0.2, 0.3, 0.4], [f"a{i}" for i in range(7)]),
        1: ([0.5, 0.5, 0.8, 0.05, 0.15, 0.25], [f"b{i}" for i in range(6)]),
        2: ([0.7, 0.6, 0.5, 0.01, 0.02, 0.03, 0.04], [f"c{i}" for i in range(7)]),
    }
    candidates = Candidates.empty()
    for shard, (values, _) in scores.items():
        candidates.add(shard, np.arange(len(values)), np.array(values))
    point, summary = cutoff(candidates, 0.3, lambda shard: scores[shard][1])
    assert summary["candidates"] == 20 and summary["kept"] == 6
    # sorted by (-score, key): a0 .9, b2 .8, c0 .7, c1 .6, then the 0.5s by key: a1 a2 b0 b1 c2 -> a1, a2 kept
    assert point == (pytest.approx(0.5), "a2") and summary["tied_at_cutoff"] == 5
    kept = []
    for values, keys in scores.values():
        r = with_scores(rows(len(values), key=keys), clip_score=values)
        decision = evaluate(config(score_from="s", clip_score_top_fraction=0.3), r)
        apply_top_fraction(decision, keys, r.scores["clip_score"], point)
        kept += [k for k, flag in zip(keys, decision.kept, strict=True) if flag]
        assert set(decision.removed_by) <= {"", "clip_score_top_fraction"}
    assert sorted(kept) == ["a0", "a1", "a2", "b2", "c0", "c1"]
    assert cutoff(Candidates.empty(), 0.3, lambda s: [])[0] is None


def test_bounded_top_fraction_cutoff_equals_the_in_memory_one(tmp_path):
    """The stage's radix selection (per-shard histograms, the boundary bin, the keys tied at the cutoff) finds
    the same cutoff as sorting every candidate in memory, with many ties and negative scores."""
    from curate.filter import top_fraction as top

    rng = np.random.default_rng(0)
    shards = {i: (rng.choice(np.float32([-0.2, 0.0, 0.31, 0.3100001]), 300).astype(np.float32)
                  if i == 1 else rng.normal(0.2, 0.1, 500).astype(np.float32)) for i in range(4)}  # fmt: skip
    keys = {i: [f"{i}-{j:04d}-{rng.integers(10**6)}" for j in range(len(v))] for i, v in shards.items()}
    root = str(tmp_path)
    for fraction in (0.3, 0.51, 1.0):
        candidates = Candidates.empty()
        for i, values in shards.items():
            candidates.add(i, np.arange(len(values)), values)
            top.write_candidates(root, i, values, keys[i])
        expected, summary = cutoff(candidates, fraction, lambda i: keys[i])
        total = sum(len(v) for v in shards.values())
        k = top.keep_count(fraction, total)
        high = top.select(root, 0, list(shards), k)
        for i in shards:
            top.low_histogram(root, i, high["digit"])
        low = top.select(root, 1, list(shards), k - high["before"])
        code = (high["digit"] << top.DIGIT) | low["digit"]
        for i in shards:
            top.tied_keys(root, i, code)
        found = top.resolve(root, list(shards), code, k, high["before"] + low["before"], fraction, total,
                            str(tmp_path / "top.json"))  # fmt: skip
        assert (found["cutoff_score"], found["cutoff_key"]) == expected
        assert found["tied_at_cutoff"] == summary["tied_at_cutoff"]


# ----------------------------------------------------------------------------------------------------
# config errors name the field


PIPELINE = """\
name: filter-test
output: {out}
models:
  sscd: {{path: {sscd}}}
stages:
  - kind: local
    name: ingest
    path: {images}
    shard_size: 8
  - kind: local              # stand-in for the score stage (built on another branch); shards written by the test
    name: score
    path: {images}
  - kind: filter
    name: prefilter
    input: ingest
    min_side: 300
    max_aspect_ratio: 2.5
    min_caption_words: 5
  - kind: filter
    name: quality
    input: ingest
    join: [prefilter, score]
    keep_from: prefilter
    score_from: score
{quality}    examples: 4
  - kind: filter             # a later filter reading quality: --redo quality must redo it too
    name: final
    input: ingest
    join: [quality]
    keep_from: quality
    max_caption_words: 15
  - kind: sscd
    input: ingest
    join: [prefilter]
    keep_from: prefilter
    resources: {{num_cpus: 1, concurrency: 1, batch_size: 8}}
  - kind: dedup
    resources: {{num_cpus: 1}}
"""

QUALITY = """\
    clip_score_min: 0.1
    aesthetic_min: 3.0
    nsfw_max: 0.8
    clip_score_top_fraction: 0.5
"""


def pipeline_text(out, images, quality: str = QUALITY) -> str:
    return PIPELINE.format(out=out, images=images, sscd=ONNX_SSCD, quality=quality)


@pytest.mark.parametrize(
    ("quality", "message"),
    [
        ("    nsfw_max: 1.5\n", "stages[3].nsfw_max: Input should be less than or equal to 1"),
        ("    clip_score_top_fraction: 0\n", "stages[3].clip_score_top_fraction: Input should be greater than 0"),
        ("    clip_score_top_fraction: 1.5\n", "stages[3].clip_score_top_fraction: Input should be less than or equal"),
        ("    clip_score_min: 2\n", "stages[3].clip_score_min: Input should be less than or equal to 1"),
        ("    aesthetic_min: -1\n", "stages[3].aesthetic_min: Input should be greater than or equal to 0"),
        ("    languages: [xx]\n", "stages[3].languages: Value error, unknown language code xx"),
        ("    min_caption_words: 5\n    max_caption_words: 2\n", "min_caption_words 5 is above max_caption_words 2"),
        ("    bogus: 1\n", "stages[3].bogus: unknown key"),
    ],
)
def test_config_errors_name_the_field(tmp_path, sample_images, quality, message):
    pytest.importorskip("py3langid")
    with pytest.raises(ConfigError) as error:
        parse_pipeline(pipeline_text(tmp_path / "run", sample_images, quality), "p.yaml")
    assert message in str(error.value), str(error.value)
    assert "p.yaml:" in str(error.value)


def test_score_rules_need_a_joined_score_stage(tmp_path, sample_images):
    text = pipeline_text(tmp_path / "run", sample_images).replace("    score_from: score\n", "")
    with pytest.raises(ConfigError) as error:
        parse_pipeline(text, "p.yaml")
    for field in ("clip_score_min", "aesthetic_min", "nsfw_max", "clip_score_top_fraction"):
        assert f"stages[3].{field}: Value error, {field} is a score rule: name the joined score stage" in str(
            error.value
        )
    text = pipeline_text(tmp_path / "run", sample_images).replace("join: [prefilter, score]", "join: [prefilter]")
    with pytest.raises(ConfigError, match="score_from 'score' must also be listed in `join`"):
        parse_pipeline(text, "p.yaml")
    text = pipeline_text(tmp_path / "run", sample_images).replace(
        "    join: [prefilter]\n    keep_from: prefilter\n", ""
    )
    with pytest.raises(ConfigError, match="a filter needs a rule"):
        parse_pipeline(text.replace("    min_side: 300\n    max_aspect_ratio: 2.5\n    min_caption_words: 5\n", ""))


# ----------------------------------------------------------------------------------------------------
# keep sources


def test_keep_sources_say_why_a_row_is_skipped(tmp_path):
    upstream = pa.table({"key": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "decode_error"]})
    filtered = tmp_path / "filter.parquet"
    pq.write_table(
        pa.table({"key": list("abcd"), "keep": [True, False, True, False], "removed_by": ["", "min_side", "", "x"]}),
        filtered,
    )
    selection = select_rows(upstream, read_keep(str(filtered), "prefilter"))
    assert selection.skip[1] == (SKIPPED_FILTERED, "removed by min_side in prefilter")
    assert selection.process == [0, 2] and selection.skip[3][0] == NOT_OK_UPSTREAM
    dedup = tmp_path / "dedup.parquet"
    pq.write_table(
        pa.table(
            {"key": list("abcd"), "keep": [False, False, True, False], "status": ["ok", SKIPPED_FILTERED, "ok", "ok"]}
        ),
        dedup,
    )
    skip = select_rows(upstream, read_keep(str(dedup), "dedup")).skip
    assert skip[0] == (SKIPPED_DUPLICATE, "keep is false in dedup")
    assert skip[1][0] == SKIPPED_FILTERED and "dedup" in skip[1][1]  # the filter's reason travels through dedup


# ----------------------------------------------------------------------------------------------------
# end to end on Ray: prefilter -> score (stand-in) -> quality -> sscd(keep_from prefilter) -> dedup


def stand_in_scores(key: str, status: str, width, height) -> dict:
    """Deterministic stand-in score row with the score stage's columns; some rows lack a score."""
    digest = hashlib.sha256(key.encode()).digest()
    unit = [d / 255 for d in digest[:4]]
    scored = status == "ok" and digest[4] % 7 != 0
    aesthetic = None if digest[5] % 9 == 0 else round(1 + 9 * unit[1], 4)
    return {
        "key": key,
        "status": "ok" if scored else "decode_error",
        "error": None if scored else "stand-in: not scored",
        "clip_score": round(0.4 * unit[0], 4) if scored else None,
        "aesthetic": aesthetic if scored else None,
        "nsfw": round(unit[2], 4) if scored else None,
        "watermark": round(unit[3], 4) if scored else None,
        "width": width,
        "height": height,
    }


SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("clip_score", pa.float32()),
        ("aesthetic", pa.float32()),
        ("nsfw", pa.float32()),
        ("watermark", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def write_score_stage(run: Path) -> None:
    ingest = RunDir(str(run)).stage("ingest")
    tables = {}
    for index in sorted(ingest.done_shards()):
        images = storage.read_parquet(ingest.shard(index), columns=["key", "status", "width", "height"]).to_pylist()
        scored = [stand_in_scores(r["key"], r["status"], r["width"], r["height"]) for r in images]
        tables[index] = pa.Table.from_pylist(scored, schema=SCORE_SCHEMA)
    write_stage_like_runner(str(run), "score", "score", tables)


def table_of(run: Path, stage: str) -> pa.Table:
    return pa.concat_tables([storage.read_parquet(u) for u in RunDir(str(run)).stage(stage).shard_uris()])


def expected_first_rule(image: dict, score: dict, prefilter_kept: bool, quality: dict) -> str:
    """The rules written out independently of the code, for one row (top fraction excluded)."""
    if image["status"] != "ok":
        return "not_ok_upstream"
    if not prefilter_kept:
        return "keep_from:prefilter"
    needed = ["clip_score"] + [c for c, f in (("aesthetic", "aesthetic_min"), ("nsfw", "nsfw_max")) if f in quality]
    if score["status"] != "ok" or any(score[c] is None for c in needed):
        return "no_score"
    if score["clip_score"] < quality["clip_score_min"]:
        return "clip_score_min"
    if "aesthetic_min" in quality and score["aesthetic"] < quality["aesthetic_min"]:
        return "aesthetic_min"
    if "nsfw_max" in quality and score["nsfw"] > quality["nsfw_max"]:
        return "nsfw_max"
    return ""


def check_quality(run: Path, quality: dict) -> dict:
    """Every quality row against the rules; returns the stage's rows by key."""
    images = {r["key"]: r for r in table_of(run, "ingest").to_pylist()}
    scores = {r["key"]: r for r in table_of(run, "score").to_pylist()}
    prefilter = {r["key"]: r for r in table_of(run, "prefilter").to_pylist()}
    rows = {r["key"]: r for r in table_of(run, "quality").to_pylist()}
    assert set(rows) == set(images)
    candidates = []
    for key, row in rows.items():
        expected = expected_first_rule(images[key], scores[key], prefilter[key]["keep"], quality)
        if expected:
            assert row["removed_by"] == expected and not row["keep"], (key, row, expected)
        else:
            assert row["removed_by"] in ("", "clip_score_top_fraction"), (key, row)
            candidates.append(key)
        assert row["keep"] == (row["removed_by"] == "")
    kept = sorted((k for k in candidates if rows[k]["keep"]), key=lambda k: (-rows[k]["clip_score"], k))
    assert len(kept) == math.ceil(quality["clip_score_top_fraction"] * len(candidates))
    best = sorted(candidates, key=lambda k: (-np.float32(scores[k]["clip_score"]), k))
    assert kept == best[: len(kept)]  # exactly the best by score, ties by key
    return rows


@pytest.fixture(scope="module")
def filtered_run(ray_cluster, sample_images, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("filter-run") / "run"
    pipeline = parse_pipeline(pipeline_text(out, sample_images))
    run_pipeline(pipeline, only=["ingest"], log=lambda line: None)
    write_score_stage(out)
    lines: list[str] = []
    records = run_pipeline(pipeline, only=["prefilter", "quality", "final", "sscd", "dedup"], log=lines.append)
    return {"run": out, "records": records, "pipeline": pipeline, "images": sample_images, "log": lines}


def test_prefilter_removes_exactly_what_the_rules_say(filtered_run):
    run = filtered_run["run"]
    rows = {r["key"]: r for r in table_of(run, "prefilter").to_pylist()}
    for image in table_of(run, "ingest").to_pylist():
        row = rows[image["key"]]
        short, long = min(image["width"] or 0, image["height"] or 0), max(image["width"] or 0, image["height"] or 0)
        words = len((image["caption"] or "").split())
        expected = (
            "not_ok_upstream"
            if image["status"] != "ok"
            else "min_side"
            if short < 300
            else "aspect_ratio"
            if long / short > 2.5
            else "caption_words"
            if words < 5
            else ""
        )
        assert row["removed_by"] == expected, (image["url"], row)
        assert row["status"] == (
            "ok" if not expected else image["status"] if expected == "not_ok_upstream" else "filtered"
        )
        assert (row["width"], row["height"], row["caption_words"]) == (image["width"], image["height"], words)
        assert row["clip_score"] is None and row["language"] is None
    removed = {r["removed_by"] for r in rows.values()}
    assert {"not_ok_upstream", "min_side", "caption_words", ""} <= removed  # the sample set exercises them
    record = filtered_run["records"]["prefilter"]
    assert record["rows"] == 31 and record["extra"]["kept"] == sum(r["keep"] for r in rows.values())
    assert record["status"]["filtered"] == sum(r["status"] == "filtered" for r in rows.values())


def test_quality_filter_chains_and_keeps_the_exact_top_fraction(filtered_run):
    run = filtered_run["run"]
    rows = check_quality(
        run, {"clip_score_min": 0.1, "aesthetic_min": 3.0, "nsfw_max": 0.8, "clip_score_top_fraction": 0.5}
    )
    removed = {r["removed_by"] for r in rows.values()}
    assert {"keep_from:prefilter", "no_score", "clip_score_top_fraction"} <= removed
    top = json.loads((run / "quality" / "_global" / "top_fraction.json").read_text())
    assert top["kept"] == sum(r["keep"] for r in rows.values()) and top["fraction"] == 0.5
    final = {r["key"]: r for r in table_of(run, "final").to_pylist()}
    for key, row in final.items():
        if not rows[key]["keep"] and rows[key]["status"] == "filtered":
            assert row["removed_by"] == "keep_from:quality"
        assert not row["keep"] or rows[key]["keep"]


def test_filtered_rows_are_not_embedded_and_dedup_does_not_keep_them(filtered_run):
    run = filtered_run["run"]
    prefilter = {r["key"]: r for r in table_of(run, "prefilter").to_pylist()}
    sscd = {r["key"]: r for r in table_of(run, "sscd").to_pylist()}
    dedup = {r["key"]: r for r in table_of(run, "dedup").to_pylist()}
    for key, row in prefilter.items():
        if row["status"] == "filtered":
            assert sscd[key]["status"] == SKIPPED_FILTERED and row["removed_by"] in sscd[key]["error"]
            assert not np.asarray(sscd[key]["sscd"]).any()  # never embedded
            assert dedup[key]["keep"] is False and dedup[key]["reason"] == "not_ok"
        elif row["keep"]:
            assert sscd[key]["status"] == "ok"
    embedded = sum(s.extra["embedded"] for s in RunDir(str(run)).stage("sscd").shard_stats())
    assert embedded == sum(r["keep"] for r in prefilter.values())
    # caption / encode selection reading dedup as keep source: the filter's reason, not "duplicate"
    ingest = RunDir(str(run)).stage("ingest")
    for index in sorted(ingest.done_shards()):
        images = storage.read_parquet(ingest.shard(index), columns=["key", "status"])
        skip = select_rows(images, read_keep(RunDir(str(run)).stage("dedup").shard(index), "dedup")).skip
        for key, reason in zip(images["key"].to_pylist(), skip, strict=True):
            if prefilter[key]["status"] == "filtered":
                assert reason[0] == SKIPPED_FILTERED
            elif reason is not None and reason[0] != NOT_OK_UPSTREAM:
                assert reason[0] == SKIPPED_DUPLICATE and dedup[key]["reason"].endswith("duplicate")
        direct = select_rows(images, read_keep(RunDir(str(run)).stage("quality").shard(index), "quality")).skip
        assert all(s is None or s[0] in (SKIPPED_FILTERED, NOT_OK_UPSTREAM) for s in direct)


def test_report_counts_rules_and_shows_histograms_and_examples(filtered_run):
    run = filtered_run["run"]
    folder = run / "quality" / "_report"
    report = json.loads((folder / "filter_report.json").read_text())
    rows = table_of(run, "quality").to_pylist()
    counted = {}
    for r in rows:
        if r["removed_by"]:
            counted[r["removed_by"]] = counted.get(r["removed_by"], 0) + 1
    assert report["removed"] == counted and report["kept"] == sum(r["keep"] for r in rows)
    clip = report["measures"]["clip_score"]
    reached = [r for r in rows if position(r["removed_by"]) >= position("clip_score_min")]
    assert clip["population"] == len(reached) == sum(clip["histogram"]["counts"])
    at = {row["threshold"]: row["passing"] for row in clip["table"]}
    assert at[0.1] == sum(r["clip_score"] >= 0.1 for r in reached)
    assert at[0.25] == sum(r["clip_score"] >= 0.25 for r in reached)
    assert report["top_fraction"]["kept"] == report["kept"]
    assert (folder / "filter_histograms.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "filter_examples_clip_score.png").is_file()
    groups = report["examples"]["clip_score"]
    assert groups[0]["threshold"] == 0.1 and 0 < len(groups[0]["rows"]) <= 4
    markdown = (folder / "filter_report.md").read_text()
    assert "| `keep_from:prefilter` |" in markdown and "![histograms](filter_histograms.png)" in markdown
    assert filtered_run["records"]["quality"]["finish"]["kept"] == report["kept"]


def test_redo_applies_new_thresholds_without_touching_scores(filtered_run, tmp_path):
    run: Path = filtered_run["run"]
    pipeline = parse_pipeline(pipeline_text(run, filtered_run["images"], "    clip_score_min: 0.2\n"))
    assert [s.stage_name for s in redo_stages(pipeline, ["quality"])] == ["quality", "final"]
    with pytest.raises(RunError, match="made with different settings"):  # without --redo: refused, nothing touched
        run_pipeline(pipeline, only=["quality"], log=lambda line: None)

    def snapshot(stage: str) -> dict[str, tuple[int, bytes]]:
        return {
            str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((run / stage).rglob("*"))
            if p.is_file()
        }

    untouched = {stage: snapshot(stage) for stage in ("score", "prefilter", "sscd", "dedup")}
    lines: list[str] = []
    records = run_pipeline(pipeline, only=["quality"], redo=["quality"], log=lines.append)
    assert set(records) == {"quality", "final"}  # the stage reading quality was redone with it
    assert any("--redo: removing" in line and line.startswith("[final]") for line in lines)
    for stage, files in untouched.items():
        assert snapshot(stage) == files, stage  # no score shard, marker or record rewritten
    rows = check_quality(run, {"clip_score_min": 0.2, "clip_score_top_fraction": 1.0})
    assert not any(r["removed_by"] in ("aesthetic_min", "nsfw_max", "clip_score_top_fraction") for r in rows.values())
    assert not (run / "quality" / "_global" / "top_fraction.json").exists()
    log = [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines()]
    assert log[-1]["redo"] == ["quality", "final"]


def test_redo_names_are_checked(tmp_path, sample_images):
    from conftest import curate_cli

    path = tmp_path / "p.yaml"
    path.write_text(pipeline_text(tmp_path / "run", sample_images))
    result = curate_cli("check", str(path), "--redo", "quality,nope")
    assert result.returncode == 1 and "--redo: no stage named 'nope'" in result.stderr
    result = curate_cli("check", str(path), "--redo", "prefilter")
    assert result.returncode == 0, result.stderr
    assert "--redo would remove and run again: prefilter, quality, final, sscd, dedup" in result.stdout
    assert not (tmp_path / "run").exists()


def test_filters_notebook_shows_counts_histograms_and_examples(filtered_run, monkeypatch):
    from test_notebooks import execute, outputs

    text, images = outputs(execute("filters.ipynb", filtered_run["run"], monkeypatch))
    assert "filter stages final, prefilter, quality" in text
    assert "removed by keep_from:prefilter" in text and "removed by min_side" in text
    assert "quality.clip_score" in text and "keep top 0.3 -> cutoff" in text
    assert images >= 4  # a histogram figure per filter stage, and example grids
