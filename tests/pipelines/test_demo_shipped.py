"""The small captioner and filter shipped with CapFilt (what `make demo` uses): their digests are
checked, a changed or missing file is refused with a way out, shipping a run keeps its weights, and
the shipped filter still tells noisy web texts from clean ones on a world it never saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from capfilt.errors import CapfiltError
from capfilt.model.checkpoint import load_checkpoint, new_checkpoint, save_checkpoint
from capfilt.pipelines.demo import ship_checkpoints, shipped_checkpoints, shipped_root


def test_the_shipped_checkpoints_match_their_manifest_and_load_for_their_roles() -> None:
    paths = shipped_checkpoints()
    captioner, filt = load_checkpoint(paths["captioner"]), load_checkpoint(paths["filter"])
    assert captioner.role == "captioner" and captioner.config.has_decoder and not captioner.config.has_encoder
    assert filt.role == "filter" and filt.config.has_encoder and not filt.config.has_decoder
    manifest = json.loads((shipped_root() / "MANIFEST.json").read_text())
    assert {"captioner/model.safetensors", "filter/model.safetensors"} <= set(manifest["files"])


@pytest.mark.parametrize("damage", ["changed", "missing", "no-manifest"])
def test_a_damaged_shipped_checkpoint_is_refused_with_a_way_out(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "small"
    shutil.copytree(shipped_root(), root)
    weights = root / "filter" / "model.safetensors"
    if damage == "changed":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        weights.unlink()
    else:
        (root / "MANIFEST.json").unlink()
    with pytest.raises(CapfiltError) as err:
        shipped_checkpoints(root)
    message = str(err.value)
    assert "capfilt demo --train" in message
    assert (str(weights) if damage != "no-manifest" else "MANIFEST.json") in message


def test_shipping_a_run_keeps_each_role_s_weights_and_records_their_digests(
    tmp_path: Path, tokenizer
) -> None:
    import torch

    run = tmp_path / "run"
    torch.manual_seed(0)
    ckpt = new_checkpoint("tiny", tokenizer, role="pretrain")
    for role in ("captioner", "filter"):
        ckpt.role = role
        save_checkpoint(ckpt, run / role)
    with pytest.raises(CapfiltError, match="not a finished checkpoint"):
        ship_checkpoints(tmp_path / "nothing", tmp_path / "out")
    manifest = ship_checkpoints(run, tmp_path / "out")
    paths = shipped_checkpoints(tmp_path / "out")
    assert set(manifest["files"]) >= {"captioner/model.safetensors", "filter/config.json"}
    shipped_filter = load_checkpoint(paths["filter"])
    assert not shipped_filter.config.has_decoder
    full = ckpt.med.state_dict()
    for name, value in shipped_filter.med.state_dict().items():
        assert torch.equal(value, full[name]), name
    assert not any(".causal_attention." in n for n in shipped_filter.med.state_dict())
    assert any(".causal_attention." in n for n in load_checkpoint(paths["captioner"]).med.state_dict())


@pytest.mark.slow
def test_the_shipped_filter_rejects_noisy_web_texts_of_an_unseen_world(tmp_path: Path) -> None:
    from capfilt.pipelines.evaluate import eval_filter
    from capfilt.world import synthesize

    world = tmp_path / "world"
    synthesize(world, web=300, human=2, test=2, noise=0.4, seed=123)  # not the shipped models' world
    report = eval_filter(shipped_checkpoints()["filter"], world / "web", world / "truth.parquet")
    assert report["precision"] >= 0.9 and report["recall"] >= 0.8, report
