"""The built-in synthetic web world: images with known content, human captions, noisy web texts.

`synthesize(out, ...)` writes the `human`, `web` and `test` splits in img2dataset's webdataset
layout with a truth table; `attribute_accuracy(caption, content)` scores a caption against a
scene. Modules, along the data flow: `scene` (sample and draw), `texts` (captions and noise),
`attributes` (read captions back, score them), `writer` (shards), `synth` (the whole world).
"""

from __future__ import annotations

from .attributes import (
    AttributeScore,
    Mention,
    ParsedCaption,
    attribute_accuracy,
    caption_attributes,
    parse_caption,
    scene_attributes,
    score_caption,
)
from .scene import ObjectKind, object_kinds
from .synth import SPLITS, TRUTH_SCHEMA, WorldSummary, read_manifest, synthesize
from .texts import NOISE_TYPES, canonical_caption

__all__ = [
    "NOISE_TYPES",
    "SPLITS",
    "TRUTH_SCHEMA",
    "AttributeScore",
    "Mention",
    "ObjectKind",
    "ParsedCaption",
    "WorldSummary",
    "attribute_accuracy",
    "canonical_caption",
    "caption_attributes",
    "object_kinds",
    "parse_caption",
    "read_manifest",
    "scene_attributes",
    "score_caption",
    "synthesize",
]
