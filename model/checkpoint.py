"""Checkpoints: our directory format, and the loaders for the layouts users bring.

Our checkpoint is a directory:
    config.json        {"format": "capfilt-med", "role": ..., "architecture": MEDConfig, "provenance": {...}}
    model.safetensors  the MED's weights (tied LM head stored once)
    tokenizer files    transformers layout (tokenizer.json, tokenizer_config.json)

`load_checkpoint` also accepts a transformers BLIP directory (`save_pretrained` of
`BlipForConditionalGeneration` or `BlipForImageTextRetrieval`) and an original BLIP `.pth`
(state dict under "model"). Nothing is unpickled with code execution: safetensors, or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import convert
from .config import CLIP_MEAN, CLIP_STD, ROLES, MEDConfig
from .med import MED
from .tokenizer import CaptionTokenizer
from .vit import resize_pos_embed

log = logging.getLogger(__name__)

FORMAT = "capfilt-med"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message says which path and why."""


@dataclass
class Checkpoint:
    med: MED
    tokenizer: CaptionTokenizer
    role: str
    provenance: dict[str, Any] = field(default_factory=dict)
    source_format: str = FORMAT  # "capfilt-med" | "transformers" | "blip-pth"
    digest: str = ""  # sha256 of the weights: identifies the checkpoint in ledgers

    @property
    def config(self) -> MEDConfig:
        return self.med.config

    def require(self, task: str, path: str | Path = "") -> None:
        """Fail clearly when a checkpoint cannot do `task` ("caption" or "score")."""
        where = f" {path}" if path else ""
        if task == "caption":
            if self.role == "filter" or not self.config.has_decoder:
                raise CheckpointError(
                    f"checkpoint{where} is a {self.role} (image-grounded encoder) and cannot write captions; "
                    "pass a captioner checkpoint"
                )
        elif task == "score":
            if self.role == "captioner" or not self.config.has_encoder:
                raise CheckpointError(
                    f"checkpoint{where} is a {self.role} (image-grounded decoder) and cannot score texts; "
                    "pass a filter checkpoint"
                )
        else:
            raise ValueError(f"unknown task {task!r}")


def new_checkpoint(
    size: str,
    tokenizer: CaptionTokenizer,
    role: str = "pretrain",
    image_size: int | None = None,
    provenance: dict[str, Any] | None = None,
    stem: str = "patch",
) -> Checkpoint:
    """A randomly initialised MED of a named size whose vocabulary and special ids are `tokenizer`'s;
    `stem` is the image encoder's (VisionConfig.stem)."""
    from .config import med_config

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    config = med_config(size, image_size=image_size, stem=stem, **tokenizer.ids.as_text_config())
    prov = {"created_from": f"random init, size {size}", **(provenance or {})}
    return Checkpoint(MED(config), tokenizer, role, prov, FORMAT)


def for_role(ckpt: Checkpoint, role: str) -> Checkpoint:
    """`ckpt` with only the text branch `role` runs: a captioner keeps the decoder's self-attention,
    a filter the encoder's (everything else is shared): what a deployed model of that role runs."""
    if role not in ("captioner", "filter"):
        raise ValueError(f"role must be captioner or filter, got {role!r}")
    keep = dataclasses.replace(ckpt.config, has_encoder=role == "filter", has_decoder=role == "captioner")
    med = MED(keep)
    own = med.state_dict()
    med.load_state_dict({k: v for k, v in ckpt.med.state_dict().items() if k in own}, strict=True)
    return dataclasses.replace(ckpt, med=med.eval(), role=role)


# ----------------------------------------------------------------------------- saving


