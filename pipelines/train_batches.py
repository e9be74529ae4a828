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
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

_WORD = re.compile(r"[a-z0-9]+")


def random_order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


@dataclass(frozen=True)
class TextFeatures:
    """Each text's set of words (ids of words found in two texts or more: a word of one text alone
    makes no neighbours) and every word's IDF. Sparse on purpose: a web corpus has many words."""

    words: list[np.ndarray]  # per text, int32 word ids
    idf: np.ndarray  # (V,) float32

    def __len__(self) -> int:
        return len(self.words)

    def dense(self, members: np.ndarray) -> np.ndarray:
        """(len(members), words of these texts) IDF-weighted, L2-normalised rows: the cosine of two
        rows counts the rare words the texts share (colours, shapes) more than common ones ("a")."""
        return self.sparse(members).toarray()

    def sparse(self, members: np.ndarray) -> sparse.csr_matrix:
        """`dense`, as a CSR matrix: a pool of a web corpus has tens of thousands of words."""
        present = [self.words[i] for i in members]
        columns, flat = np.unique(
            np.concatenate([*present, np.zeros(0, dtype=np.int32)]), return_inverse=True
        )
        indptr = np.cumsum([0, *(len(w) for w in present)])
        values = np.concatenate([*(self.idf[w] for w in present), np.zeros(0, dtype=np.float32)])
        shape = (len(members), max(1, len(columns)))
        rows = sparse.csr_matrix((values, flat.reshape(-1), indptr), shape=shape, dtype=np.float32)
        norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.maximum(norms, 1e-12)).astype(np.float32) @ rows


def text_features(texts: Sequence[str]) -> TextFeatures:
    words = [set(_WORD.findall(t.lower())) for t in texts]
    df = Counter(w for ws in words for w in ws)
    vocab = {w: i for i, w in enumerate(w for w, n in df.items() if n > 1)}
    ids = [np.array(sorted(vocab[w] for w in ws if w in vocab), dtype=np.int32) for ws in words]
    counts = np.array([df[w] for w in vocab], dtype=np.float32)
    idf = (np.log((1 + len(texts)) / (1 + counts)) + 1.0).astype(np.float32)
    return TextFeatures(ids, idf)


def similar_order(
    features: TextFeatures,
    image_ids: Sequence[int],
    group: int,
    generator: torch.Generator,
    pool: int = 2048,
) -> list[int]:
    """A permutation of range(N) made of runs of `group` pairs: an anchor, then the `group - 1`
    pairs most like it (by the cosine of `features.dense` rows) among the not-yet-placed pairs of
    its pool, never another caption of the anchor's own image. Groups are shuffled, so a batch of `k * group`
    consecutive pairs holds k groups of look-alikes. A pool's last pairs, too few or too alike to
    its own images to group, close the order as they come.
    """
    n = len(features)
    ids = np.asarray(image_ids)
    perm = torch.randperm(n, generator=generator).numpy()
    groups: list[list[int]] = []
    rest: list[int] = []
    for start in range(0, n, pool):
        members = perm[start : start + pool]
        rows = features.sparse(members)
        sim = (rows @ rows.T).toarray()
        sim[ids[members][:, None] == ids[members][None, :]] = -np.inf  # self and the same image
        m = len(members)
        k = min(m - 1, 8 * group)  # each row's best candidates, sorted; most anchors need no more
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((m, 0), dtype=np.int64)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), axis=1, kind="stable"), 1)
        free = np.ones(m, dtype=bool)
        for a in range(m):
            if not free[a]:
                continue
            free[a] = False
            picks = [c for c in top[a] if free[c] and np.isfinite(sim[a, c])][: group - 1]
            if len(picks) < group - 1:  # the candidates are taken: look at the whole pool
                row = np.where(free, sim[a], -np.inf)
                picks = [c for c in np.argsort(-row, kind="stable")[: group - 1] if np.isfinite(row[c])]
            if len(picks) < group - 1:
                rest.append(int(members[a]))
                continue
            free[picks] = False
            groups.append([int(members[a]), *(int(members[p]) for p in picks)])
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    return [i for g in shuffled for i in groups[g]] + rest


