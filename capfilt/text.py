"""Text normalisation shared by training and the filter (BLIP's `pre_caption`)."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lower-case, drop some punctuation, collapse spaces, cap the words."""
    text = _PUNCT.sub(" ", text.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])
