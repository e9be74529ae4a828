"""BLIP's three pre-training losses around a MED: ITC, ITM with hard negatives, LM.

Follows salesforce/BLIP (`blip_pretrain.py`, `blip_retrieval.py`):
    ITC  image [CLS] vs text [CLS] similarities / learnable temperature, against a queue of momentum
         features; soft targets mix the momentum model's softmax (weight `alpha`) with the true pairs.
    ITM  the image-grounded encoder classifies B positives and 2B hard negatives (one negative image
         per text and one negative text per image, drawn from the batch by similarity).
    LM   the image-grounded decoder predicts the next token, label smoothing 0.1, pad (and the
         captioner's prompt) not scored.
The filter fine-tunes with ITC + ITM (`image_ids` given: captions of one image are all positives),
the captioner with LM only (`prompt_length` > 0).

The temperature, momentum encoders and feature queues are training state: they live in this module's
state_dict (a training checkpoint resumes them), not in the MED checkpoint, which holds `med` only.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .med import MED
from .text import TextTransformer

logger = logging.getLogger(__name__)

IGNORE = -100  # target id cross-entropy skips; also the "no image" id in idx_queue
Features = tuple[Tensor, Tensor]  # normalised ITC features (image, text), each (B, embed_dim)


def alpha_ramp(step: int, steps_per_epoch: int, alpha: float = 0.4, epochs: int = 1) -> float:
    """ITC distillation weight at `step` (from 0), ramped linearly from 0 to `alpha` over the first
    `epochs` epochs, so the untrained momentum model's targets do not steer the start of training.
    BLIP ramps over 2 epochs in pre-training (pretrain.py) and 1 in fine-tuning (train_retrieval.py)."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return alpha * min(1.0, step / (steps_per_epoch * epochs))


def hardness_ramp(step: int, ramp_steps: int) -> float:
    """Weight of the similarity-ranked draw of ITM negatives at `step` (from 0), ramped linearly from
    uniform (0) to BLIP's draw (1) over `ramp_steps`; 0 ramp steps: BLIP's draw from the start.

    Why: drawn by similarity from the first step, the negatives of a model trained from scratch (or
    of a short fine-tuning) look as plausible to it as the positives, and ITM stays at its prior
    (loss ~0.64) for hundreds of steps; uniform negatives teach the match first, then the ramp
    hands over to the hard ones. Measured on the built-in world in docs/results.md."""
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must not be negative, got {ramp_steps}")
    return 1.0 if ramp_steps == 0 else min(1.0, step / ramp_steps)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """(B, ...) on every rank -> (world_size * B, ...) in rank order, without gradient; `tensor`
    itself when torch.distributed is not initialised (single process)."""
    if _world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, positive_mask: Tensor, hardness: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Draw one ITM hard negative per pair, with probability softmax(similarity) over the batch.

    sim_i2t (B, B): image b vs text j; sim_t2i (B, B): text b vs image j; positive_mask (B, B) bool:
    image b and text j belong together (the diagonal, or every caption of the same image);
    hardness: the weight of softmax(similarity) in a mix with the uniform draw (1: BLIP's; see
    `hardness_ramp`).
    Returns (neg_image, neg_text), each (B,): a negative image index for each text and a negative
    text index for each image; a positive is never drawn.
    """
    if not 0.0 <= hardness <= 1.0:
        raise ValueError(f"hardness must lie in [0, 1], got {hardness}")

    def weights(sim: Tensor) -> Tensor:
        soft = F.softmax(sim.float(), dim=1)
        return hardness * soft + (1.0 - hardness) / sim.shape[1] if hardness < 1.0 else soft

    # +1e-4 as BLIP's pre-training (its retrieval fine-tuning adds none; here the filter's fine-tuning
    # keeps it too, as its recipe was measured with it): a floor so every non-positive can still be
    # drawn when the softmax underflows.
    if not (bool(torch.isfinite(sim_t2i).all()) and bool(torch.isfinite(sim_i2t).all())):
        raise FloatingPointError("the ITC similarities the hard negatives are drawn from")
    weights_t2i = (weights(sim_t2i) + 1e-4).masked_fill(positive_mask.t(), 0)
    weights_i2t = (weights(sim_i2t) + 1e-4).masked_fill(positive_mask, 0)
    if (weights_t2i.sum(1) == 0).any() or (weights_i2t.sum(1) == 0).any():
        raise ValueError("ITM needs at least two different images in a batch: some pair has no negative")
    neg_image = torch.multinomial(weights_t2i, 1).squeeze(1)
    neg_text = torch.multinomial(weights_i2t, 1).squeeze(1)
    return neg_image, neg_text


def swap_one_token(
    ids: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row with a token that has candidates gets one such token (position > 0, not padding)
    replaced by one of its candidates, both drawn uniformly. -> (new ids (B, T), changed (B,) bool)."""
    B, T = ids.shape
    cand = candidates.to(ids.device)[ids]  # (B, T, k)
    n = (cand >= 0).sum(-1)  # (B, T)
    eligible = (n > 0) & mask.bool()
    eligible[:, 0] = False
    changed = eligible.any(1)
    noise = torch.rand(B, T, generator=generator, device="cpu").to(ids.device)
    pos = torch.where(eligible, noise, -1.0).argmax(1)  # (B,) a uniform eligible position
    rows = torch.arange(B, device=ids.device)
    count = n[rows, pos].clamp(min=1)
    which = (torch.rand(B, generator=generator, device="cpu").to(ids.device) * count).long()
    new_token = cand[rows, pos, which.clamp(max=cand.shape[-1] - 1)]
    out = ids.clone()
    out[rows[changed], pos[changed]] = new_token[changed]
    return out, changed


