"""Image-text retrieval as BLIP evaluates it (`train_retrieval.py`: `evaluation` and `itm_eval`).

1. ITC: every image and every text is encoded once; similarity = image_feature @ text_feature.T.
2. For each image, its k most similar texts are re-scored by the image-grounded encoder (ITM);
   for each text, its k most similar images likewise. A re-scored pair gets
   ITM match logit + ITC similarity; every other entry stays at -100, as in BLIP.
3. Recall@1/5/10 for text retrieval (an image is a hit at K when any of its captions ranks in
   its top K) and image retrieval (a text's own image in its top K), in percent.

The pairs the two directions re-score overlap; each distinct pair runs through ITM once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from capfilt.images import preprocess
from capfilt.model.med import MED
from capfilt.model.tokenizer import CaptionTokenizer
from capfilt.text import pre_caption

log = logging.getLogger(__name__)

UNSCORED = -100.0  # BLIP's fill value for pairs outside the top-k


@dataclass(frozen=True)
class RetrievalResult:
    """Score matrices of one evaluation set (all on the CPU, float32).

    i2t: (N images, M texts) final scores for text retrieval; t2i: (M, N) for image retrieval;
    itc: (N, M) ITC cosine similarities; text_to_image[j]: the image of text j.
    """

    i2t: torch.Tensor
    t2i: torch.Tensor
    itc: torch.Tensor
    text_to_image: list[int]
    k: int

    def metrics(self) -> dict[str, float]:
        """`recall_at_k` of the re-ranked scores."""
        return recall_at_k(self.i2t, self.t2i, self.text_to_image)

    def itc_metrics(self) -> dict[str, float]:
        """`recall_at_k` of the ITC similarities alone (before ITM re-ranking)."""
        return recall_at_k(self.itc, self.itc.T, self.text_to_image)


def _check_text_to_image(text_to_image: Sequence[int], n_images: int, n_texts: int) -> np.ndarray:
    owners = np.asarray(text_to_image, dtype=np.int64)
    if owners.shape != (n_texts,):
        raise ValueError(f"text_to_image has {owners.size} entries for {n_texts} texts")
    if n_texts and (owners.min() < 0 or owners.max() >= n_images):
        raise ValueError(f"text_to_image must hold image indices in [0, {n_images}); got {owners.tolist()}")
    return owners


def _batches(n: int, size: int) -> range:
    return range(0, n, size)


@torch.inference_mode()
def retrieval_scores(
    med: MED,
    tokenizer: CaptionTokenizer,
    images: torch.Tensor | Sequence[Image.Image],
    texts: Sequence[str],
    text_to_image: Sequence[int],
    k: int = 16,
    batch_size: int = 64,
    clean_text: bool = True,
) -> RetrievalResult:
    """BLIP's retrieval scores of N images against M texts.

    images: normalised pixels (N, 3, H, W) or PIL images (preprocessed with the MED's config).
    texts: M strings, cleaned with BLIP's `pre_caption` unless `clean_text` is False, and
    tokenised once as `[CLS] text [SEP]` (at most `config.max_text_tokens` tokens).
    k: how many candidates each query re-ranks with ITM (BLIP: 256 on COCO, 128 on Flickr);
    capped at the number of candidates. batch_size: images, texts or ITM pairs per forward pass.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be at least 1; got k={k}, batch_size={batch_size}")
    n_images, n_texts = len(images), len(texts)
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"retrieval needs images and texts; got {n_images} images, {n_texts} texts")
    owners = _check_text_to_image(text_to_image, n_images, n_texts)
    cfg, device = med.config, med.device

    # --- unimodal features (ITC) and the image tokens ITM attends to, each input encoded once
    image_embeds, image_feats = [], []
    for start in _batches(n_images, batch_size):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, torch.Tensor):
            pixels = chunk
        else:
            pixels = preprocess(chunk, cfg.vision.image_size, cfg.image_mean, cfg.image_std)
        embeds = med.encode_image(pixels.to(device))  # (B, 1+P, Dv)
        image_feats.append(med.image_feature(embeds).float())  # (B, E)
        image_embeds.append(embeds.cpu())  # kept off the accelerator: N x (1+P) x Dv can be large
    image_embeds_all = torch.cat(image_embeds)  # (N, 1+P, Dv)

    cleaned = [pre_caption(t) if clean_text else t for t in texts]
    ids, mask = tokenizer(cleaned, cfg.max_text_tokens)  # (M, T) each, padded to the longest
    text_feats = [
        med.text_feature(ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)).float()
        for s in _batches(n_texts, batch_size)
    ]
    itc = torch.cat(image_feats) @ torch.cat(text_feats).T  # (N, M)

    # --- the pairs to re-rank: each image's top-k texts and each text's top-k images
    k_texts, k_images = min(k, n_texts), min(k, n_images)
    top_texts = itc.topk(k_texts, dim=1).indices  # (N, k_texts)
    top_images = itc.topk(k_images, dim=0).indices  # (k_images, M)
    rows = torch.arange(n_images, device=itc.device)
    cols = torch.arange(n_texts, device=itc.device)
    pair_i = torch.cat([rows.repeat_interleave(k_texts), top_images.T.reshape(-1)])
    pair_j = torch.cat([top_texts.reshape(-1), cols.repeat_interleave(k_images)])
    flat = torch.unique(pair_i * n_texts + pair_j)  # distinct (image, text) pairs, sorted
    pair_i, pair_j = (flat // n_texts).cpu(), (flat % n_texts).cpu()
    log.debug("re-ranking %d distinct pairs with ITM (k=%d)", flat.numel(), k)

    match = []
    for start in _batches(flat.numel(), batch_size):
        pi, pj = pair_i[start : start + batch_size], pair_j[start : start + batch_size]
        logits = med.itm_logits(image_embeds_all[pi].to(device), ids[pj].to(device), mask[pj].to(device))
        match.append(logits[:, 1].float())  # (B,) the "match" logit, as BLIP's score
    itm = torch.cat(match).to(itc.device)  # (pairs,) aligned with `flat`

    # --- final scores: ITM logit + ITC similarity inside each query's top-k, -100 elsewhere
    def rerank(top: torch.Tensor, codes: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        """top, codes: (Q, k) candidates and their pair codes; sims: (Q, candidates) ITC -> (Q, candidates)."""
        out = torch.full_like(sims, UNSCORED)
        return out.scatter_(1, top, itm[torch.searchsorted(flat, codes)] + sims.gather(1, top))

    top_images = top_images.T.contiguous()  # (M, k_images)
    i2t = rerank(top_texts, rows[:, None] * n_texts + top_texts, itc)  # (N, M)
    t2i = rerank(top_images, top_images * n_texts + cols[:, None], itc.T)  # (M, N)
    return RetrievalResult(i2t=i2t.cpu(), t2i=t2i.cpu(), itc=itc.cpu(), text_to_image=owners.tolist(), k=k)


def _to_numpy(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        return scores.detach().float().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def recall_at_k(
    score_i2t: torch.Tensor | np.ndarray,
    score_t2i: torch.Tensor | np.ndarray,
    text_to_image: Sequence[int],
) -> dict[str, float]:
    """BLIP's `itm_eval`: TR and IR recall at 1, 5, 10 in percent, and their means.

    score_i2t: (N images, M texts); score_t2i: (M, N). Text retrieval ranks an image's texts by
    score_i2t and takes the best-placed of its own captions; image retrieval ranks a text's images
    by score_t2i. A tie with a wrong candidate counts against the query (BLIP's argsort leaves
    ties to chance), so candidates left at -100 never count as found. Keys: tr_r1, tr_r5, tr_r10,
    tr_mean, ir_r1, ir_r5, ir_r10, ir_mean, r_mean (mean of tr_mean and ir_mean, BLIP's model
    selection), r1_mean (mean of TR@1 and IR@1).
    """
    i2t, t2i = _to_numpy(score_i2t), _to_numpy(score_t2i)
    n_images, n_texts = i2t.shape
    if t2i.shape != (n_texts, n_images):
        raise ValueError(f"score_t2i must be ({n_texts}, {n_images}) to match score_i2t; got {t2i.shape}")
    owners = _check_text_to_image(text_to_image, n_images, n_texts)
    own = owners[None, :] == np.arange(n_images)[:, None]  # (N, M): text j is a caption of image i
    without = np.flatnonzero(~own.any(axis=1))
    if without.size:
        raise ValueError(f"images {without[:5].tolist()} have no text; every image needs a caption")

    # TR rank of image i: wrong texts scoring at least as high as its best own caption
    best_own = np.where(own, i2t, -np.inf).max(axis=1)  # (N,)
    tr_rank = ((i2t >= best_own[:, None]) & ~own).sum(axis=1)
    # IR rank of text j: other images scoring at least as high as its own image
    own_score = t2i[np.arange(n_texts), owners]  # (M,)
    ir_rank = (t2i >= own_score[:, None]).sum(axis=1) - 1

    out: dict[str, float] = {}
    for name, ranks in (("tr", tr_rank), ("ir", ir_rank)):
        for at in (1, 5, 10):
            out[f"{name}_r{at}"] = 100.0 * float(np.mean(ranks < at))
        out[f"{name}_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    out["r1_mean"] = (out["tr_r1"] + out["ir_r1"]) / 2
    return out
