"""`capfilt train vit` (the image encoder's supervised init, BLIP's ImageNet stage) and
`train pretrain --vit-init`: labels read right, the weights arrive, bad inputs are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capfilt.cli import main
from capfilt.data import iter_samples
from capfilt.errors import CapfiltError
from capfilt.model.checkpoint import load_checkpoint
from capfilt.pipelines.train import TrainConfig, train
from capfilt.pipelines.train_vit import VitTrainConfig, load_vit_init, train_vit
from capfilt.world import synthesize
from capfilt.world.writer import Sample, write_shard


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("labelled_world")
    synthesize(out, web=16, human=16, test=0, image_size=32, shard_size=40, labelled=120)
    return out


@pytest.fixture(scope="module")
def vit_run(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vit")
    cfg = VitTrainConfig(data=[str(labelled / "labelled")], out=str(out), size="tiny", steps=6, batch_size=16)
    result = train_vit(cfg)
    assert result.out == out and result.steps == 6
    return out


def test_vit_run_writes_encoder_labels_and_metrics(vit_run: Path, labelled: Path) -> None:
    meta = json.loads((vit_run / "vit.json").read_text())
    every = {name for s in iter_samples(labelled / "labelled") for name in s.meta["labels"]}
    assert meta["labels"] == sorted(every)  # one output per label name seen
    assert {n.split(":")[0] for n in meta["labels"]} == {"background", "colour", "count", "shape"}
    assert meta["images"] == 120 and meta["held_out_images"] == 6
    assert 0.0 <= meta["held_out_accuracy"] <= 1.0
    assert meta["vision"]["image_size"] == 32 and meta["vision"]["stem"] == "patch"
    lines = [json.loads(x) for x in (vit_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines][-1] == 6 and all(x["loss"] > 0 for x in lines)
    weights = load_file(str(vit_run / "vit.safetensors"))
    assert not any(k.startswith("head") for k in weights)  # the label head is dropped


def test_vit_training_learns_the_labels(labelled: Path, tmp_path: Path) -> None:
    """Enough steps on a small set bring the loss well below its start: the labels are learnable."""
    cfg = VitTrainConfig(
        data=[str(labelled / "labelled")],
        out=str(tmp_path),
        size="tiny",
        steps=60,
        batch_size=32,
        log_every=5,
    )
    train_vit(cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.75 * losses[0], losses


def test_pretrain_from_vit_init_starts_from_its_weights(
    vit_run: Path, labelled: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        task="pretrain",
        data=[str(labelled / "human")],
        out=str(tmp_path / "pre"),
        size="tiny",
        vit_init=str(vit_run),
        steps=1,
        lr=1e-12,  # one step that cannot move the weights: what was loaded is what is saved
        min_lr=0.0,
        batch_size=8,
        workers=0,
    )
    ckpt = load_checkpoint(train(cfg).checkpoint)
    loaded = load_file(str(vit_run / "vit.safetensors"))
    state = ckpt.med.visual_encoder.state_dict()
    for name, tensor in loaded.items():
        assert torch.allclose(state[name], tensor, atol=1e-6), name
    assert ckpt.provenance["trained"]["vit_init"] == str(vit_run)


def test_vit_init_must_fit_the_model(vit_run: Path, labelled: Path, tmp_path: Path) -> None:
    from capfilt.model.config import med_config

    with pytest.raises(CapfiltError, match=r"image_size 32 \(init\) vs 64 \(model\)"):
        load_vit_init(vit_run, med_config("tiny", image_size=64).vision)
    with pytest.raises(CapfiltError, match="not a finished `capfilt train vit` run"):
        load_vit_init(tmp_path, med_config("tiny").vision)
    common = dict(data=[str(labelled / "human")], out=str(tmp_path / "x"), size="tiny", workers=0, steps=1)
    with pytest.raises(CapfiltError, match="a run from --init keeps that checkpoint's: drop --vit-init"):
        train(TrainConfig(task="filter", init=str(vit_run), vit_init=str(vit_run), **common))
    with pytest.raises(CapfiltError, match="--vit-init run not found"):
        train(TrainConfig(task="pretrain", vit_init=str(tmp_path / "missing"), **common))


def test_unlabelled_shards_are_refused_by_name(labelled: Path, tmp_path: Path) -> None:
    with pytest.raises(CapfiltError, match=r'has no "labels" list.*--labelled N'):
        train_vit(VitTrainConfig(data=[str(labelled / "human")], out=str(tmp_path), size="tiny", steps=1))


def test_an_unreadable_image_is_skipped_not_fatal(tmp_path: Path, labelled: Path) -> None:
    good = list(iter_samples(labelled / "labelled"))[:20]
    samples = [
        Sample(s.key, s.image if i else b"not an image", s.text, "", 32, 32, {"labels": s.meta["labels"]})
        for i, s in enumerate(good)
    ]
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards", 0, samples)
    out = tmp_path / "vit"
    result = train_vit(
        VitTrainConfig(data=[str(tmp_path / "shards")], out=str(out), size="tiny", steps=2, batch_size=8)
    )
    assert json.loads((out / "vit.json").read_text())["images"] == 19 and result.steps == 2


def test_train_vit_command(labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["train", "vit", "--data", str(labelled / "labelled"), "--out", str(out), "--size", "tiny"]
    assert main([*argv, "--steps", "2", "--batch-size", "8", "--stem", "conv"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "vit" and summary["steps"] == 2 and summary["out"] == str(out)
    assert json.loads((out / "vit.json").read_text())["vision"]["stem"] == "conv"
    assert main([*argv, "--steps", "2", "--init", str(out)]) == 2
    assert "`train vit` takes no --init" in capsys.readouterr().err
    # Options of a MED run with a default of their own are refused too when given, not ignored.
    extra = ["--epochs", "3", "--workers", "4", "--batching", "similar", "--checkpoint-every", "5"]
    assert main([*argv, "--steps", "2", *extra]) == 2
    assert "`train vit` takes no --epochs, --workers, --batching" in capsys.readouterr().err
    again = [
        "train",
        "vit",
        "--data",
        str(labelled / "labelled"),
        "--out",
        str(tmp_path / "cli2"),
        "--size",
        "tiny",
    ]
    assert main([*again, "--steps", "2", "--batch-size", "8", "--epochs", "5"]) == 0  # the default: harmless


def test_world_labelled_split(labelled: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from capfilt.world.scene import scene_labels

    truth = {
        r["key"]: r for r in pq.read_table(labelled / "truth.parquet").to_pylist() if r["split"] == "labelled"
    }
    samples = list(iter_samples(labelled / "labelled"))
    assert len(samples) == len(truth) == 120
    for s in samples:
        labels = scene_labels(json.loads(truth[s.key]["content"]))
        assert s.meta["labels"] == labels and s.text == ", ".join(labels)
    manifest = json.loads((labelled / "world.json").read_text())
    assert manifest["args"]["labelled"] == 120 and manifest["counts"]["labelled"] == 120
    # a world rewritten without the split loses it, rather than keeping a stale one
    again = tmp_path / "again"
    synthesize(again, web=4, human=2, test=0, image_size=32, labelled=3)
    synthesize(again, web=4, human=2, test=0, image_size=32)
    assert not (again / "labelled").exists()


def test_a_set_too_large_for_memory_is_refused_by_name(labelled: Path, tmp_path: Path) -> None:
    cfg = VitTrainConfig(
        data=[str(labelled / "labelled")],
        out=str(tmp_path),
        size="tiny",
        steps=1,
        max_memory_gb=50 * 32 * 32 * 3 / 2**30,
    )
    with pytest.raises(CapfiltError, match="holds its images in memory, so pass a subset"):
        train_vit(cfg)


def test_a_diverging_vit_run_is_refused_and_so_is_a_nan_vit_init(labelled, tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from capfilt.cli import main
    from capfilt.pipelines.train_vit import META, WEIGHTS

    vit = [
        "train",
        "vit",
        "--data",
        str(labelled / "labelled"),
        "--size",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "8",
    ]
    assert main([*vit, "--out", str(tmp_path / "nan"), "--lr", "1e12", "--grad-clip", "0"]) == 2
    assert "training diverged at step" in capsys.readouterr().err
    good = tmp_path / "good"
    assert main([*vit, "--out", str(good)]) == 0
    capsys.readouterr()
    state = load_file(str(good / WEIGHTS))
    next(iter(state.values())).view(-1)[0] = float("nan")
    save_file(state, str(good / WEIGHTS))
    assert (good / META).is_file()
    pre = [
        "train",
        "pretrain",
        "--data",
        str(labelled / "web"),
        "--size",
        "tiny",
        "--out",
        str(tmp_path / "pre"),
    ]
    assert main([*pre, "--vit-init", str(good), "--workers", "0", "--steps", "1", "--batch-size", "8"]) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err


def test_an_out_holding_another_run_is_refused_and_the_same_vit_run_is_not_redone(
    labelled, pretrained, tmp_path, capsys
) -> None:
    """Before: `train vit` into a pre-training run truncated its metrics (its resume then read the
    ViT's loss); a pre-training into a ViT run, or a ViT run of other arguments, overwrote it."""
    import shutil

    from capfilt.cli import main

    vit = ["train", "vit", "--data", str(labelled / "labelled"), "--size", "tiny", "--batch-size", "8"]
    pre_run = pretrained.parent if (pretrained.parent / "metrics.jsonl").is_file() else pretrained
    copy = shutil.copytree(pre_run, tmp_path / "pre")
    metrics = (copy / "metrics.jsonl").read_text()
    assert main([*vit, "--steps", "2", "--out", str(copy)]) == 2
    assert "holds a MED training run" in capsys.readouterr().err
    assert (copy / "metrics.jsonl").read_text() == metrics and not (copy / "vit.json").exists()
    run = tmp_path / "vit"
    assert main([*vit, "--steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    weights = (run / "vit.safetensors").read_bytes()
    assert main([*vit, "--steps", "3", "--out", str(run)]) == 2
    assert (
        "holds a finished `train vit` run with other arguments (steps: saved 2, now 3)"
        in capsys.readouterr().err
    )
    assert main([*vit, "--steps", "2", "--out", str(run)]) == 0  # the same run: returned, not trained again
    capsys.readouterr()
    assert (run / "vit.safetensors").read_bytes() == weights
    pre = ["train", "pretrain", "--data", str(labelled / "web"), "--size", "tiny", "--out", str(run)]
    assert main([*pre, "--workers", "0", "--steps", "1", "--batch-size", "8"]) == 2
    assert "holds a `capfilt train vit` run" in capsys.readouterr().err


def test_an_interrupted_vit_run_resumes_to_the_uninterrupted_weights(labelled: Path, tmp_path: Path) -> None:
    """A run stopped after its state at step 4 resumes from there (the state holds weights,
    optimiser, schedule, data order and random states) and ends bit for bit where a run that was
    never stopped ends. Other arguments, or other images under the same --data, are refused; the
    image size the run took may be named; the state and a cut write's temporary file are removed
    once the run is done."""
    import shutil

    data = shutil.copytree(labelled / "labelled", tmp_path / "data")
    base = dict(data=[str(data)], size="tiny", steps=7, batch_size=8, log_every=1)
    whole = train_vit(VitTrainConfig(out=str(tmp_path / "whole"), checkpoint_every=0, **base))
    run = tmp_path / "stopped"

    def stop_at_5(step: int, total: int, losses: dict[str, float]) -> None:
        if step == 5:
            raise KeyboardInterrupt  # Ctrl-C

    with pytest.raises(
        KeyboardInterrupt, match=r"its last saved state is step 4 .* run the same command again"
    ):
        train_vit(VitTrainConfig(out=str(run), checkpoint_every=2, **base), stop_at_5)
    assert (run / "vit_state.pt").is_file() and not (run / "vit.json").exists()
    with pytest.raises(
        CapfiltError, match=r"unfinished `train vit` run with other arguments \(lr: saved 0.001, now 0.002\)"
    ):
        train_vit(VitTrainConfig(out=str(run), checkpoint_every=2, **{**base, "lr": 2e-3}))
    # The same path, other images (a world written again over it): the state's rows point elsewhere.
    shutil.rmtree(data)
    synthesize(
        tmp_path / "other", web=16, human=16, test=0, image_size=32, shard_size=40, labelled=120, seed=9
    )
    shutil.copytree(tmp_path / "other" / "labelled", data)
    with pytest.raises(CapfiltError, match="saved by a run on other images or labels than --data holds now"):
        train_vit(VitTrainConfig(out=str(run), checkpoint_every=2, **base))
    shutil.rmtree(data)
    shutil.copytree(labelled / "labelled", data)
    (run / ".vit_state.pt.tmp").write_bytes(b"a write a kill cut short")
    named = {**base, "image_size": 32}  # the size's own resolution, named: the same run
    resumed = train_vit(
        VitTrainConfig(out=str(run), checkpoint_every=3, **named)
    )  # checkpoint_every may change
    assert resumed.steps == whole.steps == 7 and resumed.held_out_accuracy == whole.held_out_accuracy
    ours, theirs = load_file(str(run / "vit.safetensors")), load_file(str(whole.out / "vit.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))  # step 5, logged before the stop, is not logged twice
    assert (run / "metrics.jsonl").read_text() == (whole.out / "metrics.jsonl").read_text()
    assert not (run / "vit_state.pt").exists() and not (run / ".vit_state.pt.tmp").exists()
    assert (
        train_vit(VitTrainConfig(out=str(whole.out), checkpoint_every=0, **named)).wall_s == 0.0
    )  # finished


def test_a_vit_state_that_is_no_state_is_named_and_nothing_saved_says_so(
    labelled: Path, tmp_path: Path
) -> None:
    base = dict(data=[str(labelled / "labelled")], size="tiny", steps=3, batch_size=8)
    for bad in ("a dict without its parts", "a directory"):
        run = tmp_path / bad.replace(" ", "_")
        run.mkdir()
        if bad == "a directory":
            (run / "vit_state.pt").mkdir()
        else:
            torch.save({"step": 2, "args": "{}"}, run / "vit_state.pt")
        with pytest.raises(CapfiltError, match=r"vit_state.pt is not a readable `train vit` state"):
            train_vit(VitTrainConfig(out=str(run), **base))

    def stop(step: int, total: int, losses: dict[str, float]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(
        KeyboardInterrupt, match="with --checkpoint-every 0 no state is saved: a rerun starts over"
    ):
        train_vit(VitTrainConfig(out=str(tmp_path / "none"), checkpoint_every=0, **base), stop)


def test_a_vit_state_damaged_on_disk_is_refused_and_one_without_a_checksum_still_resumes(
    labelled: Path, tmp_path: Path
) -> None:
    """The state carries the sha256 of its bytes: one byte flipped inside the tensor data used to
    load and train on. A state written before the checksum (plain `torch.save`) resumes as before."""
    from capfilt.pipelines.train_vit import STATE_MAGIC, _load_state_file

    base = dict(data=[str(labelled / "labelled")], size="tiny", steps=4, batch_size=8)

    def stop_at_3(step: int, total: int, losses: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_vit(VitTrainConfig(out=str(run), checkpoint_every=2, **base), stop_at_3)
    path = run / "vit_state.pt"
    good = path.read_bytes()
    assert good.startswith(STATE_MAGIC)
    damaged = bytearray(good)
    damaged[len(good) * 2 // 3] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(CapfiltError, match=r"vit_state.pt is not a readable .*checksum does not match"):
        train_vit(VitTrainConfig(out=str(run), checkpoint_every=2, **base))
    path.write_bytes(good)
    torch.save(_load_state_file(path), path)  # the format before the checksum
    assert not path.read_bytes().startswith(STATE_MAGIC)
    assert train_vit(VitTrainConfig(out=str(run), checkpoint_every=2, **base)).steps == 4
