"""One decoding step of the image-grounded decoder, written out for speed.

A step feeds one token per caption through the decoder: a handful of rows against every weight,
so on a CPU its cost is mostly the per-call overhead of some 80 small ops, not arithmetic.
`DecodeStep` computes exactly what `MED.lm_logits(None, tokens[:, None], cache)` computes, in the
same order of operations (but for the LM head's bias, added inside its product), with that
overhead cut:
- no module calls, no (B, 1, D) reshapes or head transposes: with one query per row the heads of
  a (R, D) row are already laid out as (R, nh, 1, hs);
- dropout is not called at all (generation runs the model in eval mode);
- plain Linears are `F.linear` on their own weights; packed (`capfilt.model.packed`) and
  quantised ones run through their own forward.
Measured on the 2-core Xeon of `docs/benchmarks.md`, small bench model, 32 captions of 30 tokens,
sampling included: 2.46-2.53 -> 2.08-2.14 ms per caption, tokens unchanged. (Transposed
contiguous weight copies, faster per call in isolation, made the whole decode 1-5% slower there.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .med import MED
from .text import KVCache, _attend_one

Affine = Callable[[torch.Tensor], torch.Tensor]
LayerNormArgs = tuple[tuple[int, ...], torch.Tensor, torch.Tensor, float]


def _affine(module: nn.Module) -> Affine:
    """x (R, in) -> (R, out), as `module(x)` computes it."""
    if type(module) is not nn.Linear:
        return module  # PackedLinear, quantised Linear: their own forward
    bias = None if module.bias is None else module.bias.detach()
    return partial(F.linear, weight=module.weight.detach(), bias=bias)


def _norm(module: nn.LayerNorm) -> LayerNormArgs:
    return tuple(module.normalized_shape), module.weight.detach(), module.bias.detach(), module.eps


class DecodeStep:
    """`step(tokens, cache)`: next-token logits (R, V) float32 after feeding `tokens` (R,) to rows
    whose prefix and image keys/values `cache` holds (the cache grows by one position).

    Built from a MED in eval mode for one `generate` call: it holds references to its weights."""

    def __init__(self, med: MED) -> None:
        text, config = med.text, med.config.text
        self.heads = config.heads
        self.word = text.embeddings.word_embeddings.weight.detach()
        self.position = text.embeddings.position_embeddings.weight.detach()
        self.embed_norm = _norm(text.embeddings.LayerNorm)
        self.layers = []
        for layer in text.layer:
            sa, ca = layer.causal_attention, layer.crossattention
            self.layers.append(
                (
                    _affine(sa.self.query),
                    _affine(sa.self.key),
                    _affine(sa.self.value),
                    _affine(sa.output.dense),
                    _norm(sa.output.LayerNorm),
                    _affine(ca.self.query),
                    _affine(ca.output.dense),
                    _norm(ca.output.LayerNorm),
                    _affine(layer.intermediate.dense),
                    _affine(layer.output.dense),
                    _norm(layer.output.LayerNorm),
                )
            )
        head = med.lm_head
        self.head_dense = _affine(head.transform.dense)
        self.head_norm = _norm(head.transform.LayerNorm)
        if type(head.decoder) is nn.Linear and head.decoder.bias is None:
            # One `addmm` into the logits instead of a product and a second (R, V) pass adding the bias.
            self.head_decoder = partial(
                F.linear, weight=head.decoder.weight.detach(), bias=head.bias.detach()
            )
            self.head_bias = None
        else:
            self.head_decoder = _affine(head.decoder)
            self.head_bias = head.bias.detach()

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        R, H = tokens.shape[0], self.heads
        past = cache.length
        x = F.embedding(tokens, self.word) + self.position[past]  # (R, D)
        x = F.layer_norm(x, *self.embed_norm)
        D = x.shape[1]
        hs = D // H
        for i, (
            query,
            key,
            value,
            sa_out,
            sa_norm,
            cross_query,
            ca_out,
            ca_norm,
            up,
            down,
            ffn_norm,
        ) in enumerate(self.layers):
            # Causal self-attention over the cached prefix and this token. One query per row:
            # (R, D) is (R, nh, 1, hs) without a copy.
            k, v = cache.append(i, key(x).view(R, H, 1, hs), value(x).view(R, H, 1, hs), past)
            y = self._attend(query(x).view(R, H, 1, hs), k, v).view(R, D)
            x = F.layer_norm(sa_out(y) + x, *sa_norm)
            # Cross-attention to the image's keys and values, computed once at the prompt.
            k, v = cache.cross_kv[i]  # type: ignore[misc]
            y = self._attend(cross_query(x).view(R, H, 1, hs), k, v).view(R, D)
            x = F.layer_norm(ca_out(y) + x, *ca_norm)
            x = F.layer_norm(down(F.gelu(up(x))) + x, *ffn_norm)
        cache.advance(1)
        x = F.layer_norm(F.gelu(self.head_dense(x)), *self.head_norm)
        logits = self.head_decoder(x)
        if self.head_bias is not None:
            logits = logits + self.head_bias
        return logits.float()

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu":
            return _attend_one(q, k, v, None)
        return F.scaled_dot_product_attention(q, k, v)
