"""`capfilt train` through the real entry point, driven with an argv list."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from capfilt.cli import main
from capfilt.pipelines.train_cli import add_train_parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capfilt")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_train_command_prints_a_json_summary(
    world: Path, pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cap"
    argv = [
        "train",
        "captioner",
        "--data",
        str(world / "human"),
        "--init",
        str(pretrained),
        "--out",
        str(out),
    ]
    argv += ["--workers", "0", "--batch-size", "8", "--max-steps", "3", "--log-every", "1", "--lr", "5e-5"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "captioner" and summary["steps"] == 3 and summary["checkpoint"] == str(out)
    assert set(summary["losses"]) == {"lm_loss", "loss"} and summary["resumed_from"] is None
    assert (out / "config.json").is_file()


def test_train_command_flags_map_onto_the_config() -> None:
    from capfilt.pipelines.train_cli import config_from_args

    args = _parse(["train", "pretrain", "--data", "a", "b", "--out", "o", "--gpu", "--workers", "2"])
    cfg = config_from_args(args)
    assert cfg.data == ["a", "b"] and cfg.use_gpu and cfg.workers == 2 and cfg.size == "small"
    args = _parse(["train", "filter", "--data", "a", "--out", "o", "--num-gpus", "0", "--queue-size", "64"])
    assert not config_from_args(args).use_gpu and config_from_args(args).queue_size == 64
    assert not config_from_args(args).text_negatives
    args = _parse(["train", "filter", "--data", "a", "--out", "o", "--text-negatives"])
    assert config_from_args(args).text_negatives
    assert config_from_args(args).stem is None
    args = _parse(["train", "pretrain", "--data", "a", "--out", "o", "--stem", "conv"])
    assert config_from_args(args).stem == "conv"


def test_stem_is_refused_for_a_run_from_init(tmp_path: Path) -> None:
    from capfilt.errors import CapfiltError
    from capfilt.pipelines.train_config import TrainConfig

    init = tmp_path / "pre"
    init.mkdir()
    cfg = TrainConfig(task="filter", data=["a"], out=str(tmp_path / "o"), init=str(init), stem="conv")
    with pytest.raises(CapfiltError, match="keeps that checkpoint's stem"):
        cfg.resolved()
    with pytest.raises(CapfiltError, match="unknown stem 'vgg'"):
        TrainConfig(task="pretrain", data=["a"], out="o", stem="vgg").resolved()


def test_train_command_names_a_missing_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "filter", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--init" in capsys.readouterr().err


def _blip_base_config_dir(directory: Path, image_size: int) -> Path:
    """A transformers directory's config.json of BLIP-base shapes (the weights are not read)."""
    directory.mkdir()
    config = {
        "model_type": "blip",
        "vision_config": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "patch_size": 16,
            "image_size": image_size,
        },
        "text_config": {"hidden_size": 768, "num_hidden_layers": 12},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("task", ["captioner", "filter"])
def test_fine_tuning_a_blip_shaped_med_takes_blips_resolution_and_rate(tmp_path: Path, task: str) -> None:
    """BLIP pre-trains base and large at 224 px and fine-tunes them at 384 px with lr 1e-5; our
    small sizes keep their own resolution and 1e-4. Given values always win."""
    from capfilt.pipelines.train_config import TrainConfig

    base = _blip_base_config_dir(tmp_path / "base", 224)
    cfg = TrainConfig(task=task, data=["x"], out=str(tmp_path / "o"), init=str(base)).resolved()
    assert (cfg.image_size, cfg.lr) == (384, 1e-5)
    given = TrainConfig(task=task, data=["x"], out="o", init=str(base), image_size=224, lr=3e-5).resolved()
    assert (given.image_size, given.lr) == (224, 3e-5)
    pre = TrainConfig(task="pretrain", data=["x"], out="o", init=str(base)).resolved()
    assert (pre.image_size, pre.lr) == (None, 3e-4)


def test_fine_tuning_a_small_med_keeps_its_resolution(tmp_path: Path, our_filter_dir: Path) -> None:
    from capfilt.pipelines.train_config import TrainConfig

    cfg = TrainConfig(task="filter", data=["x"], out="o", init=str(our_filter_dir)).resolved()
    assert (cfg.image_size, cfg.lr) == (None, 1e-4)
