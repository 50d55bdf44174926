"""Prompt decontamination: remove training rows whose caption is an evaluation prompt, or shares a run of
``n`` words with one (the filter's `exclude_prompts`; docs/filters.md#prompt-decontamination).

Texts are compared after normalisation: Unicode NFKC, case folding, every character that is not a letter or
digit turned into a space, whitespace collapsed. A caption matches a prompt when

- *exact*: its normalised words equal the prompt's, or
- *n-gram*: it contains ``n`` consecutive words that also follow each other in the prompt. Only prompts of at
  least ``n`` words take part (a short prompt matches only exactly), and a run whose every word lies inside
  an allow-listed template phrase of the prompt ("a photo of", "trending on artstation") or is a function word
  ("a", "of") is not indexed, so template phrases never make a match by themselves.

The prompts become a compact index, built once per worker process (``prompt_index`` keeps the last one):
sorted 64-bit hashes of every prompt's normalised text and of its indexable n-grams, each with the id of the
first prompt that has it (12 bytes per entry), plus the prompts as written (their UTF-8 bytes and an 8-byte
offset) and their line numbers (4 bytes): text + 24 + 12 x (words - n + 1) bytes per prompt, measured 147 B
for prompts of 8-14 words, 410 B for 10-40 words (`bench/prompts.py`). A row's
n-grams are hashed with numpy (a polynomial over per-word BLAKE2b hashes) and looked up with one
``searchsorted``: the cost per row grows with its words and log(prompts), never with a scan over the prompts.
A hash hit is confirmed on the words themselves, so a hash collision can never remove a row.

Considered: datasketch's MinHash LSH (approximate, for Jaccard similarity of shingle sets: not the exact "same
n words in a row" rule here), datatrove's n-gram decontamination filter (the same idea for LLM benchmarks, built
on datatrove's pipeline and readers, not a function we can call on a shard) and pyahocorasick (an automaton over
the prompts' n-grams: exact, but a C extension that holds Python objects per n-gram, tens of bytes more per
entry than a sorted uint64 array).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage

# Phrases of captioning and prompt templates, as in CLIP's prompt templates, captioners' openings and the tags
# of text-to-image prompt sets (DiffusionDB, Lexica). Normalised like the texts. `prompt_allow` replaces them.
TEMPLATE_PHRASES: tuple[str, ...] = (
    "a photo of",
    "a photograph of",
    "a picture of",
    "an image of",
    "a close up of",
    "a closeup of",
    "a black and white photo of",
    "a painting of",
    "a drawing of",
    "an illustration of",
    "a rendering of",
    "the image shows",
    "this image shows",
    "in this image",
    "there is a",
    "in the style of",
    "highly detailed",
    "digital painting",
    "trending on artstation",
    "artstation",
    "concept art",
    "sharp focus",
    "octane render",
    "unreal engine",
    "high resolution",
    "high quality",
    "best quality",
    "masterpiece",
    "4k",
    "8k",
)

# Words that carry no content of their own: a run made only of these and template-phrase words is not indexed
# either ("a photo of" + "a" is "a photo of a").
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for with and or by from as is are was be this that these those it its".split()  # noqa: SIM905
)
_SEPARATORS = re.compile(r"[\W_]+")  # anything but letters and digits (Unicode-aware)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: every power is invertible mod 2^64


def words(text: str | None) -> list[str]:
    """The normalised words of a text: NFKC, case folded (and NFKC again, as Unicode's NFKC_Casefold), split on
    every run of characters that are not letters or digits."""
    if not text:
        return []
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _SEPARATORS.sub(" ", folded).split()


@dataclass(frozen=True)
class PromptFile:
    """One file of prompts: text (one prompt a line) or Parquet (``column``)."""

    uri: str
    column: str | None = None


@dataclass(frozen=True)
class PromptRules:
    """The prompt rule's settings as plain values (the filter stage's config builds it)."""

    files: tuple[PromptFile, ...]
    ngram: int = 8  # 0: exact matches only
    allow: tuple[str, ...] = TEMPLATE_PHRASES


@dataclass(frozen=True)
class Match:
    prompt: int  # prompt id in the index
    kind: str  # "exact" or "ngram"
    words: str  # the shared normalised words


@dataclass(frozen=True)
class Found:
    """A row's match as the filter records it."""

    column: str  # the caption column that matched
    kind: str  # "exact" or "ngram"
    words: str  # the shared normalised words (the whole normalised text for an exact match)
    prompt: str  # the prompt as written in its file
    file: str  # the prompt file's URI
    line: int  # its line (text file) or row (Parquet), 1-based


