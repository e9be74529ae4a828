"""Loading Salesforce BLIP's original `.pth` checkpoints (`model_base.pth`,
`model_base_capfilt_large.pth`, `model_base_caption_capfilt_large.pth`, `model_base_retrieval_coco.pth`,
the large ones): the state dict under "model", read with `torch.load(weights_only=True)`; the
architecture rebuilt from tensor shapes and `med_config.json`; the tokenizer beside it or given,
completed with BLIP's [DEC] and [ENC] when it is a stock bert-base-uncased.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import convert
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    _build,
    _read_json,
    _safe_torch_load,
    file_digest,
    load_hf_tokenizer,
)
from .tokenizer import DEC, ENC, CaptionTokenizer

log = logging.getLogger(__name__)


def _med_config_facts(path: Path) -> dict[str, Any]:
    """Architecture facts from BLIP's `med_config.json` beside a `.pth` (BERT keys), if present.
    Head counts are the one thing tensor shapes cannot tell; `vision_heads` may be added there."""
    if not path.is_file():
        return {}
    cfg = _read_json(path)
    names = {
        "num_attention_heads": "text_heads",
        "layer_norm_eps": "text_layer_norm_eps",
        "vision_heads": "vision_heads",
    }
    return {ours: cfg[theirs] for theirs, ours in names.items() if theirs in cfg}


def _pth_option(option: str, path: Path) -> str:
    """Advice naming a .pth-only option: caption, score and convert take it; the commands that
    hand a checkpoint to other processes (clean, serve, train) take a converted one instead."""
    return (
        f"pass {option} to caption, score or convert; for clean, serve and train convert it once "
        f"(capfilt convert --input {path} --output DIR {option.split(' / ')[0].split()[0]} ...) and pass DIR"
    )


def _pth_tokenizer(
    path: Path, tok_dir: Path, words: torch.Tensor | None, facts: dict[str, Any]
) -> CaptionTokenizer:
    """The tokenizer for an original `.pth`, which has none. BLIP's is bert-base-uncased with [DEC]
    added as bos and [ENC] as an additional special token (blip.py `init_tokenizer`): ids 30522 and
    30523. A stock bert-base-uncased lacks both; when the word embeddings (`words`, (V, D)) have
    exactly two rows more than it, they are added the same way."""
    try:
        hf = load_hf_tokenizer(tok_dir)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"no tokenizer for {path}: an original BLIP .pth has none. Put bert-base-uncased tokenizer files "
            f"(vocab.txt or tokenizer.json) beside it, or {_pth_option('--tokenizer DIR', path)} ({err})"
        ) from err
    dec_id, enc_id = facts.get("dec_token_id"), facts.get("enc_token_id")
    vocab = hf.get_vocab()
    missing = [t for t, given in ((DEC, dec_id), (ENC, enc_id)) if given is None and t not in vocab]
    rows = None if words is None else words.shape[0]
    if missing == [DEC, ENC] and rows == len(hf) + 2:
        hf.add_special_tokens({"bos_token": DEC})
        hf.add_special_tokens({"additional_special_tokens": [ENC]})
        ids = hf.convert_tokens_to_ids([DEC, ENC])
        log.info("%s: the tokenizer has no [DEC], [ENC]; added them as BLIP does (ids %s)", path, ids)
    elif missing:
        if len(missing) == 1:
            why = "it has only one of the two"
        elif rows is None:
            why = f"{path} has no word embeddings"
        else:
            why = f"{path}'s word embeddings have {rows} rows, not {len(hf)} + 2"
        raise CheckpointError(
            f"the tokenizer in {tok_dir} lacks BLIP's {' and '.join(missing)} and cannot be completed as "
            f"BLIP's: {why}. Pass the tokenizer the model was trained with (BLIP's is bert-base-uncased "
            f"plus [DEC] and [ENC]): {_pth_option('--tokenizer DIR', path)}"
        )
    return CaptionTokenizer(hf, dec_id=dec_id, enc_id=enc_id)


def _state_dict_of(raw: Any) -> dict[str, Any] | None:
    """BLIP's state dict in a loaded `.pth`: under "model" (BLIP's own files), the file itself, or
    "state_dict"; keys may carry DistributedDataParallel's "module." prefix. None: no BLIP weights."""
    if not isinstance(raw, dict):
        return None
    for candidate in (raw.get("model"), raw, raw.get("state_dict")):
        if not isinstance(candidate, dict):
            continue
        keys = [k for k in candidate if isinstance(k, str)]
        if any(k.startswith("module.visual_encoder.") for k in keys):
            return {k.removeprefix("module."): v for k, v in candidate.items() if isinstance(k, str)}
        if any(k.startswith("visual_encoder.") for k in keys):
            return candidate
    return None


