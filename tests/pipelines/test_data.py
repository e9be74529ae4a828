"""Reading webdataset shards for training: grouping by key, skipping, caption expansion, batches."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from capfilt.data import iter_samples, shard_paths
from capfilt.errors import CapfiltError
from capfilt.images import open_image, preprocess
from capfilt.model.config import CLIP_MEAN, CLIP_STD
from capfilt.pairs import Collator, PairDataset


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(world: Path) -> bytes:
    with tarfile.open(world / "web" / "00000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read()


def test_unsorted_tar_is_grouped_by_key_and_incomplete_samples_skipped(
    world: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jpg = _jpeg(world)
    path = tmp_path / "unsorted.tar"
    with tarfile.open(path, "w") as tar:  # members of a and b interleaved, c has no text, d no image
        _add(tar, "a.jpg", jpg)
        _add(tar, "b.txt", b"second text")
        _add(tar, "c.jpg", jpg)
        _add(tar, "a.json", json.dumps({"caption": "ignored, .txt wins"}).encode())
        _add(tar, "b.jpg", jpg)
        _add(tar, "d.txt", b"no image")
        _add(tar, "a.txt", b"first text")
        _add(tar, "e.jpg", jpg)
        _add(tar, "e.json", json.dumps({"caption": "from json"}).encode())
    with caplog.at_level(logging.WARNING, logger="capfilt.data"):
        samples = list(iter_samples(path))
    assert [(s.key, s.text) for s in samples] == [
        ("a", "first text"),
        ("b", "second text"),
        ("e", "from json"),
    ]
    assert all(s.image == jpg for s in samples)
    assert samples[0].meta == {"caption": "ignored, .txt wins"}
    assert "'no_image': 1" in caplog.text and "'no_text': 1" in caplog.text


def test_shard_paths_accepts_dirs_globs_files_and_names_missing(world: Path) -> None:
    web = sorted((world / "web").glob("*.tar"))
    assert shard_paths(world / "web") == web
    # each shard once: named twice, its samples were read twice (retrieval R@1 100 -> 3.1)
    assert shard_paths([str(world / "web" / "*.tar"), str(web[0])]) == web
    assert shard_paths([str(world / "web"), str(world / "web" / ".." / "web" / web[0].name)]) == web
    with pytest.raises(CapfiltError, match="nowhere"):
        shard_paths([str(world / "nowhere")])
    with pytest.raises(CapfiltError, match=r"no tar shards \(\.tar, or compressed"):
        shard_paths([str(world / "web" / "*.zip")])


def test_pair_dataset_expands_human_captions_and_matches_preprocess(world: Path) -> None:
    human = PairDataset([world / "human"], image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    web = PairDataset([world / "web"], image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    assert human.num_images == 24 and len(human) > 24  # several phrasings per human image
    assert web.num_images == 40 and len(web) == 40
    first = [t for t, i in zip(human.texts, human.image_ids) if i == 0]
    sample = next(iter_samples(world / "human"))
    assert len(first) == len(sample.meta["captions"]) >= 2
    assert all(t == t.lower() and "." not in t for t in first)  # pre_caption applied
    pixels, text, image_id = human[0]
    expected = preprocess([open_image(sample.image)], 32, CLIP_MEAN, CLIP_STD)[0]
    assert pixels.shape == (3, 32, 32) and image_id == 0 and text == first[0]
    torch.testing.assert_close(pixels, expected)
    prompted = PairDataset(
        [world / "human"], image_size=32, mean=CLIP_MEAN, std=CLIP_STD, prompt="a picture of "
    )
    assert prompted.texts[0] == "a picture of " + human.texts[0]


def test_collate_tokenises_to_max_length(world: Path, tokenizer) -> None:
    dataset = PairDataset([world / "human"], image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    batch = Collator(tokenizer, max_length=6)([dataset[i] for i in range(5)])
    assert batch["pixels"].shape == (5, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    assert batch["input_ids"].shape[1] <= 6
    assert (batch["input_ids"][:, 0] == tokenizer.ids.cls).all()
    assert batch["image_ids"].tolist() == [dataset.image_ids[i] for i in range(5)]


def test_a_tar_cut_between_members_is_named_not_read_as_a_shorter_shard(
    world: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tarfile stops without a word where a tar was cut between two members: training and eval read
    it as a smaller shard (an eval over 8 of 16 test images, exit 0, "no_text: 1" the only sign)."""
    shard = sorted((world / "web").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: members[len(members) // 2].offset])
    whole = len(list(iter_samples([shard])))
    with caplog.at_level(logging.WARNING):
        read = list(iter_samples([cut]))
    assert 0 < len(read) < whole
    assert (
        f"cannot read shard {cut}: no end-of-archive marker" in caplog.text
        and "the tar was cut short" in caplog.text
    )
    assert "samples read before it" in caplog.text
