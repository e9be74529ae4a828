"""The bootstrap loop end to end on a tiny world and the tiny MED (fast, in-process)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from capfilt.cli import main
from capfilt.data import iter_samples


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from capfilt.world import synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, web=32, human=16, test=8, image_size=32, shard_size=16, seed=4, labelled=24)
    return out


# The tiny MED, one epoch of each training stage, small batches: a whole loop in seconds.
TINY = ["--size", "tiny", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8"]


def _bootstrap(world, out, capsys, *extra):
    code = main(["bootstrap", "--data", str(world), "--out", str(out), *TINY, "--vit-steps", "3", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_bootstrap_runs_every_stage_and_records_times(world, tmp_path, capsys):
    result = _bootstrap(
        world, tmp_path / "run", capsys, "--threshold", "0.0"
    )  # keep everything: D' not empty
    stages = [
        "vit",
        "pretrain",
        "captioner",
        "filter",
        "capfilt",
        "capfilt/dprime",
        "capfilt/pretrain",
        "capfilt/filter",
        "capfilt/captioner",
        "capfilt/evaluate",
        "evaluate_first_generation",
    ]
    assert list(result["stages"]) == stages
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["results"]) == {"bootstrapped", "first_generation"}
    for res in summary["results"].values():
        assert 0 <= res["retrieval"]["r1_mean"] <= 100
        assert 0 <= res["captioning"]["attribute_accuracy"] <= 1
    # every web key decided exactly once; with threshold 0 every web text and one synthetic caption is kept
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "curation" / "decisions.jsonl").read_text().splitlines()
    ]
    web_keys = [s.key for s in iter_samples(world / "web")]
    assert sorted(r["key"] for r in rows) == sorted(web_keys)
    dprime = list(iter_samples(tmp_path / "run" / "variant_capfilt" / "dprime"))
    origins = sorted(s.meta["origin"] for s in dprime)
    assert origins.count("synthetic") == len(web_keys)
    assert origins.count("web") == sum(1 for s in iter_samples(world / "web") if s.text.strip())
    # D' images are the web images, byte for byte
    web_images = {s.key: s.image for s in iter_samples(world / "web")}
    assert all(s.image == web_images[s.meta["source_key"]] for s in dprime)
    empty_web = sum(1 for s in iter_samples(world / "web") if not s.text.strip())
    assert summary["filter"]["rejected"] == empty_web  # at threshold 0 only texts with nothing to match go
    assert (tmp_path / "run" / "summary.md").read_text().startswith("# Bootstrap run")
    # both generations' image encoders start from the run's one `train vit` init (BLIP: ImageNet's)
    vit = tmp_path / "run" / "vit"
    assert json.loads((vit / "vit.json").read_text())["vision"]["stem"] == "conv"
    for pre in ("pretrain", "variant_capfilt/pretrain"):
        provenance = json.loads((tmp_path / "run" / pre / "config.json").read_text())["provenance"]
        assert provenance["trained"]["vit_init"] == str(vit), pre


def test_bootstrap_rerun_continues_instead_of_retraining(world, tmp_path, capsys):
    _bootstrap(world, tmp_path / "run", capsys, "--max-steps", "2")
    stamp = (tmp_path / "run" / "pretrain" / "model.safetensors").stat().st_mtime_ns
    again = _bootstrap(world, tmp_path / "run", capsys, "--max-steps", "2")
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["stages"]["pretrain"] < 1.0
    # Other arguments would mix two runs' results (each stage is skipped when its results exist).
    code = main(
        [
            "bootstrap",
            "--data",
            str(world),
            "--out",
            str(tmp_path / "run"),
            *TINY,
            "--vit-steps",
            "3",
            "--max-steps",
            "2",
            "--threshold",
            "0.3",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "holds a run started with other arguments (threshold: saved 0.5, now 0.3)" in err
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").stat().st_mtime_ns == stamp


def test_bootstrap_names_a_folder_that_is_not_a_world(tmp_path, capsys):
    code = main(["bootstrap", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "capfilt data synth" in capsys.readouterr().err


def test_bootstrap_without_a_labelled_split_says_what_to_do(tmp_path, capsys):
    from capfilt.world import synthesize

    synthesize(tmp_path / "w", web=4, human=2, test=2, image_size=32)
    code = main(["bootstrap", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "run")])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "no labelled/ folder" in err and "--vit-steps 0" in err


@pytest.mark.parametrize("command", [["bootstrap"], ["eval", "ablation"]])
def test_gpu_without_cuda_is_refused_before_any_training(world, tmp_path, capsys, monkeypatch, command):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main([*command, "--data", str(world), "--out", str(tmp_path / "run"), "--gpu"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--gpu asked for, but torch sees no CUDA device" in err and "--workers N" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))


def test_gpu_flag_reaches_the_training_and_inference_stages(world, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine

    from capfilt.cli import _bootstrap_config, build_parser
    from capfilt.pipelines import bootstrap, train_vit

    parser = build_parser()
    for command in (["bootstrap"], ["eval", "ablation"]):
        args = parser.parse_args([*command, "--data", str(world), "--out", str(tmp_path), "--gpu"])
        cfg = _bootstrap_config(args)
        assert cfg.use_gpu and cfg.device == "cuda"
        assert not _bootstrap_config(parser.parse_args([*command, "--data", "w", "--out", "r"])).use_gpu
    seen = {}
    monkeypatch.setattr(
        bootstrap, "train", lambda tc: seen.setdefault("train", tc) and SimpleNamespace(checkpoint=1)
    )
    monkeypatch.setattr(
        train_vit, "train_vit", lambda vc: seen.setdefault("vit", vc) and SimpleNamespace(out=1)
    )
    bootstrap._train(cfg, "pretrain", [str(world / "web")], tmp_path / "pre", None, 1)
    bootstrap._train_vit(cfg, tmp_path / "vit")
    assert seen["train"].use_gpu and seen["vit"].use_gpu

    class Hosted:
        def __init__(self, checkpoint, device="cpu", **_):
            seen.setdefault("devices", []).append(device)
            raise RuntimeError("stop here")

    monkeypatch.setattr(bootstrap, "Captioner", Hosted)
    with pytest.raises(RuntimeError, match="stop here"):
        bootstrap.capfilt_web(cfg, tmp_path / "cap", tmp_path / "filt", tmp_path / "curation")
    assert seen["devices"] == ["cuda"]


ROW = {
    "key": "k",
    "status": "ok",
    "web_text": "web words",
    "web_itm": 0.7,
    "synthetic": [
        {"text": "s0", "itm": 0.4, "itc": 0.1},
        {"text": "s1", "itm": 0.9, "itc": 0.2},
        {"text": "s2", "itm": 0.8, "itc": 0.3},
    ],
}


@pytest.mark.parametrize(
    ("variant", "web_itm", "expected"),
    [
        ("none", 0.1, [("web", "web words")]),
        ("filter", 0.7, [("web", "web words")]),
        ("filter", 0.3, []),
        # the first sample, whatever the filter thinks of it (s1 scores best)
        ("captioner", 0.1, [("web", "web words"), ("synthetic", "s0")]),
        ("capfilt", 0.7, [("web", "web words"), ("synthetic", "s1")]),
        ("capfilt", 0.3, [("synthetic", "s1")]),
        ("blip2", 0.7, [("synthetic", "s1"), ("synthetic", "s2")]),  # top two of web + synthetic by ITM
        ("blip2", 0.95, [("web", "web words"), ("synthetic", "s1")]),
    ],
)
def test_variant_texts_are_the_papers_rows(variant, web_itm, expected):
    from capfilt.pipelines.bootstrap import variant_texts

    row = {**ROW, "web_itm": web_itm}
    assert sorted(variant_texts(row, variant, 0.5)) == sorted(expected)


def test_ablation_runs_every_row_with_one_budget(world, tmp_path, capsys):
    argv = [
        "eval",
        "ablation",
        "--data",
        str(world),
        "--out",
        str(tmp_path / "abl"),
        *TINY,
        "--seeds",
        "0",
        "1",
        "--num-captions",
        "3",
        "--max-steps",
        "2",
        "--vit-steps",
        "2",
    ]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(result["table"]) == {"none", "filter", "captioner", "capfilt", "blip2"}
    for metrics in result["table"].values():
        assert set(metrics) == {"R@1 (mean TR/IR)", "CIDEr-D", "attribute accuracy"}
        assert all(len(v) == 2 for v in metrics.values())

    def last_step(run):
        return json.loads((run / "pretrain" / "metrics.jsonl").read_text().splitlines()[-1])["step"]

    for seed in ("0", "1"):
        run = result["per_seed"][seed]
        root = tmp_path / "abl" / f"seed_{seed}"
        steps = {last_step(root / f"variant_{v}") for v in result["table"] if v != "none"}
        assert steps == {last_step(root)} == {min(run["budget_steps"], 2)}  # one budget for every row
        # No bootstrap is the first generation itself: the whole web split plus human pairs, that budget.
        none = run["rows"]["none"]
        assert none["checkpoints"] == "first generation" and not (root / "variant_none" / "pretrain").exists()
        assert none["dprime"] == {"web": 32, "synthetic": 0}
        assert not (root / "vit").exists()  # one image-encoder init, shared by every seed
    assert (tmp_path / "abl" / "vit" / "vit.json").is_file()
    assert "± " in (tmp_path / "abl" / "ablation.md").read_text()
    # Every row kept its figures: a rerun reads them back instead of evaluating again.
    row = tmp_path / "abl" / "seed_1" / "variant_capfilt" / "results.json"
    assert json.loads(row.read_text())["retrieval"] == result["per_seed"]["1"]["rows"]["capfilt"]["retrieval"]
    stamp = row.stat().st_mtime_ns
    assert main(argv) == 0
    assert row.stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert again["table"] == result["table"] and not any("evaluate" in k for k in again["stage_seconds"])


def test_ablation_table_names_the_seeds_still_to_run():
    from capfilt.pipelines.bootstrap import ablation_markdown

    table = {
        "none": {"R@1 (mean TR/IR)": [37.6, 0.0], "CIDEr-D": [2.9, 0.0], "attribute accuracy": [0.8, 0.0]}
    }
    partial = ablation_markdown(table, [0], [0, 1, 2])
    assert "seeds [0] (seeds [1, 2] not finished yet" in partial and "| none | 37.600 ± 0.000 |" in partial
    assert "not finished" not in ablation_markdown(table, [0, 1, 2], [0, 1, 2])


def test_gpu_with_ray_workers_trains_on_theirs_and_infers_here(world, monkeypatch, caplog, tmp_path):
    import types

    import torch

    from capfilt.pipelines import train_vit
    from capfilt.pipelines.bootstrap import BootstrapConfig, _train_vit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without a GPU
    cfg = BootstrapConfig(data=str(world), out="unused", use_gpu=True, workers=2)
    cfg.validate()
    assert cfg.device == "cpu" and "Ray workers' GPUs" in caplog.text
    # The image encoder's pre-training runs here, so on this CPU (it asked for CUDA and failed).
    configs = []
    monkeypatch.setattr(
        train_vit, "train_vit", lambda vc: configs.append(vc) or types.SimpleNamespace(out=tmp_path)
    )
    _train_vit(cfg, tmp_path / "vit")
    assert len(configs) == 1 and not configs[0].use_gpu
    configs[0].validate()


def test_a_rerun_with_other_workers_skips_finished_stages_and_resumes_a_cut_one_as_it_began(
    tmp_path, monkeypatch, caplog
):
    """README: `--workers` may change on a rerun. A finished stage (its final checkpoint kept beside
    its states) was trained again and refused ("workers: saved 1, now 2"); a stage cut midway
    keeps the world size its data order was cut for."""
    import logging

    from capfilt.pipelines import bootstrap as job
    from capfilt.pipelines.bootstrap import BootstrapConfig
    from capfilt.pipelines.train_state import state_name

    asked: list = []
    monkeypatch.setattr(job, "train", lambda tc: asked.append(tc) or SimpleNamespace(checkpoint=Path(tc.out)))
    cfg = BootstrapConfig(data=str(tmp_path), out=str(tmp_path / "run"), workers=2)

    finished = tmp_path / "run" / "pretrain"
    (finished / "train_state" / state_name(40)).mkdir(parents=True)
    (finished / "train_state" / state_name(40) / "trainer.pt").write_bytes(b"")
    (finished / "train_state" / state_name(40) / "train_args.json").write_text('{"workers": 1}')
    (finished / "config.json").write_text("{}")
    assert job._train(cfg, "pretrain", [], finished, None, 1) == finished and not asked

    cut = tmp_path / "run" / "filter"
    (cut / "train_state" / state_name(3)).mkdir(parents=True)
    (cut / "train_state" / state_name(3) / "trainer.pt").write_bytes(b"")
    (cut / "train_state" / state_name(3) / "config.json").write_text("{}")
    (cut / "train_state" / state_name(3) / "train_args.json").write_text('{"workers": 1}')
    with caplog.at_level(logging.WARNING):
        job._train(cfg, "filter", [], cut, None, 1)
    assert asked[-1].workers == 1 and "resumes with the 1 workers it started with" in caplog.text

    fresh = tmp_path / "run" / "captioner"
    job._train(cfg, "captioner", [], fresh, None, 1)
    assert asked[-1].workers == 2


def test_an_ablation_without_attribute_truth_writes_valid_json_and_bad_seeds_stop_it_first(tmp_path):
    """A world without truth.parquet has no attribute accuracy: the table said NaN, which is no JSON
    (`json.loads` of jq and browsers refuse it). A negative seed was found at the first captioning,
    after hours of training."""
    from capfilt.errors import CapfiltError
    from capfilt.pipelines.bootstrap import (
        BootstrapConfig,
        ablation_markdown,
        ablation_table,
        run_ablation,
    )

    rows = {"retrieval": {"r1_mean": 40.0}, "captioning": {"cider_d": 2.0}}
    table = ablation_table({0: {"rows": {"none": rows}}, 1: {"rows": {"none": rows}}}, ("none",))
    assert table["none"]["attribute accuracy"] == [None, None] and table["none"]["CIDEr-D"] == [2.0, 0.0]
    assert json.loads(json.dumps(table, allow_nan=False)) == table
    assert "| none | 40.000 ± 0.000 | 2.000 ± 0.000 | n/a |" in ablation_markdown(table, [0, 1])
    world = tmp_path / "world"
    for part in ("human", "web", "test"):
        (world / part).mkdir(parents=True)
    with pytest.raises(CapfiltError, match=r"--seed must be in \[0, 2\*\*63 - 1\], got -1"):
        run_ablation(BootstrapConfig(data=str(world), out=str(tmp_path / "abl"), vit_steps=0), [0, -1])
    with pytest.raises(CapfiltError, match="--seed must be"):
        BootstrapConfig(data=str(world), out=str(tmp_path / "b"), vit_steps=0, seed=-3).validate()
    assert not (tmp_path / "abl" / "seed_0").exists()
