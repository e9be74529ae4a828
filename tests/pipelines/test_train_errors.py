"""Training errors a user causes end as one `error:` line and exit code 2, wherever they arise:
in a Ray worker (wrapped by Ray), from resources the local cluster cannot have, from options the
bootstrap would otherwise meet only hours later, from --out; and Ctrl-C ends one with how to resume."""

from __future__ import annotations

import pytest

from capfilt.cli import main
from capfilt.errors import CapfiltError
from capfilt.pipelines.train import _check_resources, _user_error
from capfilt.pipelines.train_config import TrainConfig


def test_a_workers_capfilt_error_is_found_through_rays_wrappers() -> None:
    """Ray re-raises a worker's exception as a class that inherits from it (its own module) inside
    a TrainingFailedError that keeps the failures in a dict: the user's message is what remains."""
    original = CapfiltError("no usable image-text pairs in ['bad.tar']")
    wrapper = type("RayTaskError(CapfiltError)", (CapfiltError,), {"__module__": "ray.exceptions"})(
        "Traceback (most recent call last):\n  ...\ncapfilt.errors.CapfiltError: no usable image-text pairs"
    )
    wrapper.cause = original

    class TrainingFailedError(RuntimeError):
        def __init__(self) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = {0: wrapper}

    found = _user_error(TrainingFailedError())
    assert isinstance(found, CapfiltError) and str(found) == str(original)
    text_only = RuntimeError(
        "worker 0 failed:\ncapfilt.errors.CapfiltError: batch size 64 exceeds the data\n"
    )
    assert str(_user_error(text_only)) == "batch size 64 exceeds the data"
    assert _user_error(RuntimeError("segfault in a worker")) is None


def test_workers_the_local_cluster_cannot_place_are_refused() -> None:
    cfg = TrainConfig(task="pretrain", data=["x"], out="o", workers=3, cpus_per_worker=1)
    with pytest.raises(
        CapfiltError, match=r"--workers 3 x --cpus-per-worker 1 need 3 CPUs; this Ray cluster has 2"
    ):
        _check_resources(cfg, {"CPU": 2.0})
    _check_resources(cfg, {"CPU": 4.0})
    gpu = TrainConfig(task="pretrain", data=["x"], out="o", workers=2, use_gpu=True)
    with pytest.raises(CapfiltError, match="need 2 GPUs; this Ray cluster has 1"):
        _check_resources(gpu, {"CPU": 8.0, "GPU": 1.0})


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--threshold", "2"], "--threshold is an ITM probability in [0, 1], got 2.0"),
        (["--threshold", "nan"], "--threshold is an ITM probability in [0, 1], got nan"),
        (["--batch-size", "1"], "--batch-size must be at least 2, got 1"),
        (["--finetune-epochs", "0"], "--finetune-epochs must be at least 1, got 0"),
    ],
)
def test_bootstrap_refuses_bad_options_before_any_training(world, tmp_path, capsys, extra, says) -> None:
    out = tmp_path / "boot"
    argv = ["bootstrap", "--data", str(world), "--size", "tiny", "--vit-steps", "0", "--out", str(out)]
    assert main([*argv, *extra]) == 2
    assert says in capsys.readouterr().err
    assert not (out / "pretrain").exists()


