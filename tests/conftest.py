"""Shared fixtures: a tiny tokenizer and tiny BLIP checkpoints in all three layouts.

transformers builds and saves small random BLIP models itself; the original-format `.pth` files
are made from those weights with BLIP's key names (renamed here by hand, independently of our
converter), with momentum copies, queues and a temperature added as BLIP's pre-training has them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CORPUS = [
    "a red circle on a blue background",
    "two green squares next to a yellow triangle",
    "a picture of a small yellow triangle",
    "three big purple stars in the corner",
    "an orange ring above a white square",
    "a black cat sleeping on a grey sofa",
    "two dogs running on the beach at sunset",
]


@pytest.fixture(scope="session")
def tokenizer():
    from capfilt.model.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 5, vocab_size=150)


def tiny_blip_config(tokenizer):
    from transformers import BlipConfig

    ids = tokenizer.ids
    return BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            vocab_size=ids.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=ids.pad,
            bos_token_id=ids.dec,
            sep_token_id=ids.sep,
            eos_token_id=ids.sep,
        ),
        image_text_hidden_size=16,
    )


@pytest.fixture(scope="session")
def hf_captioner_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(1)
    model = BlipForConditionalGeneration(tiny_blip_config(tokenizer)).eval()
    with torch.no_grad():  # peaky next-token distributions, and [SEP] likely enough to end captions
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(4.0)
        model.text_decoder.cls.predictions.bias[tokenizer.ids.sep] += 1.0
    out = tmp_path_factory.mktemp("hf_captioner")
    model.save_pretrained(out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def hf_retrieval_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(2)
    model = BlipForImageTextRetrieval(tiny_blip_config(tokenizer)).eval()
    with torch.no_grad():  # transformers' init gives near-constant ITM logits; spread them out
        model.itm_head.weight.mul_(40.0)
    out = tmp_path_factory.mktemp("hf_retrieval")
    model.save_pretrained(out)
    tokenizer.save(out)
    return out


_HF_TO_BLIP_VISION = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
        r"visual_encoder.blocks.\1.attn.proj.",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
]


def hf_to_blip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers BLIP keys -> the original repository's keys (blip.md's table)."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        for pattern, repl in _HF_TO_BLIP_VISION:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value.clone()
    return out


def _write_pth(directory: Path, hf_dir: Path, tokenizer, momentum: bool) -> Path:
    from safetensors.torch import load_file

    state = hf_to_blip_names(load_file(str(hf_dir / "model.safetensors")))
    if "text_decoder.cls.predictions.decoder.weight" not in state and any(
        k.startswith("text_decoder") for k in state
    ):
        # BLIP's state dicts carry the tied LM head weight explicitly
        state["text_decoder.cls.predictions.decoder.weight"] = state[
            "text_decoder.bert.embeddings.word_embeddings.weight"
        ]
    if momentum:  # what BLIP's pre-training / retrieval checkpoints also hold
        for key in list(state):
            head = key.split(".")[0]
            if head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
                state[key.replace(head, head + "_m", 1)] = state[key].clone()
        state["image_queue"] = torch.randn(16, 64)
        state["text_queue"] = torch.randn(16, 64)
        state["idx_queue"] = torch.full((1, 64), -100)
        state["ptr_queue"] = torch.zeros(1, dtype=torch.long)
        state["temp"] = torch.tensor(0.07)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pth"
    torch.save({"model": state, "config": {"image_size": 32, "vit": "tiny"}, "epoch": 3}, path)
    tokenizer.save(directory)
    (directory / "med_config.json").write_text(json.dumps({"num_attention_heads": 2, "vision_heads": 2}))
    return path


@pytest.fixture(scope="session")
def blip_captioner_pth(tmp_path_factory, hf_captioner_dir, tokenizer) -> Path:
    return _write_pth(tmp_path_factory.mktemp("pth_captioner"), hf_captioner_dir, tokenizer, momentum=False)


@pytest.fixture(scope="session")
def blip_filter_pth(tmp_path_factory, hf_retrieval_dir, tokenizer) -> Path:
    return _write_pth(tmp_path_factory.mktemp("pth_filter"), hf_retrieval_dir, tokenizer, momentum=True)


@pytest.fixture(scope="session")
def our_captioner_dir(tmp_path_factory, hf_captioner_dir) -> Path:
    from capfilt.model.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path_factory.mktemp("ours_captioner")
    save_checkpoint(load_checkpoint(hf_captioner_dir), out)
    return out


@pytest.fixture(scope="session")
def our_filter_dir(tmp_path_factory, hf_retrieval_dir) -> Path:
    from capfilt.model.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path_factory.mktemp("ours_filter")
    save_checkpoint(load_checkpoint(hf_retrieval_dir), out)
    return out


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[Path]:
    """Three small, different JPEG/PNG images."""
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, ext in enumerate(["jpg", "png", "jpg"]):
        arr = (rng.random((40 + 8 * i, 48, 3)) * 255).astype(np.uint8)
        arr[: 10 + 5 * i, :, i] = 255
        path = out / f"img{i}.{ext}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths
