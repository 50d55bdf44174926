"""Caption language identification with py3langid (langid.py's model, shipped inside the wheel: offline,
deterministic, ~20 µs a caption on one core). Optional: `pip install 'curate[lang]'`.

fastText's lid.176 is more accurate on short text but its model is a separate download; langid's naive
Bayes model is in the package, so the rule works and is tested offline. Short captions ("Vintage 1950s
Dress") are often identified with low confidence: the rule only removes captions confidently in another
language (docs/filters.md).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

INSTALL_HINT = "the language rule needs py3langid: pip install 'curate[lang]'"


@functools.lru_cache(maxsize=1)
def identifier() -> Any:
    """The identifier with probabilities normalised over all 97 languages, loaded once per process."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> set[str]:
    """ISO 639-1 codes the model can return; raises ImportError (with the install hint) without py3langid."""
    return set(identifier().labels)


def identify(texts: list[str | None]) -> tuple[list[str | None], np.ndarray]:
    """(top language, its probability) per text; None and nan for a missing text."""
    ident = identifier()
    languages: list[str | None] = []
    probs = np.full(len(texts), np.nan, np.float32)
    for i, text in enumerate(texts):
        if text is None:
            languages.append(None)
            continue
        language, prob = ident.classify(text)
        languages.append(language)
        probs[i] = prob
    return languages, probs
