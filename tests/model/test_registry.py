"""The size registry, the tokenizer saved inside checkpoints, and our own checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch

from capfilt.model.checkpoint import load_checkpoint, new_checkpoint, save_checkpoint
from capfilt.model.config import SIZES, MEDConfig, med_config
from capfilt.model.med import MED


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_runnable_sizes_forward_without_nans(size, tokenizer):
    ckpt = new_checkpoint(size, tokenizer)
    med, cfg = ckpt.med.eval(), ckpt.config
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids, mask = tokenizer(["a red circle", "two green squares on blue"], max_length=35)
    with torch.no_grad():
        embeds = med.encode_image(pixels)
        assert embeds.shape == (2, 1 + cfg.vision.num_patches, cfg.vision.width)
        assert med.itm_logits(embeds, ids, mask).shape == (2, 2)
        assert med.text_feature(ids, mask).shape == (2, cfg.embed_dim)
        logits = med.lm_logits(embeds, ids, mask)
        assert logits.shape == (2, ids.shape[1], tokenizer.ids.vocab_size)
        assert torch.isfinite(logits).all()


def test_paper_sizes_have_blip_shapes():
    base, large = med_config("base"), med_config("large", image_size=384)
    assert (base.vision.width, base.vision.depth, base.vision.heads, base.vision.patch_size) == (
        768,
        12,
        12,
        16,
    )
    assert (large.vision.width, large.vision.depth, large.vision.heads) == (1024, 24, 16)
    assert base.vision.image_size == 224 and large.vision.image_size == 384
    for cfg in (base, large):
        assert (cfg.text.width, cfg.text.depth, cfg.text.vocab_size, cfg.embed_dim) == (768, 12, 30524, 256)
        assert (cfg.text.dec_token_id, cfg.text.enc_token_id, cfg.text.sep_token_id) == (30522, 30523, 102)
    with pytest.raises(ValueError, match="unknown model size"):
        med_config("huge")
    assert set(SIZES) == {"tiny", "small", "base", "large"}


def test_tokenizer_has_blip_special_tokens(tokenizer):
    ids = tokenizer.ids
    assert ids.pad == 0
    assert len({ids.pad, ids.cls, ids.sep, ids.dec, ids.enc}) == 5
    assert tokenizer.hf.convert_ids_to_tokens([ids.dec, ids.enc]) == ["[DEC]", "[ENC]"]
    prompt = tokenizer.prompt_ids("a picture of ")
    assert prompt[0] == ids.dec and ids.sep not in prompt.tolist()
    assert tokenizer.decode(prompt.tolist()) == "a picture of"


def test_own_checkpoint_carries_config_role_provenance_and_tokenizer(tmp_path, tokenizer):
    ckpt = new_checkpoint("tiny", tokenizer, role="captioner", provenance={"trained_on": "nothing"})
    save_checkpoint(ckpt, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "capfilt-med" and meta["role"] == "captioner"
    assert meta["provenance"]["trained_on"] == "nothing"
    assert MEDConfig.from_dict(meta["architecture"]) == ckpt.config
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.tokenizer.ids == tokenizer.ids
    assert loaded.tokenizer(["a red circle"], 35)[0].tolist() == tokenizer(["a red circle"], 35)[0].tolist()
    # the tied LM head is stored once and re-tied on load
    assert loaded.med.lm_head.decoder.weight is loaded.med.text.embeddings.word_embeddings.weight


def test_bad_role_in_config_is_named(tmp_path, tokenizer):
    save_checkpoint(new_checkpoint("tiny", tokenizer), tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["role"] = "oracle"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    from capfilt.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="oracle"):
        load_checkpoint(tmp_path / "ck")


def test_branches_follow_the_config(tokenizer):
    cfg = med_config("tiny", **tokenizer.ids.as_text_config())
    decoder_only = MED(cfg.replace(has_encoder=False))
    encoder_only = MED(cfg.replace(has_decoder=False))
    assert not any("itm_head" in k or ".attention." in k for k in decoder_only.state_dict())
    assert not any("lm_head" in k or "causal_attention" in k for k in encoder_only.state_dict())


def test_tokenizer_training_is_deterministic_across_processes():
    import subprocess
    import sys

    code = (
        "import hashlib, json\n"
        "from capfilt.model.tokenizer import train_tokenizer\n"
        "t = train_tokenizer(['a red circle on blue', 'two green squares', 'a red square'] * 3, vocab_size=50)\n"
        "print(hashlib.sha256(json.dumps(t.hf.get_vocab(), sort_keys=True).encode()).hexdigest())\n"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert len(runs) == 1 and len(next(iter(runs))) == 64


def test_tokenizer_never_produces_unknown_for_seen_characters(tokenizer):
    ids = tokenizer(["bluish greenery by the pond"], max_length=35)[0][0].tolist()
    assert tokenizer.ids.pad not in ids
    unk = tokenizer.hf.convert_tokens_to_ids("[UNK]")
    assert unk not in ids  # letters seen in the corpus always have a ## fallback


def test_conv_stem_builds_the_same_token_grid_and_round_trips(tmp_path, tokenizer):
    ckpt = new_checkpoint("small", tokenizer, stem="conv")
    v = ckpt.config.vision
    assert v.stem == "conv" and not hasattr(ckpt.med.visual_encoder, "patch_embed")
    assert all(not k.startswith("visual_encoder.patch_embed") for k in ckpt.med.state_dict())
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        embeds = ckpt.med.eval().encode_image(pixels)
    assert embeds.shape == (2, 1 + v.num_patches, v.width)  # the grid of the patch stem it replaces
    save_checkpoint(ckpt, tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["architecture"]["vision"]["stem"] == "conv"
    loaded = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded.med.encode_image(pixels), embeds)
    # A finer resolution resizes the position embeddings; the convolutions need nothing.
    bigger = load_checkpoint(tmp_path / "ck", image_size=2 * v.image_size)
    with torch.no_grad():
        out = bigger.med.encode_image(torch.randn(1, 3, 2 * v.image_size, 2 * v.image_size))
    assert out.shape == (1, 1 + 4 * v.num_patches, v.width)


def test_stem_is_validated_and_blip_sizes_keep_the_patch_embedding():
    assert all(med_config(size).vision.stem == "patch" for size in SIZES)
    bad = med_config("tiny").to_dict()
    bad["vision"]["stem"] = "resnet"
    with pytest.raises(ValueError, match=r"vision\.stem must be one of patch, conv"):
        MEDConfig.from_dict(bad)
    odd = med_config("tiny", stem="conv").to_dict()
    odd["vision"].update(patch_size=6, image_size=36)
    with pytest.raises(ValueError, match="power of two"):
        MEDConfig.from_dict(odd)
