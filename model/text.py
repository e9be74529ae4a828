"""The text side of the MED: BERT layers whose self-attention exists twice.

One `TextTransformer` serves all three text functions of the paper:
- unimodal text encoder (ITC): bidirectional self-attention, no cross-attention;
- image-grounded text encoder (ITM): bidirectional self-attention + cross-attention;
- image-grounded text decoder (LM): causal self-attention + cross-attention.
Encoder and decoder share every parameter except self-attention: each layer holds `attention`
(the encoder's, bidirectional) and `causal_attention` (the decoder's), while the embeddings,
`crossattention`, `intermediate` and `output` are one set of modules used by both.
Names inside a layer are BERT's, so BLIP and transformers checkpoints map onto them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

Mode = Literal["text", "encoder", "decoder"]


@dataclass
class KVCache:
    """Keys and values kept between decoding steps, per layer: the causal self-attention's
    (growing by one token a step) and the cross-attention's (computed once from the image).

    After `reserve(n)`, the self-attention's keys and values live in buffers of n positions that
    each step writes into, instead of being concatenated into new tensors every step."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    capacity: int = 0  # positions in the reserved buffers; 0: not reserved
    filled: int = 0  # positions held, when reserved

    @classmethod
    def empty(cls, depth: int) -> KVCache:
        return cls([None] * depth, [None] * depth)

    @property
    def length(self) -> int:
        if self.capacity:
            return self.filled
        first = self.self_kv[0] if self.self_kv else None
        return 0 if first is None else first[0].shape[2]

    def reserve(self, capacity: int) -> None:
        """Move the self-attention keys and values (after the prompt) into buffers of `capacity`
        positions, so that each later step writes its token in place."""
        if self.capacity or any(kv is None for kv in self.self_kv):
            raise ValueError("reserve() needs a cache filled by the prompt, and reserves once")
        filled = self.length
        if capacity < filled:
            raise ValueError(f"cannot reserve {capacity} positions for a cache holding {filled}")
        for i, (k, v) in enumerate(self.self_kv):  # type: ignore[misc]
            R, H, _, D = k.shape
            kb, vb = k.new_empty(R, H, capacity, D), v.new_empty(R, H, capacity, D)
            kb[:, :, :filled], vb[:, :, :filled] = k, v
            self.self_kv[i] = (kb, vb)
        self.capacity, self.filled = capacity, filled

    def append(
        self, index: int, k: torch.Tensor, v: torch.Tensor, past: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add layer `index`'s new keys and values (B, nh, T, hs) after `past` positions; -> all of
        them so far. A reserved cache counts them once `advance` is called after the last layer."""
        held = self.self_kv[index]
        if held is None:
            self.self_kv[index] = (k, v)
            return k, v
        if not self.capacity:
            k, v = torch.cat([held[0], k], dim=2), torch.cat([held[1], v], dim=2)
            self.self_kv[index] = (k, v)
            return k, v
        stop = past + k.shape[2]
        if stop > self.capacity:
            raise ValueError(f"the decoding cache holds {self.capacity} positions; position {stop} was asked")
        kb, vb = held
        kb[:, :, past:stop], vb[:, :, past:stop] = k, v
        return kb[:, :, :stop], vb[:, :, :stop]

    def advance(self, tokens: int) -> None:
        if self.capacity:
            self.filled += tokens

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep (and reorder) batch rows, e.g. after beam search picks its parents."""
        pick = lambda kv: None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))  # noqa: E731
        return KVCache(
            [pick(kv) for kv in self.self_kv], [pick(kv) for kv in self.cross_kv], self.capacity, self.filled
        )


class Embeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (BLIP's BERT has no token types)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.width)
        self.LayerNorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class Projections(nn.Module):
    """Query, key and value projections (BERT's `attention.self`)."""

    def __init__(self, width: int, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)


class Residual(nn.Module):
    """Dense, dropout, residual add and post-LayerNorm (BERT's `*.output`)."""

    def __init__(self, in_width: int, width: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """Multi-head attention over `kv_input` (self-attention when it is the layer input)."""

    def __init__(self, config: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout_p = config.dropout
        self.self = Projections(config.width, kv_width)
        self.output = Residual(config.width, config.width, config.layer_norm_eps, config.dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, nh, T, hs)

    def kv(self, kv_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.self.key(kv_input)), self.split_heads(self.self.value(kv_input))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x (B, T, D); kv: keys and values (B, nh, S, hs); mask additive, broadcast to (B, nh, T, S)."""
        q = self.split_heads(self.self.query(x))  # (B, nh, T, hs)
        k, v = kv
        if q.shape[2] == 1 and q.device.type == "cpu" and not self.training:
            y = _attend_one(q, k, v, mask)
        else:
            dropout = self.dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(x.shape)  # (B, T, D)
        return self.output(y, x)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention for one query per row (a decoding step) as two batched matmuls: on a CPU, SDPA's
    kernel costs more than the arithmetic for a single query. q (B, nh, 1, hs), k and v (B, nh, S, hs)
    (views of the decoding cache: batch and heads merge without a copy). -> (B, nh, 1, hs)."""
    B, H, _, D = q.shape
    S = k.shape[2]
    scores = torch.bmm(q.reshape(B * H, 1, D), k.reshape(B * H, S, D).transpose(1, 2)).mul_(D**-0.5)
    if mask is not None:
        scores = (scores.view(B, H, 1, S) + mask).view(B * H, 1, S)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, S, D)).view(B, H, 1, D)


class TextLayer(nn.Module):
    """Self-attention (the mode's own), cross-attention to the image (shared), feed-forward (shared)."""

    def __init__(self, config: TextConfig, vision_width: int, has_encoder: bool, has_decoder: bool) -> None:
        super().__init__()
        if has_encoder:
            self.attention = Attention(config, config.width)  # bidirectional, encoder only
        if has_decoder:
            self.causal_attention = Attention(config, config.width)  # causal, decoder only
        self.crossattention = Attention(config, vision_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(config.width, config.intermediate)
        self.output = Residual(config.intermediate, config.width, config.layer_norm_eps, config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mode: Mode,
        self_mask: torch.Tensor | None,
        image: torch.Tensor | None,
        cache: KVCache | None,
        index: int,
        image_index: torch.Tensor | None = None,
        texts_per_image: int = 1,
        past: int = 0,
        keep: slice | None = None,
    ) -> torch.Tensor:
        """`keep`: the only positions whose outputs are needed (a last layer's); every position
        still gives its keys and values, but queries, cross-attention and feed-forward run on
        these alone."""
        sa = self.causal_attention if mode == "decoder" else self.attention
        k, v = sa.kv(x)
        if cache is not None:
            k, v = cache.append(index, k, v, past)
        if keep is not None:
            x = x[:, keep]
            if self_mask is not None and self_mask.shape[2] > 1:
                self_mask = self_mask[:, :, keep]
        x = sa(x, self_mask, (k, v))
        if mode != "text":
            if cache is not None and cache.cross_kv[index] is not None:
                cross_kv = cache.cross_kv[index]
            else:
                assert image is not None, "image-grounded modes need image features"
                cross_kv = self.crossattention.kv(image)
                if image_index is not None:  # several texts per image: project each image once
                    cross_kv = (
                        cross_kv[0].index_select(0, image_index),
                        cross_kv[1].index_select(0, image_index),
                    )
                if cache is not None:  # contiguous, so each step's attention reads it without a copy
                    cross_kv = (cross_kv[0].contiguous(), cross_kv[1].contiguous())
                    cache.cross_kv[index] = cross_kv
            if texts_per_image > 1:
                # Cross-attention keeps no state between queries, so the texts of one image can be
                # one long query sequence against that image's keys and values: no copies of them.
                B, L, D = x.shape
                grouped = x.reshape(B // texts_per_image, texts_per_image * L, D)
                x = self.crossattention(grouped, None, cross_kv).reshape(B, L, D)
            else:
                x = self.crossattention(x, None, cross_kv)
        h = F.gelu(self.intermediate.dense(x))
        return self.output(h, x)


class TextTransformer(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, width) in one of the three modes."""

    def __init__(self, config: TextConfig, vision_width: int, has_encoder: bool, has_decoder: bool) -> None:
        super().__init__()
        assert has_encoder or has_decoder, "a text transformer needs at least one self-attention"
        self.config = config
        self.has_encoder, self.has_decoder = has_encoder, has_decoder
        self.embeddings = Embeddings(config)
        self.layer = nn.ModuleList(
            TextLayer(config, vision_width, has_encoder, has_decoder) for _ in range(config.depth)
        )
        self.grad_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mode: Mode,
        image: torch.Tensor | None = None,
        cache: KVCache | None = None,
        image_index: torch.Tensor | None = None,
        texts_per_image: int = 1,
        keep: slice | None = None,
    ) -> torch.Tensor:
        """attention_mask (B, T) of 1/0 over the keys given now (cached keys are always visible).

        image (B, N, Dv), one per text row; or (B_img, N, Dv) shared by several rows, each image's
        cross-attention keys and values computed once: with `image_index` (B,) row i attends to
        image `image_index[i]`; with `texts_per_image` n, rows n*j .. n*j + n - 1 attend to image j.
        `keep`: return only these positions, (B, len, width); the last layer computes no others
        (ITM and ITC read position 0 alone, a caption's first step the last position)."""
        if (
            texts_per_image > 1
            and image is not None
            and image.shape[0] * texts_per_image != input_ids.shape[0]
        ):
            raise ValueError(
                f"{input_ids.shape[0]} texts are not {texts_per_image} per image for {image.shape[0]} images"
            )
        if mode == "decoder" and not self.has_decoder:
            raise ValueError("this checkpoint has no text decoder (it cannot caption)")
        if mode != "decoder" and not self.has_encoder:
            raise ValueError("this checkpoint has no text encoder (it cannot score texts)")
        past = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, past_length=past)
        mask = self_attention_mask(
            attention_mask, x.shape[1], past, causal=mode == "decoder", dtype=x.dtype, device=x.device
        )
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            only = keep if i == last else None
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer,
                    x,
                    mode,
                    mask,
                    image,
                    None,
                    i,
                    image_index,
                    texts_per_image,
                    0,
                    only,
                    use_reentrant=False,
                )
            else:
                x = layer(x, mode, mask, image, cache, i, image_index, texts_per_image, past, only)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return x


def self_attention_mask(
    attention_mask: torch.Tensor | None,
    T: int,
    past: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Additive mask (B or 1, 1, T, past + T): padding keys hidden, and future keys when causal."""
    if attention_mask is None and (not causal or T == 1):
        return None
    S = past + T
    neg = torch.finfo(dtype).min
    mask = None
    device = attention_mask.device if attention_mask is not None else device
    if attention_mask is not None:
        keys = (
            attention_mask[:, -S:]
            if attention_mask.shape[1] >= S
            else F.pad(attention_mask, (S - attention_mask.shape[1], 0), value=1)
        )
        mask = torch.zeros(keys.shape[0], 1, 1, S, dtype=dtype, device=device)
        mask = mask.masked_fill(keys[:, None, None, :] == 0, neg)
    if causal and T > 1:
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        future = torch.zeros(T, S, dtype=dtype, device=device).masked_fill(k_pos > q_pos, neg)[None, None]
        mask = future if mask is None else mask + future
        mask = mask.clamp(min=neg)
    return mask
