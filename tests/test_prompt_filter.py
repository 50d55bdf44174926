"""Prompt decontamination (`exclude_prompts` on the filter stage): exact, normalised and n-gram matches, template
phrases that never match alone, short prompts that match only exactly, matches through the synthetic caption of
a joined caption stage, the matched prompt recorded per row and listed in the report, and bad settings refused
before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from encode_helpers import write_stage_like_runner

from curate import storage
from curate.config import ConfigError
from curate.filter import prompts
from curate.filter.prompt_report import check_one_index
from curate.filter.prompts import PromptFile, PromptRules, build_index, words
from curate.filter.rules import FilterRules, Rows, evaluate
from curate.pipeline import parse_pipeline
from curate.runfolder import RunDir
from curate.runner import run_pipeline
from curate.schema import IMAGE_SCHEMA
from curate.stages.filter import FilterConfig

SURF = "A man riding a wave on top of a surfboard."
TEMPLATED = "a photo of a dog, highly detailed, trending on artstation, concept art, 4k"
PROMPTS = f"{SURF}\n\nA red bicycle.\n{TEMPLATED}\n"  # line 2 is blank: prompts keep their line numbers


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "coco.txt"
    path.write_text(PROMPTS)
    return path


def decide(prompt_file: Path, captions: list[str | None], **settings) -> tuple[list[str], list]:
    """removed_by and the recorded match of each caption, through the filter's rules as the stage runs them."""
    rules = FilterRules(prompts=PromptRules((PromptFile(str(prompt_file)),), **settings))
    n = len(captions)
    rows = Rows([f"k{i}" for i in range(n)], ["ok"] * n, np.full(n, 512.0), np.full(n, 512.0), captions)
    decision = evaluate(rules, rows)
    return decision.removed_by.tolist(), decision.prompts


def test_exact_and_normalised_captions_match_the_prompt(prompt_file):
    removed, found = decide(prompt_file, [
        SURF,
        "  a MAN riding—a wave,   on top of a ＳＵＲＦＢＯＡＲＤ!!",  # case, punctuation, spaces, full-width (NFKC)
        "A man riding a wave on top of a surfboard at dusk.",  # more words: an 8-gram, not exact
        "a red bicycle",
        "A woman riding a bike.",
    ])  # fmt: skip
    assert removed == ["prompt_exact", "prompt_exact", "prompt_ngram", "prompt_exact", ""]
    assert words("  a MAN riding—a wave,   on top of a ＳＵＲＦＢＯＡＲＤ!!") == words(SURF)
    assert found[1].prompt == SURF and found[1].line == 1 and found[1].file == str(prompt_file)
    assert found[1].words == "a man riding a wave on top of a surfboard" and found[1].column == "caption"
    assert found[3].prompt == "A red bicycle." and found[3].line == 3  # the blank line 2 is skipped, not renumbered
    assert found[4] is None


def test_ngram_match_needs_n_words_in_a_row(prompt_file):
    removed, found = decide(prompt_file, [
        "Look, a man riding a wave on top of the sea.",  # "a man riding a wave on top of": 8 words
        "a man riding a wave on top at dawn near a surfboard",  # at most 7 in a row
    ])  # fmt: skip
    assert removed == ["prompt_ngram", ""]
    assert found[0].words == "a man riding a wave on top of" and found[0].kind == "ngram"
    removed, _ = decide(prompt_file, ["a man riding a wave on top at dawn near a surfboard"], ngram=7)
    assert removed == ["prompt_ngram"]
    removed, _ = decide(prompt_file, ["Look, a man riding a wave on top of the sea.", SURF], ngram=0)
    assert removed == ["", "prompt_exact"]  # n-grams off: exact matches only


def test_short_prompts_match_only_exactly(prompt_file):
    removed, _ = decide(prompt_file, ["A red bicycle!", "a red bicycle leaning on a wall near the old station"])
    assert removed == ["prompt_exact", ""]
    removed, _ = decide(prompt_file, ["a red bicycle leaning on a wall"], ngram=3)  # now the prompt is long enough
    assert removed == ["prompt_ngram"]


def test_template_phrases_never_match_by_themselves(prompt_file):
    caption = "A photo of a cat, highly detailed, trending on artstation, concept art, 4K"
    # shares "highly detailed trending on artstation concept art 4k" (8 words) with the third prompt: all template
    assert decide(prompt_file, [caption])[0] == [""]
    removed, found = decide(prompt_file, [caption], allow=())
    assert removed == ["prompt_ngram"] and found[0].prompt == TEMPLATED  # what the allow-list prevents
    # with short n-grams "a photo of a" is a run of template and function words, never a match
    assert decide(prompt_file, ["a photo of a horse"], ngram=4)[0] == [""]
    assert decide(prompt_file, ["a photo of a dog in a field"], ngram=4)[0] == ["prompt_ngram"]


