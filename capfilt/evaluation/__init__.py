"""Evaluation: caption metrics, BLIP's retrieval protocol, and the filter against the world's truth.

Modules: `captioning` (BLEU-4, CIDEr-D as the COCO toolkit computes them, attribute accuracy),
`retrieval` (ITC ranking, top-k re-ranked by ITM, recall at 1/5/10), `filtering` (precision,
recall and F1 of web-text rejections, by noise type).
"""

from __future__ import annotations

from .captioning import (
    attribute_accuracy_mean,
    bleu4,
    caption_metrics,
    cider_d,
    cider_d_per_image,
    tokenize,
)
from .filtering import FilterReport, TypeRow, filter_report
from .retrieval import RetrievalResult, recall_at_k, retrieval_scores

__all__ = [
    "FilterReport",
    "RetrievalResult",
    "TypeRow",
    "attribute_accuracy_mean",
    "bleu4",
    "caption_metrics",
    "cider_d",
    "cider_d_per_image",
    "filter_report",
    "recall_at_k",
    "retrieval_scores",
    "tokenize",
]
