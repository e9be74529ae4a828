"""What a training run leaves on disk, and how it is written so that a kill never corrupts it.

    OUT/                        the final MED checkpoint (config.json written last marks it whole)
    OUT/metrics.jsonl           one JSON line per logged step
    OUT/train_state/init/       a from-scratch pre-training's initial MED and trained tokenizer
    OUT/train_state/step_000500/
        config.json, model.safetensors, tokenizer files   the MED at that step (a checkpoint)
        objectives.safetensors  MEDObjectives' own state: temperature, momentum encoders, queues
        trainer.pt              optimizer state, step, per-rank RNG states, wall time
        train_args.json         the arguments that must match to resume from it
        checksums.json          the sha256 of each file above, written last

A state directory is written under a temporary name and renamed into place, so a directory
named `step_NNNNNN` is always complete; the last `KEEP` of them are kept. A resume checks the
newest state's checksums (`usable_states`): one damaged on disk since is set aside as
`damaged-step_NNNNNN` and the run resumes from the one before it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from capfilt.model.checkpoint import Checkpoint, file_digest, save_checkpoint

log = logging.getLogger(__name__)


def make_run_dir(out: Path) -> None:
    """A run directory (`--out`), or CapfiltError naming it: a file in its place, no permission."""
    from capfilt.errors import CapfiltError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CapfiltError(f"--out {out}: cannot create the run directory ({err.strerror or err})") from err


STATE_DIR = "train_state"
INIT_DIR = "init"
METRICS = "metrics.jsonl"
KEEP = 2
_PREFIX = "step_"
_TMP = ".tmp-"
CHECKSUMS = "checksums.json"
DAMAGED = "damaged-"


def state_root(out: Path) -> Path:
    return out / STATE_DIR


def state_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def state_step(path: Path) -> int:
    return int(path.name[len(_PREFIX) :])


def list_states(out: Path) -> list[Path]:
    """Complete training states in `out`, oldest first."""
    root = state_root(out)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(_PREFIX)
        and p.name[len(_PREFIX) :].isdigit()
        and (p / "trainer.pt").is_file()
        and (p / "config.json").is_file()
    ]
    return sorted(found, key=state_step)


def remove_partial(out: Path) -> None:
    """Delete temporary directories a killed run left behind (never counted as states)."""
    for root in (out, state_root(out)):
        if root.is_dir():
            for p in root.iterdir():
                if not p.name.startswith(_TMP):
                    continue
                log.info("removing a partial write left by an interrupted run: %s", p)
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _tmp_dir(parent: Path, name: str) -> Path:
    tmp = parent / f"{_TMP}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory to its final name (atomic on one file system)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_init(out: Path, ckpt: Checkpoint) -> Path:
    """Save the from-scratch initial MED (and its trained tokenizer) atomically."""
    root = state_root(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(root, INIT_DIR)
    save_checkpoint(ckpt, tmp)
    final = root / INIT_DIR
    _publish(tmp, final)
    return final


def write_state(
    out: Path,
    step: int,
    ckpt: Checkpoint,
    objectives_state: dict[str, torch.Tensor],
    trainer: dict[str, Any],
    train_args: dict[str, Any],
    keep: int = KEEP,
) -> Path:
    """Write the training state at `step` atomically, then drop all but the newest `keep` states.

    objectives_state: MEDObjectives' tensors other than the MED's (which `ckpt` holds);
    trainer: optimizer state dict, step and RNG states, loadable with `weights_only=True`.
    """
    root = state_root(out)
    root.mkdir(parents=True, exist_ok=True)
    name = state_name(step)
    tmp = _tmp_dir(root, name)
    save_checkpoint(ckpt, tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in objectives_state.items()}
    save_file(state, str(tmp / "objectives.safetensors"))
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "train_args.json").write_text(json.dumps(train_args, indent=2, sort_keys=True) + "\n")
    sums = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
    final = root / name
    _publish(tmp, final)
    for old in list_states(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("training state saved: %s", final)
    return final


def damage(path: Path) -> str | None:
    """What is wrong with a state's files against its checksums, None when nothing is (or when it
    was written before states had checksums)."""
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"{CHECKSUMS} cannot be read ({err})"
    if not isinstance(sums, dict):
        return f"{CHECKSUMS} is not a list of files"
    for name, digest in sorted(sums.items()):
        try:
            if file_digest(path / name) != digest:
                return f"{name} is not the file that was written (its checksum differs)"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


def usable_states(out: Path) -> list[Path]:
    """`list_states`, with the newest damaged ones set aside (renamed `damaged-step_NNNNNN`, kept for
    a look) so that a resume starts from the newest whole one; each is logged with what is wrong."""
    states = list_states(out)
    while states:
        problem = damage(states[-1])
        if problem is None:
            break
        bad = states.pop()
        aside = bad.with_name(DAMAGED + bad.name)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(bad, aside)
        where = f"resuming from {states[-1].name}" if states else "no earlier state is left: starting over"
        log.warning("training state %s is damaged: %s; set aside as %s, %s", bad, problem, aside.name, where)
    return states


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer dict, objectives state) of a state directory; the MED is loaded with load_checkpoint."""
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return trainer, load_file(str(path / "objectives.safetensors"))


def read_args(path: Path) -> dict[str, Any]:
    return json.loads((path / "train_args.json").read_text())


def write_final(out: Path, ckpt: Checkpoint) -> Path:
    """Save the final MED checkpoint into `out` itself.

    `out` also holds the run's metrics and states, so it cannot be renamed into place: the
    checkpoint is written to a temporary directory, its files are moved in one by one (each
    move atomic) and config.json goes last, so `out` loads only once it is whole.
    """
    tmp = _tmp_dir(out, "final")
    save_checkpoint(ckpt, tmp)
    (out / "config.json").unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json")
    for name in [*names, "config.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return out


def truncate_metrics(out: Path, last_step: int) -> None:
    """Drop metric lines after `last_step` (logged by a run that died before its next state)."""
    path = out / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"] if line else None
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill or a full disk
            log.warning("%s: dropping a damaged line: %.80s", path, line)
            continue
        if step is not None and step <= last_step:
            kept.append(line)
    tmp = out / f"{_TMP}{METRICS}"
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def differing(saved: dict[str, Any], wanted: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Names of the arguments whose values differ between a saved state and this run."""
    return [k for k in keys if saved.get(k) != wanted.get(k)]
