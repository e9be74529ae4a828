"""`capfilt demo` end to end on a tiny world and a tiny recipe: world, checkpoints (then the cache),
the clean job on the shared local Ray, and the filter's quality against the world's truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.pipelines.demo import DemoConfig, Recipe, run_demo

TINY = Recipe(size="tiny", batch_size=8, pretrain_steps=12, captioner_steps=6, filter_steps=6)


def _config(tmp: Path, **changes) -> DemoConfig:
    base = dict(
        out=str(tmp / "demo"),
        cache=str(tmp / "cache"),
        recipe=TINY,
        web=30,
        human=16,
        test=4,
        batch_size=8,
        threshold=0.0222,  # the tiny filter's p(match) sits near 0.02: keep some, reject some
        dashboard=False,
        train=True,  # the tiny recipe; the shipped small checkpoints are tested below
    )
    return DemoConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, ray_cluster):
    tmp = tmp_path_factory.mktemp("demo")
    steps: list[str] = []
    return tmp, run_demo(_config(tmp), steps.append), steps


def test_demo_trains_cleans_and_scores_the_filter_against_the_truth(first) -> None:
    tmp, result, steps = first
    assert result.checkpoints_from == "trained"
    assert any(s.startswith("pretrain: training 12 steps") for s in steps)
    assert all((tmp / "cache").glob("demo/tiny-*/filter/config.json"))
    ledger = pq.read_table(Path(result.clean["output"]) / "ledger").to_pylist()
    truth = pq.read_table(result.world / "truth.parquet").to_pylist()
    web_keys = sorted(r["key"] for r in truth if r["split"] == "web")
    assert sorted(r["key"] for r in ledger) == web_keys  # every web sample judged once
    q = result.filter_quality
    assert q["texts"] == len(web_keys) and q["missing"] == 0
    rejected = sum(not r["web_kept"] for r in ledger)
    assert q["rejected"] == rejected
    noisy = {r["key"] for r in truth if r["split"] == "web" and r["noisy"]}
    true_rejections = sum(not r["web_kept"] and r["key"] in noisy for r in ledger)
    assert q["true_rejections"] == true_rejections
    if rejected:
        assert q["precision"] == pytest.approx(true_rejections / rejected)
    assert q["recall"] == pytest.approx(true_rejections / len(noisy))
    assert result.clean["human_pairs"] > 0 and result.clean["samples"] == len(web_keys)


def test_a_second_demo_reuses_the_cached_checkpoints(first) -> None:
    tmp, result, _ = first
    steps: list[str] = []
    again = run_demo(_config(tmp), steps.append)
    assert again.checkpoints_from == "cache" and again.checkpoints == result.checkpoints
    assert not any("training" in s for s in steps)
    assert again.stage_seconds["checkpoints"] < result.stage_seconds["checkpoints"]
    assert again.filter_quality["precision"] == result.filter_quality["precision"]  # same seed, same result


def test_demo_cli_checks_its_arguments_and_prints_what_a_new_user_needs(first, capsys) -> None:
    from rich.console import Console

    from capfilt.cli import main
    from capfilt.pipelines.demo_cli import print_result

    tmp, result, _ = first
    assert main(["demo", "--out", str(tmp / "demo"), "--no-dashboard", "--threshold", "1.5"]) == 2
    assert "--threshold must be a probability in [0, 1]; got 1.5" in capsys.readouterr().err
    console = Console(record=True, width=200)
    print_result(result, console)
    text = console.export_text()
    q, out = result.filter_quality, result.clean["output"]
    assert f"precision {q['precision']:.3f}" in text and f"recall {q['recall']:.3f}" in text
    for reason, n in result.clean["reasons"].items():
        assert re.search(rf"{reason}\W+{n}\b", text), reason
    assert f"{out}/dprime" in text and f"{out}/ledger" in text and "report.html" in text
    assert "pairs/s" in text
    assert json.loads(json.dumps(result.to_dict()))["clean"]["output"] == out


def test_the_demo_progress_bars_write_to_stderr(capsys):
    """stdout is the demo's result (`--json`): its progress bars draw on stderr."""
    from capfilt.pipelines.demo import _clean_bar, _train_bar

    clean = _clean_bar()
    clean(0, 2, 0)
    clean(2, 2, 40)
    train = _train_bar("captioner", 3)
    train(1, 3, {"lm_loss": 2.5})
    train(3, 3, {"lm_loss": 1.5})
    out, err = capsys.readouterr()
    assert out == ""
    assert "clean shards" in err and "captioner" in err
