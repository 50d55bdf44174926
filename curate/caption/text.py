"""Clean VLM captions the way text-to-image trainers expect; the raw text is always kept beside.

Rules, in order (each is a plain function so they can be tested and reused):
1. whitespace: control characters and U+FFFD dropped, runs of spaces/newlines become one space;
2. wrappers: a chat preamble ("Sure! Here is a description of the image:"), a leading `Caption:` label,
   Markdown emphasis/headers and surrounding quotes removed;
3. stock openings ("The image shows", "In this picture, we can see", "This is an image of", ...)
   removed and the next letter capitalised;
4. a last sentence cut off by `max_new_tokens` is dropped when at least one complete sentence precedes it.
"""

from __future__ import annotations

import re

_SUBJECT = r"(?:image|picture|photo|photograph|painting|illustration|drawing|artwork|scene|screenshot|render)"
_VERB = (
    r"(?:shows|depicts|features|displays|presents|captures|portrays|illustrates|showcases|contains|"
    r"is showing|is depicting|appears to show|appears to depict)"
)
_PREFIXES = [
    # "The image shows", "This photo depicts", "The picture appears to show"
    re.compile(rf"^(?:the|this|the given|the provided) {_SUBJECT} {_VERB}\s*:?\s*", re.I),
    # "In this image, we can see", "In the picture there is" (the verb stays when it carries the subject)
    re.compile(rf"^in (?:the|this) {_SUBJECT},?\s*(?:we can see|you can see|we see|there (?:is|are)\b)?\s*", re.I),
    # "This is an image of", "This image is a photograph of" -> "A photograph of"
    re.compile(rf"^(?:this|it) is an? {_SUBJECT} of\s*", re.I),
    re.compile(rf"^(?:the|this) {_SUBJECT} is (?=an? )", re.I),
]
# chat-style preambles: "Sure! Here is a detailed description of the image:", "Certainly."
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok)[!,.]\s*)?"
    r"(?:here(?:'s| is) (?:a |an |the |my )?(?:[\w-]+ )?(?:description|caption)\b[^:\n]*:\s*)?",
    re.I,
)
_LABEL = re.compile(r"^(?:\*\*|#+\s*)?(?:caption|description)\s*:\s*(?:\*\*)?\s*", re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


def normalize_whitespace(text: str) -> str:
    text = _CONTROL.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def strip_wrappers(text: str) -> str:
    stripped = _PREAMBLE.sub("", text, count=1)
    if stripped and stripped != text:
        text = stripped[0].upper() + stripped[1:]
    text = _LABEL.sub("", text)
    text = re.sub(r"^#+\s*", "", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def strip_stock_prefix(text: str) -> str:
    for pattern in _PREFIXES:
        stripped = pattern.sub("", text, count=1)
        if stripped != text and stripped:
            return stripped[0].upper() + stripped[1:]
    return text


def drop_cut_off_sentence(text: str) -> str:
    """Keep up to the last complete sentence; a caption that is a single unfinished sentence is kept whole."""
    if not text or _SENTENCE_END.search(text[-2:] if len(text) > 1 else text):
        return text
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return text
    return text[: ends[-1].end()].strip()


def clean_caption(text: str, truncated: bool) -> str:
    """The cleaned caption. ``truncated``: generation stopped at max_new_tokens (no end-of-sequence token)."""
    text = normalize_whitespace(text)
    text = strip_wrappers(text)
    text = strip_stock_prefix(text)
    if truncated:
        text = drop_cut_off_sentence(text)
    return text