def save_checkpoint(ckpt: Checkpoint, directory: str | Path) -> Path:
    """Write `ckpt` as our checkpoint directory (created if missing) and return its path."""
    if ckpt.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {ckpt.role!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in ckpt.med.state_dict().items()}
    if ckpt.config.has_decoder and ckpt.config.text.tie_word_embeddings:
        state.pop("lm_head.decoder.weight")  # the word embeddings, stored once
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "capfilt": FORMAT})
    tmp.replace(out / "model.safetensors")
    ckpt.tokenizer.save(out)
    provenance = {
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **ckpt.provenance,
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "role": ckpt.role,
        "architecture": ckpt.config.to_dict(),
        "provenance": provenance,
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    ckpt.digest = file_digest(out / "model.safetensors")
    return out


# ----------------------------------------------------------------------------- loading


def detect_format(path: str | Path) -> str:
    """ "capfilt-med", "transformers" or "blip-pth" for a path; CheckpointError otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{p} is a directory without config.json; it is not a checkpoint")
        cfg = _read_json(cfg_path)
        if cfg.get("format") == FORMAT:
            return FORMAT
        model_type = cfg.get("model_type")
        if model_type not in (None, "blip"):
            raise CheckpointError(
                f"{cfg_path} describes a transformers {model_type!r} model; CapFilt loads BLIP ones "
                "(model_type 'blip': BlipForImageTextRetrieval, BlipForConditionalGeneration)"
            )
        if model_type == "blip" or "text_config" in cfg:
            return "transformers"
        raise CheckpointError(f"{cfg_path} describes neither a CapFilt nor a transformers BLIP checkpoint")
    if not p.is_file():  # a FIFO would block the read for ever; a device is no checkpoint
        raise CheckpointError(f"{p} is neither a directory nor a regular file; {WHAT_A_CHECKPOINT_IS}")
    return "blip-pth"


def checkpoint_size(path: str | Path) -> tuple[str | None, int | None]:
    """(SIZES name, image size) of a checkpoint directory from its config.json alone, without its
    weights; (None, None) for an original `.pth` (its shapes are in its weights) or an unreadable
    config. Fine-tuning reads it to take BLIP's recipe for BLIP-shaped models."""
    from .config import named_size

    config_path = Path(path) / "config.json"
    try:
        cfg = _read_json(config_path) if config_path.is_file() else None
        if cfg is None:
            return None, None
        if cfg.get("format") == FORMAT:
            arch = MEDConfig.from_dict(cfg["architecture"])
            v, t = arch.vision, arch.text
            vision, text, image = (v.width, v.depth, v.patch_size), (t.width, t.depth), v.image_size
        else:
            v, t = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
            vision = (
                int(v.get("hidden_size", 768)),
                int(v.get("num_hidden_layers", 12)),
                int(v.get("patch_size", 16)),
            )
            text = (int(t.get("hidden_size", 768)), int(t.get("num_hidden_layers", 12)))
            image = int(v.get("image_size", 384))
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
        return None, None
    return named_size(vision, text), image


def load_checkpoint(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    image_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Load any supported checkpoint as a MED in eval mode.

    tokenizer: a directory with tokenizer files, for an original `.pth` (which has none; a
        tokenizer beside the `.pth` is found on its own).
    image_size: run at another resolution; position embeddings are resized bicubically.
    overrides: architecture facts a `.pth` cannot tell ("vision_heads", "text_heads"); BLIP's
        `med_config.json` beside the `.pth` is read for them too. Default: 64-wide heads, as BLIP's.
    """
    kind = detect_format(path)
    try:
        if kind == FORMAT:
            ckpt = _load_ours(Path(path))
        elif kind == "transformers":
            ckpt = _load_transformers(Path(path))
        else:
            from .blip_pth import load_blip_pth  # it builds on this module

            ckpt = load_blip_pth(Path(path), tokenizer, overrides or {})
    except CheckpointError:
        raise
    except (
        SafetensorError,
        pickle.UnpicklingError,
        RuntimeError,
        KeyError,
        OSError,
        ValueError,  # json.JSONDecodeError too; the loaders above say more where they can
    ) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
    _check_tokenizer_fits(ckpt, path)
    if image_size and image_size != ckpt.config.vision.image_size:
        _set_image_size(ckpt.med, image_size)
    return _finish(ckpt, device)


def _check_tokenizer_fits(ckpt: Checkpoint, path: str | Path) -> None:
    """CheckpointError when the tokenizer can produce ids the word embeddings do not have (a
    tokenizer of another model): every caption or score would fail on an index out of range."""
    text = ckpt.config.text
    vocab, size = text.vocab_size, len(ckpt.tokenizer.hf)
    for name in ("pad", "cls", "sep", "dec", "enc"):
        value = getattr(text, f"{name}_token_id")
        if value >= vocab:
            raise CheckpointError(
                f"{path}: the {name} token's id {value} is beyond the model's {vocab} word embeddings: the "
                "tokenizer is another model's. Use the one the model was trained with"
            )
    if size > vocab:
        raise CheckpointError(
            f"{path}: the tokenizer has {size} tokens but the model's word embeddings only {vocab}: it is "
            "another model's tokenizer. Use the one the model was trained with"
        )
    if size < vocab // 2:
        log.warning(
            "%s: the tokenizer has %d tokens, the model's word embeddings %d: is it the model's?",
            path,
            size,
            vocab,
        )


def _finish(ckpt: Checkpoint, device: str | torch.device) -> Checkpoint:
    ckpt.med.to(device).eval()
    ckpt.med.requires_grad_(False)
    return ckpt


def _set_image_size(med: MED, image_size: int) -> None:
    v = med.config.vision
    if image_size % v.patch_size:
        raise CheckpointError(f"image size {image_size} is not a multiple of the patch size {v.patch_size}")
    grid = image_size // v.patch_size
    new = resize_pos_embed(med.visual_encoder.pos_embed.data, grid)
    med.visual_encoder.pos_embed = torch.nn.Parameter(new)
    if v.stem == "patch":  # a conv stem keeps no image size of its own
        med.visual_encoder.patch_embed.img_size = (image_size, image_size)
        med.visual_encoder.patch_embed.grid_size = (grid, grid)
        med.visual_encoder.patch_embed.num_patches = grid * grid
    v.image_size = image_size
    log.info("resized position embeddings to %d px (%dx%d patches)", image_size, grid, grid)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    except RecursionError as err:  # json recurses once per nested list or object
        raise CheckpointError(f"{path} is JSON nested too deeply to be a config") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# Parameters a checkpoint may build (BLIP-L is 0.47 B): a config.json or the shapes of a .pth's
# tensors (a stride-0 tensor of a billion values is 4 bytes in the file) could otherwise ask for
# tens of GB before anything else is checked.
MAX_PARAMETERS = 2_000_000_000


def check_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    """`state` if it is a dict of named tensors, else CheckpointError naming what it holds."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{source}: the weights are a {type(state).__name__}, not a dict of named tensors"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source}: the weights hold {key!r}: {type(value).__name__}; expected names (str) of tensors"
            )
    return state