def test_a_row_matches_through_its_synthetic_caption(prompt_file):
    rules = FilterRules(prompts=PromptRules((PromptFile(str(prompt_file)),)))
    rows = Rows(["a", "b", "c"], ["ok", "ok", "decode_error"], np.full(3, 512.0), np.full(3, 512.0), ["x"] * 3)
    rows.texts = {
        "caption": ["IMG_0001.jpg", "a dog", "x"],
        "caption.caption_synthetic": [
            "The image shows a man riding a wave on top of a surfboard in the ocean.",
            None,  # not captioned
            SURF,  # the image row is not ok: removed as not_ok_upstream first, never matched
        ],
    }
    decision = evaluate(rules, rows)
    assert decision.removed_by.tolist() == ["prompt_ngram", "", "not_ok_upstream"]
    assert decision.prompts[0].column == "caption.caption_synthetic" and decision.prompts[0].prompt == SURF
    assert decision.prompts[2] is None


def test_parquet_prompts_and_the_index_size(tmp_path, prompt_file, monkeypatch):
    table = pa.table({"id": [7, 8], "Prompt": ["Two dogs playing frisbee in a sunny park at noon.", None]})
    pq.write_table(table, tmp_path / "parti.parquet")
    rules = PromptRules((PromptFile(str(prompt_file)), PromptFile(str(tmp_path / "parti.parquet"), "Prompt")))
    index = build_index(rules)
    assert len(index) == 4  # three lines and one non-null value
    assert index.file_of(3).uri.endswith("parti.parquet") and int(index.lines[3]) == 1
    # 8-grams: 3 of each 10-word prompt, and 5 of the 13-word templated one (those holding "dog"; the sixth is
    # all template phrases); none of the 3-word prompt. Exact: all four.
    assert len(index.exact) == 4 and len(index.grams) == 3 + 5 + 3
    assert index.nbytes < 4 * 200
    monkeypatch.setattr(prompts, "BUILD_CHUNK", 2)  # built in chunks: the same index
    chunked = build_index(rules)
    for name in ("exact", "exact_ids", "grams", "gram_ids", "lines", "file_starts"):
        assert np.array_equal(getattr(chunked, name), getattr(index, name)), name
    assert chunked.digest == index.digest and chunked.texts.equals(index.texts)


# ----------------------------------------------------------------------------------------------------
# through the stage: a joined caption stage, the recorded columns, the report, config errors


PIPELINE = """\
name: decontam-test
output: {out}
stages:
  - kind: local              # the image stage and a stand-in for a caption stage, written by the test
    name: ingest
    path: {images}
  - kind: local
    name: caption
    path: {images}
  - kind: filter
    name: decontam
    input: ingest
    join: [caption]
{filter}"""

FILTER = """\
    exclude_prompts:
      - {text}
      - {{path: {parquet}, column: Prompt}}
    prompt_columns: [caption, caption.caption_synthetic]
"""

CAPTIONS = {
    "a": "A man riding a wave on top of a surfboard",  # exact
    "b": "someone said a man riding a wave on top of it",  # 8-gram
    "c": "a red bicycle",  # exact (short prompt)
    "d": "A photo of a cat, highly detailed, trending on artstation, concept art, 4k",  # template only: kept
    "e": "IMG_2231",  # its synthetic caption matches the Parquet prompt
    "f": "a quiet harbour",
}
SYNTHETIC = {"e": "Two dogs playing frisbee in a sunny park at noon, seen from above."}


@pytest.fixture(scope="module")
def decontam_run(ray_cluster, tmp_path_factory) -> dict:
    """The image stage and a caption stage written as the runner writes them (two shards), then the filter run."""
    root = tmp_path_factory.mktemp("decontam")
    (root / "images").mkdir()
    (root / "coco.txt").write_text(PROMPTS)
    pq.write_table(pa.table({"Prompt": ["Two dogs playing frisbee in a sunny park at noon."]}), root / "parti.parquet")
    settings = {"out": root / "run", "images": root / "images"}
    text = PIPELINE.format(**settings, filter=FILTER.format(text=root / "coco.txt", parquet=root / "parti.parquet"))
    names = list(CAPTIONS)
    images, captions = {}, {}
    for index, part in enumerate((names[:3], names[3:])):
        rows = [{"key": f"{name:0>24}", "url": f"{name}.png", "caption": CAPTIONS[name], "status": "ok", "width": 64,
                 "height": 64} for name in part]  # fmt: skip
        images[index] = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
        synthetic = [SYNTHETIC.get(name, "a picture") for name in part]
        captions[index] = pa.table({"key": [r["key"] for r in rows], "caption_synthetic": synthetic,
                                    "status": ["ok"] * len(rows)})  # fmt: skip
    write_stage_like_runner(str(root / "run"), "ingest", "local", images)
    write_stage_like_runner(str(root / "run"), "caption", "caption", captions)
    run_pipeline(parse_pipeline(text, "p.yaml"), only=["decontam"], log=lambda line: None)
    return {"root": root, "settings": settings, "run": RunDir(str(root / "run"))}


