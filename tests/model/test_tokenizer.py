"""CaptionTokenizer's own call gives transformers' ids and masks, from the Rust tokenizer directly."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch
from transformers import BertTokenizer

from capfilt.model.tokenizer import DEC, ENC, CaptionTokenizer

EDGE_TEXTS = [
    "a red circle on a gray background",
    "",
    "   ",
    "word " * 80,
    "Héllo Wörld ☃ 🙂 中文",
    "[SEP] [CLS] [PAD] [DEC] [ENC] [MASK]",
    "tab\tnew\nline\x00nul",
    "x",
]


def _transformers_call(tok: CaptionTokenizer, texts: list[str], max_length: int):
    enc = tok.hf(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _assert_same(tok: CaptionTokenizer, texts: list[str], max_length: int) -> None:
    ids, mask = tok(texts, max_length)
    want_ids, want_mask = _transformers_call(tok, texts, max_length)
    assert ids.dtype == want_ids.dtype == torch.long
    assert torch.equal(ids, want_ids), (max_length, texts)
    assert torch.equal(mask, want_mask), (max_length, texts)


@pytest.mark.parametrize("max_length", [3, 8, 35])
def test_our_tokenizer_matches_transformers(tokenizer, max_length):
    _assert_same(tokenizer, EDGE_TEXTS, max_length)
    _assert_same(tokenizer, EDGE_TEXTS[:1], max_length)  # one text: no padding at all


def _bert_with_blip_tokens(tmp_path, **config) -> CaptionTokenizer:
    """A stock BertTokenizer (what bert-base-uncased is) with [DEC] and [ENC] added as BLIP adds them."""
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "circle",
        "on",
        "gray",
        "##s",
        "background",
    ]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, **config).save_pretrained(tmp_path)
    hf = BertTokenizer.from_pretrained(tmp_path)
    hf.add_special_tokens({"bos_token": DEC})
    hf.add_special_tokens({"additional_special_tokens": [ENC]})
    return CaptionTokenizer(hf)


def test_bert_tokenizer_with_blip_tokens_matches_transformers(tmp_path):
    tok = _bert_with_blip_tokens(tmp_path)
    _assert_same(tok, EDGE_TEXTS, 6)
    _assert_same(tok, ["a reds circle [ENC] on gray", "[DEC] a"], 35)


def test_sides_from_the_tokenizer_config(tmp_path):
    tok = _bert_with_blip_tokens(tmp_path, truncation_side="left", padding_side="left")
    _assert_same(tok, ["a red circle on a gray background", "a", "red circles"], 4)


def test_tokens_added_later_are_seen(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    tok = CaptionTokenizer.load(tmp_path)
    tok(["zebraword"], 8)  # builds the encoder before the token exists
    tok.hf.add_tokens(["zebraword"])
    ids, _ = tok(["zebraword"], 8)
    assert ids[0, 1].item() == tok.hf.convert_tokens_to_ids("zebraword")


def test_threads_share_the_encoder(tokenizer):
    want = tokenizer(EDGE_TEXTS, 35)
    got: list[tuple[torch.Tensor, torch.Tensor]] = []

    def work() -> None:
        for _ in range(20):
            got.append(tokenizer(EDGE_TEXTS, 35))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 80
    assert all(torch.equal(ids, want[0]) and torch.equal(mask, want[1]) for ids, mask in got)


def test_pickles_and_still_encodes(tokenizer):
    want = tokenizer(EDGE_TEXTS, 35)
    copy = pickle.loads(pickle.dumps(tokenizer))
    ids, mask = copy(EDGE_TEXTS, 35)
    assert torch.equal(ids, want[0]) and torch.equal(mask, want[1])


def test_no_texts(tokenizer):
    ids, mask = tokenizer([], 35)
    assert ids.shape[0] == 0 and mask.shape[0] == 0


def test_texts_utf8_cannot_carry_are_tokenised_with_the_replacement_character(tokenizer):
    """A command line's undecodable byte (`--text $'caf\\xe9'`) or a lone surrogate made the Rust
    tokenizer raise a TypeError: `capfilt score` ended in a traceback."""
    ids, mask = tokenizer(["caf\udce9 dog", "\ud800 cat"], 12)
    want_ids, want_mask = tokenizer(["caf\ufffd dog", "\ufffd cat"], 12)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
