"""Checkpoints made to hurt: sizes that would allocate tens of GB, weights that are NaN or not
floating point, state dicts of the wrong shape, tokenizers that cannot serve the MED, config values
the model would fail on late. Each is a CheckpointError naming the file (the CLI: exit 2, one line)
before anything large is allocated; none is a traceback, a hang or a model that answers NaN."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from capfilt.cli import main
from capfilt.model.checkpoint import CheckpointError, load_checkpoint


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: Path, edit) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return directory


def _edit_weights(directory: Path, edit) -> Path:
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize(
    "change",
    [
        {"vocab_size": 1_000_000, "width": 16384, "heads": 16, "intermediate": 16384},
        {"depth": 256, "width": 16384, "heads": 16},
    ],
    ids=["vocab_times_width", "depth_times_width"],
)
def test_an_architecture_beyond_any_blip_is_refused_before_it_is_built(
    tmp_path, our_filter_dir, change
) -> None:
    """Each field within its own cap, together tens of GB: refused from the config's shapes alone
    (before, the loader allocated until the OOM killer came)."""
    ckpt = _edit_config(
        _copy(our_filter_dir, tmp_path / "big"), lambda c: c["architecture"]["text"].update(change)
    )
    with pytest.raises(CheckpointError, match=r"parameters .* more than CapFilt builds"):
        load_checkpoint(ckpt)
    from capfilt.model.checkpoint import MAX_PARAMETERS

    assert MAX_PARAMETERS >= 500_000_000  # BLIP-L (0.47 B) is within it


def test_a_pth_of_stride_zero_giants_is_refused(tmp_path, blip_filter_pth) -> None:
    """A .pth's shapes say the architecture: a stride-0 tensor of 15 billion values is a few bytes."""
    raw = torch.load(blip_filter_pth, weights_only=True)
    state = raw.get("model", raw)
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[key] = torch.zeros(1).expand(900_000, 16384)
    out = tmp_path / "giant" / "model.pth"
    out.parent.mkdir()
    torch.save(raw, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (blip_filter_pth.parent / name).is_file():
            shutil.copy(blip_filter_pth.parent / name, out.parent / name)
    with pytest.raises(CheckpointError, match=r"parameters .* more than CapFilt builds|word embeddings"):
        load_checkpoint(out)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (
            lambda s: s.__setitem__("itm_head.bias", s["itm_head.bias"].to(torch.int8)),
            "itm_head.bias holds torch.int8 values",
        ),
        (
            lambda s: s.__setitem__("itm_head.bias", s["itm_head.bias"] > 0),
            "itm_head.bias holds torch.bool values",
        ),
        (
            lambda s: s["itm_head.weight"].view(-1)[0].fill_(float("nan")),
            "itm_head.weight holds NaN or infinite values",
        ),
        (
            lambda s: s["itm_head.weight"].view(-1)[3].fill_(float("inf")),
            "itm_head.weight holds NaN or infinite values",
        ),
        (
            lambda s: s.__setitem__("itm_head.bias", torch.zeros(())),
            r"itm_head.bias has shape \(\), the architecture \(2,\)",
        ),
    ],
    ids=["int8", "bool", "nan", "inf", "scalar"],
)
def test_weights_that_are_no_usable_floats_are_refused_by_name(tmp_path, our_filter_dir, edit, says) -> None:
    """Before: int8 and bool were cast without a word, NaN made `score --json` print NaN and
    `clean` keep nothing."""
    ckpt = _edit_weights(_copy(our_filter_dir, tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=says):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "content",
    [[1, 2], {"state_dict": {"a": torch.ones(2)}}, {7: torch.ones(2)}],
    ids=["list", "nested", "int_key"],
)
def test_a_pytorch_model_bin_that_is_no_dict_of_tensors_is_refused(
    tmp_path, hf_retrieval_dir, content
) -> None:
    ckpt = _copy(hf_retrieval_dir, tmp_path / "bin")
    (ckpt / "model.safetensors").unlink()
    torch.save(content, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: the weights"):
        load_checkpoint(ckpt)


def test_our_checkpoint_without_its_tokenizer_files_is_refused(tmp_path, our_captioner_dir) -> None:
    """transformers would load its tokenizer_config.json alone: a vocabulary of a few special tokens,
    and empty captions (before: a warning, exit 0)."""
    ckpt = _copy(our_captioner_dir, tmp_path / "notok")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer files \(tokenizer.json, vocab.txt\)"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("where", ["ours", "transformers"])
@pytest.mark.parametrize(
    "damage",
    [
        ("tokenizer_config.json", lambda c: c.update(pad_token=None, cls_token=None, sep_token=None)),
        ("tokenizer_config.json", lambda c: c.update(model_max_length="big")),
        ("tokenizer_config.json", lambda c: [c]),
        ("tokenizer.json", lambda c: [1, 2, 3]),
    ],
    ids=["no_pad_cls_sep", "max_length_text", "config_a_list", "tokenizer_a_list"],
)
def test_tokenizers_that_cannot_serve_the_med_are_refused(
    tmp_path, our_filter_dir, hf_retrieval_dir, where, damage
) -> None:
    name, edit = damage
    ckpt = _copy(our_filter_dir if where == "ours" else hf_retrieval_dir, tmp_path / "tok")
    data = json.loads((ckpt / name).read_text())
    replaced = edit(data)
    (ckpt / name).write_text(json.dumps(data if replaced is None else replaced))
    with pytest.raises(CheckpointError, match="has no usable tokenizer files"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("image_std", [0, 0, 0], "image_std must be three positive numbers"),
        ("image_mean", ["a", "b", "c"], "image_mean must be three numbers"),
        ("image_mean", [0.5, 0.5], "image_mean must be three numbers"),
        ("prompt", 5, "prompt must be a string"),
        ("has_encoder", "no", "has_encoder must be true or false"),
        ("max_text_tokens", 60, "max_text_tokens 60 is more than the text's"),
    ],
)
def test_config_values_the_model_would_fail_on_later_are_refused(
    tmp_path, our_filter_dir, field, value, says
) -> None:
    """Before: NaN scores (a zero std), a `ValueError` from transformers at captioning time (a
    prompt of 5), an IndexError on a long text, the string "no" read as true."""

    def edit(config):
        if field == "max_text_tokens":
            config["architecture"]["text"]["max_positions"] = 40
        config["architecture"][field] = value

    ckpt = _edit_config(_copy(our_filter_dir, tmp_path / "cfg"), edit)
    with pytest.raises(CheckpointError, match=says):
        load_checkpoint(ckpt)


def test_a_config_nested_too_deeply_and_a_fifo_are_refused(tmp_path, our_filter_dir) -> None:
    ckpt = _copy(our_filter_dir, tmp_path / "deep")
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(ckpt)
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)  # reading it would block for ever
    with pytest.raises(CheckpointError, match="neither a directory nor a regular file"):
        load_checkpoint(fifo)


def test_convert_to_an_output_it_cannot_create_is_exit_2(tmp_path, our_filter_dir, capsys) -> None:
    (tmp_path / "plain").write_text("a file")
    code = main(["convert", "--input", str(our_filter_dir), "--output", str(tmp_path / "plain" / "sub")])
    err = capsys.readouterr().err
    assert (
        code == 2 and "cannot write the checkpoint there (Not a directory)" in err and "Traceback" not in err
    )


def test_a_transformers_config_naming_its_architectures_oddly_is_refused(tmp_path, hf_retrieval_dir) -> None:
    ckpt = _copy(hf_retrieval_dir, tmp_path / "arch")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = 5
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="architectures is 5, not a list of class names"):
        load_checkpoint(ckpt)
