"""Choosing the next token: transformers' logits processors and nucleus sampling.

The processors (repetition penalty, top-k, top-p) mask logits exactly as transformers'
RepetitionPenalty, TopK and TopP warpers do. Nucleus sampling draws each row's token by inverse
CDF from that row's own uniforms (`row_uniforms`, seeded per image and sample), so a caption
never depends on which rows share its batch; on a GPU, `Nucleus` does it with no host sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Nucleus sampling with a top-k, on a GPU: the top-k keeps this many candidates beyond the k-th, so
# that tokens tied with the k-th value (transformers keeps them all) are among the candidates
# without the host asking the device which rows have ties. A row whose ties may run past them is
# noted on the device; when decoding ends, the images of such rows are decoded again (alone)
# through whole-row masks. Base at 384 px on an H100, 512 images: the sort of the whole vocabulary and its
# scans took about 60 of a decode's 263 ms of GPU time.
TIE_WINDOW = 16


def repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (R, V), changed in place; seqs (R, T) every token so far, prompt included. Applied
    once per distinct token (every copy of a repeated token gets the value gathered before)."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, seqs)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter_(1, seqs, seen)


def mask_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mask (-inf) every token scoring below the k-th best (transformers' TopKLogitsWarper: ties
    with the k-th are kept)."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (R, 1)
    return scores.masked_fill(scores < kth, -math.inf)


def mask_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (-inf) tokens outside the nucleus; the most likely token is always kept.

    transformers' TopPLogitsWarper, token for token: it sorts ascending and removes the prefix
    whose cumulative probability is <= 1 - top_p. On a GPU that is what runs (a sort gives its
    indices for free there, and no step waits on the device). On a CPU, that prefix is every token
    below the first kept value, so only the sorted *values* are needed (numpy's SIMD sort, several
    times faster than an argsort); rows where tied values straddle the boundary take the argsort path.
    """
    if top_p >= 1.0:
        return scores
    if scores.device.type != "cpu":
        return scores.masked_fill(_top_p_by_argsort(scores, top_p), -math.inf)
    if scores.dtype == torch.float32:
        sorted_scores = torch.from_numpy(np.sort(scores.numpy(), axis=-1))
    else:
        sorted_scores = torch.sort(scores, dim=-1).values
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    removed = (cumulative <= (1 - top_p)).sum(dim=-1).clamp(max=scores.shape[-1] - 1)  # (R,)
    lowest_kept = sorted_scores.gather(1, removed[:, None])  # (R, 1)
    remove = scores < lowest_kept
    tied = remove.sum(dim=-1) != removed  # equal values on both sides of the boundary
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        remove[rows] = _top_p_by_argsort(scores[rows], top_p)
    return scores.masked_fill(remove, -math.inf)


def _top_p_by_argsort(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """The removal mask of TopPLogitsWarper, computed as it computes it (an ascending argsort)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return remove.scatter(1, order, remove)


def row_uniforms(seeds: Sequence[int], K: int, steps: int) -> torch.Tensor:
    """(B * K, steps) float64 uniforms; row (i, k) depends only on (seeds[i], k)."""
    rows = []
    for seed in seeds:
        for k in range(K):
            # SeedSequence mixes (seed, k) so nearby seeds give unrelated streams.
            state = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
            generator = torch.Generator(device="cpu").manual_seed(state)
            rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows)


class Nucleus:
    """Sample by inverse CDF with each row's own uniform for this step (no global RNG): uniforms
    (R, steps) from `row_uniforms`; called with a step's scores (R_running, V), the running rows'
    original indices and the step, it returns their tokens (R_running,).

    With a top-k, on a CPU the top-k candidates alone are sorted (`sample_among_top_k`); on other
    devices (`windowed`, the default there) the candidates are the top k + TIE_WINDOW, and each
    row's first step whose ties at the k-th value may have run past them is kept on the device:
    `untrusted` names, once decoding is over, the rows to decode again with `windowed=False`
    (whole-row masks). Only those rows: each row's tokens depend on its own logits alone."""

    def __init__(
        self,
        uniforms: torch.Tensor,
        top_k: int,
        top_p: float,
        temperature: float = 1.0,
        windowed: bool | None = None,
    ) -> None:
        self.uniforms, self.top_k, self.top_p, self.temperature = uniforms, top_k, top_p, temperature
        self.windowed = uniforms.device.type != "cpu" if windowed is None else windowed
        self._never = uniforms.shape[1]  # a step no row reaches
        self._first_spill: torch.Tensor | None = None  # (R,) on the device: no host sync per step

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        u = self.uniforms[rows, step, None]  # (R, 1)
        k, top_p = self.top_k, self.top_p
        if 0 < k < scores.shape[-1]:
            if self.windowed:
                picked, spilled = sample_in_window(scores, u, k, top_p, TIE_WINDOW)
                if self._first_spill is None:
                    self._first_spill = torch.full(
                        (self.uniforms.shape[0],), self._never, dtype=torch.long, device=scores.device
                    )
                first = self._first_spill[rows]
                self._first_spill[rows] = torch.where(spilled, torch.clamp(first, max=step), first)
                return picked
            if scores.device.type == "cpu":
                return sample_among_top_k(scores, u, k, top_p)
        probs = mask_top_p(mask_top_k(scores, k), top_p).softmax(dim=-1)  # 0 outside the nucleus
        return inverse_cdf(probs, u)

    def untrusted(self, last_steps: Sequence[int]) -> list[int]:
        """The rows whose ties ran past the window at or before `last_steps[r]`, the step of row
        r's last token ([SEP] included); a finished row sampled on after it does not count.
        Waits for the device."""
        if self._first_spill is None:
            return []
        first = self._first_spill.tolist()
        return [r for r, (f, last) in enumerate(zip(first, last_steps)) if f <= last]


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (R, C), u (R, 1) in [0, 1): per row, the first column whose cumulative probability
    (in column order) exceeds u times the row's total. -> (R,) column indices."""
    cdf = probs.double().cumsum(dim=-1)
    target = u * cdf[:, -1:]  # (R, 1), in [0, total)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first column with cdf > target
    # cdf only rises at columns with mass, so `picked` is one; but rounding can push `target`
    # to the total (picked == C): those rows take their last column with mass.
    C = probs.shape[1]
    over = picked >= C
    if picked.device.type != "cpu":  # no branch: the host never waits for the device
        last = C - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        return torch.where(over, last, picked)
    if bool(over.any()):
        last = C - 1 - (probs[over] > 0).flip(-1).int().argmax(dim=-1)
        picked = picked.masked_scatter(over, last)
    return picked


def sample_among_top_k(scores: torch.Tensor, u: torch.Tensor, k: int, top_p: float) -> torch.Tensor:
    """The token `mask_top_p(mask_top_k(scores, k))` and `inverse_cdf` pick, computed on the k
    candidates alone: a top-k instead of a sort of the whole vocabulary (on a CPU, most of a
    sampling step's cost). The tokens outside the top k have no probability, so the nucleus and
    the cumulative sums over the candidates in token order are those of the whole row. Rows where a tie at the
    k-th value lets more than k tokens in take the whole-row path, as transformers keeps ties."""
    values, index = torch.topk(scores, k + 1, dim=-1)  # (R, k + 1), descending; k < V
    tied = values[:, k] == values[:, k - 1]  # the (k+1)-th ties the k-th: more than k tokens kept
    values, index = values[:, :k], index[:, :k]
    picked = _pick_among(mask_top_p(values, top_p), index, u)  # the nucleus as on the whole row
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        probs = mask_top_p(mask_top_k(scores[rows], k), top_p).softmax(dim=-1)
        picked[rows] = inverse_cdf(probs, u[rows])
    return picked


def sample_in_window(
    scores: torch.Tensor, u: torch.Tensor, k: int, top_p: float, extra: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token `mask_top_p(mask_top_k(scores, k))` and `inverse_cdf` pick, computed on the
    k + `extra` best candidates with no host sync: candidates below the k-th value are masked as
    `mask_top_k` masks them, so tokens tied with it (up to `extra` of them beyond the k-th) stay
    in. Where the nucleus's edge cuts through equal values, which of them stay is the sort's order
    of ties, here as on the whole row, and the two orders may differ. -> (picked (R,), spilled (R,)
    bool): rows whose last candidate still ties a finite k-th value, whose ties may go on past the
    window, so whose pick is not to be trusted."""
    R, V = scores.shape
    width = min(V, k + extra)
    values, index = torch.topk(scores, width, dim=-1)  # (R, width), descending
    kth = values[:, k - 1 : k]  # (R, 1)
    if width < V:  # a k-th value of -inf: fewer than k finite tokens, all of them in the window
        spilled = (values[:, -1] == kth[:, 0]) & kth[:, 0].isfinite()
    else:
        spilled = torch.zeros(R, dtype=torch.bool, device=scores.device)
    nucleus = mask_top_p(values.masked_fill(values < kth, -math.inf), top_p)  # as on the whole row
    return _pick_among(nucleus, index, u), spilled


def _pick_among(nucleus: torch.Tensor, index: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token `inverse_cdf` picks among candidates: nucleus (R, C) their masked scores, index
    (R, C) their token ids. The candidates go in token order first, as the whole row's cumulative
    sum runs (the ids are distinct, so any sort gives it; on a CPU numpy's SIMD argsort took a
    third of torch's time for 128 rows of 50). -> (R,) token ids."""
    if index.device.type == "cpu":
        order = torch.from_numpy(np.argsort(index.numpy(), axis=-1))
    else:
        order = index.argsort(dim=-1)
    index = index.gather(1, order)
    return index.gather(1, inverse_cdf(nucleus.gather(1, order).softmax(dim=-1), u)[:, None]).squeeze(1)
