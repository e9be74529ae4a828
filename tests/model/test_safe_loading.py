"""Loading a checkpoint never runs code from the file, and hostile checkpoint files fail cleanly.

A `.pth` is a pickle: `pickle.load` or `torch.load(weights_only=False)` calls whatever its
`__reduce__` names. CapFilt reads `.pth` files (and a transformers directory's
`pytorch_model.bin`) with `torch.load(weights_only=True)`. Here files whose payload would create a
marker file (through `os.system`, and through `exec` with no shell) go to the loader and to the
CLI: the marker must never appear, the loader must raise CheckpointError saying it refused to
unpickle, and the CLI must exit with 2 (a user's input error). A control test proves each payload
does run when unpickled the unsafe way, so the checks above can fail.

Hostile `config.json` files (unknown fields, absurd sizes, wrong types) must give a
CheckpointError naming the checkpoint, never another exception, and absurd sizes are refused by
`MEDConfig.validate` before any layer is built.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.cli import main
from capfilt.model.checkpoint import CheckpointError, load_checkpoint, new_checkpoint, save_checkpoint

REFUSED = "refusing to unpickle"


class SystemPayload:
    """Unpickled, runs `touch MARKER` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class ExecPayload:
    """Unpickled, runs Python that creates MARKER (no shell needed)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _zip(path: Path, payload: Any) -> None:  # torch.save's format, the payload inside a BLIP-like state dict
    torch.save({"model": {"visual_encoder.cls_token": payload}, "epoch": 3}, path)


def _legacy(path: Path, payload: Any) -> None:  # a plain pickle stream, as old torch.save wrote
    with open(path, "wb") as f:
        pickle.dump({"model": payload}, f, protocol=2)


def _bare(path: Path, payload: Any) -> None:  # the payload is the whole file
    with open(path, "wb") as f:
        pickle.dump(payload, f)


WRITERS: dict[str, Callable[[Path, Any], None]] = {"zip": _zip, "legacy": _legacy, "bare": _bare}
PAYLOADS = {"os.system": SystemPayload, "exec": ExecPayload}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def _evil(directory: Path, marker: Path, writer: str = "zip", payload: str = "os.system") -> Path:
    path = directory / f"evil_{writer}.pth"
    WRITERS[writer](path, PAYLOADS[payload](marker))
    assert not marker.exists()
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
    return path


# ── pickled code ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("writer", WRITERS)
def test_the_payloads_are_live(tmp_path: Path, marker: Path, writer: str, payload: str) -> None:
    """Control: unpickled the unsafe way, every file below does run its code."""
    path = _evil(tmp_path, marker, writer, payload)
    if writer == "zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("writer", WRITERS)
def test_load_checkpoint_refuses_pickled_code(
    tmp_path: Path, marker: Path, writer: str, payload: str
) -> None:
    path = _evil(tmp_path, marker, writer, payload)
    with pytest.raises(CheckpointError, match=REFUSED) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value), "the message names the file"
    assert not marker.exists()


@pytest.mark.parametrize("command", ["score", "caption", "convert"])
def test_the_cli_refuses_pickled_code_with_exit_code_2(
    tmp_path: Path, marker: Path, image: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = _evil(tmp_path, marker)
    out = tmp_path / "converted"
    argv = {
        "score": ["score", "--model", str(path), "--image", str(image), "--text", "a dog"],
        "caption": ["caption", "--model", str(path), str(image)],
        "convert": ["convert", "--input", str(path), "--output", str(out)],
    }[command]
    assert main(argv) == 2
    assert REFUSED in capsys.readouterr().err
    assert not marker.exists()
    assert not out.exists(), "nothing is written from a refused checkpoint"


def test_a_transformers_directory_with_a_pickled_pytorch_model_bin_is_refused(
    tmp_path: Path, marker: Path
) -> None:
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "blip", "text_config": {}, "vision_config": {}})
    )
    _zip(directory / "pytorch_model.bin", SystemPayload(marker))
    with pytest.raises(CheckpointError, match=REFUSED):
        load_checkpoint(directory)
    assert not marker.exists()


def test_remote_code_named_by_a_transformers_directory_is_never_imported(
    tmp_path: Path, marker: Path, hf_retrieval_dir: Path
) -> None:
    """`auto_map` entries point transformers at Python files in the directory; loading must not
    import them (no trust_remote_code)."""
    directory = tmp_path / "hf"
    shutil.copytree(hf_retrieval_dir, directory)
    (directory / "evil_code.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    for name, auto_map in (
        ("tokenizer_config.json", {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}),
        ("config.json", {"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"}),
    ):
        config = json.loads((directory / name).read_text())
        config["auto_map"] = auto_map
        (directory / name).write_text(json.dumps(config))
    try:
        ckpt = load_checkpoint(directory)
    except CheckpointError:
        pass  # refusing is as good as ignoring
    else:
        assert ckpt.role == "filter"
    assert not marker.exists()


# ── hostile config.json ─────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_filter_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A valid CapFilt checkpoint of the tiny size (role filter) to spoil."""
    return save_checkpoint(
        new_checkpoint("tiny", tokenizer, role="filter"), tmp_path_factory.mktemp("tiny_filter")
    )


