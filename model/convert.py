"""Key maps between our MED and the two layouts users have: BLIP's original `.pth` and
transformers' `BlipForConditionalGeneration` / `BlipForImageTextRetrieval`.

Our parameter names follow BLIP's original ones (timm ViT names, BERT text names), so the
original layout maps almost one to one; transformers renames the vision side. Each function
takes a state dict and returns a new one plus a record of what was dropped and why.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import MEDConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

# transformers vision names -> ours (BLIP/timm); applied to the key after `vision_model.`
_HF_VISION = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding(\.weight)?$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]
_OUR_VISION = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


@dataclass
class Conversion:
    """A converted state dict and what the conversion left out."""

    state_dict: dict[str, torch.Tensor]
    skipped: Counter = field(default_factory=Counter)  # reason -> number of tensors
    has_encoder: bool = False
    has_decoder: bool = False
    tied_lm_head: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        return "skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _text_key(bert_key: str, branch: str) -> str | None:
    """A BERT key (below `bert.` / `text_encoder.`) -> ours; `branch` is "encoder" or "decoder"."""
    if bert_key.startswith("embeddings."):
        if bert_key == "embeddings.position_ids":
            return None  # a buffer of 0..N-1, not a weight
        return "text." + bert_key
    m = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", bert_key)
    if not m:
        return None
    i, rest = m.groups()
    if rest.startswith("attention."):
        own = "attention." if branch == "encoder" else "causal_attention."
        return f"text.layer.{i}.{own}{rest[len('attention.') :]}"
    return f"text.layer.{i}.{rest}"


def _merge_shared(out: dict[str, torch.Tensor], key: str, value: torch.Tensor, notes: list[str]) -> None:
    """Encoder and decoder both bring the shared tensors; they must agree (BLIP ties them)."""
    if key in out and not torch.equal(out[key], value):
        notes.append(f"{key}: encoder and decoder copies differ; the encoder's is kept")
        return
    out.setdefault(key, value)


def _lm_head(
    sd: dict[str, torch.Tensor], prefix: str, word_embeddings: torch.Tensor | None, conv: Conversion
) -> None:
    out = conv.state_dict
    for name in (
        "transform.dense.weight",
        "transform.dense.bias",
        "transform.LayerNorm.weight",
        "transform.LayerNorm.bias",
    ):
        out[f"lm_head.{name}"] = sd[f"{prefix}{name}"]
    # transformers' forward adds `decoder.bias`; BLIP ties it to `bias`. Prefer the one actually used.
    bias = sd.get(f"{prefix}decoder.bias", sd.get(f"{prefix}bias"))
    out["lm_head.bias"] = bias
    weight = sd.get(f"{prefix}decoder.weight")
    if weight is None or (word_embeddings is not None and torch.equal(weight, word_embeddings)):
        conv.tied_lm_head = True
    else:
        conv.tied_lm_head = False
        conv.notes.append("LM head weight differs from the word embeddings; kept untied")
    out["lm_head.decoder.weight"] = weight if weight is not None else word_embeddings


def from_transformers(sd: dict[str, torch.Tensor]) -> Conversion:
    """State dict of `BlipForConditionalGeneration` and/or `BlipForImageTextRetrieval` -> ours.

    transformers keeps BERT's text names and renames only the vision side, so the vision keys are
    renamed to BLIP's and the rest is BLIP's layout. ValueError for a text encoder without the ITM
    head and ITC projections (BlipForQuestionAnswering): CapFilt has no use for it.
    """
    blip: dict[str, torch.Tensor] = {}
    unknown = 0
    for key, value in sd.items():
        if key.startswith("vision_model."):
            new = _rename(key[len("vision_model.") :], _HF_VISION)
            if new is None:
                if not key.endswith("position_ids"):
                    unknown += 1
                    log.warning("skipping unknown vision key %s", key)
                continue
            key = "visual_encoder." + new
        blip[key] = value
    conv = from_blip(blip, other="BlipForQuestionAnswering")
    if unknown:
        conv.skipped["unknown vision keys"] += unknown
    return conv


_HEADS = ("itm_head.weight", "vision_proj.weight", "text_proj.weight")


def _unusable_model(sd: dict[str, torch.Tensor], other: str) -> str | None:
    """Why a BLIP state dict is a model CapFilt cannot use (`other`: what such a model is called
    in the caller's layout), or None. BLIP's NLVR2 model has a `cls_head` and two cross-attentions a
    layer; its VQA model (`other` in transformers) a text encoder with no ITM head or ITC projections."""
    if any(k.startswith("cls_head.") for k in sd):
        return "it is BLIP's NLVR2 model (a cls_head, two images a text), not a captioner or a filter"
    if any(k.startswith("text_encoder.") for k in sd) and not all(k in sd for k in _HEADS):
        return (
            "it has a text encoder but no ITM head or ITC projections (itm_head, vision_proj, "
            f"text_proj), as {other} has: a filter needs them"
        )
    return None


_MOMENTUM = re.compile(r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.")
_QUEUES = {"image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue"}


def from_blip(sd: dict[str, torch.Tensor], other: str = "BLIP's VQA model") -> Conversion:
    """State dict of an original BLIP model (`checkpoint["model"]`) -> ours.

    Momentum copies (`*_m`), feature queues and the ITC temperature are training state: they are
    skipped and counted in the summary. ValueError for BLIP's VQA and NLVR2 models (see
    `_unusable_model`): CapFilt has no use for them.
    """
    why = _unusable_model(sd, other)
    if why is not None:
        raise ValueError(why)
    conv = Conversion({})
    out = conv.state_dict
    for key, value in sd.items():
        if _MOMENTUM.match(key):
            conv.skipped["momentum-encoder tensors"] += 1
        elif key in _QUEUES:
            conv.skipped["feature queues"] += 1
        elif key == "temp":
            conv.skipped["ITC temperature (training state)"] += 1
        elif key.startswith("visual_encoder."):
            out[key] = value
        elif key.startswith("text_encoder."):
            new = _text_key(key[len("text_encoder.") :], "encoder")
            if new is None:
                if not key.endswith("position_ids"):
                    conv.skipped["text pooler or unknown keys"] += 1
                continue
            conv.has_encoder = True
            _merge_shared(out, new, value, conv.notes)
        elif key.startswith("text_decoder.bert."):
            new = _text_key(key[len("text_decoder.bert.") :], "decoder")
            if new is None:
                if not key.endswith("position_ids"):
                    conv.skipped["text pooler or unknown keys"] += 1
                continue
            conv.has_decoder = True
            _merge_shared(out, new, value, conv.notes)
        elif key.startswith("text_decoder.cls."):
            continue
        elif key.split(".")[0] in ("vision_proj", "text_proj", "itm_head"):
            out[key] = value
        else:
            conv.skipped["keys of other BLIP heads"] += 1
    if any(k.startswith("text_decoder.cls.") for k in sd):
        _lm_head(sd, "text_decoder.cls.predictions.", out.get("text.embeddings.word_embeddings.weight"), conv)
    return conv


def _depth(s: dict[str, torch.Tensor], prefix: str, what: str) -> int:
    """Number of layers under `prefix` ("visual_encoder.blocks." -> 1 + the highest block index)."""
    layers = {int(k.split(".")[2]) for k in s if k.startswith(prefix)}
    if not layers:
        raise ValueError(f"it has no {what}")
    return 1 + max(layers)


def config_from_blip_state(
    sd: dict[str, torch.Tensor], conv: Conversion, overrides: dict[str, Any]
) -> MEDConfig:
    """Rebuild the architecture from tensor shapes. Head counts are not in the shapes: BLIP uses
    64-wide heads, so heads = width // 64 unless `overrides` ("vision_heads", "text_heads") say.
    Weights this needs are missing: KeyError or ValueError; an unusable architecture: ValueError."""
    s = conv.state_dict
    width = s["visual_encoder.cls_token"].shape[-1]
    patch = s["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((s["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    depth = _depth(s, "visual_encoder.blocks.", "ViT blocks (visual_encoder.blocks.N.*)")
    hidden = s["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=int(overrides.get("vision_heads", max(1, width // 64))),
        mlp_ratio=hidden / width,
        layer_norm_eps=float(overrides.get("vision_layer_norm_eps", 1e-6)),
    )
    emb = s["text.embeddings.word_embeddings.weight"]
    t_width = emb.shape[1]
    text = TextConfig(
        vocab_size=emb.shape[0],
        width=t_width,
        depth=_depth(
            s,
            "text.layer.",
            "BERT layers (text_encoder.encoder.layer.N.* or text_decoder.bert.encoder.layer.N.*)",
        ),
        heads=int(overrides.get("text_heads", max(1, t_width // 64))),
        intermediate=s["text.layer.0.intermediate.dense.weight"].shape[0],
        max_positions=s["text.embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=float(overrides.get("text_layer_norm_eps", 1e-12)),
        tie_word_embeddings=conv.tied_lm_head,
        **{k: int(v) for k, v in overrides.items() if k.endswith("_token_id")},
    )
    embed_dim = s["vision_proj.weight"].shape[0] if "vision_proj.weight" in s else 256
    return MEDConfig(
        vision=vision,
        text=text,
        embed_dim=embed_dim,
        has_encoder=conv.has_encoder,
        has_decoder=conv.has_decoder,
    ).validate()


def config_from_transformers(hf: dict[str, Any], conv: Conversion) -> MEDConfig:
    """Our config from a transformers BLIP `config.json` (a dict)."""
    if not isinstance(hf, dict):
        raise ValueError(f"the config is a {type(hf).__name__}, not an object")
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    if not isinstance(v, dict) or not isinstance(t, dict):
        raise ValueError("vision_config and text_config must be objects")
    for part, cfg in (("vision_config", v), ("text_config", t)):
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":  # BLIP's ViT and BERT both use exact GELU, and so does the MED built here
            raise ValueError(f"{part}.hidden_act is {act!r}; CapFilt's MED uses BLIP's 'gelu' only")
    v_width = int(v.get("hidden_size", 768))
    if v_width <= 0:
        raise ValueError(f"vision_config.hidden_size must be positive, got {v_width}")
    vision = VisionConfig(
        image_size=int(v.get("image_size", 384)),
        patch_size=int(v.get("patch_size", 16)),
        width=v_width,
        depth=int(v.get("num_hidden_layers", 12)),
        heads=int(v.get("num_attention_heads", 12)),
        mlp_ratio=int(v.get("intermediate_size", 3072)) / v_width,
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
    )
    bos = int(t.get("bos_token_id", 30522))
    text = TextConfig(
        vocab_size=int(t.get("vocab_size", 30524)),
        width=int(t.get("hidden_size", 768)),
        depth=int(t.get("num_hidden_layers", 12)),
        heads=int(t.get("num_attention_heads", 8)),
        intermediate=int(t.get("intermediate_size", 3072)),
        max_positions=int(t.get("max_position_embeddings", 512)),
        layer_norm_eps=float(t.get("layer_norm_eps", 1e-12)),
        dropout=float(t.get("hidden_dropout_prob", 0.0)),
        tie_word_embeddings=conv.tied_lm_head,
        pad_token_id=int(t.get("pad_token_id", 0)),
        sep_token_id=int(t.get("sep_token_id", 102)),
        dec_token_id=bos,
        enc_token_id=bos + 1,  # BLIP appends [ENC] right after [DEC]; the tokenizer may correct it
    )
    return MEDConfig(
        vision=vision,
        text=text,
        embed_dim=int(hf.get("image_text_hidden_size", 256)),
        has_encoder=conv.has_encoder,
        has_decoder=conv.has_decoder,
    ).validate()


# ----------------------------------------------------------------------------- export


def _bert_keys(sd: dict[str, torch.Tensor], branch: str, prefix: str) -> dict[str, torch.Tensor]:
    own, other = (
        ("attention.", "causal_attention.") if branch == "encoder" else ("causal_attention.", "attention.")
    )
    out = {}
    for key, value in sd.items():
        if key.startswith("text.embeddings."):
            out[prefix + key[len("text.") :]] = value
        elif key.startswith("text.layer."):
            _, _, i, rest = key.split(".", 3)
            if rest.startswith(other):
                continue
            if rest.startswith(own):
                rest = "attention." + rest[len(own) :]
            out[f"{prefix}encoder.layer.{i}.{rest}"] = value
    return out


def to_transformers(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our state dict -> `BlipForConditionalGeneration` ("captioning") or
    `BlipForImageTextRetrieval` ("retrieval") keys."""
    out = {}
    for key, value in sd.items():
        if key.startswith("visual_encoder."):
            new = _rename(key[len("visual_encoder.") :], _OUR_VISION)
            assert new is not None, key
            out["vision_model." + new] = value
    if kind == "captioning":
        out.update(_bert_keys(sd, "decoder", "text_decoder.bert."))
        for key, value in sd.items():
            if key.startswith("lm_head.transform."):
                out["text_decoder.cls.predictions." + key[len("lm_head.") :]] = value
        out["text_decoder.cls.predictions.decoder.weight"] = sd["lm_head.decoder.weight"]
        out["text_decoder.cls.predictions.bias"] = sd["lm_head.bias"]
        out["text_decoder.cls.predictions.decoder.bias"] = sd["lm_head.bias"]
    elif kind == "retrieval":
        out.update(_bert_keys(sd, "encoder", "text_encoder."))
        for key, value in sd.items():
            if key.split(".")[0] in ("vision_proj", "text_proj", "itm_head"):
                out[key] = value
    else:
        raise ValueError(f"unknown transformers kind {kind!r}; use 'captioning' or 'retrieval'")
    return out


def transformers_config(config: MEDConfig) -> dict[str, Any]:
    """A transformers `BlipConfig` (as kwargs) with our architecture."""
    v, t = config.vision, config.text
    return {
        "vision_config": {
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
        },
        "text_config": {
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "encoder_hidden_size": v.width,
            "intermediate_size": t.intermediate,
            "num_hidden_layers": t.depth,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_positions,
            "layer_norm_eps": t.layer_norm_eps,
            "pad_token_id": t.pad_token_id,
            "bos_token_id": t.dec_token_id,
            "sep_token_id": t.sep_token_id,
            "eos_token_id": t.sep_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        },
        "image_text_hidden_size": config.embed_dim,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
