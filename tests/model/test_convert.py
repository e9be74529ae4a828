"""Parity with transformers: our loaders on transformers directories and original `.pth` files
give transformers' own outputs (ITM, ITC within 1e-4; greedy and beam captions token-identical)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from capfilt.cli import main
from capfilt.model.checkpoint import CheckpointError, export_transformers, load_checkpoint, save_checkpoint
from capfilt.model.generate import GenerationConfig, generate

TEXTS = ["a red circle on a blue background", "two green squares", "a black cat", "sunset beach dogs running"]


def _inputs(tokenizer, n_images=2):
    torch.manual_seed(7)
    pixels = torch.randn(n_images, 3, 32, 32)
    ids, mask = tokenizer(TEXTS[: 2 * n_images], max_length=35)
    return pixels, ids, mask


def _hf_retrieval_scores(hf_dir, pixels, ids, mask, enc_id):
    from transformers import BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(hf_dir).eval()
    n = ids.shape[0]
    px = pixels.repeat_interleave(n // pixels.shape[0], dim=0)
    enc_ids = ids.clone()
    enc_ids[:, 0] = enc_id  # the same position-0 token on both sides: BLIP trains ITM with [ENC]
    with torch.no_grad():
        itm = model(input_ids=enc_ids, pixel_values=px, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        itc = model(
            input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False
        ).itm_score.diagonal()
    return itm, itc


def _our_scores(ckpt, pixels, ids, mask):
    med = ckpt.med
    n = ids.shape[0]
    with torch.no_grad():
        embeds = med.encode_image(pixels).repeat_interleave(n // pixels.shape[0], dim=0)
        itm = med.itm_logits(embeds, ids, mask).softmax(-1)[:, 1]
        itc = (med.image_feature(embeds) * med.text_feature(ids, mask)).sum(-1)
    return itm, itc


@pytest.mark.parametrize("layout", ["transformers", "pth", "ours"])
def test_itm_and_itc_match_transformers(layout, request, hf_retrieval_dir, tokenizer):
    path = {
        "transformers": hf_retrieval_dir,
        "pth": request.getfixturevalue("blip_filter_pth"),
        "ours": request.getfixturevalue("our_filter_dir"),
    }[layout]
    ckpt = load_checkpoint(path)
    assert ckpt.role == "filter"
    pixels, ids, mask = _inputs(tokenizer)
    hf_itm, hf_itc = _hf_retrieval_scores(hf_retrieval_dir, pixels, ids, mask, tokenizer.ids.enc)
    itm, itc = _our_scores(ckpt, pixels, ids, mask)
    assert torch.allclose(itm, hf_itm, atol=1e-4), (itm, hf_itm)
    assert torch.allclose(itc, hf_itc, atol=1e-4), (itc, hf_itc)
    assert (hf_itm.max() - hf_itm.min()) > 1e-3  # the comparison is not between constants


def _hf_generate(hf_dir, pixels, prompt_ids, max_tokens, min_tokens, num_beams, k):
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(hf_dir).eval()
    P = prompt_ids.shape[0]
    # transformers' BLIP generate writes bos over position 0 and drops the last token ([SEP]).
    input_ids = torch.cat([prompt_ids, prompt_ids[:1]]).repeat(pixels.shape[0], 1)
    with torch.no_grad():
        out = model.generate(
            pixel_values=pixels,
            input_ids=input_ids,
            max_length=P + max_tokens,
            min_new_tokens=min_tokens,
            num_beams=num_beams,
            num_return_sequences=k,
            do_sample=False,
            repetition_penalty=1.0,
        )
    sep, pad = model.config.text_config.sep_token_id, model.config.text_config.pad_token_id
    captions = []
    for row in out[:, P:].tolist():
        cut = row.index(sep) if sep in row else len(row)
        captions.append([t for t in row[:cut] if t != pad])
    return [captions[i * k : (i + 1) * k] for i in range(pixels.shape[0])]


@pytest.mark.parametrize("layout", ["transformers", "pth", "ours"])
@pytest.mark.parametrize(("method", "beams", "k"), [("greedy", 1, 1), ("beam", 3, 1), ("beam", 3, 2)])
def test_greedy_and_beam_captions_are_token_identical(
    layout, method, beams, k, request, hf_captioner_dir, tokenizer
):
    path = {
        "transformers": hf_captioner_dir,
        "pth": request.getfixturevalue("blip_captioner_pth"),
        "ours": request.getfixturevalue("our_captioner_dir"),
    }[layout]
    ckpt = load_checkpoint(path)
    assert ckpt.role == "captioner"
    torch.manual_seed(11)
    pixels = torch.randn(4, 3, 32, 32)
    prompt = tokenizer.prompt_ids("a picture of ")
    cfg = GenerationConfig(
        method=method, num_beams=beams, num_captions=k, max_tokens=12, min_tokens=2, repetition_penalty=1.0
    )
    with torch.no_grad():
        ours = generate(ckpt.med, ckpt.med.encode_image(pixels), prompt, cfg)
    theirs = _hf_generate(hf_captioner_dir, pixels, prompt, 12, 2, beams, k)
    assert ours == theirs
    lengths = {len(c) for caps in ours for c in caps}
    assert len(lengths) > 1 or min(lengths) < 12, "captions never end early: [SEP] handling untested"


def test_base_loads_transformers_base_shapes_without_missing_or_unexpected_keys():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.model import convert
    from capfilt.model.config import med_config
    from capfilt.model.med import MED

    hf_config = BlipConfig()  # BLIP-base shapes, random weights
    for cls, branches in (
        (BlipForConditionalGeneration, {"has_encoder": False}),
        (BlipForImageTextRetrieval, {"has_decoder": False}),
    ):
        state = cls(hf_config).state_dict()
        conv = convert.from_transformers(state)
        med = MED(med_config("base", image_size=384).replace(**branches))
        result = med.load_state_dict(conv.state_dict, strict=False)
        assert result.missing_keys == [] and result.unexpected_keys == [], result
        assert not conv.skipped, conv.skipped
        del state, med


def test_pth_skips_momentum_and_queues_with_a_summary(blip_filter_pth, caplog):
    with caplog.at_level(logging.INFO, logger="capfilt.model"):
        ckpt = load_checkpoint(blip_filter_pth)
    skipped = ckpt.provenance["skipped"]
    assert skipped["momentum-encoder tensors"] > 10
    assert skipped["feature queues"] == 4
    assert skipped["ITC temperature (training state)"] == 1
    assert "momentum-encoder tensors" in caplog.text


def test_export_to_transformers_round_trips(tmp_path, our_filter_dir, our_captioner_dir, tokenizer):
    from transformers import BlipForImageTextRetrieval

    ckpt = load_checkpoint(our_filter_dir)
    export_transformers(ckpt, tmp_path / "hf")
    model = BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    back = load_checkpoint(tmp_path / "hf")
    pixels, ids, mask = _inputs(tokenizer)
    a, _ = _our_scores(ckpt, pixels, ids, mask)
    b, _ = _our_scores(back, pixels, ids, mask)
    assert torch.allclose(a, b, atol=1e-6)
    enc = ids.clone()
    enc[:, 0] = tokenizer.ids.enc
    with torch.no_grad():
        hf = model(input_ids=enc, pixel_values=pixels.repeat_interleave(2, 0), attention_mask=mask).itm_score
    assert torch.allclose(hf.softmax(-1)[:, 1], a, atol=1e-4)
    cap = load_checkpoint(our_captioner_dir)
    export_transformers(cap, tmp_path / "hf_cap")
    assert load_checkpoint(tmp_path / "hf_cap").role == "captioner"


def test_conv_stem_checkpoint_is_refused_by_the_exporter_with_the_reason(tmp_path, tokenizer):
    from capfilt.model.checkpoint import new_checkpoint

    ckpt = new_checkpoint("tiny", tokenizer, role="filter", stem="conv")
    with pytest.raises(CheckpointError, match=r"conv stem.*--stem patch"):
        export_transformers(ckpt, tmp_path / "hf", "retrieval")
    assert not (tmp_path / "hf").exists()


def test_our_checkpoint_round_trip_is_exact(tmp_path, our_captioner_dir):
    ckpt = load_checkpoint(our_captioner_dir)
    save_checkpoint(ckpt, tmp_path / "again")
    again = load_checkpoint(tmp_path / "again")
    for (k, a), (_, b) in zip(ckpt.med.state_dict().items(), again.med.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.role == "captioner" and again.digest == ckpt.digest


def test_image_size_change_resizes_position_embeddings(our_filter_dir):
    ckpt = load_checkpoint(our_filter_dir, image_size=48)
    assert ckpt.med.visual_encoder.pos_embed.shape[1] == 1 + 6 * 6
    assert ckpt.med.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)


def test_malicious_pth_is_not_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_garbage_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pth"):
        load_checkpoint(path)


def test_missing_and_non_checkpoint_directories(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"without config\.json"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- layouts we cannot load


def _blip_pth(directory: Path, base: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the original-layout `.pth` at `base` (and its tokenizer), its state dict changed."""
    shutil.copytree(base.parent, directory)
    path = directory / base.name
    raw = torch.load(path, weights_only=True)
    change(raw["model"])
    torch.save(raw, path)
    return path


def test_a_transformers_question_answering_directory_is_a_checkpoint_error(
    tmp_path, tokenizer, image_files, capsys
):
    """BlipForQuestionAnswering has a text encoder and decoder but no ITM head or ITC projections."""
    from transformers import BlipForQuestionAnswering

    from ..conftest import tiny_blip_config

    directory = tmp_path / "hf_vqa"
    BlipForQuestionAnswering(tiny_blip_config(tokenizer)).save_pretrained(directory)
    tokenizer.save(directory)
    with pytest.raises(CheckpointError, match=r"no ITM head.*BlipForImageTextRetrieval") as err:
        load_checkpoint(directory)
    assert str(directory) in str(err.value)
    assert isinstance(err.value.__cause__, ValueError)
    argv = ["score", "--model", str(directory), "--image", str(image_files[0]), "--text", "a dog"]
    assert main(argv) == 2
    assert "no ITM head" in capsys.readouterr().err


def _drop_text_layers(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if k.startswith("text_encoder.encoder.layer.")]:
        del state[key]


def _drop_vision_blocks(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if k.startswith("visual_encoder.blocks.")]:
        del state[key]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        pytest.param(
            _drop_text_layers, r"no BERT layers \(text_encoder\.encoder\.layer", id="no-text-layers"
        ),
        pytest.param(_drop_vision_blocks, r"no ViT blocks \(visual_encoder\.blocks", id="no-vision-blocks"),
    ],
)
def test_a_pth_without_the_layers_it_needs_is_a_checkpoint_error(tmp_path, blip_filter_pth, change, says):
    path = _blip_pth(tmp_path / "pth", blip_filter_pth, change)
    with pytest.raises(CheckpointError, match=says) as err:
        load_checkpoint(path)
    assert f"architecture of {path}" in str(err.value) and "original BLIP" in str(err.value)
    assert isinstance(err.value.__cause__, ValueError)


