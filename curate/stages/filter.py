"""`filter` stage: keep or drop each row of an image stage by cheap rules and stored scores (docs/filters.md).

SD3 removed explicit and low-aesthetic images before dedup; DataComp found keeping the top 30% by CLIP
image-text score the strongest single filter. One output row per image row: `keep`, `removed_by` (the first
rule that failed, in `curate.filter.rules.RULES` order) and the values the rules compared. Scores are read
from a joined `score` stage (`score_from`), never computed here, so new thresholds cost a re-run of this
stage only (`curate run PIPELINE --redo NAME`). Later stages read rows with `keep` (`keep_from`).

With `clip_score_top_fraction` a global step computes the cutoff over every shard first (`global_step`); the
closing step (`finish`) writes the report: counts per rule, histograms with the thresholds, how many rows
would remain at other thresholds, and thumbnails of images near them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BeforeValidator, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from curate import storage
from curate.config import StageConfig, Strict
from curate.filter.prompt_columns import column_problem, read_texts, split
from curate.filter.prompts import TEMPLATE_PHRASES, PromptFile, PromptRules, file_problem, prompt_index, words
from curate.filter.rules import (
    SCORE_COLUMNS,
    Decision,
    FilterRules,
    Rows,
    apply_top_fraction,
    evaluate,
    score_columns_needed,
)
from curate.keep import check_keep_from, read_keep
from curate.runfolder import ShardTask, StageDir, shard_name
from curate.schema import FILTER_SCHEMA
from curate.stages.spec import ShardOutput, StageSpec, WorkContext, one_task_per_upstream_shard
from curate.steps import GlobalPhase, GlobalSteps, GlobalTask

SCORE_FIELDS = ("clip_score_min", "clip_score_top_fraction", "aesthetic_min", "nsfw_max", "watermark_max")
CHEAP_FIELDS = ("min_side", "max_aspect_ratio", "min_caption_words", "max_caption_words", "min_caption_chars")
PROMPT_FIELDS = ("prompt_ngram", "prompt_allow", "prompt_columns")
TOP_FRACTION_FILE = "top_fraction.json"


class PromptFileConfig(Strict):
    """A file of evaluation prompts: text, one prompt a line, or a Parquet file's `column`."""

    path: str
    column: str | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return storage.absolute(value)

    @model_validator(mode="after")
    def _column_for_parquet(self) -> PromptFileConfig:
        parquet = self.path.lower().endswith(".parquet")
        if parquet and self.column is None:
            raise ValueError(f"a Parquet file of prompts needs `column` (the one holding the prompts): {self.path}")
        if not parquet and self.column is not None:
            raise ValueError(f"`column` is for Parquet files; {self.path} is read as text, one prompt a line")
        return self


