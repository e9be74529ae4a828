"""Pre-packed decoding weights: the same products as nn.Linear, each row's result independent of
its batch, and the same captions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from capfilt.model import packed
from capfilt.model.config import med_config
from capfilt.model.generate import GenerationConfig, generate
from capfilt.model.med import MED

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch has no MKL packed matmul")


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear_for_any_number_of_rows(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    layer = packed.PackedLinear(linear, rows=8)
    with torch.inference_mode():
        for shape in [(1, 48), (8, 48), (19, 48), (3, 5, 48)]:
            x = torch.randn(shape)
            y = layer(x)
            assert y.shape == (*shape[:-1], 80)
            torch.testing.assert_close(y, linear(x), rtol=0, atol=1e-5)


def test_a_rows_result_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(1)
    layer = packed.PackedLinear(nn.Linear(64, 96), rows=8)
    x = torch.randn(21, 64)
    with torch.inference_mode():
        together = layer(x)
        for i in (0, 7, 8, 20):
            assert torch.equal(layer(x[i : i + 1])[0], together[i])  # alone, padded: the same bits


def test_packed_decoder_writes_the_same_captions() -> None:
    torch.manual_seed(2)
    med = MED(
        med_config("tiny", vocab_size=64, dec_token_id=62, enc_token_id=63, sep_token_id=2, cls_token_id=1)
    ).eval()
    images = med.encode_image(torch.randn(5, 3, 32, 32)).detach()
    prompt = torch.tensor([62, 10, 11])
    fast = copy.deepcopy(med)
    assert packed.pack_for_decoding(fast, rows=4) == 2 * med.config.text.depth + 1
    for config in (GenerationConfig(method="greedy"), GenerationConfig(method="nucleus", top_k=20, seed=3)):
        assert generate(fast, images, prompt, config) == generate(med, images, prompt, config)
    with pytest.raises(ValueError, match="rows must be at least 1"):
        packed.pack_for_decoding(copy.deepcopy(med), rows=0)
