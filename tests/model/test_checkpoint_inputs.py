"""Checkpoints as users hand them over: incomplete transformers directories, files that are no
checkpoint at all, tokenizers of another model, wrapped `.pth` state dicts, a bare `vocab.txt`.
Each either loads to the same model or fails with a CheckpointError that names the file and says
what is wrong; the CLI turns those into exit code 2 and one `error:` line, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from capfilt.cli import main
from capfilt.model.checkpoint import CheckpointError, load_checkpoint

from .test_convert import _inputs, _our_scores, _stock_bert_tokenizer


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


def _same_model(a, b, tokenizer) -> None:
    pixels, ids, mask = _inputs(tokenizer)
    for x, y in zip(_our_scores(a, pixels, ids, mask), _our_scores(b, pixels, ids, mask)):
        assert torch.allclose(x, y, atol=1e-6)


def test_a_transformers_directory_without_tokenizer_files_is_refused(tmp_path, hf_retrieval_dir) -> None:
    """`model.save_pretrained` alone writes no tokenizer; transformers 5 then builds an empty one
    and every word would be [UNK]."""
    bare = _copy(hf_retrieval_dir, tmp_path / "bare", ("tokenizer*", "vocab.txt", "special_tokens_map.json"))
    with pytest.raises(
        CheckpointError, match=r"has no tokenizer files \(tokenizer\.json, vocab\.txt\)"
    ) as err:
        load_checkpoint(bare)
    assert str(bare) in str(err.value) and "BlipProcessor" in str(err.value)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (
            b"this is just a text file\n" * 20,
            "is not a PyTorch checkpoint (it starts with 'this is just a t')",
        ),
        (b"hello", "is not a PyTorch checkpoint"),
        (b'{"model": {}}', "is not a PyTorch checkpoint"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1834552\n", "Git LFS pointer"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "is not a PyTorch checkpoint"),
    ],
)
def test_files_that_are_no_checkpoint_say_so(tmp_path, content: bytes, says: str) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert says in str(err.value) and str(path) in str(err.value)
    assert "refusing to unpickle" not in str(err.value)  # no code involved: not that message


def test_a_text_pytorch_model_bin_in_a_transformers_directory_is_a_checkpoint_error(
    tmp_path, hf_retrieval_dir
) -> None:
    directory = _copy(hf_retrieval_dir, tmp_path / "bin", ("model.safetensors",))
    (directory / "pytorch_model.bin").write_text("not weights\n" * 10)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a PyTorch checkpoint"):
        load_checkpoint(directory)


def test_transformers_directories_of_other_models_are_refused_by_name(tmp_path, hf_retrieval_dir) -> None:
    clip = _copy(hf_retrieval_dir, tmp_path / "clip")
    config = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(
        CheckpointError, match=r"describes a transformers 'clip' model; CapFilt loads BLIP ones"
    ):
        load_checkpoint(clip)


def test_a_blip_model_without_a_text_branch_is_refused(tmp_path, tokenizer) -> None:
    """BlipModel has the image and text towers of ITC only: no ITM encoder, no decoder."""
    from transformers import BlipModel

    from tests.conftest import tiny_blip_config

    directory = tmp_path / "blip_model"
    torch.manual_seed(0)
    BlipModel(tiny_blip_config(tokenizer)).save_pretrained(directory)
    tokenizer.save(directory)
    with pytest.raises(CheckpointError, match="hold no BLIP text encoder or decoder") as err:
        load_checkpoint(directory)
    assert "BlipForImageTextRetrieval" in str(err.value)


def test_a_tokenizer_of_another_model_is_refused(tmp_path, hf_retrieval_dir, tokenizer) -> None:
    """More tokens than word embeddings: every caption or score would die on an index error."""
    from capfilt.model.tokenizer import train_tokenizer

    directory = _copy(
        hf_retrieval_dir, tmp_path / "other_tok", ("tokenizer*", "vocab.txt", "special_tokens_map.json")
    )
    bigger = train_tokenizer([f"word{i} thing{i}" for i in range(400)], vocab_size=400)
    assert len(bigger.hf) > tokenizer.ids.vocab_size
    bigger.save(directory)
    with pytest.raises(CheckpointError, match=r"(beyond the model's|only) \d+ word embeddings") as err:
        load_checkpoint(directory)
    assert "another model's" in str(err.value)


@pytest.mark.parametrize("wrap", ["module_prefix", "state_dict", "both"])
def test_wrapped_pth_state_dicts_load_as_the_plain_one(
    tmp_path, blip_filter_pth, tokenizer, wrap: str
) -> None:
    raw = torch.load(blip_filter_pth, weights_only=True)
    state = raw["model"]
    if wrap in ("module_prefix", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    saved = {"state_dict": state, "epoch": 1} if wrap in ("state_dict", "both") else state
    directory = _copy(blip_filter_pth.parent, tmp_path / wrap)
    torch.save(saved, directory / "model.pth")
    _same_model(load_checkpoint(directory / "model.pth"), load_checkpoint(blip_filter_pth), tokenizer)


def test_a_bare_vocab_txt_beside_a_pth_is_read_as_bert_wordpiece(
    tmp_path, blip_filter_pth, tokenizer
) -> None:
    """What the error for a `.pth` without a tokenizer advises: bert-base-uncased's vocab.txt."""
    vocab = tokenizer.hf.get_vocab()
    words = sorted(vocab, key=vocab.get)[:-2]  # a stock BERT vocabulary: no [DEC], [ENC]
    directory = tmp_path / "pth"
    directory.mkdir()
    shutil.copy(blip_filter_pth, directory / "model.pth")
    shutil.copy(blip_filter_pth.parent / "med_config.json", directory)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")  # nothing else
    ckpt = load_checkpoint(directory / "model.pth")
    assert ckpt.tokenizer.ids == tokenizer.ids
    _same_model(ckpt, load_checkpoint(blip_filter_pth), tokenizer)