def _spoiled(base: Path, directory: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    shutil.copytree(base, directory)
    config = json.loads((directory / "config.json").read_text())
    replaced = change(config)
    text = replaced if isinstance(replaced, str) else json.dumps(config if replaced is None else replaced)
    (directory / "config.json").write_text(text)
    return directory


def _arch(part: str | None, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        target = config["architecture"] if part is None else config["architecture"][part]
        target.update(fields)

    return change


OURS = [
    pytest.param(_arch(None, evil=1), id="unknown-architecture-field"),
    pytest.param(_arch("vision", evil=1), id="unknown-vision-field"),
    pytest.param(lambda c: c.update(architecture=[1, 2]), id="architecture-not-an-object"),
    pytest.param(_arch(None, vision=None), id="vision-null"),
    pytest.param(_arch(None, image_mean=5), id="image-mean-not-a-list"),
    pytest.param(lambda c: c.update(role="evil"), id="unknown-role"),
    pytest.param(lambda c: c.update(format_version=10**400), id="format-version-huge"),
    pytest.param(lambda c: "{not json", id="not-json"),
    pytest.param(lambda c: [c], id="json-list"),
    pytest.param(_arch("vision", width=10**12), id="huge-width"),
    pytest.param(_arch("text", vocab_size=2**62), id="huge-vocab"),
    pytest.param(_arch("vision", image_size=10**9), id="huge-image-size"),
    pytest.param(_arch("text", width=-5), id="negative-width"),
    pytest.param(_arch("vision", heads=0), id="zero-heads"),
    pytest.param(_arch("vision", patch_size=0), id="zero-patch"),
    pytest.param(_arch("vision", width="wide"), id="width-a-string"),
    pytest.param(_arch("vision", depth=2.5), id="depth-a-float"),
    pytest.param(
        lambda c: c.update(format_version="9"),
        id="format-version-a-string",
    ),
]


@pytest.mark.parametrize("change", OURS)
def test_a_hostile_config_json_gives_a_checkpoint_error(
    tmp_path: Path, tiny_filter_dir: Path, change: Callable[[dict[str, Any]], Any]
) -> None:
    directory = _spoiled(tiny_filter_dir, tmp_path / "ckpt", change)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(directory)
    assert str(directory) in str(err.value), "the message names the checkpoint"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_arch("vision", width=10**12), id="huge-width"),
        pytest.param(_arch("vision", depth=10**6), id="huge-depth"),
        pytest.param(_arch("text", vocab_size=2**62), id="huge-vocab"),
    ],
)
def test_absurd_sizes_are_refused_from_config_json_before_the_model_is_built(
    tmp_path: Path,
    tiny_filter_dir: Path,
    change: Callable[[dict[str, Any]], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A config asking for 10^6 layers must be refused by reading it, not by building layers until
    memory runs out: building the MED here fails the test at once. (Never load such a config
    unguarded in a test: today a depth of 10^30 builds layers until the OOM killer ends pytest.)"""
    import capfilt.model.checkpoint as checkpoint

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was built from an absurd config")

    monkeypatch.setattr(checkpoint, "MED", no_build)
    directory = _spoiled(tiny_filter_dir, tmp_path / "ckpt", change)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(directory)


def test_the_cli_reports_a_hostile_config_json_with_exit_code_2(
    tmp_path: Path, tiny_filter_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _spoiled(tiny_filter_dir, tmp_path / "ckpt", _arch("vision", evil=1))
    assert main(["score", "--model", str(directory), "--image", str(image), "--text", "a dog"]) == 2
    assert "evil" in capsys.readouterr().err


def _hf(part: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        if fields:
            config[part].update(fields)
        else:
            config[part] = "not an object"

    return change


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_hf("text_config", hidden_size=10**12), id="huge-width"),
        pytest.param(_hf("vision_config"), id="vision-config-a-string"),
        pytest.param(
            _hf("text_config", vocab_size="many"),
            id="vocab-a-string",
        ),
        pytest.param(
            _hf("vision_config", hidden_size=0),
            id="zero-width",
        ),
    ],
)
def test_a_hostile_transformers_config_gives_a_checkpoint_error(
    tmp_path: Path, hf_retrieval_dir: Path, change: Callable[[dict[str, Any]], Any]
) -> None:
    directory = _spoiled(hf_retrieval_dir, tmp_path / "hf", change)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(directory)
    assert str(directory) in str(err.value)


def test_unknown_fields_in_a_transformers_config_are_ignored(tmp_path: Path, hf_retrieval_dir: Path) -> None:
    directory = _spoiled(hf_retrieval_dir, tmp_path / "hf", lambda c: c.update(evil={"nested": [1, 2]}))
    assert load_checkpoint(directory).role == "filter"


def test_spoiling_keeps_the_original(tiny_filter_dir: Path) -> None:
    """The fixture is shared: every case above must work on a copy."""
    config = json.loads((tiny_filter_dir / "config.json").read_text())
    assert config["role"] == "filter" and "evil" not in config["architecture"]
    assert load_checkpoint(tiny_filter_dir).role == "filter"
