"""Text normalisation shared by training and the filter (BLIP's `pre_caption`)."""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lower-case, drop some punctuation, collapse spaces, cap the words."""
    text = _PUNCT.sub(" ", text.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


_INVISIBLE = ("Cc", "Cf")  # control characters (NUL, ...) and format ones (zero-width space, BOM, ...)


def is_blank(text: str | None) -> bool:
    """True for None and for a text with nothing to read: only white space, control or format
    characters (a zero-width space, a BOM, NULs), which `str.strip` leaves in place."""
    return text is None or all(c.isspace() or unicodedata.category(c) in _INVISIBLE for c in text)