def read_prompts(file: PromptFile) -> tuple[list[str], list[int]]:
    """A file's prompts (stripped, blank ones left out) and their 1-based line (text) or row (Parquet)."""
    if file.column is None:
        lines = storage.read_bytes(file.uri).decode("utf-8").splitlines()
        found = [(t.strip(), i + 1) for i, t in enumerate(lines)]
    else:
        column = storage.read_parquet(file.uri, columns=[file.column])[file.column]
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ValueError(f"{file.uri}: column {file.column!r} holds {column.type}, not text")
        found = [((t or "").strip(), i + 1) for i, t in enumerate(column.to_pylist())]
    found = [(t, line) for t, line in found if t]
    return [t for t, _ in found], [line for _, line in found]


def file_problem(file: PromptFile) -> str | None:
    """Why a prompt file cannot be read (reads only a Parquet footer), or None."""
    if not storage.exists(file.uri):
        return f"no such file: {file.uri}"
    if file.column is None:
        return None
    try:
        schema = storage.parquet_file(file.uri).schema_arrow
    except Exception as e:
        return f"cannot read {file.uri} as Parquet: {e}"
    if file.column not in schema.names:
        return f"{file.uri} has no column {file.column!r} (columns: {', '.join(schema.names)})"
    kind = schema.field(file.column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"{file.uri}: column {file.column!r} holds {kind}, not text"
    return None


# ----------------------------------------------------------------------------------------------------
# hashing


def _word_hashes(texts: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Every word of every text as a uint64 (BLAKE2b of its UTF-8, each distinct word hashed once), flat, and
    the offsets where each text starts (len(texts) + 1)."""
    vocabulary: dict[str, int] = {}
    ids = [vocabulary.setdefault(w, len(vocabulary)) for t in texts for w in t]
    table = np.array(
        [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in vocabulary] or [0],
        np.uint64,
    )
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    return table[np.array(ids, np.int64)], offsets


def _ngram_hashes(flat: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The hash of every run of ``n`` words inside one text (a polynomial in an odd constant over the word
    hashes, mod 2^64) and where it starts in ``flat``."""
    m = len(flat) - n + 1
    if n <= 0 or m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    grams = np.zeros(m, np.uint64)
    for j in range(n):
        grams = grams * _MULTIPLIER + flat[j : j + m]
    text_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[:m]
    inside = np.flatnonzero(np.arange(m) + n <= offsets[1:][text_of])
    return grams[inside], inside


def _text_hash(text_words: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(text_words).encode(), digest_size=8).digest(), "little")


def _covered(text_words: list[str], allow: list[list[str]]) -> np.ndarray:
    """Which words of a prompt carry no content: inside an occurrence of an allow-listed phrase, or a function
    word."""
    mask = np.array([w in FUNCTION_WORDS for w in text_words], bool)
    joined = f" {' '.join(text_words)} "
    for phrase in allow:
        if f" {' '.join(phrase)} " not in joined:  # a substring test first: most prompts hold no phrase
            continue
        k = len(phrase)
        for start in range(len(text_words) - k + 1):
            if text_words[start : start + k] == phrase:
                mask[start : start + k] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# the index


@dataclass
class PromptIndex:
    ngram: int
    allow: list[list[str]]
    files: tuple[PromptFile, ...]
    file_starts: np.ndarray  # int64: first prompt id of each file, then the total
    texts: pa.LargeStringArray  # the prompts as written (stripped)
    lines: np.ndarray  # uint32: line (text) or row (Parquet), 1-based
    exact: np.ndarray  # uint64, sorted: hash of each prompt's normalised words
    exact_ids: np.ndarray  # uint32: the first prompt with that hash
    grams: np.ndarray  # uint64, sorted: hash of each indexable n-gram
    gram_ids: np.ndarray  # uint32: the first prompt with that n-gram
    digest: str  # SHA-256 of the settings and the prompts: every shard records the one it used

    @property
    def nbytes(self) -> int:
        arrays = (self.file_starts, self.lines, self.exact, self.exact_ids, self.grams, self.gram_ids)
        return self.texts.nbytes + sum(a.nbytes for a in arrays)

    def __len__(self) -> int:
        return len(self.lines)

    def prompt(self, i: int) -> str:
        return self.texts[i].as_py()

    def file_of(self, i: int) -> PromptFile:
        return self.files[int(np.searchsorted(self.file_starts, i, side="right")) - 1]

    def indexable(self, prompt: list[str]) -> set[tuple[str, ...]]:
        """A prompt's n-grams that are in the index (not every word inside a template phrase)."""
        n = self.ngram
        if n <= 0 or len(prompt) < n:
            return set()
        covered = _covered(prompt, self.allow)
        return {tuple(prompt[s : s + n]) for s in range(len(prompt) - n + 1) if not covered[s : s + n].all()}


def _sorted_first(hashes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique hashes, sorted, each with its smallest id."""
    order = np.lexsort((ids, hashes))
    hashes, ids = hashes[order], ids[order]
    first = np.r_[True, hashes[1:] != hashes[:-1]] if len(hashes) else np.zeros(0, bool)
    return hashes[first], ids[first].astype(np.uint32)


BUILD_CHUNK = 65_536  # prompts normalised at a time while building: the Python objects of one chunk at most


def _index_chunk(
    texts: list[str], first: int, n: int, allow: list[list[str]], digest: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hashes of one chunk of prompts (ids from ``first``): (exact hashes, their ids, n-gram hashes, their ids)."""
    normal = [words(t) for t in texts]
    for w in normal:
        digest.update(" ".join(w).encode() + b"\n")
    covered = [_covered(w, allow) for w in normal]
    useful = [i for i, c in enumerate(covered) if not c.all()]  # an empty or content-free prompt matches nothing
    exact = np.array([_text_hash(normal[i]) for i in useful], np.uint64)
    long_ids = [i for i in useful if n > 0 and len(normal[i]) >= n]
    flat, offsets = _word_hashes([normal[i] for i in long_ids])
    grams, at = _ngram_hashes(flat, offsets, n)
    owner = np.repeat(np.array(long_ids, np.int64), np.diff(offsets))[at] if len(at) else np.zeros(0, np.int64)
    if len(at):  # drop n-grams without content: a run of n covered words
        run = np.concatenate([[0], np.cumsum(np.concatenate([covered[i] for i in long_ids]))])
        keep = (run[at + n] - run[at]) < n
        grams, owner = grams[keep], owner[keep]
    return exact, np.array(useful, np.int64) + first, grams, owner + first


def build_index(rules: PromptRules) -> PromptIndex:
    """Read every prompt file and index it, BUILD_CHUNK prompts at a time (see the module docstring for what is
    held per prompt)."""
    allow = [w for w in (words(a) for a in rules.allow) if w]
    digest = hashlib.sha256(repr((rules.ngram, allow)).encode())
    texts: list[pa.Array] = []
    lines: list[np.ndarray] = []
    parts: list[tuple[np.ndarray, ...]] = []
    starts = [0]
    for file in rules.files:
        found, where = read_prompts(file)
        if not found:
            raise ValueError(f"{file.uri}: no prompts in it (every line or value is empty)")
        for start in range(0, len(found), BUILD_CHUNK):
            chunk = found[start : start + BUILD_CHUNK]
            parts.append(_index_chunk(chunk, starts[-1] + start, rules.ngram, allow, digest))
        texts.append(pa.array(found, pa.large_string()))
        lines.append(np.array(where, np.uint32))
        starts.append(starts[-1] + len(found))
        del found, where
    if starts[-1] >= 2**32:
        raise ValueError(f"{starts[-1]:,} prompts: at most 2^32 - 1 fit the index's uint32 ids")
    exact, exact_id = _sorted_first(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    grams, gram_id = _sorted_first(np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))
    return PromptIndex(
        ngram=rules.ngram,
        allow=allow,
        files=rules.files,
        file_starts=np.array(starts, np.int64),
        texts=pa.concat_arrays(texts),
        lines=np.concatenate(lines),
        exact=exact,
        exact_ids=exact_id,
        grams=grams,
        gram_ids=gram_id,
        digest=digest.hexdigest(),
    )


_CACHE: dict[PromptRules, PromptIndex] = {}


def prompt_index(rules: PromptRules) -> PromptIndex:
    """The index for these settings, built once per worker process (Ray reuses a worker for the stage's next
    shard): only the last one is kept, so a process holds one index at most."""
    if rules not in _CACHE:
        _CACHE.clear()
        _CACHE[rules] = build_index(rules)
    return _CACHE[rules]


# ----------------------------------------------------------------------------------------------------
# matching


def _lookup(table: np.ndarray, ids: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """The prompt id of each hash found in ``table`` (-1 where absent)."""
    if not len(table) or not len(hashes):
        return np.full(len(hashes), -1, np.int64)
    at = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
    return np.where(table[at] == hashes, ids[at].astype(np.int64), -1)


def match_exact(index: PromptIndex, texts: list[list[str]]) -> list[Match | None]:
    """Texts whose normalised words are a prompt's (confirmed on the words)."""
    out: list[Match | None] = [None] * len(texts)
    hashes = np.array([_text_hash(t) if t else 0 for t in texts], np.uint64)
    found = _lookup(index.exact, index.exact_ids, hashes)
    for row in np.flatnonzero(found >= 0).tolist():
        prompt = int(found[row])
        if texts[row] and words(index.prompt(prompt)) == texts[row]:
            out[row] = Match(prompt, "exact", " ".join(texts[row]))
    return out


def match_ngrams(index: PromptIndex, texts: list[list[str]]) -> list[Match | None]:
    """Texts with ``n`` words in a row that a prompt has (its first such run; confirmed on the words)."""
    out: list[Match | None] = [None] * len(texts)
    n = index.ngram
    if n <= 0 or not len(index.grams):
        return out
    flat, offsets = _word_hashes(texts)
    grams, at = _ngram_hashes(flat, offsets, n)
    found = _lookup(index.grams, index.gram_ids, grams)
    hits = np.flatnonzero(found >= 0)
    rows = np.searchsorted(offsets, at[hits], side="right") - 1
    for hit, row in zip(hits.tolist(), rows.tolist(), strict=True):
        if out[row] is not None:
            continue
        start = int(at[hit]) - int(offsets[row])
        gram = tuple(texts[row][start : start + n])
        prompt = int(found[hit])
        if gram in index.indexable(words(index.prompt(prompt))):
            out[row] = Match(prompt, "ngram", " ".join(gram))
    return out


def match(index: PromptIndex, columns: dict[str, list[str | None]]) -> list[Found | None]:
    """Each row's first match: exact matches in any column first, then n-grams, each in the order of
    ``columns``; None where nothing matches."""
    normal = {name: [words(t) for t in texts] for name, texts in columns.items()}
    n_rows = len(next(iter(columns.values()))) if columns else 0
    out: list[Found | None] = [None] * n_rows
    for finder in (match_exact, match_ngrams):
        for name, texts in normal.items():
            todo = [i for i in range(n_rows) if out[i] is None and texts[i]]
            for i, found in zip(todo, finder(index, [texts[i] for i in todo]) if todo else [], strict=True):
                if found is not None:
                    file = index.file_of(found.prompt)
                    line = int(index.lines[found.prompt])
                    out[i] = Found(name, found.kind, found.words, index.prompt(found.prompt), file.uri, line)
    return out