def test_caption_and_score_take_the_pth_options(
    tmp_path, blip_filter_pth, blip_captioner_pth, tokenizer, image, capsys
) -> None:
    """The loader's errors for a `.pth` ask for --tokenizer / --text-heads / --vision-heads: every
    command that loads a model takes them."""
    stock = _stock_bert_tokenizer(tmp_path / "stock", tokenizer)
    directory = tmp_path / "filter"
    directory.mkdir()
    shutil.copy(blip_filter_pth, directory / "model.pth")  # no tokenizer, no med_config.json beside it
    argv = [
        "score",
        "--model",
        str(directory / "model.pth"),
        "--image",
        str(image),
        "--text",
        "a red circle",
        "--json",
    ]
    assert main(argv) == 2 and "--tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(stock), "--text-heads", "2", "--vision-heads", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"][0]["text"] == "a red circle"
    caption = [
        "caption",
        "--model",
        str(blip_captioner_pth),
        str(image),
        "--tokenizer",
        str(stock),
        "--method",
        "greedy",
    ]
    assert main([*caption, "--text-heads", "2", "--vision-heads", "2"]) == 0


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--max-tokens", "0"], "--max-tokens: must be >= 1, got 0"),
        (["--num-captions", "-1"], "--num-captions: must be >= 1, got -1"),
    ],
)
def test_cli_options_out_of_range_are_usage_errors(our_captioner_dir, image, capsys, extra, says) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["caption", "--model", str(our_captioner_dir), str(image), *extra])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_cli_errors_a_user_causes_are_one_line_and_exit_2(
    tmp_path, our_captioner_dir, our_filter_dir, image, capsys
) -> None:
    cases = [
        (
            ["caption", "--model", str(our_captioner_dir), str(image), "--max-tokens", "10000"],
            "lower max_tokens",
        ),
        (["caption", "--model", str(our_captioner_dir), str(image), "--device", "foo"], "--device 'foo'"),
        (
            ["score", "--model", str(our_filter_dir), "--image", str(tmp_path), "--text", "x"],
            "is a directory, not an image file",
        ),
        (["caption", "--model", str(image), str(image)], "is not a PyTorch checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["caption", "--model", str(our_captioner_dir), str(image), "--device", "cuda"], "no CUDA GPU")
        )
    (tmp_path / "a_file").write_text("x")
    cases.append(
        (
            ["convert", "--input", str(our_filter_dir), "--output", str(tmp_path / "a_file")],
            "is a file; give a directory",
        )
    )
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, (argv, err)


def test_a_shard_index_may_name_only_files_of_its_directory(tmp_path, hf_retrieval_dir) -> None:
    directory = _copy(hf_retrieval_dir, tmp_path / "sharded", ("model.safetensors",))
    shutil.copy(hf_retrieval_dir / "model.safetensors", tmp_path / "elsewhere.safetensors")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names shard files outside .*: \.\./elsewhere\.safetensors"):
        load_checkpoint(directory)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no weight_map"):
        load_checkpoint(directory)


def test_an_activation_other_than_blips_gelu_is_refused(tmp_path, hf_retrieval_dir) -> None:
    directory = _copy(hf_retrieval_dir, tmp_path / "relu")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["hidden_act"] = "relu"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"text_config\.hidden_act is 'relu'; CapFilt's MED uses BLIP's 'gelu'"
    ):
        load_checkpoint(directory)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_transformers_weights_load_as_the_single_file(tmp_path, hf_retrieval_dir, fmt) -> None:
    """`save_pretrained(max_shard_size=...)` writes shards and an index: safetensors, or with
    transformers 4's `safe_serialization=False` `pytorch_model-0000N-of-0000M.bin` and
    `pytorch_model.bin.index.json` (refused before: only one .bin was looked for)."""
    from safetensors.torch import load_file, save_file

    directory = _copy(hf_retrieval_dir, tmp_path / fmt, ("model.safetensors",))
    state = load_file(str(hf_retrieval_dir / "model.safetensors"))
    names = sorted(state)
    parts = [names[i::3] for i in range(3)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"{stem}-{i:05d}-of-00003.{ext}"
        tensors = {k: state[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(tensors, str(directory / shard))
        else:
            torch.save(tensors, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = directory / f"{stem}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded, single = load_checkpoint(directory), load_checkpoint(hf_retrieval_dir)
    assert sharded.role == single.role == "filter"
    _same_model(sharded, single, single.tokenizer)
    (directory / f"{stem}-00002-of-00003.{ext}").unlink()
    with pytest.raises(CheckpointError, match=rf"names shard files that are not in .*{stem}-00002-of-00003"):
        load_checkpoint(directory)
    (directory / f"{stem}-00002-of-00003.{ext}").mkdir()  # a directory in a shard's place
    with pytest.raises(CheckpointError, match="names shard files that are not in"):
        load_checkpoint(directory)


def test_clean_s_advice_for_a_pth_without_a_tokenizer_is_one_clean_can_follow(tmp_path, blip_filter_pth):
    """clean takes no --tokenizer: its error says to convert the .pth once instead."""
    from capfilt.errors import CapfiltError
    from capfilt.pipelines.clean import inspect_checkpoint

    directory = tmp_path / "filter"
    directory.mkdir()
    shutil.copy(blip_filter_pth, directory / "model.pth")
    with pytest.raises(CapfiltError, match=r"--filter .*for clean, serve and train convert it once") as err:
        inspect_checkpoint(str(directory / "model.pth"), "score", "filter")
    assert "capfilt convert --input" in str(err.value) and "--tokenizer" in str(err.value)
