"""Training in-process (workers=0): the three tasks, the schedule, data sharding, frozen branches."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from capfilt.errors import CapfiltError
from capfilt.model.checkpoint import load_checkpoint, new_checkpoint
from capfilt.model.losses import MEDObjectives
from capfilt.pipelines.train import TrainConfig, lr_at, train
from capfilt.pipelines.train_config import TASK_LOSSES
from capfilt.pipelines.train_loop import EpochBatches, set_trainable


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_loss_decreases(world: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        task="pretrain",
        data=[str(world / "web")],
        out=str(tmp_path / "pre"),
        size="tiny",
        epochs=12,  # 40 pairs / 8 = 5 steps an epoch: 60 steps
        batch_size=8,
        lr=1e-3,
        warmup_steps=5,
        workers=0,
        log_every=1,
        checkpoint_every=20,
    )
    result = train(cfg)
    rows = _metrics(tmp_path / "pre")
    assert [r["step"] for r in rows] == list(range(1, 61)) and result.steps == 60
    assert {"itc_loss", "itm_loss", "lm_loss", "loss", "lr", "epoch", "examples_per_s", "wall_s"} <= set(
        rows[0]
    )
    for key in ("loss", "lm_loss"):  # ITC and ITM barely move in 60 tiny steps; LM carries the drop
        first, last = (sum(r[key] for r in part) / 10 for part in (rows[:10], rows[-10:]))
        assert last < first - 0.2, (key, first, last)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.role == "pretrain" and ckpt.config.vision.image_size == 32
    assert ckpt.tokenizer.ids.vocab_size < 2000  # a small corpus gives a small vocabulary
    states = sorted(p.name for p in (tmp_path / "pre" / "train_state").iterdir())
    assert states == ["init", "step_000040", "step_000060"]  # the last two kept
    assert result.losses["loss"] == rows[-1]["loss"]


@pytest.mark.parametrize("task", ["captioner", "filter"])
def test_finetune_from_pretrained(world: Path, pretrained: Path, tmp_path: Path, task: str) -> None:
    cfg = TrainConfig(
        task=task,
        data=[str(world / "human")],
        init=str(pretrained),
        out=str(tmp_path / task),
        epochs=1,
        batch_size=8,
        workers=0,
        log_every=2,
    )
    seen: list[tuple[int, int]] = []
    result = train(cfg, progress=lambda step, total, losses: seen.append((step, total)))
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.role == task
    rows = _metrics(tmp_path / task)
    expected = {"lm_loss"} if task == "captioner" else {"itc_loss", "itm_loss"}
    assert {k for k in rows[-1] if k.endswith("_loss")} == expected
    assert all(math.isfinite(r["loss"]) for r in rows)
    total = seen[-1][1]
    assert total == result.steps and [s for s, _ in seen] == list(range(total + 1))
    provenance = json.loads((result.checkpoint / "config.json").read_text())["provenance"]
    assert provenance["trained"]["task"] == task and provenance["trained"]["init"] == str(pretrained)
    # Only the branches the task trains may change.
    before, after = load_checkpoint(pretrained).med.state_dict(), ckpt.med.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if task == "filter":
        assert not any(".causal_attention." in k or k.startswith("lm_head.transform") for k in moved)
        assert any(k.startswith("itm_head") for k in moved)
    else:
        assert not any(".attention." in k or k.startswith(("itm_head", "text_proj")) for k in moved)
        assert any(".causal_attention." in k for k in moved)


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("task", ["pretrain", "captioner", "filter"])
def test_every_trainable_parameter_gets_a_gradient(tokenizer, task: str, stem: str) -> None:
    """What makes DDP work without find_unused_parameters: frozen = exactly the unused branches."""
    med = new_checkpoint("tiny", tokenizer, stem=stem).med.train()
    set_trainable(med, task)
    objectives = MEDObjectives(med, **TASK_LOSSES[task], queue_size=8, prompt_length=3)
    ids, mask = tokenizer(
        ["a red circle", "two green squares", "a yellow star", "a blue ring"], max_length=12
    )
    image_ids = torch.arange(4) if task == "filter" else None
    losses = objectives(torch.randn(4, 3, 32, 32), ids, mask, alpha=0.4, image_ids=image_ids)
    torch.stack(list(losses.values())).sum().backward()
    without = [n for n, p in objectives.named_parameters() if p.requires_grad and p.grad is None]
    assert not without
    frozen = [n for n, p in objectives.named_parameters() if not p.requires_grad and n.startswith("med.")]
    assert bool(frozen) == (task != "pretrain")


def test_a_conv_stem_pretrain_passes_its_stem_to_the_fine_tuning(world: Path, tmp_path: Path) -> None:
    common = dict(size="tiny", steps=2, batch_size=8, workers=0, log_every=1, checkpoint_every=0)
    pre = train(
        TrainConfig(
            task="pretrain", data=[str(world / "web")], out=str(tmp_path / "pre"), stem="conv", **common
        )
    )
    assert load_checkpoint(pre.checkpoint).config.vision.stem == "conv"
    filt = train(
        TrainConfig(
            task="filter",
            data=[str(world / "human")],
            out=str(tmp_path / "f"),
            init=str(pre.checkpoint),
            **common,
        )
    )
    before = load_checkpoint(pre.checkpoint).med.state_dict()
    after = load_checkpoint(filt.checkpoint).med.state_dict()
    assert load_checkpoint(filt.checkpoint).config.vision.stem == "conv"
    assert not torch.equal(
        before["visual_encoder.stem.proj.weight"], after["visual_encoder.stem.proj.weight"]
    )


def test_epoch_batches_split_global_batches_between_ranks() -> None:
    ranks = [list(EpochBatches(50, 4, rank, 3, seed=1, epoch=2)) for rank in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # 50 // 12, the incomplete global batch dropped
    seen = [i for r in ranks for batch in r for i in batch]
    assert len(seen) == len(set(seen)) == 48
    assert list(EpochBatches(50, 4, 1, 3, seed=1, epoch=2)) == ranks[1]  # same seed and epoch, same order
    assert list(EpochBatches(50, 4, 1, 3, seed=1, epoch=3)) != ranks[1]
    assert list(EpochBatches(50, 4, 1, 3, seed=1, epoch=2, start=2)) == ranks[1][2:]
    single = list(EpochBatches(50, 12, 0, 1, seed=1, epoch=2))  # one worker, same global batch
    assert single[0] == ranks[0][0] + ranks[1][0] + ranks[2][0]


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lr_at(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def test_bad_arguments_name_the_input(world: Path, tmp_path: Path) -> None:
    base = dict(data=[str(world / "human")], out=str(tmp_path / "x"), size="tiny", workers=0)
    with pytest.raises(CapfiltError, match="--init"):
        train(TrainConfig(task="filter", **base))
    with pytest.raises(CapfiltError, match="unknown task"):
        train(TrainConfig(task="caption", **base))
    with pytest.raises(CapfiltError, match="multiple of the global batch 8"):
        train(TrainConfig(task="pretrain", batch_size=8, queue_size=20, **base))
    with pytest.raises(CapfiltError, match="fewer than one global batch"):
        train(TrainConfig(task="pretrain", batch_size=512, **base))
    with pytest.raises(CapfiltError, match="not found"):
        train(TrainConfig(task="pretrain", **{**base, "data": [str(world / "nope")]}))


def test_a_step_budget_replaces_epochs(world: Path, pretrained: Path, tmp_path: Path) -> None:
    """Ablation rows train on data of different sizes for the same number of steps: the
    schedule spans the budget, not the epochs."""
    cfg = TrainConfig(
        task="captioner",
        data=[str(world / "human")],
        out=str(tmp_path / "cap"),
        init=str(pretrained),
        workers=0,
        batch_size=4,
        epochs=1,
        steps=9,
        log_every=1,
        lr=1e-4,
        min_lr=1e-6,
        warmup_steps=0,
    )
    result = train(cfg)
    rows = _metrics(tmp_path / "cap")
    assert result.steps == 9 and [r["step"] for r in rows] == list(range(1, 10))
    assert rows[-1]["lr"] < 0.1 * rows[0]["lr"]  # the cosine reached its end at the budget
