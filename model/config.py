"""MED configuration: flat dataclasses and the one registry of named sizes.

A config fully describes the network's shapes; it is written into every checkpoint's
`config.json` (under "architecture") so a checkpoint rebuilds without outside knowledge.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# BLIP normalises images with the CLIP statistics (blip/data/__init__.py; HF BlipImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PROMPT = "a picture of "
ROLES = ("pretrain", "captioner", "filter")


@dataclass
class VisionConfig:
    image_size: int = 224  # pixels per side; position embeddings are resized when this changes
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6  # BLIP's ViT; transformers' BLIP port uses 1e-5
    drop_path: float = 0.0  # stochastic depth during training
    # How pixels become patch tokens. "patch": BLIP's linear embedding of each patch (one strided
    # convolution). "conv": stride-2 3x3 convolutions down to the same grid, then a 1x1 projection
    # (Xiao et al. 2021, "Early convolutions help transformers see better"): a from-scratch MED
    # learns object shape far sooner on small data. Only "patch" exists in BLIP and transformers.
    stem: str = "patch"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # hidden and attention dropout (BLIP trains with 0.1)
    tie_word_embeddings: bool = True  # LM head weight is the word embedding matrix, as in BERT
    # Special token ids; the tokenizer saved with the checkpoint agrees with them.
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102  # also EOS for generation
    dec_token_id: int = 30522  # [DEC]: position 0 of the image-grounded decoder (bos)
    enc_token_id: int = 30523  # [ENC]: position 0 of the image-grounded encoder (ITM)


@dataclass
class MEDConfig:
    """The multimodal mixture of encoder-decoder.

    `has_encoder` / `has_decoder` say which text branches exist: a transformers captioner has
    only the decoder (causal self-attention + LM head), a retrieval model only the encoder
    (bidirectional self-attention + ITC projections + ITM head). Our own pre-trained MED has both.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection width
    has_encoder: bool = True
    has_decoder: bool = True
    prompt: str = DEFAULT_PROMPT  # captioner prompt, stripped from generated captions
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_text_tokens: int = 35  # BLIP tokenises ITM/ITC texts with max_length=35

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MEDConfig:
        data = dict(data)
        vision = VisionConfig(**data.pop("vision", {}))
        text = TextConfig(**data.pop("text", {}))
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MED config fields: {sorted(unknown)}")
        return cls(vision=vision, text=text, **data).validate()

    def replace(self, **changes: Any) -> MEDConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> MEDConfig:
        """Check types and sizes before any layer is built (a config.json may be hostile: a depth
        of 10^6 would allocate until memory runs out). Raises ValueError naming the field."""
        v, t = self.vision, self.text
        for name, value, top in (
            ("vision.image_size", v.image_size, 4096),
            ("vision.patch_size", v.patch_size, 1024),
            ("vision.width", v.width, MAX_WIDTH),
            ("vision.depth", v.depth, MAX_DEPTH),
            ("vision.heads", v.heads, 256),
            ("text.vocab_size", t.vocab_size, 1_000_000),
            ("text.width", t.width, MAX_WIDTH),
            ("text.depth", t.depth, MAX_DEPTH),
            ("text.heads", t.heads, 256),
            ("text.intermediate", t.intermediate, 4 * MAX_WIDTH),
            ("text.max_positions", t.max_positions, 8192),
            ("embed_dim", self.embed_dim, MAX_WIDTH),
            ("max_text_tokens", self.max_text_tokens, 8192),
        ):
            _check_int(name, value, 1, top)
        for name, value in (
            ("text.pad_token_id", t.pad_token_id),
            ("text.cls_token_id", t.cls_token_id),
            ("text.sep_token_id", t.sep_token_id),
            ("text.dec_token_id", t.dec_token_id),
            ("text.enc_token_id", t.enc_token_id),
        ):  # the others are checked against the tokenizer (which may set them) once it is loaded
            _check_int(name, value, 0, 10**9)
        # the word embeddings' padding row: past them, building the layer fails
        _check_int("text.pad_token_id", t.pad_token_id, 0, t.vocab_size - 1)
        for name, value in (
            ("has_encoder", self.has_encoder),
            ("has_decoder", self.has_decoder),
            ("text.tie_word_embeddings", t.tie_word_embeddings),
        ):
            if not isinstance(value, bool):  # the string "false" would read as true
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string (BLIP's is {DEFAULT_PROMPT!r}), got {self.prompt!r}")
        for name, values, low in (("image_mean", self.image_mean, None), ("image_std", self.image_std, 0.0)):
            numbers = (
                isinstance(values, (tuple, list))
                and len(values) == 3
                and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in values
                )
            )
            if not numbers or (low is not None and min(values) <= low):
                want = (
                    "three positive numbers (one per RGB channel)"
                    if low is not None
                    else "three numbers (one per RGB channel)"
                )
                raise ValueError(f"{name} must be {want}, got {values!r}")
        if self.max_text_tokens > t.max_positions:
            raise ValueError(
                f"max_text_tokens {self.max_text_tokens} is more than the text's {t.max_positions} positions"
            )
        for name, value, top in (
            ("vision.mlp_ratio", v.mlp_ratio, 64.0),
            ("vision.layer_norm_eps", v.layer_norm_eps, 1.0),
            ("text.layer_norm_eps", t.layer_norm_eps, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top:
                raise ValueError(f"{name} must be a number in (0, {top}], got {value!r}")
        for name, value in (("vision.drop_path", v.drop_path), ("text.dropout", t.dropout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if v.width % v.heads or t.width % t.heads:
            raise ValueError(
                f"widths must be multiples of the heads: vision {v.width}/{v.heads}, text {t.width}/{t.heads}"
            )
        if v.image_size % v.patch_size:
            raise ValueError(
                f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}"
            )
        if v.stem not in STEMS:
            raise ValueError(f"vision.stem must be one of {', '.join(STEMS)}, got {v.stem!r}")
        if v.stem == "conv" and v.patch_size & (v.patch_size - 1):
            raise ValueError(
                f"a conv stem halves the image per layer: patch_size must be a power of two, "
                f"got {v.patch_size}"
            )
        return self


STEMS = ("patch", "conv")
MAX_WIDTH = 16384  # wider than any BLIP (ViT-L: 1024, BERT-base: 768) by far
MAX_DEPTH = 256


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


# ----------------------------------------------------------------------------- named sizes
# Each size is a short function, timm-style. `image_size=None` takes the size's default
# (pre-training resolution); BLIP fine-tunes base/large at 384 px.


def _tiny(image_size: int | None) -> MEDConfig:
    # For tests: trains in seconds on a CPU.
    return MEDConfig(
        vision=VisionConfig(image_size=image_size or 32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=2, heads=2, intermediate=64, max_positions=64),
        embed_dim=32,
    )


def _small(image_size: int | None) -> MEDConfig:
    # The built-in world: small images with a handful of objects; trains on a laptop CPU. Width 128
    # learns more per CPU-second than 192 did (measured on the default world, 2 cores: 80 vs 35
    # pairs/s, and a lower ITM loss after the same wall time).
    return MEDConfig(
        vision=VisionConfig(image_size=image_size or 64, patch_size=8, width=128, depth=4, heads=4),
        text=TextConfig(width=128, depth=3, heads=4, intermediate=512, max_positions=64),
        embed_dim=128,
    )


def _base(image_size: int | None) -> MEDConfig:
    # BLIP ViT-B/16 + BERT-base.
    return MEDConfig(
        vision=VisionConfig(image_size=image_size or 224, patch_size=16, width=768, depth=12, heads=12),
        text=TextConfig(width=768, depth=12, heads=12, intermediate=3072, dropout=0.1),
    )


def _large(image_size: int | None) -> MEDConfig:
    # BLIP ViT-L/16 + BERT-base (the text side stays BERT-base in BLIP-L).
    return MEDConfig(
        vision=VisionConfig(image_size=image_size or 224, patch_size=16, width=1024, depth=24, heads=16),
        text=TextConfig(width=768, depth=12, heads=12, intermediate=3072, dropout=0.1),
    )


SIZES = {"tiny": _tiny, "small": _small, "base": _base, "large": _large}
FINETUNE_IMAGE_SIZE = {"tiny": 32, "small": 64, "base": 384, "large": 384}


def named_size(vision: tuple[int, int, int], text: tuple[int, int]) -> str | None:
    """The SIZES name of an architecture given as (vision width, depth, patch size) and (text
    width, depth), or None when no named size has that shape (a checkpoint of another shape)."""
    for name, make in SIZES.items():
        c = make(None)
        if (c.vision.width, c.vision.depth, c.vision.patch_size) == vision and (
            c.text.width,
            c.text.depth,
        ) == text:
            return name
    return None


def med_config(size: str, image_size: int | None = None, stem: str = "patch", **text_ids: int) -> MEDConfig:
    """The config of a named size; `stem` picks the image encoder's stem (VisionConfig.stem);
    `text_ids` overrides vocab size and special token ids."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    config = SIZES[size](image_size)
    config.vision = dataclasses.replace(config.vision, stem=stem)
    if text_ids:
        config.text = dataclasses.replace(config.text, **text_ids)
    return config