def _build(config: MEDConfig, state: dict[str, torch.Tensor], source: str) -> MED:
    """The MED of `config` with `state` loaded, checked before anything is allocated: the
    architecture's size, every tensor's shape and kind; and after, every weight finite."""
    check_state_dict(state, source)
    with torch.device("meta"):  # shapes without memory
        skeleton = MED(config)
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise CheckpointError(
            f"{source}: its architecture has {count:,} parameters ({4 * count / 2**30:.0f} GiB in fp32), more "
            f"than CapFilt builds ({MAX_PARAMETERS:,}; BLIP-L has 0.47 billion): not a BLIP checkpoint"
        )
    expected = skeleton.state_dict()
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None:
            continue  # reported with the missing keys below
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: weights do not match the architecture: {key} has shape {tuple(tensor.shape)}, "
                f"the architecture {tuple(want.shape)}"
            )
        if want.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: {key} holds {tensor.dtype} values; weights must be floating point "
                "(float32, float16, bfloat16)"
            )
    med = MED(config)
    missing, unexpected = med.load_state_dict(state, strict=False)
    if config.has_decoder and config.text.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.decoder.weight"]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the architecture "
            f"(missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    med.tie_weights()
    for key, tensor in med.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{source}: {key} holds NaN or infinite values; every caption and score would be NaN "
                "(a diverged training run's checkpoint?)"
            )
    return med


