"""Pre-packed weights for decoding on a CPU.

A decoding step multiplies a few rows (one token per caption) by every weight matrix of the
decoder, so its matmuls are bounded by reading the weights, and MKL re-packs a weight for its
kernels on every call. `pack_for_decoding` packs the largest ones once, the feed-forward layers and
the LM head: at 8 rows, BERT-base's feed-forward matmuls ran 2.7x faster here, at 32 rows 1.4x
(`docs/benchmarks.md`).

A packed weight serves products of exactly `rows` rows, so any number of rows is computed in
chunks of `rows`, the last one padded with zeros: for a given `rows`, each row's result is then the
same whatever batch it is in (a row's product never depends on the other rows), which keeps
nucleus sampling reproducible per image (a Captioner packs for its batch size; jobs use one). The packed copy replaces the Linear's weight; MKL's packed format is
larger than the weight (a few MB of padding per matrix), which is what this costs in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    """Whether this torch has MKL's packed matmul (x86 builds do; others decode unpacked)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Module):
    """`linear` with its weight packed by MKL for products of `rows` rows (CPU, fp32)."""

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"packing is for fp32 weights on a CPU, got {weight.dtype} on {weight.device}")
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        self.bias = None if linear.bias is None else linear.bias.detach()
        # The kernel reads the weight's sizes from this; the values live in `packed`.
        self.sizes = torch.zeros((), dtype=weight.dtype).expand(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (M, in)
        M, R = flat.shape[0], self.rows
        chunks = []
        for start in range(0, M, R):
            chunk = flat[start : start + R]
            n = chunk.shape[0]
            if n < R:
                chunk = F.pad(chunk, (0, 0, 0, R - n))
            chunks.append(torch.ops.mkl._mkl_linear(chunk, self.packed, self.sizes, self.bias, R)[:n])
        y = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}"


def pack_for_decoding(med: nn.Module, rows: int) -> int:
    """Pack, in place, the decoder's feed-forward layers and LM head of `med` (an inference-only
    MED on a CPU) for steps of `rows` rows; -> how many weights were packed. Its weights for those
    layers are then MKL's packed copies only: it can decode, not train or be saved."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    count = 0
    for layer in med.text.layer:
        for owner, name in ((layer.intermediate, "dense"), (layer.output, "dense")):
            linear = getattr(owner, name)
            if type(linear) is nn.Linear:
                setattr(owner, name, PackedLinear(linear, rows))
                count += 1
    head = getattr(med, "lm_head", None)
    if head is not None and type(head.decoder) is nn.Linear:
        head.decoder = PackedLinear(head.decoder, rows)  # the word embeddings keep their own weight
        count += 1
    return count
