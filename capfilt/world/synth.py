"""`synthesize`: write the built-in web world to a directory.

Layout under `out`:

    human/ web/ test/    img2dataset webdataset shards: 00000.tar, 00000.parquet, 00000_stats.json, ...
    labelled/            (with `labelled` > 0) images with class labels and no captions, the
                         ImageNet analogue that `capfilt train vit` pre-trains the image encoder on:
                         each .json holds "labels" (scene.scene_labels), the .txt the labels joined
    truth.parquet        one row per sample of every split: noisy or not, noise type, text, content
    world.json           the arguments and the counts (same arguments, same bytes: a cache key)

Every random choice comes from a `random.Random` seeded by a string naming the seed, the split,
the sample and the purpose, so a sample's scene does not depend on how many others are drawn with
it. Which web texts are noisy, and which caption a swapped text takes, is drawn over the whole
web split (exactly `round(noise * web)` of them), so those change with `web` and `noise`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import CapfiltError
from .attributes import scene_attributes
from .scene import object_kinds, render, sample_scene, scene_labels
from .texts import (
    NOISE_TYPES,
    boilerplate,
    canonical_caption,
    empty_or_short,
    filename,
    human_captions,
    web_text,
    wrong_attribute,
)
from .writer import Sample, sample_key, write_parquet, write_shard

log = logging.getLogger(__name__)

VERSION = 1  # bump when the same arguments would give a different world
SPLITS = ("human", "web", "test")
LABELLED = "labelled"  # the optional classification split (module docstring)
TRUTH_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("noisy", pa.bool_()),
        ("noise_type", pa.string()),  # null when clean; else one of NOISE_TYPES
        ("noise_detail", pa.string()),  # JSON: swapped {"source_key"}, wrong_attribute {"attribute", ...}
        ("text", pa.string()),  # what the sample's .txt holds
        ("canonical", pa.string()),  # the plain true caption
        ("content", pa.string()),  # JSON of the scene (scene.py's docstring)
    ]
)
_URL_DIRS = (
    "images",
    "photos/2019/07",
    "wp-content/uploads/2021/04",
    "media/catalog/product",
    "cdn/assets/img",
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class WorldSummary:
    """What `synthesize` wrote: samples per split, web texts per noise type, and the paths."""

    out: Path
    counts: dict[str, int]
    noise_counts: dict[str, int]  # every type in NOISE_TYPES, zero included
    shards: dict[str, list[Path]] = field(default_factory=dict)  # tar files per split

    @property
    def truth(self) -> Path:
        return self.out / "truth.parquet"

    @property
    def manifest(self) -> Path:
        return self.out / "world.json"


@dataclass
class _Planned:
    """A sample before rendering: its scene and its text(s)."""

    content: dict[str, Any]
    text: str = ""
    captions: list[str] | None = None
    labels: list[str] | None = None  # the labelled split's class labels
    noise_type: str | None = None
    noise_detail: dict[str, Any] | None = None
    url_name: str | None = None


def _rng(seed: int, split: str, index: int | str, purpose: str) -> random.Random:
    return random.Random(f"capfilt-world:{seed}:{split}:{index}:{purpose}")


def _plan_clean(split: str, n: int, seed: int) -> list[_Planned]:
    """Human and test samples: 3-5 human-style captions each, the first one in .txt."""
    planned = []
    for i in range(n):
        content = sample_scene(_rng(seed, split, i, "scene"))
        rng = _rng(seed, split, i, "text")
        captions = human_captions(content, rng, k=rng.randint(3, 5))
        planned.append(_Planned(content, captions[0], captions))
    return planned


def _plan_labelled(n: int, seed: int) -> list[_Planned]:
    """Labelled samples: a scene and its class labels (the .txt names them, comma-separated)."""
    planned = []
    for i in range(n):
        content = sample_scene(_rng(seed, LABELLED, i, "scene"))
        labels = scene_labels(content)
        planned.append(_Planned(content, ", ".join(labels), labels=labels))
    return planned


def _plan_web(n: int, noise: float, seed: int, keys: list[str]) -> list[_Planned]:
    """Web samples: a fraction `noise` gets a noisy text, types in turn, the rest a correct text."""
    planned = [_Planned(sample_scene(_rng(seed, "web", i, "scene"))) for i in range(n)]
    noisy = _rng(seed, "web", "all", "noise").sample(range(n), round(noise * n))
    for turn, i in enumerate(noisy):
        planned[i].noise_type = NOISE_TYPES[turn % len(NOISE_TYPES)]
    clean = [i for i, p in enumerate(planned) if p.noise_type is None]
    for i in clean:
        p = planned[i]
        p.text = web_text(object_kinds(p.content), p.content["background"], _rng(seed, "web", i, "text"))
    for i in noisy:
        p = planned[i]
        rng = _rng(seed, "web", i, "text")
        if p.noise_type == "swapped":
            source = _swap_source(i, planned, clean, rng)
            if source is None:  # a one-image web split has no other caption to take
                p.noise_type = "boilerplate"
            else:
                other = planned[source]
                p.text = (
                    other.text
                    if other.noise_type is None
                    else web_text(object_kinds(other.content), other.content["background"], rng)
                )
                p.noise_detail = {"source_key": keys[source]}
        if p.noise_type == "boilerplate":
            p.text = boilerplate(rng)
        elif p.noise_type == "filename":
            p.text = filename(rng)
            p.url_name = re.sub(r"[^A-Za-z0-9._@-]+", "-", p.text).strip("-")
        elif p.noise_type == "wrong_attribute":
            p.text, p.noise_detail = wrong_attribute(p.content, rng)
        elif p.noise_type == "empty_or_short":
            p.text = empty_or_short(rng)
    return planned


def _swap_source(i: int, planned: list[_Planned], clean: list[int], rng: random.Random) -> int | None:
    """Another web sample whose objects differ from sample i's; a clean one when there is any."""

    def objects(p: _Planned) -> frozenset:
        return frozenset(a for a in scene_attributes(p.content) if a[0] == "object")

    pool = [j for j in clean if j != i] or [j for j in range(len(planned)) if j != i]
    mine = objects(planned[i])
    for _ in range(100):
        if not pool:
            return None
        j = rng.choice(pool)
        if objects(planned[j]) != mine:
            return j
    return None


