"""Evaluation: BLEU-4 and CIDEr-D against hand arithmetic, BLIP's retrieval protocol, filter reports."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.evaluation import (
    attribute_accuracy_mean,
    bleu4,
    caption_metrics,
    cider_d,
    cider_d_per_image,
    filter_report,
    recall_at_k,
    retrieval_scores,
    tokenize,
)
from capfilt.model.config import med_config
from capfilt.model.med import MED
from capfilt.text import pre_caption
from capfilt.world import canonical_caption
from capfilt.world.scene import sample_scene
from tests.conftest import CORPUS

# ----------------------------------------------------------------------------- tokenisation


def test_tokenize_lowercases_and_drops_punctuation_like_the_ptb_tokenizer():
    assert tokenize("A Dog's toy, isn't it?") == ["a", "dog", "'s", "toy", "is", "n't", "it"]
    assert tokenize("It costs 3.5 dollars... really -- yes!") == [
        "it",
        "costs",
        "3.5",
        "dollars",
        "really",
        "yes",
    ]
    # PTB's escapes, split words and symbols; the toolkit lower-cases "-LRB-" after escaping, and its
    # punctuation list has only the upper case: brackets stay as words
    assert tokenize("A man (in red) [sic] {x}") == [
        "a",
        "man",
        "-lrb-",
        "in",
        "red",
        "-rrb-",
        "-lsb-",
        "sic",
        "-rsb-",
        "-lcb-",
        "x",
        "-rcb-",
    ]
    assert tokenize("It cannot cost $5, I'm gonna pay 50% for #1") == (
        ["it", "can", "not", "cost", "$", "5", "i", "'m", "gon", "na", "pay", "50", "%", "for", "#", "1"]
    )
    assert tokenize("a black-and-white photo of 'birds'.") == ["a", "black-and-white", "photo", "of", "birds"]
    assert tokenize("") == []


# ----------------------------------------------------------------------------- BLEU-4


def test_bleu4_one_image_by_hand():
    # candidate (7 words): a red circle on a blue background
    # refs: "a red circle on a green background" (7 words), "a big red circle" (4)
    # 1-grams: a x2 (clipped by ref 1's two a's: 2), red, circle, on, background; blue misses -> 6/7
    # 2-grams: a red, red circle, circle on, on a match; a blue, blue background miss -> 4/6
    # 3-grams: a red circle, red circle on, circle on a match; on a blue, a blue background miss -> 3/5
    # 4-grams: a red circle on, red circle on a match; 2 miss -> 2/4
    # closest reference length 7 = candidate length: no brevity penalty
    cand = "A red circle on a blue background."
    refs = ["a red circle on a green background", "a big red circle"]
    expected = (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25  # 0.64346
    assert bleu4([cand], [refs]) == pytest.approx(expected, rel=1e-8)


def test_bleu4_sums_counts_over_the_corpus_and_penalises_brevity():
    # second image: "a cat" vs refs "a black cat" (3), "a black cat on the mat" (6): closest length 3
    # 1-grams a, cat -> 2/2; 2-gram "a cat" -> 0/1; no 3- or 4-grams
    # corpus: matches (6+2, 4+0, 3+0, 2+0) over (7+2, 6+1, 5+0, 4+0); length c = 9, r = 7 + 3 = 10
    # BLEU = (8/9 * 4/7 * 3/5 * 2/4)^(1/4) * exp(1 - 10/9) = 0.55908
    cands = ["a red circle on a blue background", "a cat"]
    refs = [
        ["a red circle on a green background", "a big red circle"],
        ["a black cat", "a black cat on the mat"],
    ]
    expected = (8 / 9 * 4 / 7 * 3 / 5 * 2 / 4) ** 0.25 * math.exp(1 - 10 / 9)
    assert bleu4(cands, refs) == pytest.approx(expected, rel=1e-8)
    assert expected == pytest.approx(0.559085, abs=1e-6)


def test_bleu4_closest_reference_ties_go_to_the_shorter_one():
    # 3-word candidate, references of 2 and 4 words: r = 2, c = 3 > r, so no penalty;
    # matches: "the red dot" vs ref 2 (4 words) -> 1-grams 3/3, 2-grams 2/2, 3-grams 1/1, 4-grams 0/0
    # the empty 4-gram order gives (0 + 1e-15) / (0 + 1e-9) = 1e-6 in the toolkit: BLEU = 1e-6 ** 0.25
    score = bleu4(["the red dot"], [["red dot", "the red dot here"]])
    assert score == pytest.approx((1e-15 / 1e-9) ** 0.25, rel=1e-6)
    longer_first = bleu4(["the red dot"], [["the red dot here", "red dot"]])
    assert longer_first == pytest.approx(score)


def test_bleu4_properties():
    caps = ["two red circles on a blue background", "a green star in the top left corner"]
    assert bleu4(caps, [[c] for c in caps]) == pytest.approx(1.0)
    refs = [[c, "something else entirely here"] for c in caps]
    good = bleu4(caps, refs)
    worse = bleu4(["two blue circles on a red background", "a green square in the top right corner"], refs)
    assert good == pytest.approx(1.0) and worse < good
    assert bleu4(["zebra"], [["a red circle on a blue background"]]) < 1e-3
    with pytest.raises(ValueError, match="reference"):
        bleu4(["a"], [[]])
    with pytest.raises(ValueError, match="1 candidate"):
        bleu4(["a"], [["a"], ["b"]])


# ----------------------------------------------------------------------------- CIDEr-D


def test_cider_d_by_hand():
    # two images, one reference each: "a red circle", "a blue square"; N = 2, idf = log 2 - log df
    #   "a" is in both images' refs: idf 0; every other n-gram: idf log 2 = L (unseen n-grams too)
    # image B, candidate = reference: cosine 1 for n = 1, 2, 3; no 4-grams (norm 0) -> 0
    #   -> 10 * (1 + 1 + 1 + 0) / 4 = 7.5
    # image A, "a red square": 1-grams {a:0, red:L, square:L} vs {a:0, red:L, circle:L} -> L^2 / 2L^2 = 0.5
    #   2-grams {a red, red square} vs {a red, red circle} -> 0.5; 3-grams differ -> 0 -> 10 * 1/4 = 2.5
    assert cider_d_per_image(["a red square", "a blue square"], [["a red circle"], ["a blue square"]]) == (
        pytest.approx([2.5, 7.5])
    )
    assert cider_d(["a red square", "a blue square"], [["a red circle"], ["a blue square"]]) == pytest.approx(
        5.0
    )
    # clipping and the length penalty: "red red" vs "a red circle"
    #   1-grams {red: 2L} vs {a:0, red:L, circle:L}: clipped dot min(2L, L) * L = L^2, norms 2L and sqrt(2) L
    #   -> 1 / (2 sqrt 2); 2-grams {red red} share nothing -> 0; higher orders empty -> 0
    #   lengths (the toolkit counts bigrams): 1 vs 2 -> penalty exp(-1 / (2 * 6^2))
    expected = 10 * (1 / (2 * math.sqrt(2))) * math.exp(-1 / 72) / 4  # 0.87169
    scores = cider_d_per_image(["red red", "a blue square"], [["a red circle"], ["a blue square"]])
    assert scores == pytest.approx([expected, 7.5])


def _cider_d_independent(cands: list[str], refs: list[list[str]]) -> float:
    """CIDEr-D written per n-gram order, for captions of two words or more (word and bigram lengths agree)."""
    grams = lambda words, n: Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))  # noqa: E731
    df = [
        Counter(g for rs in refs for g in set().union(*(grams(r.split(), n) for r in rs)))
        for n in range(1, 5)
    ]
    idf = lambda n, g: math.log(len(cands)) - math.log(max(1, df[n - 1][g]))  # noqa: E731
    scores = []
    for cand, rs in zip(cands, refs):
        total = 0.0
        for ref in rs:
            penalty = math.exp(-((len(cand.split()) - len(ref.split())) ** 2) / 72)
            for n in range(1, 5):
                h = {g: c * idf(n, g) for g, c in grams(cand.split(), n).items()}
                r = {g: c * idf(n, g) for g, c in grams(ref.split(), n).items()}
                nh, nr = math.hypot(*h.values()), math.hypot(*r.values())
                if nh and nr:
                    total += (
                        penalty * sum(min(w, r.get(g, 0)) * r.get(g, 0) for g, w in h.items()) / (nh * nr)
                    )
        scores.append(10 * total / 4 / len(rs))
    return sum(scores) / len(scores)


def test_cider_d_matches_an_independent_implementation_on_multi_reference_captions():
    rng = random.Random(0)
    words = ["a", "two", "red", "blue", "green", "circle", "circles", "square", "star", "on", "the", "left"]
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))  # noqa: E731
    refs = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(6)]
    cands = [sentence() for _ in refs]
    cands[0] = refs[0][0]
    assert cider_d(cands, refs) == pytest.approx(_cider_d_independent(cands, refs), rel=1e-9)


def test_cider_d_properties():
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(12)]
    truth = [canonical_caption(s) for s in scenes]
    refs = [[t, t.replace(" on ", " against ")] for t in truth]
    perfect = cider_d(truth, refs)
    shuffled = cider_d(truth[1:] + truth[:1], refs)
    generic = cider_d(["a picture of something"] * len(truth), refs)
    assert perfect > 1.0
    assert perfect > shuffled and perfect > generic
    assert cider_d(["a red circle on a blue background"], [["a red circle on a blue background"]]) == 0.0


def test_attribute_accuracy_mean_reads_scene_dicts_and_json():
    rng = random.Random(2)
    scenes = [sample_scene(rng) for _ in range(4)]
    right = [canonical_caption(s) for s in scenes]
    assert attribute_accuracy_mean(right, scenes) == pytest.approx(1.0)
    assert attribute_accuracy_mean(right, [json.dumps(s) for s in scenes]) == pytest.approx(1.0)
    assert attribute_accuracy_mean(right[1:] + right[:1], scenes) < 1.0
    metrics = caption_metrics(right, [[c] for c in right], scenes)
    assert set(metrics) == {"bleu4", "cider_d", "attribute_accuracy"}


# ----------------------------------------------------------------------------- recall@k


def test_recall_at_k_on_hand_made_scores():
    # 3 images; texts 0, 1 belong to image 0, text 2 to image 1, texts 3, 4 to image 2
    text_to_image = [0, 0, 1, 2, 2]
    i2t = np.array(
        [
            [0.1, 0.9, 0.5, 0.2, 0.0],  # image 0: its text 1 ranks first -> TR rank 0
            [0.8, 0.1, 0.7, 0.0, 0.3],  # image 1: text 0 beats its text 2 -> rank 1
            [0.9, 0.8, 0.7, 0.6, 0.1],  # image 2: its best, text 3, after 0, 1, 2 -> rank 3
        ]
    )
    t2i = np.array(
        [
            [0.9, 0.1, 0.2],  # text 0 -> image 0 first: rank 0
            [0.1, 0.5, 0.9],  # text 1 -> image 0 last: rank 2
            [0.3, 0.6, 0.1],  # text 2 -> image 1 first: rank 0
            [0.5, 0.5, 0.5],  # text 3: all tied, ties count against it: rank 2
            [0.0, 0.2, 0.7],  # text 4 -> image 2 first: rank 0
        ]
    )
    m = recall_at_k(i2t, t2i, text_to_image)
    assert m["tr_r1"] == pytest.approx(100 / 3) and m["tr_r5"] == m["tr_r10"] == pytest.approx(100.0)
    assert m["ir_r1"] == pytest.approx(60.0) and m["ir_r5"] == m["ir_r10"] == pytest.approx(100.0)
    assert m["r1_mean"] == pytest.approx((100 / 3 + 60) / 2)
    assert m["tr_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["r_mean"] == pytest.approx((m["tr_mean"] + m["ir_mean"]) / 2)
    # same numbers from torch tensors
    assert recall_at_k(torch.tensor(i2t), torch.tensor(t2i), text_to_image) == pytest.approx(m)


def test_recall_at_k_counts_unscored_ties_as_misses():
    # 12 texts, one per image; image 0's own text was left outside the top-k (-100) like 10 others
    n = 12
    i2t = np.full((n, n), -100.0)
    np.fill_diagonal(i2t, 1.0)
    i2t[0, 0], i2t[0, 5] = -100.0, 2.0
    m = recall_at_k(i2t, i2t.T.copy(), list(range(n)))
    assert m["tr_r10"] == pytest.approx(100 * 11 / 12)  # a -100 tie with 10 wrong texts is no hit
    # image retrieval of the transpose: text 0 (all -100) and text 5 (image 0 above its own) miss
    assert m["ir_r1"] == pytest.approx(100 * 10 / 12) and m["ir_r10"] == pytest.approx(100 * 11 / 12)


REFERENCE = json.loads((Path(__file__).parent / "reference_metrics.json").read_text())
ITM_EVAL_KEYS = {  # BLIP's itm_eval names -> ours
    "txt_r1": "tr_r1",
    "txt_r5": "tr_r5",
    "txt_r10": "tr_r10",
    "txt_r_mean": "tr_mean",
    "img_r1": "ir_r1",
    "img_r5": "ir_r5",
    "img_r10": "ir_r10",
    "img_r_mean": "ir_mean",
    "r_mean": "r_mean",
}


def test_bleu4_and_cider_equal_the_coco_toolkit_on_its_own_numbers():
    """Values computed by pycocoevalcap itself (`reference_metrics.json`, made by it): exact matches,
    no overlap, one and five references, repeated n-grams, an empty candidate, a length tie."""
    ref = REFERENCE["caption"]
    candidates, references = ref["candidates"], ref["references"]
    assert [" ".join(tokenize(c)) for c in candidates] == candidates  # already the toolkit's tokens
    assert bleu4(candidates, references) == pytest.approx(ref["bleu4"], abs=1e-12)
    assert cider_d(candidates, references) == pytest.approx(ref["cider"], abs=1e-12)
    assert cider_d_per_image(candidates, references) == pytest.approx(ref["cider_per_image"], abs=1e-12)


@pytest.mark.parametrize("case", range(len(REFERENCE["retrieval"])))
def test_recall_at_k_equals_blips_itm_eval(case):
    """BLIP's own `itm_eval` numbers on tie-free scores, 1, 2 and 5 texts an image."""
    ref = REFERENCE["retrieval"][case]
    got = recall_at_k(np.array(ref["score_i2t"]), np.array(ref["score_t2i"]), ref["text_to_image"])
    assert {ours: got[ours] for ours in ITM_EVAL_KEYS.values()} == pytest.approx(
        {ours: ref["itm_eval"][theirs] for theirs, ours in ITM_EVAL_KEYS.items()}, abs=1e-9
    )