def test_the_stage_records_each_match_and_the_report_lists_them(decontam_run):
    run = decontam_run["run"]
    stage = run.stage("decontam")
    out = pa.concat_tables([storage.read_parquet(u) for u in stage.shard_uris()]).to_pylist()
    by_name = {r["key"].lstrip("0"): r for r in out}
    expected = {"a": "prompt_exact", "b": "prompt_ngram", "c": "prompt_exact", "d": "", "e": "prompt_ngram", "f": ""}
    assert {name: r["removed_by"] for name, r in by_name.items()} == expected
    assert by_name["e"]["matched_column"] == "caption.caption_synthetic"
    assert by_name["e"]["matched_prompt_file"].endswith("parti.parquet") and by_name["e"]["matched_prompt_line"] == 1
    assert by_name["b"]["matched_words"] == "a man riding a wave on top of" and by_name["b"]["matched_prompt"] == SURF
    assert by_name["d"]["matched_prompt"] is None and by_name["d"]["keep"]
    report = storage.read_json(storage.join(stage.uri, "_report", "filter_report.json"))
    matches = report["prompt_matches"]
    coco = str(decontam_run["root"] / "coco.txt")
    assert matches["files"][coco] == {"rows": 3, "prompt_exact": 2, "prompt_ngram": 1}
    assert matches["columns"] == {"caption": 3, "caption.caption_synthetic": 1}
    assert matches["top_prompts"][0] == {"file": coco, "line": 1, "prompt": SURF, "rows": 2}
    markdown = storage.read_text(storage.join(stage.uri, "_report", "filter_report.md"))
    assert "## Prompt matches" in markdown and "Two dogs playing frisbee" in markdown
    assert len({s.extra["prompt_index"] for s in stage.shard_stats()}) == 1


def test_a_missing_joined_column_fails_before_any_task(decontam_run, tmp_path):
    root, settings = decontam_run["root"], dict(decontam_run["settings"], out=tmp_path / "run")
    filter_ = FILTER.format(text=root / "coco.txt", parquet=root / "parti.parquet").replace("caption_synthetic", "nope")
    pipeline = parse_pipeline(PIPELINE.format(**settings, filter=filter_), "p.yaml")
    for name in ("ingest", "caption"):  # the earlier stages as they are
        shutil.copytree(decontam_run["run"].stage(name).uri, tmp_path / "run" / name)
    with pytest.raises(ValueError) as error:  # from the stage's plan, before any task
        run_pipeline(pipeline, only=["decontam"], log=lambda line: None)
    assert "prompt_columns: 'caption.nope': " in str(error.value) and "has no column 'nope'" in str(error.value)
    assert not RunDir(str(tmp_path / "run")).stage("decontam").done_shards()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f, r: f.replace(str(r / "coco.txt"), str(r / "missing.txt")),
         "stages[2].exclude_prompts[0].path: no such file: "),
        (lambda f, r: f.replace("column: Prompt", "column: prompt"),
         "stages[2].exclude_prompts[1].path: {parquet} has no column 'prompt' (columns: Prompt)"),
        (lambda f, r: f.replace(", column: Prompt", ""),
         "stages[2].exclude_prompts[1]: Value error, a Parquet file of prompts needs `column`"),
        (lambda f, r: f.replace("caption.caption_synthetic", "captions.caption_synthetic"),
         "stages[2].prompt_columns: Value error, 'captions.caption_synthetic': stage 'captions' must be listed in"),
        (lambda f, r: "    min_side: 10\n    prompt_ngram: 4\n",
         "stages[2]: Value error, prompt_ngram set without `exclude_prompts`"),
        (lambda f, r: f + "    prompt_ngram: -1\n", "stages[2].prompt_ngram: Input should be greater than or equal"),
        (lambda f, r: f + "    prompt_allow: ['...']\n", "stages[2].prompt_allow: Value error, '...' has no letters"),
    ],
)  # fmt: skip
def test_bad_prompt_settings_fail_before_any_work_naming_the_field(tmp_path, change, message):
    (tmp_path / "coco.txt").write_text(PROMPTS)
    pq.write_table(pa.table({"Prompt": ["two dogs"]}), tmp_path / "parti.parquet")
    base = FILTER.format(text=tmp_path / "coco.txt", parquet=tmp_path / "parti.parquet")
    text = PIPELINE.format(out=tmp_path / "run", images=tmp_path, filter=change(base, tmp_path))
    with pytest.raises(ConfigError) as error:
        parse_pipeline(text, "p.yaml")
    assert message.format(parquet=tmp_path / "parti.parquet") in str(error.value), str(error.value)
    assert "p.yaml:" in str(error.value)


def test_a_filter_with_only_exclude_prompts_is_valid(tmp_path, prompt_file):
    config = FilterConfig(kind="filter", exclude_prompts=[str(prompt_file)])
    assert config.rules().prompts == PromptRules((PromptFile(str(prompt_file)),))


def test_prompt_files_changed_during_a_run_fail_the_report():
    check_one_index({0: "a" * 64, 1: "a" * 64, 2: None})  # one set (shard 2 had no prompt rule record)
    with pytest.raises(ValueError, match=r"2 different sets of prompts \(aaaaaaaaaaaa: 2 shards, e\.g\. 0, 1; bbbb"):
        check_one_index({0: "a" * 64, 1: "a" * 64, 5: "b" * 64})
