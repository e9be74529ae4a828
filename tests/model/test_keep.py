"""`keep`: a last layer that computes only the positions its caller reads (ITM and ITC read
position 0, a caption's first step the prompt's last) gives those positions exactly as the whole
forward does, in every mode, with padding, shared images and a decoding cache."""

from __future__ import annotations

import pytest
import torch

from capfilt.model.med import MED

from .test_losses import CLS, DEC, ENC, PAD, tiny_med


@pytest.fixture
def med() -> MED:
    return tiny_med(0).eval()


@pytest.fixture
def texts() -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask (4, 7); row 2 padded after 5 tokens, row 3 after 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, DEC, (4, 7), generator=g)
    ids[2, 5:] = PAD
    ids[3, 3:] = PAD
    return ids, (ids != PAD).long()


@pytest.fixture
def images(med: MED) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return med.encode_image(torch.randn(2, 3, 32, 32, generator=g))


@pytest.mark.parametrize("keep", [slice(0, 1), slice(-1, None), slice(2, 5)])
@pytest.mark.parametrize("mode", ["text", "encoder", "decoder"])
def test_kept_positions_equal_the_whole_forward(med: MED, texts, images, mode: str, keep: slice) -> None:
    ids, mask = texts
    image = None if mode == "text" else images[[0, 0, 1, 1]]
    with torch.no_grad():
        whole = med.text(ids, mask, mode=mode, image=image)
        kept = med.text(ids, mask, mode=mode, image=image, keep=keep)
    assert kept.shape == whole[:, keep].shape
    torch.testing.assert_close(kept, whole[:, keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared", ["texts_per_image", "image_index"])
def test_itm_with_shared_images_reads_position_0_as_before(med: MED, texts, images, shared: str) -> None:
    ids, mask = texts
    with torch.no_grad():
        enc = ids.clone()
        enc[:, 0] = ENC
        whole = med.itm_head(med.text(enc, mask, mode="encoder", image=images[[0, 0, 1, 1]])[:, 0])
        if shared == "texts_per_image":
            logits = med.itm_logits(images, ids, mask, texts_per_image=2)
        else:
            logits = med.itm_logits(images, ids, mask, image_index=torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(logits, whole, rtol=0, atol=1e-6)


def test_text_feature_equals_the_whole_forward(med: MED, texts) -> None:
    ids, mask = texts
    with torch.no_grad():
        cls = ids.clone()
        cls[:, 0] = CLS
        hidden = med.text(cls, mask, mode="text")
        whole = torch.nn.functional.normalize(med.text_proj(hidden[:, 0]), dim=-1)
        torch.testing.assert_close(med.text_feature(ids, mask), whole, rtol=0, atol=1e-6)


def test_prompt_with_a_cache_keeps_every_key_and_the_last_logits(med: MED, images) -> None:
    prompt = torch.tensor([[DEC, 5, 6, 7]] * 2)
    with torch.no_grad():
        whole_cache, kept_cache = med.new_cache(), med.new_cache()
        whole = med.lm_logits(images, prompt, cache=whole_cache)
        kept = med.lm_logits(images, prompt, cache=kept_cache, keep=slice(-1, None))
        torch.testing.assert_close(kept, whole[:, -1:], rtol=0, atol=1e-6)
        assert kept_cache.length == whole_cache.length == 4
        # the next step sees the same cache either way
        step = torch.tensor([[9], [10]])
        torch.testing.assert_close(
            med.lm_logits(None, step, cache=kept_cache),
            med.lm_logits(None, step, cache=whole_cache),
            rtol=0,
            atol=1e-6,
        )


def test_keep_trains_like_the_whole_forward(med: MED, texts, images) -> None:
    """ITM and ITC losses read position 0 only, so their gradients are the same with `keep`."""
    ids, mask = texts
    med.train()  # tiny has no dropout: both runs compute the same function
    grads = []
    for keep in (None, slice(0, 1)):
        med.zero_grad()
        out = med.text(ids, mask, mode="encoder", image=images[[0, 0, 1, 1]], keep=keep)
        out[:, 0].square().sum().backward()
        grads.append(med.text.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
