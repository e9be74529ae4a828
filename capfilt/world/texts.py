"""Texts of the built-in web world: human-style captions of a scene, web texts, and web noise.

Every caption the grammar writes states, for each object kind, its count, colour and shape
("two red circles"); most also name the background colour, and some add sizes, positions and the
background's pattern. The vocabulary is small and fixed, so `attributes.parse_caption` can read
any of these phrasings back. Noise makers return texts of the known noise types (`NOISE_TYPES`).
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Any

from .scene import OBJECT_COLOURS, SHAPES, ObjectKind, object_kinds

NOISE_TYPES = ("swapped", "boilerplate", "filename", "wrong_attribute", "empty_or_short")

COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("a", "a", "one", "a single"),
    2: ("two", "two", "a pair of"),
    3: ("three",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PATTERN_WORDS = {
    "solid": ("plain", "solid"),
    "gradient": ("gradient", "shaded"),
    "noise": ("textured", "grainy", "speckled"),
    "stripes": ("striped",),
}
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the left"),
    "centre": ("in the centre", "in the middle", "in the center"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
# (template, starts with the objects): {objs} the object phrases, {bg} "a gray background",
# {be} "is"/"are" agreeing with the first object phrase.
TEMPLATES: tuple[tuple[str, bool], ...] = (
    ("{objs} on {bg}", True),
    ("{objs} on {bg}", True),
    ("{objs} against {bg}", True),
    ("{objs} over {bg}", True),
    ("{objs} in front of {bg}", True),
    ("{objs} drawn on {bg}", True),
    ("{bg} with {objs}", False),
    ("there {be} {objs} on {bg}", False),
    ("a picture of {objs} on {bg}", False),
    ("an image of {objs} against {bg}", False),
    ("a drawing of {objs} on {bg}", False),
    ("{objs}", True),
)
WEB_PREFIXES = ("stock photo of ", "vector illustration of ", "clipart: ", "wallpaper with ", "poster of ")
WEB_SUFFIXES = (
    " - stock image",
    " | royalty free vector",
    " #art #design",
    " #abstract #geometry",
    " stock illustration",
    " (free download)",
    " - wall art print",
    " | high resolution",
)
BOILERPLATE = (
    "click here to enlarge",
    "image",
    "photo {n}",
    "view larger image",
    "thumbnail",
    "no description available",
    "untitled",
    "product photo",
    "stock photo",
    "image {n} of {m}",
    "gallery image {n}",
    "placeholder",
    "see more",
    "featured image",
    "loading...",
    "copyright all rights reserved",
    "download now",
    "photo by staff",
    "royalty free stock image",
    "enlarge",
)
FILENAMES = (
    "IMG_{d4}.JPG",
    "dsc{d5}.jpg",
    "DSC_{d4}.JPG",
    "banner_final_v{d1}.png",
    "screenshot_{d4}.png",
    "image ({d1}).png",
    "photo-{d6}.jpeg",
    "untitled-{d1}.png",
    "header-bg@2x.png",
    "{hex}.jpg",
    "upload_{hex}.webp",
    "thumb_{d4}_small.jpg",
)
SHORT_WORDS = (
    "shapes",
    "art",
    "abstract",
    "design",
    "pattern",
    "graphic",
    "wallpaper",
    "geometry",
    "img",
    "pic",
)

MAX_OBJECT_WORDS = 15  # object phrases longer than this lose their sizes and positions
_A_VOWEL = re.compile(r"\ba (?=[aeiou])")


def plural(shape: str) -> str:
    """`crosses`, `circles`, ..."""
    return shape + ("es" if shape.endswith("s") else "s")


def _object_phrase(kind: ObjectKind, rng: random.Random, size_p: float, position_p: float) -> str:
    words = [rng.choice(COUNT_WORDS[kind.count])]
    if rng.random() < size_p:
        words.append(rng.choice(SIZE_WORDS[kind.size]))
    words += [kind.colour, kind.shape if kind.count == 1 else plural(kind.shape)]
    if kind.position is not None and rng.random() < position_p:
        words.append(rng.choice(POSITION_PHRASES[kind.position]))
    return " ".join(words)


def _join(phrases: list[str], rng: random.Random) -> str:
    if len(phrases) == 1:
        return phrases[0]
    comma = "," if len(phrases) > 2 and rng.random() < 0.3 else ""  # the Oxford comma, sometimes
    return ", ".join(phrases[:-1]) + f"{comma} and {phrases[-1]}"


def _background_phrase(background: dict[str, Any], rng: random.Random) -> str:
    colour = (
        background["colour"]
        if rng.random() < 0.85
        else {"gray": "grey"}.get(background["colour"], background["colour"])
    )
    pattern = rng.choice(PATTERN_WORDS[background["pattern"]])
    words = rng.choice(([colour], [pattern, colour], [colour, pattern]))
    return " ".join(["a", *words, "background"])


def describe(
    kinds: list[ObjectKind],
    background: dict[str, Any],
    rng: random.Random,
    *,
    objects_first: bool = False,
    with_background: float = 0.92,
) -> str:
    """One lower-case phrasing of a scene (given as object kinds and a background record)."""
    kinds = list(kinds)
    if len(kinds) > 1 and rng.random() < 0.3:
        rng.shuffle(kinds)
    # (size, position) mention rates; fewer extras for three kinds keeps captions short
    rates = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.6), (0.6, 0.6), (1.0, 1.0))
    size_p, position_p = rng.choice(rates if len(kinds) < 3 else rates[:3])
    objs = _join([_object_phrase(k, rng, size_p, position_p) for k in kinds], rng)
    if len(objs.split()) > MAX_OBJECT_WORDS:  # captioners decode ~30 tokens: drop sizes and positions
        objs = _join([_object_phrase(k, rng, 0.0, 0.0) for k in kinds], rng)
    if rng.random() >= with_background:
        template = "{objs}"
    else:
        choices = [t for t, first in TEMPLATES[:-1] if first or not objects_first]
        template = rng.choice(choices)
    text = template.format(
        objs=objs, bg=_background_phrase(background, rng), be="is" if kinds[0].count == 1 else "are"
    )
    return _A_VOWEL.sub("an ", text)


def _human_style(text: str, rng: random.Random) -> str:
    """People capitalise and end with a full stop about half the time."""
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def canonical_caption(content: dict[str, Any]) -> str:
    """The one plain phrasing of a scene: every kind's count, colour and shape, and the background colour."""
    phrases = []
    for kind in object_kinds(content):
        count = {1: "a", 2: "two", 3: "three"}[kind.count]
        phrases.append(f"{count} {kind.colour} {kind.shape if kind.count == 1 else plural(kind.shape)}")
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
    return _A_VOWEL.sub("an ", f"{objs} on a {content['background']['colour']} background")