class MEDObjectives(nn.Module):
    """A MED plus the training state its losses need; `forward` returns {"itc_loss", "itm_loss", "lm_loss"}
    (only the enabled ones) for the training loop to sum.

    Momentum encoders and queues exist only when ITC is enabled, the temperature when ITC or ITM is.
    The momentum text encoder is the unimodal encoder only (no decoder self-attention).
    """

    def __init__(
        self,
        med: MED,
        *,
        itc: bool = True,
        itm: bool = True,
        lm: bool = True,
        queue_size: int = 57600,
        momentum: float = 0.995,
        temp: float = 0.07,
        label_smoothing: float = 0.1,
        prompt_length: int = 0,
    ) -> None:
        super().__init__()
        cfg = med.config
        if not (itc or itm or lm):
            raise ValueError("enable at least one of the losses itc, itm, lm")
        if (itc or itm) and not cfg.has_encoder:
            raise ValueError("ITC and ITM need the MED's text encoder; this MED has none (has_encoder=False)")
        if lm and not cfg.has_decoder:
            raise ValueError("LM needs the MED's text decoder; this MED has none (has_decoder=False)")
        if itc and queue_size <= 0:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.med = med
        self.itc, self.itm, self.lm = itc, itm, lm
        self.momentum = momentum
        self.label_smoothing = label_smoothing
        self.prompt_length = prompt_length  # [DEC] + prompt tokens, not scored by the LM loss
        # (V, k) confusable tokens (`pipelines.train_batches.confusable_tokens`): when set, ITM also
        # learns from each text with one token swapped, against its own image. None: BLIP's ITM.
        self.token_swaps: Tensor | None = None
        if itc or itm:
            self.temp = nn.Parameter(torch.tensor(float(temp), device=med.device))
        if itc:
            self.queue_size = queue_size
            self._build_momentum_encoders()
            dev, dtype = med.device, med.text.embeddings.word_embeddings.weight.dtype
            for name in ("image_queue", "text_queue"):  # (embed_dim, Q) momentum features, random at first
                features = torch.randn(cfg.embed_dim, queue_size, device=dev)
                self.register_buffer(name, F.normalize(features, dim=0).to(dtype))
            ids = torch.full((1, queue_size), IGNORE, dtype=torch.long, device=dev)
            self.register_buffer("idx_queue", ids)  # (1, Q) image id of each queued pair
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long, device=dev))
            logger.debug("ITC momentum encoders built; queue of %d features", queue_size)

    # ------------------------------------------------------------------ momentum encoders
    def _build_momentum_encoders(self) -> None:
        med, cfg = self.med, self.med.config
        self.visual_encoder_m = copy.deepcopy(med.visual_encoder)
        self.vision_proj_m = copy.deepcopy(med.vision_proj)
        self.text_proj_m = copy.deepcopy(med.text_proj)
        self.text_m = TextTransformer(cfg.text, cfg.vision.width, has_encoder=True, has_decoder=False)
        result = self.text_m.load_state_dict(med.text.state_dict(), strict=False)
        assert not result.missing_keys, f"momentum text encoder missing {result.missing_keys}"
        assert all(".causal_attention." in k for k in result.unexpected_keys)
        weight = med.text.embeddings.word_embeddings.weight
        self.text_m.to(device=weight.device, dtype=weight.dtype)
        for _, p_m in self._momentum_pairs():
            p_m.requires_grad_(False)

    def _momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(online, momentum) parameter pairs, matched by name."""
        pairs = []
        for name in ("visual_encoder", "vision_proj", "text", "text_proj"):  # each has a `<name>_m` copy
            online = dict(getattr(self.med, name).named_parameters())
            pairs += [(online[n], p_m) for n, p_m in getattr(self, f"{name}_m").named_parameters()]
        return pairs

    @torch.no_grad()
    def _momentum_update(self) -> None:
        online, ema = zip(*self._momentum_pairs())
        torch._foreach_mul_(ema, self.momentum)  # param_m = m * param_m + (1 - m) * param
        torch._foreach_add_(ema, [p.detach() for p in online], alpha=1.0 - self.momentum)

    @torch.no_grad()
    def momentum_features(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Features:
        """Normalised ITC features of the momentum encoders: image (B, embed_dim), text (B, embed_dim)."""
        image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixels)[:, 0]), dim=-1)
        ids = ids.clone()
        ids[:, 0] = self.med.config.text.cls_token_id
        text_feat_m = F.normalize(self.text_proj_m(self.text_m(ids, mask, mode="text")[:, 0]), dim=-1)
        return image_feat_m, text_feat_m

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor | None) -> None:
        image_feats = concat_all_gather(image_feat)  # (world * B, D): every rank's queue stays identical
        text_feats = concat_all_gather(text_feat)
        n = image_feats.shape[0]
        if image_ids is None:
            ids = torch.full((n,), IGNORE, dtype=torch.long, device=image_feats.device)
        else:
            ids = concat_all_gather(image_ids.reshape(-1).to(self.idx_queue.dtype))
        ptr = int(self.queue_ptr)
        assert n <= self.queue_size, "forward checks that the queue size is a multiple of the global batch"
        # Slots ptr .. ptr + n - 1, wrapping, so a change of batch size cannot run past the end.
        slots = (ptr + torch.arange(n, device=self.queue_ptr.device)) % self.queue_size
        self.image_queue[:, slots] = image_feats.t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feats.t().to(self.text_queue.dtype)
        self.idx_queue[:, slots] = ids.view(1, -1)
        self.queue_ptr[0] = (ptr + n) % self.queue_size

    # ------------------------------------------------------------------ losses
    def forward(
        self,
        pixels: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        alpha: float = 0.4,
        image_ids: Tensor | None = None,
        hardness: float = 1.0,
    ) -> dict[str, Tensor]:
        """pixels (B, 3, H, W); input_ids, attention_mask (B, T): `[CLS] text [SEP]` padded with pad id;
        alpha: ITC distillation weight (see `alpha_ramp`); image_ids (B,): the image each pair shows,
        when several captions of one image may meet (fine-tuning), so they count as positives;
        hardness: how ITM draws its negatives (see `hardness_ramp`; 1 is BLIP's).

        In eval mode the momentum encoders and queues are left untouched (validation does not
        change training state).
        """
        if self.itc or self.itm:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        if self.itc and self.training:
            global_batch = pixels.shape[0] * _world_size()
            if self.queue_size % global_batch:
                raise ValueError(
                    f"queue_size {self.queue_size} must be divisible by the global batch size "
                    f"{global_batch}; choose a multiple of it and drop incomplete batches (drop_last)"
                )
        image_embeds = self.med.encode_image(pixels)  # (B, 1 + N, Dv), shared by all three losses
        losses: dict[str, Tensor] = {}
        feats = None
        if self.itc:
            feats = self.med.image_feature(image_embeds), self.med.text_feature(input_ids, attention_mask)
            losses["itc_loss"] = self._itc_loss(pixels, input_ids, attention_mask, feats, alpha, image_ids)
        if self.itm:
            losses["itm_loss"] = self._itm_loss(
                image_embeds, input_ids, attention_mask, feats, image_ids, hardness
            )
        if self.lm:
            losses["lm_loss"] = self._lm_loss(image_embeds, input_ids, attention_mask)
        return losses

    def _itc_loss(
        self,
        pixels: Tensor,
        ids: Tensor,
        mask: Tensor,
        feats: Features,
        alpha: float,
        image_ids: Tensor | None,
    ) -> Tensor:
        """feats: the online image and text features (B, embed_dim) -> the ITC loss."""
        image_feat, text_feat = feats
        with torch.no_grad():
            if self.training:
                self._momentum_update()
            image_feat_m, text_feat_m = self.momentum_features(pixels, ids, mask)
            # Batch first, then the queue: (embed_dim, B + Q).
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp  # (B, B+Q)
            sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp
            if image_ids is None:  # each pair is its own only positive
                targets = torch.eye(*sim_i2t_m.shape, device=sim_i2t_m.device)
            else:
                img_ids = image_ids.reshape(-1, 1)
                pos = img_ids.eq(torch.cat([img_ids.t(), self.idx_queue.clone().detach()], dim=1)).float()
                targets = pos / pos.sum(1, keepdim=True)  # every caption of the image, queued ones too
            i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets

        sim_i2t = image_feat @ text_feat_m_all / self.temp  # (B, B+Q)
        sim_t2i = text_feat @ image_feat_m_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
        if self.training:
            self._dequeue_and_enqueue(image_feat_m, text_feat_m, image_ids)
        return (loss_i2t + loss_t2i) / 2

    def _itm_loss(
        self,
        image_embeds: Tensor,
        ids: Tensor,
        mask: Tensor,
        feats: Features | None,
        image_ids: Tensor | None,
        hardness: float = 1.0,
    ) -> Tensor:
        """feats: ITC's image and text features, if computed (they rank the hard negatives)."""
        B = ids.shape[0]
        if B < 2:
            raise ValueError(f"ITM needs at least two different images in a batch, got batch size {B}")
        with torch.no_grad():
            if feats is None:  # ITC off: features only rank the negatives
                feats = self.med.image_feature(image_embeds), self.med.text_feature(ids, mask)
            sim_i2t = feats[0] @ feats[1].t() / self.temp  # (B, B), this rank's batch only
            if image_ids is None:
                positive = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)
            else:
                img_ids = image_ids.reshape(-1, 1)
                positive = img_ids.eq(img_ids.t())  # every caption of the same image is a positive
            neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_i2t.t(), positive, hardness)

        # One encoder pass: B positives, B (text, negative image), B (image, negative text).
        ids_all = [ids, ids, ids[neg_text]]
        mask_all = [mask, mask, mask[neg_text]]
        images_all = [image_embeds, image_embeds[neg_image], image_embeds]
        swapping = self.token_swaps is not None and self.training
        if swapping:
            # Beyond BLIP: each text with one token swapped for a confusable one, against its
            # own image (the attribute-level negative a batch rarely offers).
            swapped, changed = swap_one_token(ids, mask, self.token_swaps)
            rows = changed.nonzero().squeeze(1)
            ids_all.append(swapped[rows])
            mask_all.append(mask[rows])
            images_all.append(image_embeds[rows])
        logits = self.med.itm_logits(torch.cat(images_all), torch.cat(ids_all), torch.cat(mask_all))
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        loss = F.cross_entropy(logits[: 3 * B], labels)  # BLIP's ITM
        if swapping and len(rows):
            # A term of its own, one swapped text per positive: p(match) keeps BLIP's calibration
            # (a fourth negative per positive in BLIP's term would move every score down).
            pair = torch.cat([logits[rows], logits[3 * B :]])
            pair_labels = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))]).long().to(logits.device)
            loss = loss + F.cross_entropy(pair, pair_labels)
        return loss

    def _lm_loss(self, image_embeds: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        targets = ids.masked_fill(ids == self.med.config.text.pad_token_id, IGNORE)
        targets[:, : self.prompt_length] = IGNORE  # the captioner's prompt is given, not learnt
        logits = self.med.lm_logits(image_embeds, ids, mask)  # (B, T, V)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),  # position t predicts token t + 1
            targets[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            label_smoothing=self.label_smoothing,
        )
