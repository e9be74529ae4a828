"""The image encoder's fused inference path: torch's fused encoder layer on the blocks' own
weights must give what timm's blocks give, and only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import LayerScale
from torch import nn

from capfilt.model import vit as V
from capfilt.model.config import med_config

pytestmark = pytest.mark.skipif(V._FUSED_LAYER is None, reason="this torch has no fused encoder layer")


def _encoder(stem: str = "patch") -> V.VisionTransformer:
    torch.manual_seed(0)
    encoder = V.VisionTransformer(med_config("tiny", stem=stem).vision).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of them shows
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoder


def _timm(
    encoder: V.VisionTransformer, pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(V, "_FUSED_LAYER", None)
        return encoder(pixels)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_fused_blocks_give_what_timm_blocks_give(stem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder(stem)
    pixels = torch.randn(3, 3, 32, 32)
    calls = []
    fused = V._FUSED_LAYER
    monkeypatch.setattr(V, "_FUSED_LAYER", lambda *a: calls.append(1) or fused(*a))
    with torch.inference_mode():
        got = encoder(pixels)
        assert len(calls) == len(encoder.blocks)  # every block took the fused path
        expected = _timm(encoder, pixels, monkeypatch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fused_blocks_take_a_large_batch_in_chunks_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder = _encoder()
    pixels = torch.randn(7, 3, 32, 32)
    tokens = 1 + (32 // encoder.config.patch_size) ** 2
    with torch.inference_mode():
        whole = encoder(pixels)  # the tiny encoder's 7 images fit one chunk
        calls = []
        fused = V._FUSED_LAYER
        monkeypatch.setattr(V, "_FUSED_LAYER", lambda x, *a: calls.append(x.shape[0]) or fused(x, *a))
        monkeypatch.setattr(V, "FUSED_CHUNK_BYTES", 3 * tokens * encoder.config.width * 4)  # 3 images a chunk
        chunked = encoder(pixels)
        expected = _timm(encoder, pixels, monkeypatch)
    assert calls == [3] * len(encoder.blocks) + [2] * len(encoder.blocks) + [2] * len(encoder.blocks)
    assert chunked.shape == whole.shape == (7, tokens, encoder.config.width)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-5)
    # Blocks that do not run fused (here quantised) take the batch whole: the chunks were measured
    # for the fused layer alone.
    quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {nn.Linear}, dtype=torch.qint8)
    batches = []
    run_blocks = V.VisionTransformer._blocks
    monkeypatch.setattr(
        V.VisionTransformer, "_blocks", lambda self, x, a: batches.append(len(x)) or run_blocks(self, x, a)
    )
    with torch.inference_mode():
        quantised(pixels)
        encoder(pixels)
    assert batches == [7, 3, 2, 2]


def test_training_autograd_and_quantised_blocks_run_through_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder()
    pixels = torch.randn(2, 3, 32, 32)
    calls = []
    fused = V._FUSED_LAYER
    monkeypatch.setattr(V, "_FUSED_LAYER", lambda *a: calls.append(1) or fused(*a))
    encoder(pixels).sum().backward()  # autograd on: gradients flow through timm's blocks
    assert not calls and encoder.blocks[0].attn.qkv.weight.grad is not None
    quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        quantised(pixels)
        assert not calls
        layer_scaled = copy.deepcopy(encoder)
        layer_scaled.blocks[0].ls1 = LayerScale(layer_scaled.config.width)
        layer_scaled(pixels)
        assert len(calls) == len(encoder.blocks) - 1  # the block with layer scale runs as it is
        calls.clear()
        del layer_scaled.blocks[1].drop_path1  # a block laid out otherwise (another timm): as it is
        assert V._fused_layer_args(layer_scaled.blocks[1]) is None
