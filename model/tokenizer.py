"""The text tokenizer: BERT WordPiece with BLIP's `[DEC]` and `[ENC]` tokens.

Our own checkpoints cannot fetch bert-base-uncased, so `train_tokenizer` builds a WordPiece
vocabulary from the training captions with the `tokenizers` package's BERT normaliser,
pre-tokeniser and WordPiece model. The tokenizer is saved
inside every checkpoint in transformers' layout (tokenizer.json, tokenizer_config.json,
vocab.txt), which also makes an exported checkpoint loadable by transformers.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from capfilt.data import text_of

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: pad id 0, as BERT
DEC, ENC = "[DEC]", "[ENC]"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 1) -> CaptionTokenizer:
    """Learn a lower-cased WordPiece vocabulary from captions; `[DEC]`, `[ENC]` are appended last.

    The vocabulary is built deterministically (the same corpus gives the same ids in every
    process, which reproducible training needs; the `tokenizers` WordPiece trainer breaks ties
    in hash-map order): BERT's normaliser and pre-tokeniser split the words, then come the special
    tokens, every character seen (as a word start and as a `##` continuation, so no word is ever
    unknown), and the most frequent words (ties by spelling) up to `vocab_size`.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, strip_accents=None)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    seen = set(vocab)
    words = sorted(
        (w for w, n in counts.items() if n >= min_frequency and w not in seen), key=lambda w: (-counts[w], w)
    )
    vocab += words[: max(0, vocab_size - 2 - len(vocab))]
    vocab += [DEC, ENC]
    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([DEC, ENC])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    hf = BertTokenizer(tokenizer_object=tok, vocab=ids, bos_token=DEC, additional_special_tokens=[ENC])
    return CaptionTokenizer(hf)


@dataclass(frozen=True)
class TokenIds:
    pad: int
    cls: int
    sep: int
    dec: int
    enc: int
    vocab_size: int

    def as_text_config(self) -> dict[str, int]:
        return {
            "pad_token_id": self.pad,
            "cls_token_id": self.cls,
            "sep_token_id": self.sep,
            "dec_token_id": self.dec,
            "enc_token_id": self.enc,
            "vocab_size": self.vocab_size,
        }


class CaptionTokenizer:
    """A transformers tokenizer plus the ids the MED needs; texts in, padded id tensors out."""

    def __init__(
        self, hf: PreTrainedTokenizerBase, dec_id: int | None = None, enc_id: int | None = None
    ) -> None:
        self.hf = hf
        missing = [name for name in ("pad", "cls", "sep") if getattr(hf, f"{name}_token_id") is None]
        if missing:  # every text is `[CLS] ... [SEP]`, padded: a BPE or GPT tokenizer cannot serve
            raise ValueError(
                f"the tokenizer ({type(hf).__name__}) has no {', '.join(f'[{m.upper()}]' for m in missing)} "
                "token: the MED needs BERT's WordPiece tokenizer (bert-base-uncased's for BLIP)"
            )
        if not isinstance(hf.model_max_length, int):
            raise ValueError(f"the tokenizer's model_max_length is {hf.model_max_length!r}, not an integer")
        vocab = hf.get_vocab()
        self.ids = TokenIds(
            pad=hf.pad_token_id,
            cls=hf.cls_token_id,
            sep=hf.sep_token_id,
            dec=dec_id if dec_id is not None else vocab[DEC],
            enc=enc_id if enc_id is not None else vocab[ENC],
            vocab_size=len(hf),
        )
        self._encoders: dict[tuple[int, int], Tokenizer] = {}  # (max_length, len(hf)) -> a configured copy
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # The configured copies and their lock stay behind (a lock does not pickle); rebuilt on use.
        return {k: v for k, v in self.__dict__.items() if k not in ("_encoders", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._encoders, self._lock = {}, threading.Lock()

    @classmethod
    def load(
        cls, directory: str | Path, dec_id: int | None = None, enc_id: int | None = None
    ) -> CaptionTokenizer:
        """Load tokenizer files from a local directory (ours or a transformers BLIP checkpoint).
        ValueError naming the directory for files transformers cannot read as a tokenizer."""
        try:
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (TypeError, AttributeError, KeyError, RecursionError) as err:  # JSON of the wrong shape
            raise ValueError(
                f"the tokenizer files in {directory} are not a tokenizer's: {type(err).__name__}: {err}"
            ) from err
        vocab = hf.get_vocab()
        if dec_id is None and DEC not in vocab:
            raise ValueError(f"the tokenizer in {directory} has no {DEC} token; pass its id explicitly")
        if enc_id is None and ENC not in vocab:
            raise ValueError(f"the tokenizer in {directory} has no {ENC} token; pass its id explicitly")
        return cls(hf, dec_id, enc_id)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[CLS] text [SEP]`, padded to the longest, truncated to `max_length` -> (ids, mask), both (B, T).

        The ids transformers' `hf(texts, padding="longest", truncation=True, max_length=...)` gives,
        from the same Rust tokenizer called directly: 256 short texts took 6.3 ms that way against
        13.7 through transformers' Python layer (the 2-core Xeon of `docs/benchmarks.md`)."""
        # what UTF-8 cannot encode (a command line's undecodable bytes, a JSON "\udcff") as U+FFFD:
        # the Rust tokenizer refuses such a str with a TypeError
        texts = [text_of(t) or "" for t in texts]
        if not texts:
            return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
        encoder = self._encoder(max_length)
        if encoder is None:
            enc = self.hf(
                texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
            )
            return enc["input_ids"], enc["attention_mask"]
        encodings = encoder.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _encoder(self, max_length: int) -> Tokenizer | None:
        """A copy of hf's Rust tokenizer that truncates to `max_length` and pads to the longest, as
        transformers configures it for such a call (sides and pad token from hf); None where hf has
        no Rust tokenizer. Copies are configured once and never changed, so threads may share them."""
        key = (max_length, len(self.hf))  # tokens added to hf later make a new copy
        with self._lock:
            if key in self._encoders:
                return self._encoders[key]
            backend = getattr(self.hf, "_tokenizer", None)
            if not isinstance(backend, Tokenizer) or self.hf.pad_token is None:
                return None  # transformers' own call then (and its error for a missing pad token)
            encoder = Tokenizer.from_str(backend.to_str())
            encoder.enable_truncation(max_length, strategy="longest_first", direction=self.hf.truncation_side)
            encoder.enable_padding(
                direction=self.hf.padding_side,
                pad_id=self.hf.pad_token_id,
                pad_type_id=self.hf.pad_token_type_id,
                pad_token=self.hf.pad_token,
            )
            self._encoders[key] = encoder
            return encoder

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """The decoder's prefix for `prompt`: `[DEC] prompt-tokens` (no `[SEP]`), shape (P,)."""
        ids = self.hf(prompt, add_special_tokens=True)["input_ids"][:-1]  # drop [SEP], as BLIP does
        ids[0] = self.ids.dec
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()