def _url(seed: int, split: str, key: str, name: str | None) -> str:
    digest = hashlib.sha256(f"{seed}:{split}:{key}".encode()).hexdigest()
    folder = _URL_DIRS[int(digest[:2], 16) % len(_URL_DIRS)]
    if name:
        return f"https://example.invalid/{folder}/{digest[2:10]}/{name}"
    return f"https://example.invalid/{folder}/{digest[2:14]}.jpg"


MAX_IMAGE_SIZE = 1024  # px a side: 8100 took 4.4 GB to draw, and its images were over the job's pixel limit


def _check_args(out: Path, counts: dict[str, int], noise: float, image_size: int, shard_size: int) -> None:
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise CapfiltError(f"--{name} must be a whole number >= 0, got {n!r}")
    if not 0.0 <= noise <= 1.0:
        raise CapfiltError(f"--noise is the noisy fraction of web texts, between 0 and 1; got {noise}")
    if image_size < 32:
        raise CapfiltError(
            f"--image-size {image_size} is too small to draw shapes; use 32 or more (64 default)"
        )
    if image_size > MAX_IMAGE_SIZE:
        raise CapfiltError(
            f"--image-size {image_size} is larger than the world draws (up to {MAX_IMAGE_SIZE}); models "
            "resize every image to their own size (384 for BLIP's fine-tuned base and large)"
        )
    if shard_size < 1:
        raise CapfiltError(f"shard size must be >= 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise CapfiltError(f"{out} is a file; give a directory for the world")
    ours = {*SPLITS, LABELLED, "truth.parquet", "world.json"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if foreign:
        raise CapfiltError(
            f"{out} holds other files ({', '.join(foreign[:3])}); give an empty or new directory, "
            "or one a previous `data synth` wrote"
        )


def synthesize(
    out: Path,
    *,
    web: int = 4000,
    human: int = 2000,
    test: int = 500,
    noise: float = 0.4,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 1000,
    labelled: int = 0,
    progress: Progress | None = None,
) -> WorldSummary:
    """Write the built-in web world (module docstring) to `out`, replacing a world already there.
    `labelled` > 0 adds the labelled split (the CLI's default world has one; callers here opt in).

    `progress(split, done, total)` is called after each shard. Same arguments, same bytes.
    """
    out = Path(out)
    counts = {"human": human, "web": web, "test": test}
    _check_args(out, {**counts, LABELLED: labelled}, noise, image_size, shard_size)
    if labelled:
        counts[LABELLED] = labelled
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)  # written last: its presence marks a finished world

    truth_rows: list[dict[str, Any]] = []
    shards: dict[str, list[Path]] = {}
    noise_counts = dict.fromkeys(NOISE_TYPES, 0)
    if not labelled and (out / LABELLED).is_dir():  # a previous world's: not part of this one
        shutil.rmtree(out / LABELLED)
    for split in counts:
        n = counts[split]
        keys = [sample_key(i // shard_size, i % shard_size, shard_size) for i in range(n)]
        if split == "web":
            planned = _plan_web(n, noise, seed, keys)
        elif split == LABELLED:
            planned = _plan_labelled(n, seed)
        else:
            planned = _plan_clean(split, n, seed)
        directory = out / split
        directory.mkdir(exist_ok=True)
        for stale in [
            *directory.glob("*.tar"),
            *directory.glob("*.parquet"),
            *directory.glob("*_stats.json"),
        ]:
            stale.unlink()
        shards[split] = []
        for shard_id, first in enumerate(range(0, n, shard_size)):
            samples = []
            for i in range(first, min(first + shard_size, n)):
                p = planned[i]
                jpg = render(p.content, image_size, _rng(seed, split, i, "render"))
                url = _url(seed, split, keys[i], p.url_name)
                extra = {"captions": p.captions} if p.captions is not None else {}
                if p.labels is not None:
                    extra = {"labels": p.labels}
                samples.append(Sample(keys[i], jpg, p.text, url, image_size, image_size, extra))
                truth_rows.append(
                    {
                        "split": split,
                        "key": keys[i],
                        "shard": f"{shard_id:05d}",
                        "noisy": p.noise_type is not None,
                        "noise_type": p.noise_type,
                        "noise_detail": json.dumps(p.noise_detail, sort_keys=True)
                        if p.noise_detail
                        else None,
                        "text": p.text,
                        "canonical": canonical_caption(p.content),
                        "content": json.dumps(p.content, sort_keys=True),
                    }
                )
            shards[split].append(write_shard(directory, shard_id, samples))
            if progress is not None:
                progress(split, min(first + shard_size, n), n)
        if split == "web":
            noise_counts.update(Counter(p.noise_type for p in planned if p.noise_type))

    write_parquet(out / "truth.parquet", truth_rows, TRUTH_SCHEMA)
    manifest = {
        "generator": "capfilt.world",
        "version": VERSION,
        "args": {
            "web": web,
            "human": human,
            "test": test,
            "noise": noise,
            "seed": seed,
            "image_size": image_size,
            "shard_size": shard_size,
            "labelled": labelled,
        },
        "counts": counts,
        "noise_counts": noise_counts,
        "shards": {s: [p.relative_to(out).as_posix() for p in paths] for s, paths in shards.items()},
    }
    (out / "world.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    log.info(
        "wrote the web world to %s: %s samples, %s noisy web texts in %.1f s",
        out,
        counts,
        sum(noise_counts.values()),
        time.perf_counter() - start,
    )
    return WorldSummary(out, counts, noise_counts, shards)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The world.json of a finished world in `out`, or None (compare its "args" to reuse a world)."""
    path = Path(out) / "world.json"
    return json.loads(path.read_text()) if path.is_file() else None
