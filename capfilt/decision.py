"""CapFilt's decision rule: which texts of a web image survive. One implementation, used by the
bootstrap loop, the cleaning job and the REST service.

BLIP: the filter scores the web text T_w and the synthetic caption T_s against the image with
the ITM head (`[ENC]`); a text is kept when softmax(itm)[match] > 0.5. Both kept texts become
separate pairs of D'. With K sampled candidates, the best by ITM is the synthetic caption;
BLIP-2 instead ranks web and synthetic texts together and keeps the top two per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# Reason codes: one per sample, stable strings written into the ledger.
KEPT_BOTH = "kept_web_and_synthetic"
KEPT_WEB = "kept_web_only"
KEPT_SYNTHETIC = "kept_synthetic_only"
REJECTED = "rejected_web_and_synthetic"
REASONS = (KEPT_BOTH, KEPT_WEB, KEPT_SYNTHETIC, REJECTED)

Mode = Literal["best", "blip2"]


DEFAULT_THRESHOLD = 0.5  # BLIP's: keep a text when its ITM p(match) is above it


@dataclass(frozen=True)
class Rule:
    """threshold: keep a text when its ITM p(match) is strictly above it (BLIP: 0.5).
    synthetic_per_image: mode "best" (BLIP): the web text is judged on its own and the best
        `synthetic_per_image` of the K candidates by ITM are judged (1 in BLIP, 2 as BLIP-2 keeps).
    mode "blip2": web and synthetic texts are ranked together by ITM and the top `blip2_top` kept,
        each still above the threshold."""

    threshold: float = DEFAULT_THRESHOLD
    synthetic_per_image: int = 1
    mode: Mode = "best"
    blip2_top: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise ValueError(f"threshold is a probability in [0, 1]; got {self.threshold}")
        if self.synthetic_per_image < 0:
            raise ValueError(f"synthetic_per_image must be >= 0; got {self.synthetic_per_image}")
        if self.mode not in ("best", "blip2"):
            raise ValueError(f"mode must be 'best' or 'blip2'; got {self.mode!r}")
        if self.blip2_top < 1:
            raise ValueError(f"blip2_top must be >= 1; got {self.blip2_top}")


@dataclass(frozen=True)
class Scored:
    text: str
    itm: float  # ITM p(match) with [ENC]


@dataclass
class Decision:
    """What happens to one web image's texts."""

    web: Scored | None
    web_kept: bool
    synthetic_kept: list[Scored] = field(default_factory=list)  # kept candidates, best first
    reason: str = REJECTED

    @property
    def kept_texts(self) -> list[tuple[str, str, float]]:
        """(origin, text, itm) of every pair this image contributes to D'."""
        web = [("web", self.web.text, self.web.itm)] if self.web_kept and self.web is not None else []
        return web + [("synthetic", s.text, s.itm) for s in self.synthetic_kept]


def decide(web: Scored | None, synthetic: Sequence[Scored], rule: Rule) -> Decision:
    """Apply `rule` to one image: its web text (None when it has none) and its K candidates."""
    ranked = sorted(synthetic, key=lambda s: s.itm, reverse=True)  # stable: ties keep sample order
    if rule.mode == "blip2":
        pool = ([("web", web)] if web is not None else []) + [("synthetic", s) for s in ranked]
        pool.sort(key=lambda item: item[1].itm, reverse=True)
        top = [item for item in pool[: rule.blip2_top] if item[1].itm > rule.threshold]
        web_kept = any(origin == "web" for origin, _ in top)
        kept = [s for origin, s in top if origin == "synthetic"]
    else:
        web_kept = web is not None and web.itm > rule.threshold
        kept = [s for s in ranked[: rule.synthetic_per_image] if s.itm > rule.threshold]
    if web_kept and kept:
        reason = KEPT_BOTH
    elif web_kept:
        reason = KEPT_WEB
    elif kept:
        reason = KEPT_SYNTHETIC
    else:
        reason = REJECTED
    return Decision(web, web_kept, kept, reason)


def threshold_for_keep_fraction(scores: Sequence[float] | np.ndarray, fraction: float) -> float:
    """The threshold that keeps (strictly above) as close as possible to `fraction` of `scores`.

    Use it on the ITM scores of every text the rule would judge (web and best synthetic). Ties
    at the cut keep fewer texts rather than more."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"keep fraction must be in [0, 1]; got {fraction}")
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    if values.size == 0 or fraction == 0.0:
        return 1.0
    n_keep = round(fraction * values.size)
    if n_keep >= values.size:
        return float(max(0.0, np.nextafter(values[-1], -np.inf)))
    if n_keep == 0:
        return float(values[0])
    # keep values[:n_keep]: the threshold is the next value down (kept texts are strictly above it)
    return float(values[n_keep])
