"""The filter rules, evaluated in one fixed order (cheap first) so each removed row names the first rule
it failed, and the expensive checks (language identification) only see rows every cheaper rule kept.

A rule that is not configured removes nothing. Score rules read the joined score stage: a row whose score
row is not `ok`, or whose configured score is null, is removed as `no_score` (never kept or dropped
without a recorded reason), before any threshold is compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curate.filter.prompts import Found, PromptRules, match, prompt_index

# (removed_by value, what removes a row), in evaluation order. `keep_from` is written `keep_from:<stage>`.
RULES: tuple[tuple[str, str], ...] = (
    ("not_ok_upstream", "the image row's status is not `ok` (the filter's `status` keeps the image's)"),
    ("keep_from", "`keep` is false in the `keep_from` stage (written `keep_from:<stage>`)"),
    ("min_side", "the shorter side is below `min_side` pixels"),
    ("aspect_ratio", "longer side / shorter side is above `max_aspect_ratio`"),
    ("caption_words", "fewer than `min_caption_words` or more than `max_caption_words` words"),
    ("caption_chars", "fewer than `min_caption_chars` characters (after stripping whitespace)"),
    ("prompt_exact", "a caption (`prompt_columns`) is, after normalisation, a prompt of `exclude_prompts`"),
    ("prompt_ngram", "a caption shares `prompt_ngram` words in a row with a prompt of `exclude_prompts`"),
    ("language", "the caption's language is not in `languages`, identified with probability >= `language_confidence`"),
    ("no_score", "a score rule is configured but the score row is not `ok` or that score is null"),
    ("clip_score_min", "CLIP image-text cosine below `clip_score_min`"),
    ("aesthetic_min", "aesthetic score below `aesthetic_min`"),
    ("nsfw_max", "NSFW probability above `nsfw_max`"),
    ("watermark_max", "watermark probability above `watermark_max`"),
    ("clip_score_top_fraction", "not in the top `clip_score_top_fraction` by CLIP score of rows every other rule kept"),
)
ORDER = {name: i for i, (name, _) in enumerate(RULES)}
SCORE_COLUMNS = ("clip_score", "aesthetic", "nsfw", "watermark")
# score rule -> (score column, "min" keeps values >= threshold / "max" keeps values <= threshold)
SCORE_RULES = {
    "clip_score_min": ("clip_score", "min"),
    "aesthetic_min": ("aesthetic", "min"),
    "nsfw_max": ("nsfw", "max"),
    "watermark_max": ("watermark", "max"),
}


@dataclass(frozen=True)
class FilterRules:
    """The configured rules as plain values (the filter stage's config builds it); None: not configured."""

    keep_from: str | None = None
    min_side: int | None = None
    max_aspect_ratio: float | None = None
    min_caption_words: int | None = None
    max_caption_words: int | None = None
    min_caption_chars: int | None = None
    prompts: PromptRules | None = None  # exclude_prompts and its settings
    languages: tuple[str, ...] | None = None
    language_confidence: float = 0.5
    score_from: str | None = None
    clip_score_min: float | None = None
    clip_score_top_fraction: float | None = None
    aesthetic_min: float | None = None
    nsfw_max: float | None = None
    watermark_max: float | None = None


def position(removed_by: str) -> int:
    """A removed_by value's place in the order; kept rows ("") come after every rule."""
    if not removed_by:
        return len(RULES)
    return ORDER[removed_by.split(":", 1)[0]]


@dataclass
class Rows:
    """What the rules look at, one entry per row of the image shard (nan where a value is null)."""

    key: list[str]
    image_status: list[str]
    width: np.ndarray
    height: np.ndarray
    caption: list[str | None]
    texts: dict[str, list[str | None]] | None = None  # the prompt rule's columns (default: {"caption": caption})
    kept_by_source: np.ndarray | None = None  # bool, from keep_from
    score_ok: np.ndarray | None = None  # bool: the score stage's row is `ok`
    scores: dict[str, np.ndarray] | None = None  # SCORE_COLUMNS -> float32 (nan when null)


@dataclass
class Decision:
    removed_by: np.ndarray  # object: "" when kept, else the first rule that removed the row
    caption_words: np.ndarray  # int32
    caption_chars: np.ndarray  # int32
    language: list[str | None]  # top language of rows that reached the language rule
    language_prob: np.ndarray  # float32, nan where not identified
    prompts: list[Found | None] | None = None  # the prompt a row matched, for rows that reached the prompt rule

    @property
    def kept(self) -> np.ndarray:
        return self.removed_by == ""


def score_columns_needed(config: FilterRules) -> list[str]:
    """Score columns the configured rules compare (the top fraction compares clip_score)."""
    needed = [SCORE_RULES[rule][0] for rule in SCORE_RULES if getattr(config, rule) is not None]
    if config.clip_score_top_fraction is not None and "clip_score" not in needed:
        needed.insert(0, "clip_score")
    return needed


def _words(caption: str | None) -> int:
    return len(caption.split()) if caption else 0


def evaluate(config: FilterRules, rows: Rows) -> Decision:
    """Every rule except the top fraction (which needs all shards: `top_fraction`), in RULES order."""
    n = len(rows.key)
    removed = np.full(n, "", dtype=object)

    def apply(rule: str, fails: np.ndarray) -> None:
        removed[(removed == "") & fails] = rule

    apply("not_ok_upstream", np.array([s != "ok" for s in rows.image_status], bool))
    if config.keep_from is not None:
        assert rows.kept_by_source is not None
        apply(f"keep_from:{config.keep_from}", ~rows.kept_by_source)
    short = np.fmin(rows.width, rows.height)
    long = np.fmax(rows.width, rows.height)
    if config.min_side is not None:
        apply("min_side", ~(short >= config.min_side))  # unknown sizes (nan) fail
    if config.max_aspect_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            apply("aspect_ratio", ~(long / short <= config.max_aspect_ratio))
    words = np.array([_words(c) for c in rows.caption], np.int32)
    chars = np.array([len(c.strip()) if c else 0 for c in rows.caption], np.int32)
    lo, hi = config.min_caption_words, config.max_caption_words
    if lo is not None or hi is not None:
        apply("caption_words", (words < (lo or 0)) | (words > (hi if hi is not None else np.iinfo(np.int32).max)))
    if config.min_caption_chars is not None:
        apply("caption_chars", chars < config.min_caption_chars)
    found: list[Found | None] | None = None
    if config.prompts is not None:
        reach = np.flatnonzero(removed == "").tolist()
        texts = rows.texts if rows.texts is not None else {"caption": rows.caption}
        hits = match(prompt_index(config.prompts), {name: [c[i] for i in reach] for name, c in texts.items()})
        found = [None] * n
        for i, hit in zip(reach, hits, strict=True):
            found[i] = hit
        apply("prompt_exact", np.array([f is not None and f.kind == "exact" for f in found], bool))
        apply("prompt_ngram", np.array([f is not None and f.kind == "ngram" for f in found], bool))
    languages: list[str | None] = [None] * n
    probs = np.full(n, np.nan, np.float32)
    if config.languages is not None:
        from curate.filter.language import identify

        reach = np.flatnonzero(removed == "")
        found, found_probs = identify([rows.caption[i] for i in reach])
        for i, language in zip(reach, found, strict=True):
            languages[i] = language
        probs[reach] = found_probs
        allowed = set(config.languages)
        other = np.array([lang is not None and lang not in allowed for lang in languages], bool)
        apply("language", other & (probs >= config.language_confidence))
    needed = score_columns_needed(config)
    if needed:
        assert rows.scores is not None and rows.score_ok is not None
        missing = ~rows.score_ok
        for column in needed:
            missing |= np.isnan(rows.scores[column])
        apply("no_score", missing)
        for rule, (column, kind) in SCORE_RULES.items():
            threshold = getattr(config, rule)
            if threshold is None:
                continue
            value = rows.scores[column].astype(np.float64)  # the stored float32, widened exactly: no rounding of t
            apply(rule, value < threshold if kind == "min" else value > threshold)
    return Decision(removed, words, chars, languages, probs, found)


def apply_top_fraction(decision: Decision, keys: list[str], clip: np.ndarray, cutoff: tuple[float, str] | None) -> None:
    """Remove kept rows below the global cutoff: kept iff (score, key) ranks at or above (cutoff score, cutoff
    key) in the order of descending score, then ascending key (ties at the cutoff are broken by key, so exactly
    the computed number of rows is kept over all shards)."""
    if cutoff is None:
        return
    score, key = np.float32(cutoff[0]), cutoff[1]
    value = clip.astype(np.float32)
    for i in np.flatnonzero(decision.kept):
        if value[i] < score or (value[i] == score and keys[i] > key):
            decision.removed_by[i] = "clip_score_top_fraction"