def test_recall_at_k_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no text"):
        recall_at_k(np.zeros((2, 2)), np.zeros((2, 2)), [0, 0])
    with pytest.raises(ValueError, match="entries"):
        recall_at_k(np.zeros((2, 2)), np.zeros((2, 2)), [0])
    with pytest.raises(ValueError, match="score_t2i"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), [0, 1, 1])


# ----------------------------------------------------------------------------- retrieval_scores

TEXTS = CORPUS  # the sentences the shared tokenizer fixture was built from


@pytest.fixture(scope="module")
def tiny_med(tokenizer) -> MED:
    torch.manual_seed(0)
    med = MED(med_config("tiny", **tokenizer.ids.as_text_config())).eval()
    with torch.no_grad():  # random ITM logits near zero; spread them so re-ranking changes the order
        med.itm_head.weight.mul_(50.0)
    return med


def test_retrieval_scores_rerank_the_itc_top_k_by_itm(tiny_med, tokenizer):
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32)
    text_to_image = [0, 0, 1, 2, 2, 3, 3]
    k = 3
    res = retrieval_scores(tiny_med, tokenizer, pixels, TEXTS, text_to_image, k=k, batch_size=2)
    assert res.i2t.shape == (4, 7) and res.t2i.shape == (7, 4) and res.itc.shape == (4, 7)

    # scored entries are exactly each query's ITC top-k; the rest are -100
    top_t = res.itc.topk(k, dim=1).indices
    scored_i2t = res.i2t != -100.0
    assert scored_i2t.sum(1).tolist() == [k] * 4
    assert all(set(top_t[i].tolist()) == set(scored_i2t[i].nonzero().flatten().tolist()) for i in range(4))
    top_i = res.itc.T.topk(k, dim=1).indices
    scored_t2i = res.t2i != -100.0
    assert scored_t2i.sum(1).tolist() == [k] * 7
    assert all(set(top_i[j].tolist()) == set(scored_t2i[j].nonzero().flatten().tolist()) for j in range(7))

    # one entry by hand: image 2 with its best ITC text, and text 0 with its best ITC image
    med, cfg = tiny_med, tiny_med.config

    def by_hand(i: int, j: int) -> float:
        embeds = med.encode_image(pixels[i : i + 1])
        ids, mask = tokenizer([pre_caption(TEXTS[j])], cfg.max_text_tokens)
        itc = (med.image_feature(embeds) @ med.text_feature(ids, mask).T).item()
        return med.itm_logits(embeds, ids, mask)[0, 1].item() + itc

    with torch.no_grad():
        j = int(top_t[2, 0])
        assert res.i2t[2, j].item() == pytest.approx(by_hand(2, j), abs=1e-4)
        i = int(top_i[0, 0])
        assert res.t2i[0, i].item() == pytest.approx(by_hand(i, 0), abs=1e-4)

    # batching does not change an answer; PIL images go through the model's preprocessing
    again = retrieval_scores(tiny_med, tokenizer, pixels, TEXTS, text_to_image, k=k, batch_size=64)
    assert torch.allclose(again.i2t, res.i2t, atol=1e-4) and torch.allclose(again.t2i, res.t2i, atol=1e-4)
    metrics = res.metrics()
    assert {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean", "r1_mean"} <= set(metrics)


def test_retrieval_scores_accept_pil_images_and_cap_k(tiny_med, tokenizer):
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    res = retrieval_scores(tiny_med, tokenizer, images, TEXTS[:3], [0, 1, 2], k=16)
    assert (res.i2t != -100.0).all() and (res.t2i != -100.0).all()  # k capped at 3: everything re-ranked
    assert torch.allclose(res.t2i, res.i2t.T)  # with k = all, both directions score the same pairs
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_scores(tiny_med, tokenizer, images, TEXTS[:3], [0, 1, 5])


# ----------------------------------------------------------------------------- filter_report


def test_filter_report_precision_recall_and_per_type_numbers():
    truth = [
        # web split: 4 clean, 6 noisy (3 swapped, 2 boilerplate, 1 wrong_attribute)
        {"split": "web", "key": "c1", "noisy": False, "noise_type": None},
        {"split": "web", "key": "c2", "noisy": False, "noise_type": None},
        {"split": "web", "key": "c3", "noisy": False, "noise_type": None},
        {"split": "web", "key": "c4", "noisy": False, "noise_type": None},
        {"split": "web", "key": "s1", "noisy": True, "noise_type": "swapped"},
        {"split": "web", "key": "s2", "noisy": True, "noise_type": "swapped"},
        {"split": "web", "key": "s3", "noisy": True, "noise_type": "swapped"},
        {"split": "web", "key": "b1", "noisy": True, "noise_type": "boilerplate"},
        {"split": "web", "key": "b2", "noisy": True, "noise_type": "boilerplate"},
        {"split": "web", "key": "w1", "noisy": True, "noise_type": "wrong_attribute"},
        {"split": "web", "key": "c5", "noisy": False, "noise_type": None},  # no decision: missing
        {"split": "human", "key": "c1", "noisy": False, "noise_type": None},  # another split: ignored
    ]
    kept = {"c1": True, "c2": True, "c3": False, "c4": True}  # one false rejection
    kept |= {"s1": False, "s2": False, "s3": True, "b1": False, "b2": False, "w1": True}
    report = filter_report(truth, kept)
    # rejected: c3, s1, s2, b1, b2 = 5, of which 4 noisy; noisy = 6
    assert (report.texts, report.noisy, report.rejected, report.true_rejections) == (10, 6, 5, 4)
    assert report.precision == pytest.approx(4 / 5)
    assert report.recall == pytest.approx(4 / 6)
    assert report.f1 == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3))
    assert report.false_rejection_rate == pytest.approx(1 / 4)
    assert report.missing == 1
    table = {r.noise_type: (r.count, r.rejected, r.rate) for r in report.by_type}
    assert table == {
        "swapped": (3, 2, pytest.approx(2 / 3)),
        "boilerplate": (2, 2, 1.0),
        "wrong_attribute": (1, 0, 0.0),
        "clean": (4, 1, 0.25),
    }
    assert [r.noise_type for r in report.by_type] == ["swapped", "boilerplate", "wrong_attribute", "clean"]
    md = report.to_markdown()
    assert "precision 0.800, recall 0.667" in md and "| swapped (recall) | 3 | 2 | 0.667 |" in md
    assert "| clean (false rejections) | 4 | 1 | 0.250 |" in md
    assert json.loads(json.dumps(report.to_dict()))["f1"] == pytest.approx(report.f1)