def _transformers_weights_file(raw: Any) -> bool:
    """Whether a loaded weights file is one file of a transformers BLIP directory."""
    if not isinstance(raw, dict):
        return False
    keys = [k for k in raw if isinstance(k, str)]
    return any(k.startswith("vision_model.") for k in keys)


def load_blip_pth(path: Path, tokenizer: str | Path | None, overrides: dict[str, Any]) -> Checkpoint:
    raw = _safe_torch_load(path)
    state = _state_dict_of(raw)
    if state is None:
        if _transformers_weights_file(raw):
            raise CheckpointError(
                f"{path} holds the weights of a transformers BLIP model (vision_model.* keys): pass the "
                f"directory it was saved in ({path.parent}, with its config.json), not the file"
            )
        raise CheckpointError(
            f"{path} is not a BLIP checkpoint: no state dict with visual_encoder.* weights (looked at the "
            "file itself and under 'model' and 'state_dict', with and without a 'module.' prefix)"
        )
    # BLIP's files hold other entries beside the weights (an epoch, the optimizer's...): names and
    # tensors only
    state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    try:
        conv = convert.from_blip(state)
    except ValueError as err:
        raise CheckpointError(
            f"{path} is not a BLIP model CapFilt can load: {err}. Pass BLIP's pre-training, captioning "
            "(model_*_caption*.pth, a captioner) or retrieval (model_*_retrieval_*.pth, a filter) checkpoint"
        ) from err
    log.info("%s: %s", path, conv.summary())
    for note in conv.notes:
        log.warning("%s: %s", path, note)
    facts = _med_config_facts(path.parent / "med_config.json")
    facts.update(overrides)
    train_cfg = raw.get("config") if isinstance(raw, dict) else None
    words = conv.state_dict.get("text.embeddings.word_embeddings.weight")
    tok = _pth_tokenizer(path, Path(tokenizer) if tokenizer else path.parent, words, facts)
    facts.update({f"{k}_token_id": getattr(tok.ids, k) for k in ("pad", "sep", "dec", "enc", "cls")})
    try:
        config = convert.config_from_blip_state(state, conv, facts)
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as err:
        why = f"it has no {err.args[0]} weight" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(
            f"cannot rebuild the architecture of {path} from its weights: {why}. Pass an original BLIP "
            "pre-training, captioning or retrieval checkpoint; head counts come from med_config.json "
            f"beside it (num_attention_heads, vision_heads), or {_pth_option('--text-heads / --vision-heads', path)}"
        ) from err
    if isinstance(train_cfg, dict) and isinstance(train_cfg.get("prompt"), str):
        config.prompt = train_cfg["prompt"]
    med = _build(config, conv.state_dict, str(path))
    role = (
        "pretrain" if conv.has_encoder and conv.has_decoder else "captioner" if conv.has_decoder else "filter"
    )
    provenance = {"source": str(path), "source_format": "blip-pth", "skipped": dict(conv.skipped)}
    return Checkpoint(med, tok, role, provenance, "blip-pth", file_digest(path))