def test_a_pth_whose_head_count_does_not_divide_the_width_is_a_checkpoint_error(tmp_path, blip_filter_pth):
    """`MEDConfig.validate` refuses the architecture; the message says where head counts come from."""
    path = _blip_pth(tmp_path / "pth", blip_filter_pth, lambda state: None)
    (path.parent / "med_config.json").write_text(json.dumps({"num_attention_heads": 3, "vision_heads": 2}))
    with pytest.raises(CheckpointError, match=r"multiples of the heads.*med_config\.json") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_the_cli_reports_a_pth_it_cannot_rebuild_with_exit_code_2(tmp_path, blip_filter_pth, capsys):
    path = _blip_pth(tmp_path / "pth", blip_filter_pth, _drop_text_layers)
    out = tmp_path / "converted"
    assert main(["convert", "--input", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no BERT layers" in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------- a stock BERT tokenizer


def _stock_bert_tokenizer(directory: Path, tokenizer, drop: int = 2) -> Path:
    """`tokenizer`'s vocabulary without its last `drop` tokens ([DEC], [ENC] for 2), saved the way a
    stock bert-base-uncased is: a plain BertTokenizer that knows nothing of BLIP."""
    from transformers import BertTokenizer

    vocab = tokenizer.hf.get_vocab()
    words = sorted(vocab, key=vocab.get)
    assert words[-2:] == ["[DEC]", "[ENC]"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words[:-drop])}).save_pretrained(directory)
    return directory


