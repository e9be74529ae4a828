"""The built-in web world: determinism, layout, counts, and that its noise labels tell the truth."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from capfilt.errors import CapfiltError
from capfilt.world import (
    NOISE_TYPES,
    SPLITS,
    attribute_accuracy,
    object_kinds,
    parse_caption,
    read_manifest,
    scene_attributes,
    score_caption,
    synthesize,
)
from capfilt.world.scene import OBJECT_COLOURS, POSITIONS
from capfilt.world.writer import sample_key

ARGS = dict(web=60, human=30, test=20, shard_size=25, noise=0.4, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("world")
    return synthesize(out, **ARGS)


@pytest.fixture(scope="module")
def truth(world) -> list[dict]:
    rows = pq.read_table(world.truth).to_pylist()
    for row in rows:
        row["content"] = json.loads(row["content"])
        row["noise_detail"] = json.loads(row["noise_detail"]) if row["noise_detail"] else None
    return rows


def _objects(content: dict) -> Counter:
    return Counter((k.colour, k.shape, k.count) for k in object_kinds(content))


def test_same_arguments_same_bytes(world, tmp_path: Path) -> None:
    expected = _files(world.out)
    assert {
        "truth.parquet",
        "world.json",
        "web/00002.tar",
        "web/00002.parquet",
        "web/00002_stats.json",
    } <= set(expected)
    again = tmp_path / "again"
    synthesize(again, **{**ARGS, "web": 90})  # a bigger world first: its extra shard must go
    synthesize(again, **ARGS)
    assert _files(again) == expected
    other = _files(synthesize(tmp_path / "other", **{**ARGS, "seed": 1}).out)
    assert other.keys() == expected.keys()
    for name in ("web/00000.tar", "human/00000.tar", "test/00000.parquet", "truth.parquet"):
        assert other[name] != expected[name], name


def test_counts_and_noise_shares(world, truth) -> None:
    by_split = Counter(r["split"] for r in truth)
    assert dict(by_split) == {"human": 30, "web": 60, "test": 20} == world.counts
    assert all(not r["noisy"] and r["noise_type"] is None for r in truth if r["split"] != "web")
    web = [r for r in truth if r["split"] == "web"]
    noisy = [r for r in web if r["noisy"]]
    assert len(noisy) == round(0.4 * 60)
    types = Counter(r["noise_type"] for r in noisy)
    assert set(types) == set(NOISE_TYPES)
    assert max(types.values()) - min(types.values()) <= 1
    assert dict(types) == {t: n for t, n in world.noise_counts.items() if n}
    manifest = read_manifest(world.out)
    assert manifest["args"] == {**ARGS, "image_size": 64, "test": 20, "labelled": 0}
    assert manifest["counts"] == world.counts
    assert [len(world.shards[s]) for s in SPLITS] == [2, 3, 1]


def test_noise_labels_are_right(truth) -> None:
    web = {r["key"]: r for r in truth if r["split"] == "web"}
    for row in web.values():
        text, content, detail = row["text"], row["content"], row["noise_detail"]
        if not row["noisy"]:
            assert attribute_accuracy(text, content) == 1.0, text
        elif row["noise_type"] == "wrong_attribute":
            kinds = object_kinds(content)
            kind = kinds[detail["kind"]]
            assert getattr(kind, detail["attribute"]) == detail["from"] != detail["to"]
            changed = [(k.colour, k.shape, k.count) for k in kinds]
            index = ("colour", "shape", "count").index(detail["attribute"])
            changed[detail["kind"]] = tuple(
                detail["to"] if i == index else v for i, v in enumerate(changed[detail["kind"]])
            )
            parsed = parse_caption(text)
            assert Counter((m.colour, m.shape, m.count) for m in parsed.objects) == Counter(changed), text
            assert parsed.background in (None, content["background"]["colour"])
            score = score_caption(text, content)
            assert score.total - score.correct == 1, text
            assert attribute_accuracy(text, content) < 1.0
        elif row["noise_type"] == "swapped":
            source = web[detail["source_key"]]
            assert source["key"] != row["key"] and not source["noisy"]
            assert source["text"] == text
            assert _objects(source["content"]) != _objects(content)
            assert attribute_accuracy(text, source["content"]) == 1.0
            assert attribute_accuracy(text, content) < 1.0
        else:
            assert parse_caption(text).objects == (), text
            assert attribute_accuracy(text, content) == 0.0
            if row["noise_type"] == "filename":
                assert re.search(r"\.(jpe?g|png|webp)$", text, re.IGNORECASE), text
            elif row["noise_type"] == "empty_or_short":
                assert len(text.split()) <= 1


def test_human_and_test_captions_state_every_attribute(world, truth) -> None:
    rows = {(r["split"], r["key"]): r for r in truth}
    for split in ("human", "test"):
        for sample in wds.WebDataset([str(p) for p in world.shards[split]], shardshuffle=False):
            meta = json.loads(sample["json"])
            content = rows[(split, sample["__key__"])]["content"]
            captions = meta["captions"]
            assert 3 <= len(captions) <= 5 and len({c.lower().rstrip(".") for c in captions}) == len(captions)
            assert sample["txt"].decode() == captions[0] == meta["caption"]
            for caption in [*captions, rows[(split, sample["__key__"])]["canonical"]]:
                assert attribute_accuracy(caption, content) == 1.0, caption


def test_layout_reads_as_img2dataset_output(world, truth) -> None:
    texts = {(r["split"], r["key"]): r["text"] for r in truth}
    for split in SPLITS:
        keys: list[str] = []
        for tar in world.shards[split]:
            sidecar = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
            samples = list(wds.WebDataset(str(tar), shardshuffle=False))
            assert [s["__key__"] for s in samples] == [r["key"] for r in sidecar]
            stats = json.loads((tar.parent / f"{tar.stem}_stats.json").read_text())
            assert stats["count"] == stats["successes"] == len(samples) and stats["duration"] == 0.0
            for sample, row in zip(samples, sidecar):
                meta = json.loads(sample["json"])
                assert {k: meta[k] for k in row} == row
                assert meta["status"] == "success" and meta["error_message"] is None and meta["exif"] is None
                assert meta["url"].startswith("https://example.invalid/")
                assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
                assert sample["txt"].decode() == meta["caption"] == texts[(split, sample["__key__"])]
                image = Image.open(io.BytesIO(sample["jpg"]))
                assert image.format == "JPEG" and image.size == (64, 64) == (meta["width"], meta["height"])
                assert re.fullmatch(r"\d{9}", sample["__key__"]) and sample["__key__"].startswith(tar.stem)
            keys += [s["__key__"] for s in samples]
        assert len(keys) == len(set(keys)) == world.counts[split]
        assert len(
            {
                json.loads(s["json"])["url"]
                for s in wds.WebDataset([str(t) for t in world.shards[split]], shardshuffle=False)
            }
        ) == len(keys)


def test_images_show_their_content(world, truth) -> None:
    """The pixel at a filled shape's cell centre has the shape's colour; the scene is what truth says."""
    rows = {r["key"]: r for r in truth if r["split"] == "human"}
    checked = 0
    for sample in wds.WebDataset(str(world.shards["human"][0]), shardshuffle=False):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        for obj in rows[sample["__key__"]]["content"]["objects"]:
            if obj["shape"] == "ring":  # hollow: its centre shows the background
                continue
            row, col = divmod(POSITIONS.index(obj["position"]), 3)
            pixel = image.getpixel((int((col + 0.5) * 64 / 3), int((row + 0.5) * 64 / 3)))
            distance = sum((a - b) ** 2 for a, b in zip(pixel, OBJECT_COLOURS[obj["colour"]])) ** 0.5
            assert distance < 70, (sample["__key__"], obj, pixel)
            checked += 1
    assert checked > 20


def test_attribute_accuracy_definition() -> None:
    content = {
        "background": {"colour": "gray", "pattern": "solid"},
        "objects": [
            {"shape": "circle", "colour": "red", "size": "large", "position": "top left"},
            {"shape": "circle", "colour": "red", "size": "large", "position": "bottom"},
            {"shape": "star", "colour": "blue", "size": "small", "position": "centre"},
        ],
    }
    assert scene_attributes(content) == {
        ("object", "red", "circle", 2),
        ("object", "blue", "star", 1),
        ("background", "gray"),
    }
    assert attribute_accuracy("two red circles and a blue star on a gray background", content) == 1.0
    assert (
        attribute_accuracy("A pair of big red circles, and a tiny blue star in the centre.", content) == 1.0
    )
    assert attribute_accuracy("a blue star and two red circles on a grey striped background", content) == 1.0
    assert score_caption("two red circles and a blue star on a pink background", content).correct == 6
    assert attribute_accuracy("two red circles and a blue star on a pink background", content) == 6 / 7
    assert attribute_accuracy("three red circles and a blue star", content) == 5 / 6
    assert attribute_accuracy("two red circles", content) == 3 / 6  # a kind left out
    assert attribute_accuracy("two red circles, a blue star and a green ring", content) == 6 / 9
    assert attribute_accuracy("", content) == 0.0
    mention = parse_caption("a pair of tiny black squares in the top left corner").objects[0]
    assert (mention.shape, mention.colour, mention.count, mention.size, mention.position) == (
        "square",
        "black",
        2,
        "small",
        "top left",
    )
    assert parse_caption("red circles on an olive gradient background").objects[0].count is None
    assert parse_caption("red circles on an olive gradient background").background == "olive"


def test_keys_follow_img2dataset() -> None:
    assert sample_key(0, 0, 10_000) == "000000000"
    assert sample_key(1, 7, 1000) == "000010007"
    assert sample_key(2, 12_345, 100_000) == "0000212345"


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(CapfiltError, match="--noise"):
        synthesize(tmp_path / "a", noise=1.5)
    with pytest.raises(CapfiltError, match="--web"):
        synthesize(tmp_path / "a", web=-1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(CapfiltError, match=r"notes\.txt"):
        synthesize(tmp_path / "b", web=2, human=0, test=0)