def human_captions(content: dict[str, Any], rng: random.Random, k: int) -> list[str]:
    """`k` distinct human-style captions of a scene (fewer only if the grammar runs out)."""
    kinds = object_kinds(content)
    captions: list[str] = []
    for _ in range(20 * k):
        text = _human_style(describe(kinds, content["background"], rng), rng)
        if text.lower().rstrip(".") not in {c.lower().rstrip(".") for c in captions}:
            captions.append(text)
        if len(captions) == k:
            break
    return captions


def web_text(kinds: list[ObjectKind], background: dict[str, Any], rng: random.Random) -> str:
    """A web text that describes the given kinds: a phrasing, sometimes with stock-site words around it."""
    roll = rng.random()
    if roll < 0.2:
        text = rng.choice(WEB_PREFIXES) + describe(kinds, background, rng, objects_first=True)
    elif roll < 0.4:
        text = describe(kinds, background, rng) + rng.choice(WEB_SUFFIXES)
    else:
        text = describe(kinds, background, rng)
    if rng.random() < 0.1:
        return text.title()
    return _human_style(text, rng)


def boilerplate(rng: random.Random) -> str:
    """Alt-text that says nothing about the image."""
    n = rng.randint(1, 12)
    return rng.choice(BOILERPLATE).format(n=n, m=n + rng.randint(0, 20))


def filename(rng: random.Random) -> str:
    """A file name used as alt-text."""
    return rng.choice(FILENAMES).format(
        d1=rng.randint(1, 9),
        d4=f"{rng.randint(0, 9999):04d}",
        d5=f"{rng.randint(0, 99999):05d}",
        d6=f"{rng.randint(0, 999999):06d}",
        hex=f"{rng.getrandbits(32):08x}",
    )


def empty_or_short(rng: random.Random) -> str:
    """An empty text or a single content-free word."""
    return "" if rng.random() < 0.5 else rng.choice(SHORT_WORDS)


def wrong_attribute(content: dict[str, Any], rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A web text that is right but for exactly one attribute (colour, shape or count) of one kind.

    Returns the text and what was changed: {"kind": i, "attribute": ..., "from": ..., "to": ...}.
    The changed kind never coincides with another kind of the scene, so it stays a hard negative.
    """
    kinds = object_kinds(content)
    index = rng.randrange(len(kinds))
    kind = kinds[index]
    taken = {(k.colour, k.shape) for i, k in enumerate(kinds) if i != index}
    attribute = rng.choice(("colour", "shape", "count"))
    if attribute == "colour":
        new: Any = rng.choice(
            [c for c in OBJECT_COLOURS if c != kind.colour and (c, kind.shape) not in taken]
        )
        changed = replace(kind, colour=new)
    elif attribute == "shape":
        new = rng.choice([s for s in SHAPES if s != kind.shape and (kind.colour, s) not in taken])
        changed = replace(kind, shape=new)
    else:
        new = {1: 2, 2: rng.choice((1, 3)), 3: 2}[kind.count]
        changed = replace(kind, count=new, position=kind.position if new == 1 else None)
    kinds[index] = changed
    detail = {"kind": index, "attribute": attribute, "from": getattr(kind, attribute), "to": new}
    return web_text(kinds, content["background"], rng), detail
