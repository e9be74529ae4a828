"""CapFilt on a batch of web samples: caption, score, decide.

The two halves are separate functions because the cleaning job runs them in separate actor
pools (captioner, filter); the bootstrap loop and the REST service call `curate`, which is
exactly the two in sequence. Sampling seeds come from (job seed, sample key), so a sample gets the
same synthetic captions whatever batch, actor or machine it lands on, and a resumed job
reproduces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from capfilt.model.generate import GenerationConfig

from .decision import Decision, Rule, Scored, decide
from .inference import Captioner, Filter, Images
from .text import is_blank


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the job seed and the sample key (stable across processes and runs)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Candidate:
    text: str
    itm: float
    itc: float


@dataclass
class Curated:
    """One web sample after CapFilt: every score, and the decision."""

    key: str
    web_text: str | None
    web_itm: float | None
    web_itc: float | None
    synthetic: list[Candidate]
    decision: Decision


def caption_samples(
    captioner: Captioner,
    images: Images,
    keys: Sequence[str],
    generation: GenerationConfig,
    seed: int,
) -> list[list[str]]:
    """K synthetic captions per image, seeded per sample key."""
    return captioner.caption(images, generation, seeds=[sample_seed(seed, k) for k in keys])


def score_and_decide(
    filt: Filter,
    images: Images,
    keys: Sequence[str],
    web_texts: Sequence[str | None],
    synthetic: Sequence[Sequence[str]],
    rule: Rule,
) -> list[Curated]:
    """Score each image's web text and candidates with one image encoding, then apply `rule`.

    A web text with nothing to read (empty, white space, zero-width or control characters only:
    `capfilt.text.is_blank`) is not scored (nothing to match) and never kept."""
    texts = []
    for web, cands in zip(web_texts, synthetic):
        has_web = not is_blank(web)
        texts.append(([web] if has_web else []) + list(cands))
    scores = filt.score(images, texts)
    out = []
    for key, web, cands, row in zip(keys, web_texts, synthetic, scores):
        has_web = len(row) > len(cands)
        web_score = row[0] if has_web else None
        cand_scores = row[1:] if has_web else row
        candidates = [Candidate(t, s.itm, s.itc) for t, s in zip(cands, cand_scores)]
        decision = decide(
            Scored(web, web_score.itm) if web_score is not None and web is not None else None,
            [Scored(c.text, c.itm) for c in candidates],
            rule,
        )
        out.append(
            Curated(
                key=key,
                web_text=web,
                web_itm=web_score.itm if web_score else None,
                web_itc=web_score.itc if web_score else None,
                synthetic=candidates,
                decision=decision,
            )
        )
    return out


def curate(
    captioner: Captioner,
    filt: Filter,
    images: Images,
    keys: Sequence[str],
    web_texts: Sequence[str | None],
    rule: Rule,
    generation: GenerationConfig,
    seed: int = 0,
) -> list[Curated]:
    """CapFilt for decoded web samples: caption, then score and decide."""
    if not (len(images) == len(keys) == len(web_texts)):
        raise ValueError(f"got {len(images)} images, {len(keys)} keys and {len(web_texts)} web texts")
    if captioner.image_size == filt.image_size:  # one stacked copy of the pixels serves both models
        images = captioner.stack(images)
    synthetic = caption_samples(captioner, images, keys, generation, seed)
    return score_and_decide(filt, images, keys, web_texts, synthetic, rule)