def test_filter_report_says_n_a_where_a_ratio_has_no_denominator():
    clean_world = [{"split": "web", "key": k, "noisy": False, "noise_type": None} for k in "abc"]
    report = filter_report(clean_world, {"a": False, "b": True, "c": True})  # no noisy text at all
    assert (report.precision, report.recall, report.false_rejection_rate) == (0.0, 0.0, pytest.approx(1 / 3))
    assert "precision 0.000, recall n/a, F1 n/a (1 of 3 texts rejected, 0 noisy)" in report.to_markdown()
    nothing_rejected = filter_report(clean_world, {"a": True, "b": True, "c": True})
    assert "precision n/a, recall n/a, F1 n/a (0 of 3 texts rejected" in nothing_rejected.to_markdown()


def test_filter_report_reads_arrow_tables_and_rejects_unknown_keys():
    import pyarrow as pa

    table = pa.table(
        {
            "split": ["web", "web", "web"],
            "key": ["a", "b", "c"],
            "noisy": [True, False, True],
            "noise_type": ["filename", None, "empty_or_short"],
        }
    )
    report = filter_report(table, {"a": False, "b": True, "c": True})
    assert (report.precision, report.recall) == (1.0, 0.5)
    with pytest.raises(ValueError, match="not in the truth"):
        filter_report(table, {"a": False, "zzz": True})


def test_filter_report_refuses_a_key_twice_and_a_noisy_flag_that_is_not_a_bool():
    """A repeated key would be counted twice; "False" from an untyped CSV would read as noisy."""
    row = {"key": "a", "noisy": True, "noise_type": "swapped"}
    with pytest.raises(ValueError, match="key 'a' twice"):
        filter_report([row, row], {"a": False}, split=None)
    with pytest.raises(ValueError, match="'a': noisy must be true or false, got 'False'"):
        filter_report([{**row, "noisy": "False"}], {"a": False}, split=None)
    numpy_flags = [{**row, "noisy": np.bool_(True)}, {"key": "b", "noisy": np.int64(0), "noise_type": None}]
    report = filter_report(numpy_flags, {"a": False, "b": True}, split=None)
    assert (report.noisy, report.rejected, report.precision) == (1, 1, 1.0)
