"""Progress off a terminal: plain lines at an interval, rates and time left from this run's work."""

from __future__ import annotations

import io
import json

import pytest

from capfilt import progress as progress_mod
from capfilt.cli import main
from capfilt.progress import LineProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", c)
    return c


def test_lines_come_at_the_interval_and_count_only_this_runs_work(clock: Clock) -> None:
    out = io.StringIO()
    lines = LineProgress(out, every_s=30, heartbeat=False)
    task = lines.add_task("clean shards", total=None, samples=0)
    lines.update(task, completed=10, total=60, samples=10_000)  # resumed: 10 shards done before
    clock.now += 10
    lines.update(task, completed=20, samples=20_000)
    assert out.getvalue() == ""  # not 30 s yet
    clock.now += 30
    lines.update(task, completed=40, samples=40_000)
    assert out.getvalue() == ("clean shards: 40/60 (67%), samples 40,000 (750.0/s), 27s left, 40s elapsed\n")
    clock.now += 5
    lines.update(task, completed=60, samples=60_000)
    assert out.getvalue().count("\n") == 1
    clock.now += 5
    lines.close()  # the last state, once
    last = out.getvalue().splitlines()[-1]
    assert last == "clean shards: 60/60 (100%), samples 60,000 (1,000.0/s), 50s elapsed"
    lines.close()
    assert out.getvalue().count("\n") == 2


def test_text_fields_and_descriptions_show_as_they_are(clock: Clock) -> None:
    out = io.StringIO()
    lines = LineProgress(out, every_s=0, heartbeat=False)
    task = lines.add_task("train captioner", total=None, losses="starting")
    lines.update(task, completed=0, total=2000, losses="starting")
    clock.now += 90
    lines.update(task, completed=500, losses="lm=2.310", description="train captioner")
    assert out.getvalue() == "train captioner: 500/2,000 (25%), lm=2.310, 4m30s left, 1m30s elapsed\n"


def test_the_interval_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(progress_mod.PROGRESS_EVERY_ENV, "5")
    assert progress_mod._every_s() == 5.0
    for bad in ("soon", "nan", "inf"):
        monkeypatch.setenv(progress_mod.PROGRESS_EVERY_ENV, bad)
        assert progress_mod._every_s() == progress_mod.DEFAULT_EVERY_S


def test_a_heartbeat_repeats_the_state_while_nothing_updates() -> None:
    """A model loading or a training stage of hours: no update, yet a line every interval."""
    import time

    out = io.StringIO()
    lines = LineProgress(out, every_s=0.2)
    task = lines.add_task("bootstrap: pretrain", total=7)
    lines.update(task, completed=2)
    time.sleep(1.0)
    beats = out.getvalue().splitlines()
    lines.close()
    assert len(beats) >= 2 and all(b.startswith("bootstrap: pretrain: 2/7 (29%)") for b in beats), beats


def test_a_command_off_a_terminal_prints_progress_lines(tmp_path, capsys, monkeypatch) -> None:
    """`capfilt data synth` with stderr captured (no terminal): rich's live bar would print
    nothing there; each split's progress comes as lines instead."""
    monkeypatch.setenv(progress_mod.PROGRESS_EVERY_ENV, "0")
    argv = ["data", "synth", "--out", str(tmp_path / "w"), "--web", "30", "--human", "10"]
    code = main([*argv, "--test", "5", "--labelled", "0", "--shard-size", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["counts"]["web"] == 30
    last = {}
    for line in err.splitlines():
        if line.startswith("writing "):
            split, _, rest = line.partition(": ")
            last[split] = rest
    assert set(last) == {"writing web", "writing human", "writing test"}, err
    assert last["writing web"].startswith("30/30 (100%)") and last["writing human"].startswith("10/10 (100%)")


def test_signals_a_process_ignores_stay_ignored() -> None:
    """`nohup` ignores SIGHUP so that a job outlives its terminal: entering signals_interrupt must
    not turn the terminal's hang-up into a stop."""
    import signal

    from capfilt.errors import signals_interrupt

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
