"""The decision rule: threshold semantics, best-of-K, BLIP-2's variant, keep-fraction, D' composition."""

from __future__ import annotations

import numpy as np
import pytest

from capfilt.decision import (
    KEPT_BOTH,
    KEPT_SYNTHETIC,
    KEPT_WEB,
    REJECTED,
    Rule,
    Scored,
    decide,
    threshold_for_keep_fraction,
)


def test_threshold_is_strict():
    rule = Rule(threshold=0.5)
    assert not decide(Scored("w", 0.5), [], rule).web_kept  # p == threshold is not a match
    assert decide(Scored("w", 0.5000001), [], rule).web_kept


@pytest.mark.parametrize(
    ("web", "syn", "reason"),
    [(0.9, 0.8, KEPT_BOTH), (0.9, 0.2, KEPT_WEB), (0.1, 0.8, KEPT_SYNTHETIC), (0.1, 0.2, REJECTED)],
)
def test_reasons_and_dprime_composition(web, syn, reason):
    d = decide(Scored("web text", web), [Scored("synthetic text", syn)], Rule())
    assert d.reason == reason
    kept = d.kept_texts
    assert (("web", "web text", web) in kept) == (web > 0.5)
    assert (("synthetic", "synthetic text", syn) in kept) == (syn > 0.5)
    assert len(kept) == (web > 0.5) + (syn > 0.5)  # both kept texts become separate pairs


def test_best_of_k_by_itm():
    cands = [Scored("a", 0.6), Scored("b", 0.95), Scored("c", 0.7), Scored("d", 0.1)]
    one = decide(None, cands, Rule(synthetic_per_image=1))
    assert [s.text for s in one.synthetic_kept] == ["b"]
    two = decide(None, cands, Rule(synthetic_per_image=2))
    assert [s.text for s in two.synthetic_kept] == ["b", "c"]
    # the best candidate must still pass the threshold
    assert decide(None, [Scored("x", 0.3), Scored("y", 0.4)], Rule()).synthetic_kept == []


def test_missing_web_text_is_never_kept():
    d = decide(None, [Scored("s", 0.9)], Rule())
    assert not d.web_kept and d.reason == KEPT_SYNTHETIC


def test_blip2_ranks_web_and_synthetic_together():
    cands = [Scored("s1", 0.9), Scored("s2", 0.8), Scored("s3", 0.6)]
    d = decide(Scored("w", 0.7), cands, Rule(mode="blip2", blip2_top=2))
    assert not d.web_kept and [s.text for s in d.synthetic_kept] == ["s1", "s2"]
    d = decide(Scored("w", 0.95), cands, Rule(mode="blip2", blip2_top=2))
    assert d.web_kept and [s.text for s in d.synthetic_kept] == ["s1"]
    d = decide(Scored("w", 0.95), [Scored("s1", 0.2)], Rule(mode="blip2", blip2_top=2))
    assert d.reason == KEPT_WEB  # the second of the top two is below the threshold


def test_keep_fraction_picks_a_threshold_that_keeps_that_fraction():
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    for fraction in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        t = threshold_for_keep_fraction(scores, fraction)
        assert (scores > t).mean() == pytest.approx(fraction, abs=1e-3)
    assert threshold_for_keep_fraction([], 0.5) == 1.0
    with pytest.raises(ValueError, match="keep fraction"):
        threshold_for_keep_fraction(scores, 1.5)


def test_rule_validation_names_the_field():
    with pytest.raises(ValueError, match="threshold"):
        Rule(threshold=1.5)
    with pytest.raises(ValueError, match="synthetic_per_image"):
        Rule(synthetic_per_image=-1)
    with pytest.raises(ValueError, match="mode"):
        Rule(mode="vote")  # type: ignore[arg-type]