def test_a_stock_bert_tokenizer_gets_dec_and_enc_added_as_blip_does(
    tmp_path, blip_captioner_pth, tokenizer, caplog
):
    """BLIP adds [DEC] (bos) and [ENC] to bert-base-uncased: the embeddings have len(tokenizer) + 2
    rows, so a stock tokenizer is completed with ids len and len + 1, as the model was trained with."""
    stock = _stock_bert_tokenizer(tmp_path / "bert", tokenizer)
    with caplog.at_level(logging.INFO, logger="capfilt.model"):
        ckpt = load_checkpoint(blip_captioner_pth, tokenizer=stock)
    n = tokenizer.ids.vocab_size - 2
    assert (ckpt.tokenizer.ids.dec, ckpt.tokenizer.ids.enc) == (n, n + 1)
    assert ckpt.tokenizer.ids == tokenizer.ids
    assert ckpt.tokenizer.hf.bos_token == "[DEC]" and "[ENC]" in ckpt.tokenizer.hf.all_special_tokens
    assert "added them as BLIP does" in caplog.text
    for a, b in zip(ckpt.tokenizer(TEXTS, 35), tokenizer(TEXTS, 35)):
        assert torch.equal(a, b)
    prompt = ckpt.tokenizer.prompt_ids("a picture of ")
    assert torch.equal(prompt, tokenizer.prompt_ids("a picture of ")) and prompt[0] == n
    assert ckpt.tokenizer.decode([n, *prompt[1:].tolist(), n + 1]) == "a picture of"


def test_a_completed_stock_tokenizer_is_saved_with_dec_and_enc(tmp_path, blip_filter_pth, tokenizer):
    stock = _stock_bert_tokenizer(tmp_path / "bert", tokenizer)
    ckpt = load_checkpoint(blip_filter_pth, tokenizer=stock)
    again = load_checkpoint(save_checkpoint(ckpt, tmp_path / "ours"))
    assert again.tokenizer.ids == tokenizer.ids