def _path_or_file(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class FilterConfig(StageConfig):
    kind: Literal["filter"]

    # cheap rules on the image rows (`input`)
    min_side: PositiveInt | None = None  # shorter side in pixels
    max_aspect_ratio: float | None = Field(None, ge=1.0)  # longer side / shorter side
    # "original": the image's size before the download stage resized it (original_width/height), else the
    # stored image's; "stored": width/height of the stored image (after img2dataset's resize)
    dimensions: Literal["original", "stored"] = "original"
    min_caption_words: PositiveInt | None = None  # whitespace-separated words of the original caption
    max_caption_words: PositiveInt | None = None
    min_caption_chars: PositiveInt | None = None  # for scripts without spaces between words
    # prompt decontamination (docs/filters.md#prompt-decontamination): files of evaluation prompts
    exclude_prompts: tuple[Annotated[PromptFileConfig, BeforeValidator(_path_or_file)], ...] = ()
    prompt_ngram: int = Field(8, ge=0)  # words in a row shared with a prompt of at least this many words; 0: off
    prompt_allow: tuple[str, ...] = TEMPLATE_PHRASES  # template phrases that never match by themselves
    # captions to check: a column of the image stage (`caption`), or `<joined stage>.<column>`
    prompt_columns: tuple[str, ...] = ("caption",)
    languages: tuple[str, ...] | None = None  # ISO 639-1 codes to keep, e.g. [en]; needs curate[lang]
    language_confidence: float = Field(0.5, ge=0.0, le=1.0)  # remove only captions this sure to be another language
    # score rules on a joined score stage (`score_from`, also listed in `join`)
    score_from: str | None = None
    clip_score_min: float | None = Field(None, ge=-1.0, le=1.0)  # cosine of image and caption embeddings
    clip_score_top_fraction: float | None = Field(None, gt=0.0, le=1.0)  # DataComp: keep the top 0.3
    aesthetic_min: float | None = Field(None, ge=0.0, le=10.0)  # LAION aesthetic predictor, ~1..10
    nsfw_max: float | None = Field(None, ge=0.0, le=1.0)  # probability
    watermark_max: float | None = Field(None, ge=0.0, le=1.0)  # probability
    keep_from: str | None = None  # an earlier filter (or dedup): a row is kept only if it keeps it too
    examples: int = Field(6, ge=0, le=32)  # report thumbnails per threshold and score

    @field_validator(*SCORE_FIELDS)
    @classmethod
    def _needs_scores(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("score_from") is None:
            raise ValueError(f"{info.field_name} is a score rule: name the joined score stage in `score_from`")
        return value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one language, or leave `languages` out")
        from curate.filter.language import known_languages

        try:
            known = known_languages()
        except ImportError as e:
            raise ValueError(str(e)) from None
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ValueError(f"unknown language code {', '.join(unknown)} (langid knows: {', '.join(sorted(known))})")
        return value

    @field_validator("prompt_allow")
    @classmethod
    def _phrases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        empty = [v for v in value if not words(v)]
        if empty:
            raise ValueError(f"{empty[0]!r} has no letters or digits: a template phrase needs words")
        return value

    @field_validator("prompt_columns")
    @classmethod
    def _columns(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one caption column, e.g. [caption]")
        for column in value:
            stage, name = split(column)
            if stage == "" or not name:
                raise ValueError(f"{column!r}: a joined stage's column is written <stage>.<column>")
            joined = list(info.data.get("join", ()))
            if stage is not None and stage not in joined:
                raise ValueError(f"{column!r}: stage {stage!r} must be listed in `join` (join: {joined})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FilterConfig:
        check_keep_from(self.keep_from, self.join)
        fields = type(self).model_fields
        stray = [  # set to something else than the default (a run folder's pipeline.yaml writes the defaults out)
            f
            for f in PROMPT_FIELDS
            if f in self.model_fields_set and getattr(self, f) != fields[f].get_default(call_default_factory=True)
        ]
        if stray and not self.exclude_prompts:
            raise ValueError(f"{', '.join(stray)} set without `exclude_prompts` (the prompt files to match)")
        if self.score_from is not None and self.score_from not in self.join:
            raise ValueError(f"score_from {self.score_from!r} must also be listed in `join` (join: {list(self.join)})")
        if self.score_from is not None and self.score_from == self.keep_from:
            raise ValueError("score_from and keep_from name the same stage: a score stage has no `keep` column")
        lo, hi = self.min_caption_words, self.max_caption_words
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_caption_words {lo} is above max_caption_words {hi}")
        rules = [f for f in (*CHEAP_FIELDS, *SCORE_FIELDS) if getattr(self, f) is not None]
        if not rules and self.languages is None and self.keep_from is None and not self.exclude_prompts:
            every = (*CHEAP_FIELDS, "exclude_prompts", "languages", *SCORE_FIELDS)
            raise ValueError(f"a filter needs a rule: one of {', '.join(every)}")
        return self

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Local prompt files exist and have their column (Parquet footers only); remote ones are checked when
        the stage plans, before its first task."""
        files = [PromptFile(f.path, f.column) for f in self.exclude_prompts]
        local = [(i, file) for i, file in enumerate(files) if storage.is_local(file.uri)]
        return [(("exclude_prompts", i, "path"), p) for i, file in local if (p := file_problem(file)) is not None]

    def prompt_rules(self) -> PromptRules | None:
        if not self.exclude_prompts:
            return None
        files = tuple(PromptFile(f.path, f.column) for f in self.exclude_prompts)
        return PromptRules(files, self.prompt_ngram, self.prompt_allow)

    def rules(self) -> FilterRules:
        """The rules as the filter package takes them."""
        fields = {f: getattr(self, f) for f in FilterRules.__dataclass_fields__ if f != "prompts"}
        return FilterRules(**fields, prompts=self.prompt_rules())

    def settings(self) -> dict[str, Any]:
        """What the report records as the stage's settings."""
        return self.model_dump(mode="json", exclude={"resources", "kind", "name"})


# ----------------------------------------------------------------------------------------------------
# reading one shard's rows


def _floats(column: pa.ChunkedArray | None, n: int) -> np.ndarray:
    if column is None:
        return np.full(n, np.nan, np.float64)
    return np.array([np.nan if v is None else float(v) for v in column.to_pylist()], np.float64)


def _score_columns(config: FilterConfig, uri: str, keys: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The score stage's shard joined on key: (row is ok, score columns as float32 with nan for null)."""
    names = storage.parquet_file(uri).schema_arrow.names
    needed = ["key", "status", *score_columns_needed(config.rules())]
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(
            f"{uri}: score stage {config.score_from!r} has no column {', '.join(missing)} (columns: {', '.join(names)})"
        )
    present = [c for c in SCORE_COLUMNS if c in names]
    table = storage.read_parquet(uri, columns=["key", "status", *present])
    where = {k: i for i, k in enumerate(table["key"].to_pylist())}
    absent = [k for k in keys if k not in where]
    if absent:
        raise ValueError(f"{len(absent)} keys of the image shard are missing from {uri}, e.g. {absent[0]}")
    index = np.array([where[k] for k in keys], np.int64)
    status = table["status"].to_pylist()
    ok = np.array([status[i] == "ok" for i in index], bool)
    scores = {
        c: _floats(table[c] if c in present else None, table.num_rows)[index].astype(np.float32) for c in SCORE_COLUMNS
    }
    return ok, scores


def read_rows(config: FilterConfig, context: WorkContext, index: int, image_uri: str) -> Rows:
    names = storage.parquet_file(image_uri).schema_arrow.names
    wanted = ["key", "status", "width", "height", "original_width", "original_height", "caption"]
    if config.exclude_prompts:
        wanted += [c for c in config.prompt_columns if "." not in c]
    table = storage.read_parquet(image_uri, columns=[c for c in dict.fromkeys(wanted) if c in names])
    n = table.num_rows
    keys = table["key"].to_pylist()
    width, height = _floats(table["width"], n), _floats(table["height"], n)
    if config.dimensions == "original" and "original_width" in names:
        ow, oh = _floats(table["original_width"], n), _floats(table["original_height"], n)
        known = ~np.isnan(ow) & ~np.isnan(oh)
        width, height = np.where(known, ow, width), np.where(known, oh, height)
    caption = table["caption"].to_pylist() if "caption" in names else [None] * n
    rows = Rows(keys, table["status"].to_pylist(), width, height, caption)
    if config.exclude_prompts:
        rows.texts = read_texts(table, config.prompt_columns, lambda stage: context.joined_shard(stage, index))
    if config.keep_from is not None:
        flags = read_keep(context.joined_shard(config.keep_from, index), config.keep_from)
        rows.kept_by_source = np.array([flags.skip(k) is None for k in keys], bool)
    if config.score_from is not None:
        rows.score_ok, rows.scores = _score_columns(config, context.joined_shard(config.score_from, index), keys)
    return rows


def decide(config: FilterConfig, context: WorkContext, index: int, image_uri: str) -> tuple[Rows, Decision]:
    """Every rule but the top fraction, for one shard."""
    rows = read_rows(config, context, index, image_uri)
    return rows, evaluate(config.rules(), rows)


# ----------------------------------------------------------------------------------------------------
# the stage


def _candidates(config: FilterConfig, context: WorkContext, index: int, image_uri: str, root: str) -> dict[str, Any]:
    """One shard's top-fraction candidates (rows every other rule kept) with their CLIP scores, to a file."""
    from curate.filter.top_fraction import write_candidates

    rows, decision = decide(config, context, index, image_uri)
    kept = np.flatnonzero(decision.kept)
    assert rows.scores is not None
    return write_candidates(root, index, rows.scores["clip_score"][kept], [rows.key[i] for i in kept.tolist()])


def global_step(config: FilterConfig, upstream: StageDir | None, stage: StageDir, context: WorkContext) -> GlobalSteps:
    """The top-fraction cutoff over every shard's candidates, with bounded memory (curate.filter.top_fraction):
    a candidates pass, two histogram selections, the keys tied at the cutoff score. The runner runs it only with
    `clip_score_top_fraction` set (`global_when`)."""
    from curate.filter import top_fraction as top

    assert upstream is not None and config.clip_score_top_fraction is not None
    fraction = config.clip_score_top_fraction
    root = storage.join(stage.global_uri, "top")
    out = storage.join(stage.global_uri, TOP_FRACTION_FILE)
    shards = sorted(upstream.done_shards())

    def each_shard(function: Any, *args: Any) -> tuple[GlobalTask, ...]:
        return tuple(GlobalTask(shard_name(i), function, (*args[:1], i, *args[1:])) for i in shards)

    found = yield GlobalPhase("candidates", tuple(
        GlobalTask(shard_name(i), _candidates, (config, context, i, upstream.shard(i), root)) for i in shards
    ))  # fmt: skip
    candidates = sum(r["candidates"] for r in found.values())
    if not candidates:
        summary = {"candidates": 0, "kept": 0, "fraction": fraction, "cutoff_score": None, "cutoff_key": None}
        storage.write_json(out, summary)
        return {"top_fraction": summary}
    k = top.keep_count(fraction, candidates)
    high = (yield GlobalPhase("select-high", (GlobalTask("select", top.select, (root, 0, shards, k)),)))["select"]
    yield GlobalPhase("histogram-low", each_shard(top.low_histogram, root, high["digit"]))
    low = yield GlobalPhase("select-low", (GlobalTask("select", top.select, (root, 1, shards, k - high["before"])),))
    code = (high["digit"] << top.DIGIT) | low["select"]["digit"]
    before = high["before"] + low["select"]["before"]
    yield GlobalPhase("ties", each_shard(top.tied_keys, root, code))
    summary = (yield GlobalPhase("cutoff", (
        GlobalTask("cutoff", top.resolve, (root, shards, code, k, before, fraction, candidates, out)),
    )))["cutoff"]  # fmt: skip
    return {"top_fraction": summary}


def plan(config: FilterConfig, upstream: StageDir | None) -> list[ShardTask]:
    """One task per upstream shard, after checking what the config could not check offline: remote prompt
    files, and that the prompt columns exist in the first shard of the image stage and of the joined stages."""
    tasks = one_task_per_upstream_shard(config, upstream)
    assert upstream is not None
    for i, file in enumerate(config.exclude_prompts):
        problem = file_problem(PromptFile(file.path, file.column))
        if problem:
            raise ValueError(f"exclude_prompts[{i}].path: {problem}")
    if config.exclude_prompts and tasks:
        run = upstream.uri.rstrip("/").rsplit("/", 1)[0]
        folder = {None: upstream} | {stage: StageDir(storage.join(run, stage)) for stage in config.join}
        problem = column_problem(config.prompt_columns, lambda stage: folder[stage].shard(tasks[0].index))
        if problem:
            raise ValueError(f"prompt_columns: {problem}")
    return tasks


def read_cutoff(stage: StageDir) -> tuple[float, str] | None:
    summary = storage.read_json(storage.join(stage.global_uri, TOP_FRACTION_FILE))
    return None if summary["cutoff_score"] is None else (summary["cutoff_score"], summary["cutoff_key"])


def _int32(values: np.ndarray) -> pa.Array:
    return pa.array([None if np.isnan(v) else round(v) for v in values.tolist()], pa.int32())


def _float32(values: np.ndarray | None, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.float32())
    return pa.array(values.astype(np.float32), pa.float32(), mask=np.isnan(values))


def process(config: FilterConfig, task: ShardTask, context: WorkContext, state: Any) -> ShardOutput:
    (image_uri,) = task.inputs
    rows, decision = decide(config, context, task.index, image_uri)
    if config.clip_score_top_fraction is not None:
        stage = StageDir(storage.join(context.run_uri, context.stage_name))
        assert rows.scores is not None
        apply_top_fraction(decision, rows.key, rows.scores["clip_score"], read_cutoff(stage))
    n = len(rows.key)
    removed = decision.removed_by.tolist()
    status = [
        "ok" if not r else (image if r == "not_ok_upstream" else "filtered")
        for r, image in zip(removed, rows.image_status, strict=True)
    ]
    scores = rows.scores or {}
    found = decision.prompts or [None] * n
    table = pa.table(
        {
            "key": pa.array(rows.key, pa.string()),
            "keep": pa.array(decision.kept, pa.bool_()),
            "removed_by": pa.array(removed, pa.string()),
            "status": pa.array(status, pa.string()),
            "width": _int32(rows.width),
            "height": _int32(rows.height),
            "caption_words": pa.array(decision.caption_words, pa.int32()),
            "caption_chars": pa.array(decision.caption_chars, pa.int32()),
            "language": pa.array(decision.language, pa.string()),
            "language_prob": _float32(decision.language_prob, n),
            **{c: _float32(scores.get(c), n) for c in SCORE_COLUMNS},
            "matched_prompt": pa.array([f and f.prompt for f in found], pa.string()),
            "matched_prompt_file": pa.array([f and f.file for f in found], pa.string()),
            "matched_prompt_line": pa.array([f and f.line for f in found], pa.int32()),
            "matched_column": pa.array([f and f.column for f in found], pa.string()),
            "matched_words": pa.array([f and f.words for f in found], pa.string()),
        },
        schema=FILTER_SCHEMA,
    )
    counts: dict[str, Any] = {}
    for r in removed:
        if r:
            counts[f"removed.{r}"] = counts.get(f"removed.{r}", 0) + 1
    if config.exclude_prompts:  # which prompts this shard was checked against (the report checks they agree)
        counts["prompt_index"] = prompt_index(config.prompt_rules()).digest
    return ShardOutput(table, {"kept": int(decision.kept.sum()), **counts})


def finish(config: FilterConfig, upstream: StageDir | None, stage: StageDir, context: WorkContext) -> dict[str, Any]:
    from curate.filter.report import write_report

    assert upstream is not None
    return write_report(config.rules(), upstream, stage, config.settings(), config.examples)


def describe(config: FilterConfig) -> str:
    parts = []
    if config.keep_from:
        parts.append(f"kept by {config.keep_from}")
    for name in (*CHEAP_FIELDS, *SCORE_FIELDS):
        value = getattr(config, name)
        if value is not None:
            parts.append(f"{name} {value:g}")
    if config.exclude_prompts:
        ngram = f"or {config.prompt_ngram} words in a row" if config.prompt_ngram else "exactly"
        parts.append(f"no caption ({', '.join(config.prompt_columns)}) matching the prompts of "
                     f"{len(config.exclude_prompts)} file(s) {ngram}")  # fmt: skip
    if config.languages is not None:
        parts.append(f"languages {','.join(config.languages)} (confidence {config.language_confidence:g})")
    if config.score_from:
        parts.append(f"scores from {config.score_from}")
    return "; ".join(parts)


SPEC = StageSpec(
    kind="filter",
    config=FilterConfig,
    summary="keep/drop rows by cheap rules (size, aspect, caption, language, eval prompts) and stored scores",
    schema=FILTER_SCHEMA,
    plan=plan,
    one_to_one=True,  # the plan is one task per upstream shard, after its prompt checks
    process=process,
    global_step=global_step,
    global_when=lambda config: config.clip_score_top_fraction is not None,
    finish=finish,
    describe_inputs=describe,
)
