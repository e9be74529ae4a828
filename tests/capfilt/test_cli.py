"""`capfilt caption / score / convert` through the real entry point, on all three checkpoint kinds."""

from __future__ import annotations

import json

import pytest

from capfilt.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _kinds(request, role: str) -> dict[str, str]:
    names = {
        "captioner": ("hf_captioner_dir", "blip_captioner_pth", "our_captioner_dir"),
        "filter": ("hf_retrieval_dir", "blip_filter_pth", "our_filter_dir"),
    }[role]
    return dict(zip(("transformers", "pth", "ours"), (str(request.getfixturevalue(n)) for n in names)))


@pytest.mark.parametrize("kind", ["transformers", "pth", "ours"])
def test_caption_json_on_every_checkpoint_kind(kind, request, capsys, image_files):
    model = _kinds(request, "captioner")[kind]
    images = [str(p) for p in image_files]
    code, out, err = _run(
        capsys, "caption", "--model", model, *images, "--num-captions", "3", "--seed", "5", "--json"
    )
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == images
    for r in results:
        assert len(r["captions"]) == 3
        assert all(isinstance(c, str) for c in r["captions"])
        assert not any(c.startswith("a picture of") for c in r["captions"])  # the prompt is stripped
    # the same seed gives the same captions; sampling differs across the K samples somewhere
    code, again, _ = _run(
        capsys, "caption", "--model", model, *images, "--num-captions", "3", "--seed", "5", "--json"
    )
    assert json.loads(again) == json.loads(out)
    assert any(len(set(r["captions"])) > 1 for r in results)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_caption_deterministic_methods(method, capsys, our_captioner_dir, image_files):
    args = ["caption", "--model", str(our_captioner_dir), str(image_files[0]), "--method", method, "--json"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert len(json.loads(out)["results"][0]["captions"]) == 1


@pytest.mark.parametrize("kind", ["transformers", "pth", "ours"])
def test_score_json_on_every_checkpoint_kind(kind, request, capsys, image_files):
    from capfilt.images import open_image
    from capfilt.inference import Filter

    model = _kinds(request, "filter")[kind]
    texts = ["a red circle on a blue background", "two dogs running on the beach"]
    code, out, err = _run(
        capsys,
        "score",
        "--model",
        model,
        "--image",
        str(image_files[1]),
        "--text",
        texts[0],
        "--text",
        texts[1],
        "--json",
    )
    assert code == 0, err
    payload = json.loads(out)
    assert payload["image"] == str(image_files[1])
    assert [s["text"] for s in payload["scores"]] == texts
    expected = Filter(model).score([open_image(image_files[1])], [texts])[0]
    for got, want in zip(payload["scores"], expected):
        assert 0.0 <= got["itm"] <= 1.0 and -1.0 <= got["itc"] <= 1.0
        assert got["itm"] == pytest.approx(want.itm, abs=1e-6)
        assert got["itc"] == pytest.approx(want.itc, abs=1e-6)


def test_convert_pth_then_use_it(tmp_path, capsys, blip_captioner_pth, image_files):
    out_dir = tmp_path / "converted"
    code, out, err = _run(capsys, "convert", "--input", str(blip_captioner_pth), "--output", str(out_dir))
    assert code == 0, err
    assert json.loads(out)["role"] == "captioner"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    code, out, err = _run(
        capsys, "caption", "--model", str(out_dir), str(image_files[0]), "--method", "greedy", "--json"
    )
    assert code == 0, err
    # the same captions as from the .pth itself
    _, from_pth, _ = _run(
        capsys,
        "caption",
        "--model",
        str(blip_captioner_pth),
        str(image_files[0]),
        "--method",
        "greedy",
        "--json",
    )
    assert json.loads(out)["results"][0]["captions"] == json.loads(from_pth)["results"][0]["captions"]


def test_convert_to_transformers(tmp_path, capsys, our_filter_dir):
    from transformers import BlipForImageTextRetrieval

    code, _, err = _run(
        capsys,
        "convert",
        "--input",
        str(our_filter_dir),
        "--output",
        str(tmp_path / "hf"),
        "--to",
        "transformers",
    )
    assert code == 0, err
    BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf")


# ----------------------------------------------------------------------------- errors: exit 2, named


def test_missing_model_path(capsys, image_files, tmp_path):
    code, _, err = _run(capsys, "caption", "--model", str(tmp_path / "no_such_ckpt"), str(image_files[0]))
    assert code == 2
    assert "no_such_ckpt" in err and "not found" in err


def test_missing_image(capsys, our_captioner_dir, tmp_path):
    code, _, err = _run(capsys, "caption", "--model", str(our_captioner_dir), str(tmp_path / "ghost.jpg"))
    assert code == 2
    assert "ghost.jpg" in err


@pytest.mark.parametrize("payload", [b"", b"<html>not an image</html>", b"\xff\xd8\xff\xe0truncated jpeg"])
def test_corrupt_image(payload, capsys, our_filter_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(payload)
    code, _, err = _run(
        capsys, "score", "--model", str(our_filter_dir), "--image", str(bad), "--text", "a cat"
    )
    assert code == 2
    assert "broken.jpg" in err


@pytest.mark.parametrize("kind", ["transformers", "pth", "ours"])
def test_captions_from_a_filter_are_refused(kind, request, capsys, image_files):
    model = _kinds(request, "filter")[kind]
    code, _, err = _run(capsys, "caption", "--model", model, str(image_files[0]))
    assert code == 2
    assert "cannot write captions" in err and "filter" in err


@pytest.mark.parametrize("kind", ["transformers", "pth", "ours"])
def test_scores_from_a_captioner_are_refused(kind, request, capsys, image_files):
    model = _kinds(request, "captioner")[kind]
    code, _, err = _run(capsys, "score", "--model", model, "--image", str(image_files[0]), "--text", "a cat")
    assert code == 2
    assert "cannot score texts" in err


def test_bad_generation_options_exit_2(capsys, our_captioner_dir, image_files):
    code, _, err = _run(
        capsys, "caption", "--model", str(our_captioner_dir), str(image_files[0]), "--top-p", "1.5"
    )
    assert code == 2
    assert "top_p" in err


def test_pth_without_tokenizer_is_explained(tmp_path, capsys, blip_captioner_pth, image_files):
    lonely = tmp_path / "lonely.pth"
    lonely.write_bytes(blip_captioner_pth.read_bytes())
    code, _, err = _run(capsys, "caption", "--model", str(lonely), str(image_files[0]))
    assert code == 2
    assert "tokenizer" in err and "lonely.pth" in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("caption", "score", "convert"):
        assert command in out


def test_data_synth_writes_a_world(tmp_path, capsys):
    out = tmp_path / "world"
    code, stdout, err = _run(
        capsys,
        "data",
        "synth",
        "--out",
        str(out),
        "--web",
        "30",
        "--human",
        "10",
        "--test",
        "5",
        "--shard-size",
        "20",
        "--seed",
        "3",
        "--labelled",
        "7",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["counts"] == {"human": 10, "web": 30, "test": 5, "labelled": 7}
    assert len(list((out / "labelled").glob("*.tar"))) == 1
    assert sum(summary["noise"].values()) == round(0.4 * 30)
    assert sorted(p.name for p in (out / "web").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (out / "truth.parquet").is_file()


def test_data_synth_rejects_bad_noise(tmp_path, capsys):
    code, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "w"), "--noise", "1.5")
    assert code == 2
    assert "--noise" in err


def test_data_synth_refuses_images_it_cannot_usefully_draw(tmp_path, capsys):
    code, out, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "w"), "--image-size", "8100")
    assert code == 2 and out == ""
    assert "--image-size 8100 is larger than the world draws (up to 1024)" in err
    assert not any((tmp_path / "w").iterdir())  # refused before anything is drawn or written


def test_building_the_cli_does_not_import_torch():
    """`capfilt --help` stays instant: commands import their heavy modules when they run."""
    import subprocess
    import sys

    code = "import sys; from capfilt.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _ray_prints_on_stdout() -> None:
    """What Ray's driver does while a job runs: a background thread prints raylet and worker
    messages on whatever `sys.stdout` is then."""
    import threading

    thread = threading.Thread(target=lambda: print("(raylet) Task _map_task failed due to oom; retrying"))
    thread.start()
    thread.join()


@pytest.mark.parametrize("command", ["clean", "train", "demo"])
def test_stdout_holds_only_the_result_while_ray_prints(command, monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from capfilt.pipelines import clean_cli, demo, train_cli

    result = {"samples": 3, "status": {"kept": 3}}

    def work(*args, **kwargs):
        _ray_prints_on_stdout()
        return SimpleNamespace(to_dict=lambda: result) if command == "demo" else result

    monkeypatch.setattr(clean_cli, "run_clean", work)
    monkeypatch.setattr(train_cli, "run_train", work)
    monkeypatch.setattr(demo, "run_demo", work)
    argv = {
        "clean": ["clean", "--input", "in", "--output", "out", "--captioner", "c", "--filter", "f"],
        "train": ["train", "pretrain", "--data", "d", "--out", str(tmp_path / "t")],
        "demo": ["demo", "--out", str(tmp_path / "demo"), "--json"],
    }[command]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out) == result  # the result alone: Ray's line went to stderr
    assert "(raylet) Task _map_task failed" in err


def test_a_reader_that_stops_reading_ends_the_command_without_a_traceback() -> None:
    """`capfilt eval ... | head -c 20`: the print into the closed pipe ended in a BrokenPipeError
    traceback (and another at interpreter exit)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from capfilt import cli\n"
        "cli.COMMANDS['demo'] = lambda args: print('x' * 4_000_000)\n"
        "sys.exit(cli.main(['demo']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]
