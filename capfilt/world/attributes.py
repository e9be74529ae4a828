"""Reading a caption back into scene attributes, and scoring it against a scene's truth.

A scene's *key attributes* are, for each object kind (objects of one colour and shape), its
colour, its shape and its count: "two red circles and a blue star" has six. The background
colour counts too when a caption names it (most do), so a wrong background is a contradiction
but leaving it out is not. Sizes and positions are parsed but not scored.

`attribute_accuracy` pairs the caption's object mentions with the scene's kinds so that the most
attributes agree, then divides the agreeing attributes by the attributes at stake:
3 x max(kinds, mentions) (+1 when the caption names a background). A mention of an object that
is not there therefore costs as much as a kind left out. Human captions of a scene score 1.0;
a text with one attribute changed scores (3k - 1) / 3k or (3k) / (3k + 1).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from .scene import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, object_kinds
from .texts import PATTERN_WORDS, SIZE_WORDS, plural

_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_COUNTS.update({str(n): n for n in range(1, 10)})
_COLOURS = {c: c for c in (*OBJECT_COLOURS, *BACKGROUND_COLOURS)} | {"grey": "gray"}
_SIZES = {word: size for size, words in SIZE_WORDS.items() for word in words}
_SHAPES = {s: (s, False) for s in SHAPES} | {plural(s): (s, True) for s in SHAPES}
_PATTERNS = {w for words in PATTERN_WORDS.values() for w in words}
_POSITION_WORDS = {
    "top": "top",
    "upper": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "left": "left",
    "right": "right",
    "centre": "centre",
    "center": "centre",
    "middle": "centre",
}
_POSITION_GLUE = {"in", "at", "on", "near", "the", "corner"}
_MAX_MATCHED = 12
_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Mention:
    """One object phrase in a caption; None where the caption does not say."""

    shape: str
    colour: str | None
    count: int | None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption states: its object mentions in order, and the background colour if named."""

    objects: tuple[Mention, ...]
    background: str | None


@dataclass(frozen=True)
class AttributeScore:
    """Agreeing attributes out of those at stake (see the module docstring)."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _mention(tokens: list[str], i: int) -> Mention:
    """Read the object phrase around the shape word tokens[i]."""
    shape, is_plural = _SHAPES[tokens[i]]
    colour = size = count = None
    j = i - 1
    while j >= 0:  # modifiers before the noun, up to and including the count word
        word = tokens[j]
        if word in _COLOURS and colour is None:
            colour = _COLOURS[word]
        elif word in _SIZES and size is None:
            size = _SIZES[word]
        elif word in _COUNTS:
            count = _COUNTS[word]
            break
        elif word == "of" and j > 0 and tokens[j - 1] == "pair":
            count = 2
            break
        else:
            break
        j -= 1
    if count is None and not is_plural:
        count = 1  # "red circle" with no article still means one
    found = []
    for word in tokens[i + 1 : i + 6]:  # "in the top left corner", "on the left"
        if word in _POSITION_WORDS:
            found.append(_POSITION_WORDS[word])
        elif word not in _POSITION_GLUE:
            break
    vertical = next((w for w in found if w in ("top", "bottom")), None)
    horizontal = next((w for w in found if w in ("left", "right")), None)
    position = " ".join(w for w in (vertical, horizontal) if w) or ("centre" if "centre" in found else None)
    return Mention(shape, colour, count, size, position)


def parse_caption(caption: str) -> ParsedCaption:
    """Read the object mentions and the background colour from a caption in the world's vocabulary."""
    tokens = _TOKEN.findall(caption.lower())
    objects = tuple(_mention(tokens, i) for i, word in enumerate(tokens) if word in _SHAPES)
    background = None
    for i, word in enumerate(tokens):
        if word != "background":
            continue
        for before in reversed(tokens[max(0, i - 3) : i]):  # "a striped teal background"
            if before in _COLOURS:
                background = _COLOURS[before]
                break
            if before not in _PATTERNS:
                break
        break
    return ParsedCaption(objects, background)


def scene_attributes(content: dict[str, Any]) -> frozenset[tuple[Any, ...]]:
    """The scene's key attributes: ("object", colour, shape, count) per kind, ("background", colour)."""
    kinds = {("object", k.colour, k.shape, k.count) for k in object_kinds(content)}
    return frozenset(kinds | {("background", content["background"]["colour"])})


def caption_attributes(caption: str) -> frozenset[tuple[Any, ...]]:
    """The same form read from a caption (None for what it leaves unsaid)."""
    parsed = parse_caption(caption)
    found: set[tuple[Any, ...]] = {("object", m.colour, m.shape, m.count) for m in parsed.objects}
    if parsed.background is not None:
        found.add(("background", parsed.background))
    return frozenset(found)


def score_caption(caption: str, content: dict[str, Any]) -> AttributeScore:
    """Count a caption's agreeing attributes against the scene (the module docstring defines it)."""
    parsed = parse_caption(caption)
    truth = [(k.colour, k.shape, k.count) for k in object_kinds(content)]
    stated = [(m.colour, m.shape, m.count) for m in parsed.objects]

    def agree(t: tuple, s: tuple) -> int:
        return sum(a == b for a, b in zip(t, s))

    best = 0
    if stated:
        candidates = stated[:_MAX_MATCHED]  # bounds the search on degenerate, repetitive captions
        small, large = (truth, candidates) if len(truth) <= len(candidates) else (candidates, truth)
        for chosen in itertools.permutations(range(len(large)), len(small)):
            best = max(best, sum(agree(small[a], large[b]) for a, b in enumerate(chosen)))
    total = 3 * max(len(truth), len(stated))
    if parsed.background is not None:
        total += 1
        best += parsed.background == content["background"]["colour"]
    return AttributeScore(best, total)


def attribute_accuracy(caption: str, content: dict[str, Any]) -> float:
    """Fraction of the scene's key attributes a caption states right, contradictions counted against it."""
    return score_caption(caption, content).accuracy
