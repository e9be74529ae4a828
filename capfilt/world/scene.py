"""Scenes of the built-in web world: what is in an image, sampled at random and drawn with PIL.

A scene's `content` is a JSON-serialisable record, the ground truth every caption is judged by:

    {"background": {"colour": "teal", "pattern": "stripes", "direction": "vertical"},
     "objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}, ...]}

Objects sit in distinct cells of a 3x3 grid, so they never overlap and a named position is
unambiguous. Objects of one colour and shape form an *object kind* ("two red circles"); kinds in a
scene differ in colour or shape, and the objects of one kind share a size.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "orange": (250, 135, 20),
    "purple": (140, 50, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Background colours have their own names, so "a red circle" and "a gray background" never share a word.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (222, 205, 165),
    "pink": (245, 170, 200),
    "brown": (120, 78, 45),
    "teal": (20, 128, 128),
    "navy": (25, 35, 95),
    "olive": (115, 120, 40),
    "cyan": (140, 215, 235),
}
PATTERNS = ("solid", "gradient", "noise", "stripes")
SIZES = ("small", "large")
# 3x3 grid, row-major; the middle row and column drop their word ("left", not "middle left").
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Object counts per kind, one tuple per scene layout, and how often each layout is drawn.
LAYOUTS: tuple[tuple[int, ...], ...] = ((1,), (2,), (3,), (1, 1), (2, 1), (1, 1, 1))
LAYOUT_WEIGHTS = (1.0, 1.0, 0.8, 1.2, 1.2, 0.8)

MIN_CONTRAST = 110.0  # RGB distance between an object and every tone of its background
JPEG_QUALITY = 90
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges at 64 px
_SIZE_FRACTION = {"small": 0.55, "large": 0.85}  # object diameter / grid cell


@dataclass(frozen=True)
class ObjectKind:
    """Objects of one colour and shape in a scene; `position` only when there is one of them."""

    colour: str
    shape: str
    count: int
    size: str
    position: str | None = None


def object_kinds(content: dict[str, Any]) -> list[ObjectKind]:
    """Group a scene's objects by (colour, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for obj in content["objects"]:
        groups.setdefault((obj["colour"], obj["shape"]), []).append(obj)
    kinds = []
    for (colour, shape), objs in groups.items():
        position = objs[0]["position"] if len(objs) == 1 else None
        kinds.append(ObjectKind(colour, shape, len(objs), objs[0]["size"], position))
    return kinds


def scene_labels(content: dict[str, Any]) -> list[str]:
    """A scene's class labels, as an annotator of a classification dataset (ImageNet's role for
    BLIP's ViT) would give them: every shape, object colour and per-kind count present, and the
    background colour; sorted, e.g. ["background:gray", "colour:red", "count:2", "shape:circle"]."""
    kinds = object_kinds(content)
    labels = {f"background:{content['background']['colour']}"}
    labels.update(f"shape:{k.shape}" for k in kinds)
    labels.update(f"colour:{k.colour}" for k in kinds)
    labels.update(f"count:{k.count}" for k in kinds)
    return sorted(labels)


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second tone of a background (gradients, stripes): darker for light colours, else lighter."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 110:
        return tuple(round(c * 0.72) for c in rgb)  # type: ignore[return-value]
    return tuple(round(c + (255 - c) * 0.3) for c in rgb)  # type: ignore[return-value]


def visible_colours(background: str) -> list[str]:
    """Object colours that stand out against every tone of the named background."""
    tones = (BACKGROUND_COLOURS[background], _shade(BACKGROUND_COLOURS[background]))
    return [
        name
        for name, rgb in OBJECT_COLOURS.items()
        if min(math.dist(rgb, tone) for tone in tones) >= MIN_CONTRAST
    ]


def sample_scene(rng: random.Random) -> dict[str, Any]:
    """Draw a random scene: a background and 1-3 objects in 1-3 kinds (see the module docstring)."""
    bg_colour = rng.choice(sorted(BACKGROUND_COLOURS))
    pattern = rng.choice(PATTERNS)
    background: dict[str, Any] = {"colour": bg_colour, "pattern": pattern}
    if pattern in ("gradient", "stripes"):
        background["direction"] = rng.choice(("horizontal", "vertical", "diagonal"))
    colours = visible_colours(bg_colour)
    layout = rng.choices(LAYOUTS, weights=LAYOUT_WEIGHTS)[0]
    cells = rng.sample(POSITIONS, sum(layout))
    kinds: set[tuple[str, str]] = set()
    objects = []
    for count in layout:
        while True:
            kind = (rng.choice(colours), rng.choice(SHAPES))
            if kind not in kinds:
                break
        kinds.add(kind)
        size = rng.choice(SIZES)
        for _ in range(count):
            objects.append({"shape": kind[1], "colour": kind[0], "size": size, "position": cells.pop()})
    return {"background": background, "objects": objects}


def _background(bg: dict[str, Any], size: int, rng: np.random.Generator) -> Image.Image:
    """The background at the final image size (objects are drawn later, supersampled)."""
    base = BACKGROUND_COLOURS[bg["colour"]]
    if bg["pattern"] == "solid":
        return Image.new("RGB", (size, size), base)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)  # (size, size) each in [0, 1]
    direction = bg.get("direction", "horizontal")
    if bg["pattern"] == "gradient":  # a horizontal gradient changes from left to right
        mix = {"horizontal": xs, "vertical": ys, "diagonal": (xs + ys) / 2}[direction]
    elif bg["pattern"] == "stripes":  # horizontal stripes run left to right: they change along y
        across = {"horizontal": ys, "vertical": xs, "diagonal": (xs + ys) / 2}[direction]
        pairs = rng.integers(3, 6)  # 3-5 stripe pairs across the image
        mix = ((across * pairs) % 1.0 >= 0.5).astype(np.float32)
    else:  # noise: square grains a sixteenth of the image wide
        grain = max(1, size // 16)
        coarse = np.abs(rng.normal(0.0, 0.45, size=(size // grain + 1,) * 2)).astype(np.float32)
        mix = np.clip(coarse.repeat(grain, 0).repeat(grain, 1)[:size, :size], 0.0, 1.0)
    lo = np.array(base, dtype=np.float32)
    hi = np.array(_shade(base), dtype=np.float32)
    pixels = lo + mix[..., None] * (hi - lo)  # (size, size, 3)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Draw one shape of radius `r` (half its diameter) centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.88  # same visual weight as a circle of radius r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(r * 0.42)))
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    else:
        raise AssertionError(f"unknown shape {shape}")


def render(content: dict[str, Any], image_size: int, rng: random.Random) -> bytes:
    """Draw a scene as a JPEG of `image_size` x `image_size` pixels; `rng` only adds small jitter."""
    side = image_size * _SUPERSAMPLE
    np_rng = np.random.default_rng(rng.getrandbits(64))
    image = _background(content["background"], image_size, np_rng).resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    cell = side / 3
    for obj in content["objects"]:
        row, col = divmod(POSITIONS.index(obj["position"]), 3)
        diameter = cell * _SIZE_FRACTION[obj["size"]]
        slack = min((cell - diameter) / 2, cell * 0.06)  # jitter, never leaving the cell
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw(draw, obj["shape"], cx, cy, diameter / 2, OBJECT_COLOURS[obj["colour"]])
    image = image.reduce(_SUPERSAMPLE)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: small objects keep their colour
    return buf.getvalue()
