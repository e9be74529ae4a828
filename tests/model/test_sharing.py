"""Parameter sharing in the MED: encoder and decoder share embeddings, cross-attention and
feed-forward (the same tensors), but each has its own self-attention; ITM reads `[ENC]`, the
decoder starts from `[DEC]` and the unimodal text encoder from `[CLS]`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capfilt.model.config import med_config
from capfilt.model.losses import MEDObjectives
from capfilt.model.med import MED

PAD, CLS, SEP, DEC, ENC = 0, 1, 2, 62, 63


@pytest.fixture
def med() -> MED:
    torch.manual_seed(0)
    config = med_config(
        "tiny",
        vocab_size=64,
        pad_token_id=PAD,
        cls_token_id=CLS,
        sep_token_id=SEP,
        dec_token_id=DEC,
        enc_token_id=ENC,
    )
    return MED(config).eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixels (3, 3, 32, 32); ids and mask (3, 7), position 0 an ordinary word (the MED overwrites it)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, DEC, (3, 7), generator=g)
    ids[:, -1] = SEP
    ids[2, 5:] = PAD
    return pixels, ids, (ids != PAD).long()


def ids_of(params: dict[str, nn.Parameter]) -> set[int]:
    return {id(p) for p in params.values()}


def module_param_ids(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


# ----------------------------------------------------------------------------- structure


def test_shared_parameters_are_the_same_tensors_and_self_attention_is_not(med: MED) -> None:
    text = med.text
    shared = ids_of(med.encoder_parameters()) & ids_of(med.decoder_parameters())
    expected = module_param_ids(
        text.embeddings,
        *(m for layer in text.layer for m in (layer.crossattention, layer.intermediate, layer.output)),
    )
    assert shared == expected

    encoder_sa = module_param_ids(*(layer.attention for layer in text.layer))
    decoder_sa = module_param_ids(*(layer.causal_attention for layer in text.layer))
    assert encoder_sa and decoder_sa and not encoder_sa & decoder_sa
    assert encoder_sa <= ids_of(med.encoder_parameters()) and not encoder_sa & ids_of(
        med.decoder_parameters()
    )
    assert decoder_sa <= ids_of(med.decoder_parameters()) and not decoder_sa & ids_of(
        med.encoder_parameters()
    )
    # Distinct storage too, not views of one tensor.
    ptrs = lambda layer_sa: {p.data_ptr() for p in layer_sa.parameters()}  # noqa: E731
    for layer in text.layer:
        assert not ptrs(layer.attention) & ptrs(layer.causal_attention)
    # Every text parameter is used by the encoder or the decoder, and the LM head is tied to the embeddings.
    assert ids_of(med.encoder_parameters()) | ids_of(med.decoder_parameters()) == module_param_ids(text)
    assert med.lm_head.decoder.weight is text.embeddings.word_embeddings.weight


# ----------------------------------------------------------------------------- behaviour


def outputs(med: MED, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    pixels, ids, mask = batch
    with torch.no_grad():
        image = med.encode_image(pixels)
        return {
            "itm": med.itm_logits(image, ids, mask),
            "lm": med.lm_logits(image, ids, mask),
            "text": med.text_feature(ids, mask),
        }


@pytest.mark.parametrize(
    "pick, changes",
    [
        (lambda t: t.layer[0].crossattention.self.query.weight, {"itm", "lm"}),
        (lambda t: t.layer[1].output.dense.weight, {"itm", "lm", "text"}),
        (lambda t: t.embeddings.word_embeddings.weight, {"itm", "lm", "text"}),
        (lambda t: t.layer[0].attention.self.query.weight, {"itm", "text"}),
        (lambda t: t.layer[0].causal_attention.self.query.weight, {"lm"}),
    ],
    ids=["crossattention", "feed-forward", "embeddings", "encoder-self-attention", "decoder-self-attention"],
)
def test_perturbing_a_parameter_changes_exactly_the_functions_that_use_it(
    med: MED, batch: tuple[torch.Tensor, ...], pick: Callable[[nn.Module], nn.Parameter], changes: set[str]
) -> None:
    before = outputs(med, batch)
    with torch.no_grad():
        param = pick(med.text)
        param.add_(0.5 * torch.randn_like(param))
    after = outputs(med, batch)
    changed = {name for name in before if not torch.allclose(before[name], after[name], atol=1e-6)}
    assert changed == changes


def grads(med: MED, loss: torch.Tensor) -> dict[str, bool]:
    """Which parameter groups of layer 0 received a non-zero gradient from `loss`."""
    med.zero_grad(set_to_none=True)
    loss.backward()
    layer = med.text.layer[0]
    groups = {"crossattention": layer.crossattention, "encoder_sa": layer.attention}
    groups |= {"decoder_sa": layer.causal_attention, "feed_forward": layer.intermediate}
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in group.parameters())
        for name, group in groups.items()
    }


def test_lm_gradient_skips_the_encoder_self_attention_and_itm_the_decoders(
    med: MED, batch: tuple[torch.Tensor, ...]
) -> None:
    med.train()
    lm = MEDObjectives(med, itc=False, itm=False, lm=True)(*batch)["lm_loss"]
    assert grads(med, lm) == {
        "crossattention": True,
        "encoder_sa": False,
        "decoder_sa": True,
        "feed_forward": True,
    }
    itm = MEDObjectives(med, itc=False, itm=True, lm=False)(*batch)["itm_loss"]
    assert grads(med, itm) == {
        "crossattention": True,
        "encoder_sa": True,
        "decoder_sa": False,
        "feed_forward": True,
    }
    itc = MEDObjectives(med, itc=True, itm=False, lm=False, queue_size=6)(*batch)["itc_loss"]
    assert grads(med, itc) == {
        "crossattention": False,
        "encoder_sa": True,
        "decoder_sa": False,
        "feed_forward": True,
    }


# ----------------------------------------------------------------------------- mode tokens


def with_token(ids: torch.Tensor, token: int) -> torch.Tensor:
    ids = ids.clone()
    ids[:, 0] = token
    return ids


def test_itm_reads_enc_the_decoder_dec_and_the_text_encoder_cls(
    med: MED, batch: tuple[torch.Tensor, ...]
) -> None:
    pixels, ids, mask = batch
    assert not (ids[:, 0] == torch.tensor([CLS, ENC, DEC])[:, None]).any()  # position 0 holds none of them
    with torch.no_grad():
        image = med.encode_image(pixels)

        def itm_with(token: int) -> torch.Tensor:
            return med.itm_head(med.text(with_token(ids, token), mask, mode="encoder", image=image)[:, 0])

        def lm_with(token: int) -> torch.Tensor:
            return med.lm_head(med.text(with_token(ids, token), mask, mode="decoder", image=image))

        def text_with(token: int) -> torch.Tensor:
            hidden = med.text(with_token(ids, token), mask, mode="text")
            return F.normalize(med.text_proj(hidden[:, 0]), dim=-1)

        for got, expected_fn, mode_token in (
            (med.itm_logits(image, ids, mask), itm_with, ENC),
            (med.lm_logits(image, ids, mask), lm_with, DEC),
            (med.text_feature(ids, mask), text_with, CLS),
        ):
            torch.testing.assert_close(got, expected_fn(mode_token))
            for other in {CLS, ENC, DEC} - {mode_token}:
                assert not torch.allclose(got, expected_fn(other), atol=1e-5)


def test_attention_masks_are_built_on_the_model_device() -> None:
    """The causal mask of a prompt with no padding mask is made where the tokens are (on a GPU the
    decoder's prefill failed when it came out on the CPU)."""
    from capfilt.model.text import self_attention_mask

    meta = torch.device("meta")
    mask = self_attention_mask(None, 4, 0, causal=True, dtype=torch.float32, device=meta)
    assert mask is not None and mask.device == meta and mask.shape == (1, 1, 4, 4)
    cpu = self_attention_mask(None, 4, 0, causal=True, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(cpu[0, 0] < 0, torch.ones(4, 4).triu(1).bool())  # future keys hidden, the rest seen