# ----------------------------------------------------------------------------- text negatives


def confusable_tokens(
    token_lists: Sequence[Sequence[int]],
    vocab_size: int,
    special: Sequence[int],
    min_count: int = 20,
    k: int = 8,
    min_similarity: float = 0.5,
    image_ids: Sequence[int] | None = None,
    max_synonymy: float = 0.2,
) -> torch.Tensor:
    """(vocab_size, k) token ids that occur between the same neighbours as each token, most alike
    first, -1 where there are fewer: tokens a caption could hold in the same place ("red" and
    "blue" in "a _ circle", "circle" and "star" in "a red _ on").

    Learnt from the training captions alone (distributional similarity: the cosine of left- and
    right-neighbour counts), so no vocabulary of attributes is given. Tokens seen fewer than
    `min_count` times and special tokens get no candidates and are never picked.

    With `image_ids` (several captions per image, as in human-annotated data), pairs that behave as
    synonyms are dropped: b is no candidate for a when, of the images whose captions use a, more
    than `max_synonymy` use b in another caption but never both in one ("big" and "large"; "red"
    and "blue" meet in one caption when an image shows both).
    """
    V = vocab_size
    rows, cols = [], []
    for tokens in token_lists:
        seq = [V, *tokens, V + 1]  # V, V + 1: start and end markers
        for i in range(1, len(seq) - 1):
            rows += [seq[i], seq[i]]
            cols += [seq[i - 1], (V + 2) + seq[i + 1]]
    counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=V)[:V] / 2
    context = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(V, 2 * (V + 2)))
    context.sum_duplicates()
    context.data = np.sqrt(context.data)  # damp the most frequent neighbours
    norms = np.sqrt(np.asarray(context.multiply(context).sum(axis=1)).ravel())
    eligible = counts >= min_count
    eligible[[t for t in special if 0 <= t < V]] = False
    scale = np.where(eligible & (norms > 0), 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    unit = sparse.diags(scale) @ context
    similarity = (unit @ unit.T).toarray()  # (V, V): vocabularies of captioning models are small
    np.fill_diagonal(similarity, 0.0)
    if image_ids is not None:
        similarity[(_synonymy(token_lists, image_ids, V) > max_synonymy).toarray()] = 0.0
    out = torch.full((V, k), -1, dtype=torch.long)
    for t in np.flatnonzero(eligible):
        best = np.argsort(-similarity[t])[:k]
        best = best[similarity[t, best] >= min_similarity]
        out[t, : len(best)] = torch.from_numpy(best)
    return out


def _synonymy(token_lists: Sequence[Sequence[int]], image_ids: Sequence[int], V: int) -> sparse.csr_matrix:
    """(V, V): of the images whose captions use token a, the fraction whose captions use b too,
    but only in other captions than a's (row a, column b)."""
    by_image: dict[int, list[set[int]]] = {}
    for tokens, image in zip(token_lists, image_ids):
        by_image.setdefault(int(image), []).append(set(tokens))
    apart: Counter[tuple[int, int]] = Counter()
    users = np.zeros(V, dtype=np.float64)
    for captions in by_image.values():
        anywhere = set().union(*captions)
        for a in anywhere:
            users[a] += 1
        if len(captions) < 2:  # one caption: every pair of its words is used together
            continue
        together = set()
        for c in captions:
            together.update((a, b) for a in c for b in c)
        for a in anywhere:
            for b in anywhere:
                if a != b and (a, b) not in together:
                    apart[(a, b)] += 1
    if not apart:
        return sparse.csr_matrix((V, V), dtype=np.float32)
    pairs = np.array(list(apart.keys()))
    rate = np.array(list(apart.values()), dtype=np.float64) / users[pairs[:, 0]]
    return sparse.csr_matrix((rate.astype(np.float32), (pairs[:, 0], pairs[:, 1])), shape=(V, V))