def test_a_tokenizer_without_dec_and_enc_that_does_not_fit_the_embeddings_is_refused(
    tmp_path, blip_captioner_pth, tokenizer
):
    stock = _stock_bert_tokenizer(tmp_path / "bert", tokenizer, drop=3)  # one word short of BLIP's
    rows = tokenizer.ids.vocab_size
    with pytest.raises(
        CheckpointError, match=rf"word embeddings have {rows} rows, not {rows - 3} \+ 2"
    ) as err:
        load_checkpoint(blip_captioner_pth, tokenizer=stock)
    assert str(blip_captioner_pth) in str(err.value) and "--tokenizer" in str(err.value)


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.mark.parametrize(
    "processor",
    [
        {"image_mean": IMAGENET[0], "image_std": IMAGENET[1]},
        {"image_mean": 0.5, "image_std": 0.25},  # one number for every channel
        {"do_normalize": False},
        {"do_rescale": False, "image_mean": [120.0, 110.0, 100.0], "image_std": [60.0, 60.0, 60.0]},
    ],
    ids=["imagenet", "scalar", "no-normalize", "no-rescale"],
)
@pytest.mark.parametrize("file", ["preprocessor_config.json", "processor_config.json"])
def test_a_transformers_directory_normalises_images_as_its_image_processor_says(
    tmp_path, hf_retrieval_dir, processor, file
):
    """Pixels reach the model as transformers' own image processor from the same directory
    makes them (a directory saved with ImageNet statistics was read with CLIP's)."""
    from PIL import Image
    from transformers import BlipImageProcessor

    from capfilt.inference import Filter

    directory = tmp_path / "hf"
    shutil.copytree(hf_retrieval_dir, directory)
    saved = BlipImageProcessor(size={"height": 32, "width": 32}, **processor)
    if file == "preprocessor_config.json":
        saved.save_pretrained(directory)
    else:  # transformers 5's processor file nests the image processor's fields
        fields = json.loads(saved.to_json_string())
        (directory / file).write_text(json.dumps({"image_processor": fields}))
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    expected = saved(image, return_tensors="pt").pixel_values
    ours = Filter(load_checkpoint(directory), device="cpu").pixels([image])
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_a_transformers_directory_without_an_image_processor_uses_blip_s_statistics(hf_retrieval_dir):
    from capfilt.model.config import CLIP_MEAN, CLIP_STD

    assert not (hf_retrieval_dir / "preprocessor_config.json").exists()
    config = load_checkpoint(hf_retrieval_dir).config
    assert (config.image_mean, config.image_std) == (CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"image_mean": [0.5, 0.5]}, "image_mean is [0.5, 0.5]"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"image_mean": "imagenet"}, "image_mean is 'imagenet'"),
        ({"rescale_factor": 0}, "rescale_factor is 0"),
    ],
)
def test_an_unusable_image_processor_is_a_checkpoint_error_naming_the_field(
    tmp_path, hf_retrieval_dir, fields, says
):
    directory = tmp_path / "hf"
    shutil.copytree(hf_retrieval_dir, directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(fields))
    with pytest.raises(CheckpointError, match=re.escape(says)):
        load_checkpoint(directory)


def _as_vqa(state: dict[str, torch.Tensor]) -> None:
    """BLIP's VQA model: a text encoder (questions) and a decoder (answers), no ITM head or ITC."""
    for key in [k for k in state if k.split(".")[0] in ("itm_head", "vision_proj", "text_proj")]:
        del state[key]
    for key in [k for k in state if k.startswith("text_encoder.")]:
        state["text_decoder.bert." + key[len("text_encoder.") :]] = state[key].clone()


def _as_nlvr(state: dict[str, torch.Tensor]) -> None:
    """BLIP's NLVR2 model: a classification head over two images."""
    for key in [k for k in state if k.split(".")[0] in ("itm_head", "vision_proj", "text_proj")]:
        del state[key]
    state["cls_head.0.weight"] = torch.zeros(32, 32)


@pytest.mark.parametrize(
    ("change", "says"),
    [(_as_vqa, r"no ITM head or ITC projections .*BLIP's VQA model"), (_as_nlvr, "BLIP's NLVR2 model")],
    ids=["vqa", "nlvr"],
)
def test_blip_s_vqa_and_nlvr_files_are_named_at_once(tmp_path, blip_filter_pth, change, says, caplog):
    """Refused with what they are, before any weight is merged (the VQA file warned 20 times about
    its encoder and decoder copies first, then named missing keys)."""
    path = _blip_pth(tmp_path / "pth", blip_filter_pth, change)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match=says) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "retrieval" in str(err.value)
    assert not [r for r in caplog.records if "differ" in r.getMessage()]


def test_a_transformers_weights_file_asks_for_its_directory(tmp_path, hf_retrieval_dir):
    with pytest.raises(CheckpointError, match="pass the directory it was saved in") as err:
        load_checkpoint(hf_retrieval_dir / "model.safetensors")
    assert str(hf_retrieval_dir) in str(err.value)