def test_train_out_that_is_a_file_is_a_usage_error(world, tmp_path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = ["train", "pretrain", "--data", str(world / "human"), "--out", str(a_file), "--size", "tiny"]
    assert main([*argv, "--workers", "0", "--steps", "1", "--batch-size", "4"]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err
    vit = ["train", "vit", "--data", str(world / "human"), "--out", str(tmp_path / "v"), "--size", "tiny"]
    assert main([*vit, "--image-size", "33", "--steps", "1"]) == 2
    assert "multiple of the tiny encoder's patch size 8" in capsys.readouterr().err


def test_a_fine_tuned_captioner_exports_by_its_role(tmp_path, pretrained) -> None:
    """`train captioner` keeps the pre-trained MED's encoder too: the role, not the branches, says
    which transformers class it is."""
    import dataclasses

    from capfilt.model.checkpoint import export_transformers, load_checkpoint

    both = load_checkpoint(pretrained)
    assert both.config.has_encoder and both.config.has_decoder
    out = export_transformers(dataclasses.replace(both, role="captioner"), tmp_path / "hf")
    assert '"BlipForConditionalGeneration"' in (out / "config.json").read_text()


def test_a_torn_metrics_line_does_not_block_resume(tmp_path) -> None:
    from capfilt.pipelines.train_state import METRICS, truncate_metrics

    (tmp_path / METRICS).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / METRICS).read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'


def test_data_without_pairs_says_what_a_pair_needs(tmp_path, capsys) -> None:
    import tarfile

    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    argv = ["train", "pretrain", "--data", str(empty), "--out", str(tmp_path / "p"), "--size", "tiny"]
    assert main([*argv, "--workers", "0", "--steps", "1", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "hold no image-text pairs: each sample needs an image member and a text" in err


@pytest.mark.parametrize("sent", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("rays_handler", ["exits", "aborts"])
def test_ctrl_c_during_ray_training_says_how_to_resume(
    world, tmp_path, ray_cluster, monkeypatch, capsys, rays_handler, sent
) -> None:
    """Ray Train's Ctrl-C handler aborts the run, then either exits (status 1, no word) or lets
    `fit` return: either way the CLI says the run was interrupted, where its state is, and exits 130.
    SIGTERM and SIGHUP go the same way (before, Ray's SIGTERM handler aborted the driver with exit
    134 and the workers trained on)."""
    import signal
    import sys

    import ray.train.torch

    class FakeTrainer:  # Ray's handler as Ray 2.60 installs it, without starting a run
        def __init__(self, *args, **kwargs) -> None:
            pass

        def _register_sigint_handler(self, controller) -> None:
            signal.signal(
                signal.SIGINT, lambda signum, frame: sys.exit(0) if rays_handler == "exits" else None
            )

        def fit(self) -> None:
            self._register_sigint_handler(None)
            signal.raise_signal(getattr(signal, sent))

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    before = signal.getsignal(signal.SIGINT)
    terms = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    out = tmp_path / "run"
    argv = ["train", "pretrain", "--data", str(world / "web"), "--out", str(out), "--size", "tiny"]
    assert main([*argv, "--workers", "2", "--steps", "4", "--batch-size", "4"]) == 130
    said = " ".join(capsys.readouterr().err.split())
    assert f"training interrupted; no state was saved yet in {out}" in said
    assert "run the same command again to resume" in said
    assert signal.getsignal(signal.SIGINT) is before  # Ray's handler does not outlive the run
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == terms


@pytest.mark.parametrize("sent", ["SIGTERM", "SIGHUP"])
def test_sigterm_during_local_training_says_how_to_resume(world, tmp_path, monkeypatch, capsys, sent) -> None:
    """In this process (--workers 0): SIGTERM killed it with no word; now as Ctrl-C, which says where
    the last state is."""
    import signal

    from capfilt.pipelines import train as job

    def stopped(*args, **kwargs) -> int:
        signal.raise_signal(getattr(signal, sent))
        return 0

    monkeypatch.setattr(job, "run_worker", stopped)
    out = tmp_path / "run"
    argv = ["train", "pretrain", "--data", str(world / "web"), "--out", str(out), "--size", "tiny"]
    assert main([*argv, "--workers", "0", "--steps", "4", "--batch-size", "4"]) == 130
    said = " ".join(capsys.readouterr().err.split())
    assert f"training interrupted; no state was saved yet in {out}" in said


@pytest.mark.parametrize(
    ("task", "data"),
    [("captioner", "human"), ("filter", "human"), ("pretrain", "web")],
)
def test_a_diverging_run_stops_at_its_first_non_finite_loss(
    world, pretrained, tmp_path, capsys, task, data
) -> None:
    """An lr of 1e8: before, a captioner ran on with NaN losses and saved a NaN checkpoint (exit 0),
    a filter or pre-training died in torch.multinomial with a traceback."""
    out = tmp_path / task
    argv = ["train", task, "--data", str(world / data), "--out", str(out), "--workers", "0", "--steps", "12"]
    init = ["--init", str(pretrained)] if task != "pretrain" else ["--size", "tiny"]
    code = main([*argv, *init, "--batch-size", "8", "--lr", "1e8", "--grad-clip", "0"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "training diverged at step" in captured.err and "is not finite" in captured.err
    assert "--grad-clip 1.0" in captured.err and captured.out == ""
    assert not (out / "model.safetensors").exists()  # no final checkpoint of NaN weights


def test_size_with_init_is_refused_unless_it_is_the_inits(world, pretrained, tmp_path, capsys) -> None:
    """Before: `pretrain --init <tiny> --size small` trained a tiny MED and said nothing."""
    argv = ["train", "captioner", "--data", str(world / "human"), "--init", str(pretrained), "--workers", "0"]
    assert (
        main([*argv, "--out", str(tmp_path / "a"), "--size", "small", "--steps", "1", "--batch-size", "8"])
        == 2
    )
    assert (
        "--size small: a run from --init keeps that checkpoint's size (tiny): drop --size"
        in capsys.readouterr().err
    )
    assert (
        main([*argv, "--out", str(tmp_path / "b"), "--size", "tiny", "--steps", "1", "--batch-size", "8"])
        == 0
    )


def test_data_whose_texts_are_all_empty_is_refused(tmp_path, capsys) -> None:
    """Texts that are empty, or only punctuation that BLIP's cleaning removes, leave nothing to
    learn: refused before training (it used to train on them without a word)."""
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            for ext, data in (("png", buf.getvalue()), ("txt", b"" if i % 2 else b" ... !")):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    argv = ["train", "pretrain", "--data", str(shard), "--out", str(tmp_path / "p"), "--size", "tiny"]
    assert main([*argv, "--workers", "0", "--steps", "1", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "every one of the 8 texts is empty after BLIP's caption cleaning" in err
