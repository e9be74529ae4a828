"""Resume: same arguments continue exactly where a run stopped; other arguments are refused; a run
killed with SIGKILL resumes from its last complete state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capfilt.errors import CapfiltError
from capfilt.pipelines.train import TrainConfig, train


def _config(world: Path, out: Path, **changes) -> TrainConfig:
    base = dict(
        task="pretrain",
        data=[str(world / "web")],
        out=str(out),
        size="tiny",
        epochs=6,  # 5 steps an epoch: 20 steps cross epoch boundaries mid-way
        batch_size=8,
        lr=1e-3,
        warmup_steps=3,
        workers=0,
        log_every=1,
        checkpoint_every=5,
        seed=3,
    )
    return TrainConfig(**{**base, **changes})


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("split", [10, 12], ids=["at_an_epoch_boundary", "mid_epoch"])
def test_resumed_run_equals_uninterrupted_run(
    world: Path, pretrained: Path, tmp_path: Path, split: int
) -> None:
    # Both start from one checkpoint: a from-scratch vocabulary differs between two trainings
    # (huggingface/tokenizers#1794), while a resumed run reuses the one saved in its state.
    init = str(pretrained)
    whole = train(_config(world, tmp_path / "whole", max_steps=20, init=init))
    first = train(_config(world, tmp_path / "split", max_steps=split, init=init))
    assert first.steps == split and first.resumed_from is None
    second = train(_config(world, tmp_path / "split", max_steps=20, init=init))
    assert second.resumed_from == split and second.steps == 20
    assert _steps(tmp_path / "split") == list(range(1, 21))
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:  # dropout is 0 in tiny; data order, RNG, queues and optimizer state all restored
        assert torch.equal(a[key], b[key]), key
    assert whole.losses == second.losses
    # Objectives state too: momentum encoders and queues.
    sa = load_file(str(tmp_path / "whole" / "train_state" / "step_000020" / "objectives.safetensors"))
    sb = load_file(str(tmp_path / "split" / "train_state" / "step_000020" / "objectives.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Finished: running again trains nothing.
    again = train(_config(world, tmp_path / "split", max_steps=20, init=init))
    assert again.resumed_from == 20 and again.steps == 20 and _steps(tmp_path / "split") == list(range(1, 21))


def test_other_arguments_are_refused_by_name(world: Path, tmp_path: Path) -> None:
    train(_config(world, tmp_path / "run", max_steps=5))
    with pytest.raises(CapfiltError, match=r"seed: saved 3, now 4; lr: saved 0\.001, now 0\.002"):
        train(_config(world, tmp_path / "run", max_steps=10, lr=2e-3, seed=4))
    with pytest.raises(CapfiltError, match="data: saved"):
        train(_config(world, tmp_path / "run", data=[str(world / "human")]))
    # What may change: max_steps, checkpoint_every, log_every.
    assert train(_config(world, tmp_path / "run", max_steps=7, checkpoint_every=0, log_every=2)).steps == 7


def test_naming_the_value_a_default_took_resumes_the_run(world: Path, tmp_path: Path) -> None:
    """--stem patch, --image-size, --warmup-steps and --queue-size equal to what their defaults
    took (None in the saved arguments) continue the run; other values are still refused."""
    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.pipelines.train_state import list_states

    run = tmp_path / "run"
    train(_config(world, run, max_steps=5, warmup_steps=None))
    trainer = torch.load(list_states(run)[-1] / "trainer.pt", map_location="cpu", weights_only=True)
    named = dict(
        stem="patch",
        image_size=load_checkpoint(run).config.vision.image_size,
        warmup_steps=trainer["total_steps"] // 20,
        queue_size=trainer["queue_size"],
    )
    for key, value in named.items():
        other = "conv" if key == "stem" else value * 2 if key in ("image_size", "queue_size") else value + 1
        with pytest.raises(CapfiltError, match=f"{key}: saved None, now {other!r}"):
            train(_config(world, run, max_steps=6, **{"warmup_steps": None, key: other}))
    assert train(_config(world, run, max_steps=7, **named)).resumed_from == 5


KILLED_RUN = """
import sys
from capfilt.pipelines.train import TrainConfig, train
train(TrainConfig(task="pretrain", data=[sys.argv[1]], out=sys.argv[2], size="tiny", epochs=40, batch_size=8,
                  lr=1e-3, warmup_steps=3, workers=0, log_every=1, checkpoint_every=5, seed=3, max_steps=120))
"""


def test_killed_run_resumes_from_last_complete_state(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(world / "web"), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not list((out / "train_state").glob("step_*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        time.sleep(0.1)  # kill somewhere in the steps after the first state
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "config.json").exists()  # no final checkpoint
    states = sorted(p.name for p in (out / "train_state").glob("step_*"))
    last = int(states[-1].removeprefix("step_"))
    assert last < 120
    # A half-written state (a temporary dir, or one without trainer.pt) never counts.
    (out / "train_state" / ".tmp-step_000115-999").mkdir()
    (out / "train_state" / "step_000115").mkdir()
    (out / "train_state" / "step_000115" / "config.json").write_text("{}")
    result = train(_config(world, out, epochs=40, max_steps=120))
    assert result.resumed_from == last and result.steps == 120
    assert _steps(out) == list(range(1, 121))  # lines logged after the last state were dropped
    assert not (out / "train_state" / ".tmp-step_000115-999").exists()
    from capfilt.model.checkpoint import load_checkpoint

    assert load_checkpoint(out).role == "pretrain"


def test_a_state_damaged_on_disk_is_set_aside_and_the_run_resumes_from_the_one_before(
    world: Path, pretrained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each state holds the sha256 of its files: a byte flipped in the newest state's weights used to
    load and train on. It is set aside (kept for a look) and the run resumes from the state before,
    to the weights of a run never stopped."""
    init = str(pretrained)
    train(_config(world, tmp_path / "whole", max_steps=12, init=init))
    run = tmp_path / "run"
    assert train(_config(world, run, max_steps=10, init=init)).steps == 10  # states at 5 and 10
    weights = run / "train_state" / "step_000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's values
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        resumed = train(_config(world, run, max_steps=12, init=init))
    assert resumed.resumed_from == 5 and resumed.steps == 12
    assert "step_000010 is damaged: model.safetensors is not the file that was written" in caplog.text
    assert (run / "train_state" / "damaged-step_000010").is_dir()
    ours, theirs = _weights(run), _weights(tmp_path / "whole")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
