"""Similar-text batching: a permutation of whole groups of look-alike texts, never two captions of
the anchor's image in its group, deterministic per generator seed, and plugged into the loop."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from capfilt.errors import CapfiltError
from capfilt.pipelines.train import TrainConfig, train
from capfilt.pipelines.train_batches import confusable_tokens, similar_order, text_features
from capfilt.pipelines.train_loop import EpochBatches

COLOURS = ("red", "blue", "green", "yellow", "white", "black")
SHAPES = ("circle", "square", "star", "ring")


def _texts() -> tuple[list[str], list[int]]:
    """Two captions per image of 'two COLOUR SHAPEs on a gray background' over every pair."""
    texts, ids = [], []
    for image, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        texts += [f"two {colour} {shape}s on a gray background", f"a pair of {colour} {shape}s"]
        ids += [image, image]
    return texts, ids


def test_similar_order_groups_look_alikes_from_other_images() -> None:
    texts, ids = _texts()
    features = text_features(texts)
    order = similar_order(features, ids, 4, torch.Generator().manual_seed(3), pool=32)
    assert sorted(order) == list(range(len(texts)))  # every pair once
    groups = [order[i : i + 4] for i in range(0, len(order) - len(order) % 4, 4)]
    for group in groups:
        assert ids[group[0]] not in {ids[i] for i in group[1:]}  # the anchor's captions are not its negatives

    def mean_cosine(gs: list[list[int]]) -> float:
        rows = features.dense(np.arange(len(texts)))
        return float(np.mean([rows[g[0]] @ rows[j] for g in gs for j in g[1:]]))

    shuffled = torch.randperm(len(texts), generator=torch.Generator().manual_seed(3)).tolist()
    random_groups = [shuffled[i : i + 4] for i in range(0, len(shuffled) - 3, 4)]
    assert mean_cosine(groups) > mean_cosine(random_groups) + 0.2

    # Most anchors' closest look-alike shares a colour or a shape (a pool's last anchors take what is left).
    def alike(a: str, b: str) -> bool:
        words_a, words_b = ({w.rstrip("s") for w in t.split()} for t in (a, b))
        return bool(words_a & words_b & {*COLOURS, *SHAPES})

    assert sum(alike(texts[g[0]], texts[g[1]]) for g in groups) >= 0.8 * len(groups)
    again = similar_order(features, ids, 4, torch.Generator().manual_seed(3), pool=32)
    assert again == order
    assert similar_order(features, ids, 4, torch.Generator().manual_seed(4), pool=32) != order


def test_words_of_one_text_alone_make_no_feature() -> None:
    features = text_features(["photo-123.jpg", "photo-456.jpg", "two red stars"])
    assert len(features.idf) == 2  # "photo", "jpg": the numbers and the third text's words are unique
    rows = features.dense(np.arange(3))
    assert rows.shape == (3, 2) and not rows[2].any()
    assert rows[0] @ rows[1] == pytest.approx(1.0)


def test_epoch_batches_take_the_given_order() -> None:
    order = list(range(47, -1, -1))
    batches = list(EpochBatches(48, 4, 1, 2, seed=0, epoch=0, order=lambda g: order))
    assert batches[0] == [43, 42, 41, 40] and len(batches) == 6


def test_similar_batching_trains_and_checks_its_group(world: Path, pretrained: Path, tmp_path: Path) -> None:
    base = dict(
        task="filter",
        data=[str(world / "human")],
        init=str(pretrained),
        workers=0,
        batch_size=8,
        steps=3,
        log_every=1,
        batching="similar",
    )
    with pytest.raises(CapfiltError, match="divides the batch size 8, got 3"):
        train(TrainConfig(out=str(tmp_path / "bad"), similar_group=3, **base))
    result = train(TrainConfig(out=str(tmp_path / "ok"), **base))
    assert result.steps == 3


def test_text_negatives_train_and_are_a_resume_key(
    world: Path, pretrained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = dict(task="filter", data=[str(world / "human")], init=str(pretrained), workers=0, batch_size=8)
    out = str(tmp_path / "tn")
    with caplog.at_level("INFO", logger="capfilt.pipelines.train_loop"):
        result = train(TrainConfig(out=out, steps=4, max_steps=2, text_negatives=True, **base))
    assert result.steps == 2
    found = [r.getMessage() for r in caplog.records if "text negatives" in r.getMessage()]
    assert found and int(found[0].split(": ")[1].split()[0]) >= 5  # some of the world's colours and shapes
    with pytest.raises(CapfiltError, match="text_negatives"):
        train(TrainConfig(out=out, steps=4, **base))  # resuming without the option is refused


def test_confusable_tokens_share_contexts_and_skip_synonyms() -> None:
    words = {
        w: i
        for i, w in enumerate(
            [
                "[PAD]",
                "[CLS]",
                "a",
                "red",
                "blue",
                "green",
                "circle",
                "square",
                "star",
                "big",
                "large",
                "small",
                "on",
                "plain",
                "background",
                "rare",
            ]
        )
    }
    captions, images = [], []
    for image, (colour, shape, size) in enumerate(
        itertools.islice(
            itertools.cycle(
                itertools.product(["red", "blue", "green"], ["circle", "square", "star"], ["big", "small"])
            ),
            60,
        )
    ):
        # two captions per image; "big" objects are "large" in the second one (synonyms)
        other = "large" if size == "big" else size
        for s in (size, other):
            captions.append([words[w] for w in f"a {s} {colour} {shape} on plain background".split()])
            images.append(image)
    captions.append([words["a"], words["rare"], words["circle"]])
    images.append(99)
    swaps = confusable_tokens(captions, len(words), special=[0, 1], min_count=5, k=4, image_ids=images)
    named = {w: {t for t in swaps[i].tolist() if t >= 0} for w, i in words.items()}
    assert named["red"] == {words["blue"], words["green"]}
    assert {words["square"], words["star"]} <= named["circle"] and words["red"] not in named["circle"]
    assert words["small"] in named["big"] and words["large"] not in named["big"]  # synonyms apart
    assert named["rare"] == set() and words["rare"] not in named["circle"] | named["red"]
    assert named["[CLS]"] == set() and named["[PAD]"] == set()
    without = confusable_tokens(captions, len(words), special=[0, 1], min_count=5, k=4)
    assert words["large"] in {t for t in without[words["big"]].tolist()}  # only image ids tell synonyms


def test_every_rank_batch_of_the_filter_holds_two_images() -> None:
    """A batch of one image's captions has no ITM negative (the run stopped with "ITM needs at
    least two different images"); such a batch gets a pair of another image, and nothing else moves."""
    from capfilt.pipelines.train_loop import EpochBatches, two_images_a_batch

    images = [0, 0, 0, 1, 1, 2, 2, 2]  # pair -> image
    # [0 1] -> [0 3]; then [2 1] -> [2 4]; the last, [6 7], takes pair 0 from the first batch
    assert two_images_a_batch([0, 1, 2, 3, 4, 5, 6, 7], images, 2) == [7, 3, 2, 4, 1, 5, 6, 0]
    fine = [0, 3, 1, 5, 2, 6, 4, 7]
    assert two_images_a_batch(fine, images, 2) == fine
    assert two_images_a_batch([0, 1, 2], [0, 0, 0], 2) == [0, 1, 2]  # one image in all: nothing to do
    for seed in range(20):
        batches = [
            b for rank in (0, 1) for b in EpochBatches(len(images), 2, rank, 2, seed, 0, image_ids=images)
        ]
        assert all(len({images[i] for i in b}) == 2 for b in batches), batches
        assert sorted(i for b in batches for i in b) == sorted(set(i for b in batches for i in b))