def _load_ours(path: Path) -> Checkpoint:
    meta = _read_json(path / "config.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}/config.json is not a JSON object")
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}/config.json has format_version {version!r}; expected an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer CapFilt (format {meta['format_version']})")
    role = meta.get("role")
    if role not in ROLES:
        raise CheckpointError(f"{path}/config.json has role {role!r}; expected one of {ROLES}")
    try:
        config = MEDConfig.from_dict(meta["architecture"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}/config.json has an invalid architecture: {err}") from err
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no model.safetensors")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):  # transformers would make do with
        raise CheckpointError(  # its tokenizer_config.json alone: a vocabulary of a few special tokens
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy them from the directory "
            "the checkpoint came from"
        )
    med = _build(config, load_file(str(weights)), str(path))
    try:
        tok = CaptionTokenizer.load(path, dec_id=config.text.dec_token_id, enc_id=config.text.enc_token_id)
    except ValueError as err:
        raise CheckpointError(f"{path} has no usable tokenizer files: {err}") from err
    return Checkpoint(med, tok, role, meta.get("provenance", {}), FORMAT, file_digest(weights))


# transformers' weight files, in the order it looks for them: one file, or shards and their index.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def _transformers_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    for single, index in WEIGHT_FILES:
        if (path / single).is_file():
            return _weights_file(path / single), [path / single]
        if (path / index).is_file():
            files = _shard_files(path / index)
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(_weights_file(file))
            return state, files
    raise CheckpointError(
        f"{path} has no model.safetensors or pytorch_model.bin (nor a sharded one's .index.json)"
    )


def _weights_file(file: Path) -> dict[str, torch.Tensor]:
    if file.name.endswith(".safetensors"):
        return load_file(str(file))
    return check_state_dict(_safe_torch_load(file), str(file))  # pickled: weights only, checked


def _shard_files(index: Path) -> list[Path]:
    """The shard files a transformers index names: files of its own directory, each present."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
    names = sorted(set(weight_map.values()))
    directory = index.parent
    outside = [f for f in names if not (directory / f).resolve().is_relative_to(directory.resolve())]
    if outside:
        raise CheckpointError(f"{index} names shard files outside {directory}: {', '.join(outside[:3])}")
    missing = [f for f in names if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{index} names shard files that are not in {directory}: {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    return [directory / f for f in names]


def _load_transformers(path: Path) -> Checkpoint:
    hf_cfg = _read_json(path / "config.json")
    state, files = _transformers_weights(path)
    names = hf_cfg.get("architectures") or [""]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}/config.json: architectures is {names!r}, not a list of class names")
    arch = names[0]
    try:
        conv = convert.from_transformers(state)
        if not (conv.has_encoder or conv.has_decoder):
            raise ValueError(
                f"its weights hold no BLIP text encoder or decoder ({arch or 'no architecture named'})"
            )
    except ValueError as err:
        raise CheckpointError(
            f"{path} is not a BLIP model CapFilt can load: {err}. Pass a BlipForImageTextRetrieval "
            "directory (a filter) or a BlipForConditionalGeneration one (a captioner)"
        ) from err
    for note in conv.notes:
        log.warning("%s: %s", path, note)
    try:
        config = convert.config_from_transformers(hf_cfg, conv)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as err:
        raise CheckpointError(f"{path}/config.json is not a usable BLIP config: {err}") from err
    normalization = image_normalization(path, config.vision.image_size)
    if normalization is not None:
        config = config.replace(image_mean=normalization[0], image_std=normalization[1])
        try:
            config.validate()
        except ValueError as err:
            raise CheckpointError(f"{path}: its image processor's {err}") from err
    tok = _tokenizer_for(path, config)
    config.text.enc_token_id, config.text.dec_token_id = tok.ids.enc, tok.ids.dec
    config.text.cls_token_id = tok.ids.cls
    med = _build(config, conv.state_dict, str(path))
    role = (
        "captioner"
        if conv.has_decoder and not conv.has_encoder
        else "filter"
        if conv.has_encoder and not conv.has_decoder
        else "pretrain"
    )
    provenance = {"source": str(path), "source_format": "transformers", "architecture": arch}
    digest = (
        file_digest(files[0])
        if len(files) == 1
        else "sha256:" + hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()
    )
    log.info("loaded transformers %s from %s (%s)", arch or "BLIP", path, conv.summary())
    return Checkpoint(med, tok, role, provenance, "transformers", digest)


Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


def image_normalization(directory: Path, image_size: int) -> Normalization | None:
    """(mean, std) over pixels scaled to [0, 1], as the image processor saved beside a transformers
    checkpoint normalises them (`preprocessor_config.json`, or transformers 5's
    `processor_config.json` under `image_processor`); None when neither file is there (BLIP's
    CLIP statistics then). A processor that rescales by another factor than 1/255, or not at
    all, is folded into the same two numbers per channel; one that does not normalise gives
    mean 0 and std 1."""
    found = None
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (directory / name).is_file():
            data = _read_json(directory / name)
            found = (name, data if section is None else data.get(section))
            if isinstance(found[1], dict):
                break
            found = None
    if found is None:
        return None
    name, proc = found
    where = f"{directory / name}"

    def triple(key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        if key not in proc:
            return default
        value = proc[key]
        values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not (
            isinstance(values, list)
            and len(values) == 3
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values
            )
        ):
            raise CheckpointError(f"{where}: {key} is {value!r}, not a number or three (one per RGB channel)")
        return tuple(float(x) for x in values)  # type: ignore[return-value]

    if proc.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = triple("image_mean", CLIP_MEAN), triple("image_std", CLIP_STD)
    factor = proc.get("rescale_factor", 1 / 255) if proc.get("do_rescale", True) is not False else 1.0
    if (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or not (factor > 0 and math.isfinite(factor))
    ):
        raise CheckpointError(f"{where}: rescale_factor is {factor!r}, not a positive number")
    scale = factor * 255  # 1 for the usual 1/255: our pixels are already in [0, 1]
    if abs(scale - 1) > 1e-9:
        log.warning(
            "%s rescales pixels by %r, not 1/255; CapFilt folds that into the normalisation", where, factor
        )
        mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)  # type: ignore[assignment]
    size = proc.get("size")
    sides = (
        {size.get("height"), size.get("width")} - {None}
        if isinstance(size, dict)
        else {size}
        if isinstance(size, int)
        else set()
    )
    if sides and sides != {image_size}:
        log.warning(
            "%s resizes images to %s, but the model's position embeddings are for %d px; "
            "CapFilt resizes to %d px",
            where,
            size,
            image_size,
            image_size,
        )
    return mean, std


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # what a BERT tokenizer is read from


def load_hf_tokenizer(directory: Path) -> Any:
    """transformers' tokenizer saved in `directory`; a bare BERT `vocab.txt` (no tokenizer.json or
    tokenizer_config.json, which transformers 5 no longer reads alone) as bert-base-uncased's
    lower-casing WordPiece over it. OSError or ValueError when there is none."""
    from transformers import AutoTokenizer, BertTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError):
        vocab = directory / "vocab.txt"
        if not vocab.is_file() or (directory / "tokenizer.json").is_file():
            raise
        log.info("%s: a bare vocab.txt; reading it as an uncased BERT WordPiece vocabulary", directory)
        return BertTokenizer(vocab=str(vocab))


def _tokenizer_for(path: Path, config: MEDConfig) -> CaptionTokenizer:
    """A transformers BLIP tokenizer may or may not list [DEC]/[ENC]; BLIP's ids are bos and bos+1."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): `save_pretrained` of a model "
            "writes none. Save the model's tokenizer or BlipProcessor into the same directory"
        )
    try:
        hf = load_hf_tokenizer(path)
        vocab = hf.get_vocab()
        dec = vocab.get("[DEC]", config.text.dec_token_id)
        enc = vocab.get("[ENC]", config.text.enc_token_id)
        if "[ENC]" not in vocab:
            log.info("%s: tokenizer has no [ENC]; using id %d (BLIP's: right after [DEC])", path, enc)
        return CaptionTokenizer(hf, dec_id=dec, enc_id=enc)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
        raise CheckpointError(f"{path} has no usable tokenizer files: {err}") from err


