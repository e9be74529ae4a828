"""CapFilt on a batch: the filter scores web and synthetic texts with [ENC], and the decision
follows the rule; sampling depends on (seed, key) only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capfilt.curate import curate, sample_seed
from capfilt.decision import Rule
from capfilt.inference import Captioner, Filter
from capfilt.model.generate import GenerationConfig
from capfilt.text import is_blank

GEN = GenerationConfig(method="nucleus", num_captions=3, repetition_penalty=1.1, max_tokens=8, min_tokens=2)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def models(our_captioner_dir, our_filter_dir):
    return Captioner(our_captioner_dir), Filter(our_filter_dir)


def test_sample_seed_is_stable_and_key_dependent():
    assert sample_seed(0, "000000001") == sample_seed(0, "000000001")
    assert sample_seed(0, "000000001") != sample_seed(0, "000000002")
    assert sample_seed(1, "000000001") != sample_seed(0, "000000001")
    assert 0 <= sample_seed(123, "k") < 2**63


def test_curate_scores_with_enc_and_applies_the_rule(models):
    captioner, filt = models
    images, keys = _images(5), ["k0", "k1", "k2", "k3", "k4"]
    # k4: nothing to read, though str.strip() keeps it (zero-width space, BOM, NUL)
    web = ["a red circle", "", None, "two green squares", "\u200b\ufeff\x00 "]
    rule = Rule(threshold=0.5, synthetic_per_image=1)
    out = curate(captioner, filt, images, keys, web, rule, GEN, seed=9)
    assert [c.key for c in out] == keys
    for c, img, w in zip(out, images, web):
        assert len(c.synthetic) == 3
        texts = ([w] if not is_blank(w) else []) + [s.text for s in c.synthetic]
        direct = filt.score([img], [texts])[0]  # Filter.score is ITM with [ENC] (tests/model/test_sharing.py)
        got = ([c.web_itm] if not is_blank(w) else []) + [s.itm for s in c.synthetic]
        assert got == pytest.approx([d.itm for d in direct], abs=1e-6)
        best = max(c.synthetic, key=lambda s: s.itm)
        assert bool(c.decision.synthetic_kept) == (best.itm > 0.5)
        if best.itm > 0.5:
            assert c.decision.synthetic_kept[0].text == best.text
        if is_blank(w):
            assert c.web_itm is None and not c.decision.web_kept
        else:
            assert c.decision.web_kept == (c.web_itm > 0.5)


def test_curate_is_independent_of_batching(models):
    captioner, filt = models
    images, keys, web = _images(3), ["a", "b", "c"], ["x", "y", "z"]
    together = curate(captioner, filt, images, keys, web, Rule(), GEN, seed=1)
    alone = [
        curate(captioner, filt, [i], [k], [w], Rule(), GEN, seed=1)[0] for i, k, w in zip(images, keys, web)
    ]
    for a, b in zip(together, alone):
        assert [s.text for s in a.synthetic] == [s.text for s in b.synthetic]
        assert a.decision.reason == b.decision.reason


def test_threshold_extremes_keep_all_or_nothing(models):
    captioner, filt = models
    images, keys, web = _images(2), ["a", "b"], ["x", "y"]
    none = curate(captioner, filt, images, keys, web, Rule(threshold=1.0), GEN)
    assert all(c.decision.kept_texts == [] for c in none)
    every = curate(captioner, filt, images, keys, web, Rule(threshold=0.0), GEN)
    assert all(len(c.decision.kept_texts) == 2 for c in every)


def test_a_text_of_invisible_characters_is_blank():
    for text in (None, "", "  \n\t", "\u200b\u200b", "\ufeff", "\x00", "\u200d \u2060\x7f"):
        assert is_blank(text), repr(text)
    for text in ("a", " \u200ba", "\u00e9", "\u05d0", "\U0001f600", "_"):
        assert not is_blank(text), repr(text)
