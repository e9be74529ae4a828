"""Ray Train: two CPU workers (gloo DDP) keep identical weights and fill one ITC queue together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capfilt.model.checkpoint import load_checkpoint
from capfilt.pipelines.train import TrainConfig, train


@pytest.mark.parametrize("batching", ["random", "similar"])  # similar: every rank orders the epoch alike
def test_two_workers_stay_in_sync_and_share_the_itc_queue(
    world: Path, tmp_path: Path, ray_cluster, batching: str
) -> None:
    out = tmp_path / "ray"
    cfg = TrainConfig(
        task="pretrain",
        data=[str(world / "web")],
        out=str(out),
        size="tiny",
        epochs=2,
        batch_size=4,  # global batch 8: 5 steps an epoch
        workers=2,
        lr=1e-3,
        log_every=1,
        checkpoint_every=3,
        max_steps=6,
        queue_size=32,  # wraps once in 6 steps: 48 features enqueued
        debug_checks=True,
        batching=batching,
    )
    seen: list[tuple[int, int]] = []
    result = train(cfg, progress=lambda step, total, losses: seen.append((step, total)))
    assert result.steps == 6 and seen[-1] == (6, 6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(result.checkpoint).role == "pretrain"

    ranks = [json.loads((out / "debug" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [6, 6]
    # Weights (MED, temperature, momentum encoders) identical on both ranks after 6 DDP steps.
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    # One queue: identical on both ranks, advanced by the global batch each step ...
    assert ranks[0]["queue_sha256"] == ranks[1]["queue_sha256"]
    assert ranks[0]["queue_ptr"] == ranks[1]["queue_ptr"] == (6 * 8) % 32
    for rank, record in enumerate(ranks):
        for row in record["rows"]:
            assert row["ptr_after"] == (row["ptr_before"] + 8) % 32
            # ... holding each rank's own momentum features at its offset of the global batch.
            assert row["own_error"] < 1e-6, (rank, row)
    # The ranks trained on different pairs: slices of one permutation.
    for a, b in zip(ranks[0]["rows"], ranks[1]["rows"]):
        assert not set(a["pairs"]) & set(b["pairs"])
    epoch = [
        i for a, b in zip(ranks[0]["rows"][:5], ranks[1]["rows"][:5]) for i in (*a["pairs"], *b["pairs"])
    ]
    assert len(epoch) == len(set(epoch)) == 40  # 5 steps of global batch 8, no pair twice
