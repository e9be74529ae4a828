"""The order in which an epoch visits the pairs: a random permutation (BLIP), or one that puts
pairs with similar texts side by side, so that a batch carries hard negatives for ITC and ITM.

Why: ITM learns from the negatives its batch offers (`model.losses.sample_hard_negatives` draws
them from the batch by similarity). In a random batch of 32 scenes the nearest other text almost
always differs in a colour, so a model can match pairs by colour alone and never learn shape or
count: a text with one of those wrong then passes the filter. Batches made of groups of look-alike
texts ("two red circles on a gray background" next to "a red circle and a blue square on a gray
background") make the rest of the content count. The losses and the sampling of negatives within
the batch stay BLIP's; only which pairs meet in a batch changes.

`similar_order` is linear in the number of pairs: it looks for neighbours within pools of `pool`
pairs of a random permutation, never across the whole dataset.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

BATCHING = ("random", "similar")
_WORD = re.compile(r"[a-z0-9]+")


def random_order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def text_features(texts: Sequence[str]) -> np.ndarray:
    """(N, V) float32: each text's set of words weighted by IDF and L2-normalised, so the cosine of
    two texts counts the rare words they share (colours, shapes) more than common ones ("a", "on")."""
    words = [set(_WORD.findall(t.lower())) for t in texts]
    df = Counter(w for ws in words for w in ws)
    vocab: dict[str, int] = {}  # words of two texts or more: one text's alone make no neighbours
    rows = [[vocab.setdefault(w, len(vocab)) for w in ws if df[w] > 1] for ws in words]
    features = np.zeros((len(texts), max(1, len(vocab))), dtype=np.float32)
    for i, row in enumerate(rows):
        features[i, row] = 1.0
    idf = np.log((1 + len(texts)) / (1 + features.sum(0))) + 1.0
    features *= idf
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def similar_order(
    features: np.ndarray,
    image_ids: Sequence[int],
    group: int,
    generator: torch.Generator,
    pool: int = 2048,
) -> list[int]:
    """A permutation of range(N) made of runs of `group` pairs: an anchor, then the `group - 1`
    pairs most like it (by `features` cosine) among the not-yet-placed pairs of its pool, never
    another caption of the anchor's own image. Groups are shuffled, so a batch of `k * group`
    consecutive pairs holds k groups of look-alikes. A pool's last pairs, too few or too alike to
    its own images to group, close the order as they come.
    """
    n = features.shape[0]
    ids = np.asarray(image_ids)
    perm = torch.randperm(n, generator=generator).numpy()
    groups: list[list[int]] = []
    rest: list[int] = []
    for start in range(0, n, pool):
        members = perm[start : start + pool]
        sim = features[members] @ features[members].T
        sim[ids[members][:, None] == ids[members][None, :]] = -np.inf  # self and the same image
        free = np.ones(len(members), dtype=bool)
        for a in range(len(members)):
            if not free[a]:
                continue
            free[a] = False
            row = np.where(free, sim[a], -np.inf)
            picks = np.argsort(-row, kind="stable")[: group - 1]
            picks = picks[np.isfinite(row[picks])]
            if len(picks) < group - 1:
                rest.append(int(members[a]))
                continue
            free[picks] = False
            groups.append([int(members[a]), *(int(members[p]) for p in picks)])
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    return [i for g in shuffled for i in groups[g]] + rest