WHAT_A_CHECKPOINT_IS = (
    "a checkpoint is a directory with config.json (CapFilt's or transformers' BLIP) or an original "
    "BLIP .pth (a PyTorch zip or pickle)"
)


def _sniff(path: Path) -> None:
    """CheckpointError when `path` cannot be a PyTorch or safetensors file, judged by its first bytes:
    a Git LFS pointer (a clone without `git lfs pull`), text, an image."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is a Git LFS pointer, not the weights: fetch them (`git lfs pull` in that clone)"
        )
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch's zip format; a legacy pickle
        return
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: a little-endian length, then its JSON header
        return
    shown = head[:16].decode("ascii", errors="replace").encode("unicode_escape").decode()
    raise CheckpointError(
        f"{path} is not a PyTorch checkpoint (it starts with {shown!r}); {WHAT_A_CHECKPOINT_IS}"
    )


def _safe_torch_load(path: Path) -> Any:
    """A `.pth`/`.bin` read with `weights_only=True`: tensors and plain data, never code."""
    _sniff(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):  # torch's safe unpickler met what it does not read
            found = re.search(r"GLOBAL (\S+)|(Unsupported [^\n]+)", str(err))
            what = f" ({found.group(1) or found.group(2)})" if found else ""
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain data{what}; refusing to unpickle it, "
                "as that could run code. Re-save it with only its state dict"
            ) from err
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {str(err).splitlines()[0]}"
        ) from err
    except Exception as err:  # torch's zip and pickle readers raise many kinds on a damaged file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); {WHAT_A_CHECKPOINT_IS}"
        ) from err


# ----------------------------------------------------------------------------- export


def export_transformers(ckpt: Checkpoint, directory: str | Path, kind: str | None = None) -> Path:
    """Write `ckpt` as a transformers BLIP directory that `from_pretrained` loads.

    kind: "captioning" (BlipForConditionalGeneration) or "retrieval" (BlipForImageTextRetrieval);
    by default the captioner exports as captioning and the filter as retrieval.
    """
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
    )

    if ckpt.config.vision.stem != "patch":
        raise CheckpointError(
            f"this checkpoint's image encoder has a {ckpt.config.vision.stem} stem; transformers' BLIP "
            "classes have only BLIP's linear patch embedding, so it cannot be exported to them "
            "(train with --stem patch for a checkpoint that can)"
        )
    if kind is None:  # by role: a fine-tuned captioner or filter still holds both branches
        if ckpt.role == "captioner":
            kind = "captioning"
        elif ckpt.role == "filter":
            kind = "retrieval"
        elif ckpt.config.has_decoder and ckpt.config.has_encoder:
            raise CheckpointError(
                "a pre-trained MED holds both a captioner and a filter; choose --kind captioning or --kind retrieval"
            )
        else:
            kind = "captioning" if ckpt.config.has_decoder else "retrieval"
    if kind == "captioning" and not ckpt.config.has_decoder:
        raise CheckpointError("this checkpoint has no text decoder to export as a captioning model")
    if kind == "retrieval" and not ckpt.config.has_encoder:
        raise CheckpointError("this checkpoint has no text encoder to export as a retrieval model")
    hf_config = BlipConfig(**convert.transformers_config(ckpt.config))
    cls = BlipForConditionalGeneration if kind == "captioning" else BlipForImageTextRetrieval
    hf_config.architectures = [cls.__name__]
    model = cls(hf_config)
    state = convert.to_transformers(ckpt.med.state_dict(), kind)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    out = Path(directory)
    model.save_pretrained(str(out))
    ckpt.tokenizer.save(out)
    size = ckpt.config.vision.image_size
    BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(ckpt.config.image_mean),
        image_std=list(ckpt.config.image_std),
    ).save_pretrained(str(out))
    return out
