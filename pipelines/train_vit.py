"""`capfilt train vit`: supervised pre-training of the image encoder, BLIP's ImageNet init.

BLIP does not train its ViT from scratch: it starts from a ViT pre-trained on ImageNet
classification. No outside weights reach CapFilt, so this stage makes that init from labelled
images: webdataset shards whose .json records carry `"labels": [...]` (the built-in world writes
such a split with `capfilt data synth --labelled N`; an ImageNet-style dataset with its class
names in the .json works the same).

The task is multi-label (one sigmoid per label name, binary cross-entropy). The labels are read
from the ViT's patch tokens by a max over them (multiple-instance, as in word detectors trained
from captions): a small object's tokens answer for the whole image. A readout by attention or by a
mean (the [CLS] token) stays on a plateau when objects are small, because it starts as a mean over
every token and the object drowns in its background (docs/results.md, "Why shape and count are not
learnt"); the MED's objectives read the image only by attention, so without this init they never
learn shape. The head is discarded: `pretrain --vit-init OUT` keeps the encoder.

Writes OUT/vit.safetensors (the encoder's weights), OUT/vit.json (its config, the label names, the
run's arguments and held-out accuracy) and OUT/metrics.jsonl. Every `checkpoint_every` steps it
saves OUT/vit_state.pt (weights, optimiser, schedule, data order and random states): the same
command run again after an interruption resumes from there and ends with the weights an
uninterrupted run gives. The state is removed once the run is finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from capfilt.data import iter_samples, shard_paths
from capfilt.errors import CapfiltError
from capfilt.images import normalize_pixels, open_image, stack_pixels
from capfilt.model.config import SIZES, STEMS, VisionConfig, med_config
from capfilt.model.vit import VisionTransformer

from .train_config import lr_at
from .train_state import make_run_dir

log = logging.getLogger(__name__)

WEIGHTS = "vit.safetensors"
META = "vit.json"
STATE = "vit_state.pt"
STATE_MAGIC = (
    b"CAPFILT-VIT-STATE sha256 "  # then the hex digest of the torch.save bytes, a newline, those bytes
)
# Arguments that may change between a run and its resume (they shape neither the weights nor the
# data order): the rest must be the same.
RESUME_EXEMPT = ("out", "checkpoint_every", "log_every", "max_memory_gb")
ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class VitTrainConfig:
    data: list[str]
    out: str
    size: str = "small"
    stem: str = "patch"
    image_size: int | None = None  # None: the size's resolution
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    # The end of the cosine; None keeps the peak rate after the warm-up. A ViT annealed to a low rate
    # gave the MED far less (docs/results.md, "The image encoder's init"), so the default is constant.
    min_lr: float | None = None
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    held_out: float = 0.05  # fraction of the images kept for the accuracy report
    # The decoded images are held in memory (N x S x S x 3 bytes: 0.3 GB for the world's 24k at 64
    # px); a larger set is refused rather than left to exhaust the machine.
    max_memory_gb: float = 16.0
    log_every: int = 50
    checkpoint_every: int = 500  # steps between resumable states (OUT/vit_state.pt); 0: none
    use_gpu: bool = False
    seed: int = 0

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise CapfiltError(message)

        need(bool(self.data), "no training data: pass --data with labelled shard directories, tars or globs")
        need(self.size in SIZES, f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
        need(self.stem in STEMS, f"unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        need(self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        need(
            self.min_lr is None or 0 <= self.min_lr <= self.lr,
            f"min_lr must lie between 0 and lr ({self.lr}), got {self.min_lr}",
        )
        need(0 <= self.held_out < 0.5, f"held_out is a fraction below 0.5, got {self.held_out}")
        need(self.warmup_steps >= 0, f"warmup steps must be >= 0, got {self.warmup_steps}")
        need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight decay must not be negative, got {self.weight_decay}",
        )
        need(self.grad_clip >= 0, f"grad clip must be >= 0 (0: none), got {self.grad_clip}")
        need(self.log_every >= 1, f"log every must be at least 1 step, got {self.log_every}")
        need(
            self.checkpoint_every >= 0,
            f"checkpoint every must be >= 0 (0: never), got {self.checkpoint_every}",
        )
        if self.image_size is not None:
            from capfilt.model.config import med_config

            patch = med_config(self.size, stem=self.stem).vision.patch_size
            need(
                self.image_size >= patch and self.image_size % patch == 0,
                f"image size must be a positive multiple of the {self.size} encoder's patch size {patch}, "
                f"got {self.image_size}",
            )
        need(not self.use_gpu or torch.cuda.is_available(), "--gpu was given but torch sees no CUDA device")


@dataclass(frozen=True)
class VitTrainResult:
    out: Path
    steps: int
    labels: list[str]
    held_out_accuracy: float | None  # mean over labels of per-label accuracy, None without held-out images
    wall_s: float


def _read(cfg: VitTrainConfig, shards: list[Path], image_size: int) -> tuple[torch.Tensor, list[list[str]]]:
    """(N, S, S, 3) uint8 pixels and each image's labels; an unreadable image is skipped and logged."""
    pixels, labels = [], []
    skipped = 0
    for sample in iter_samples(shards):
        names = sample.meta.get("labels")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CapfiltError(
                f'sample {sample.key} of {sample.shard} has no "labels" list of names in its .json; '
                "`train vit` needs labelled images (capfilt data synth --labelled N writes them)"
            )
        try:
            image = open_image(sample.image)
        except CapfiltError as err:
            skipped += 1
            log.warning("skipping %s of %s: %s", sample.key, sample.shard, err)
            continue
        pixels.append(stack_pixels([image], image_size)[0])
        labels.append(sorted(set(names)))
        if len(pixels) * image_size * image_size * 3 > cfg.max_memory_gb * 2**30:
            raise CapfiltError(
                f"{', '.join(cfg.data)} hold more than {len(pixels)} images, over {cfg.max_memory_gb:g} GB "
                f"decoded at {image_size} px: `train vit` holds its images in memory, so pass a subset "
                "of the shards (or raise max_memory_gb where the memory is there)"
            )
    if skipped:
        log.warning("%d unreadable images skipped", skipped)
    if not pixels:
        raise CapfiltError(f"{', '.join(cfg.data)} hold no readable labelled images")
    return torch.stack(pixels), labels


def _lr_factor(step: int, cfg: VitTrainConfig) -> float:
    """The training schedule (train_config.lr_at) as a fraction of the peak: linear warm-up, then a
    cosine down to min_lr, or constant without one."""
    floor = 1.0 if cfg.min_lr is None else cfg.min_lr / cfg.lr
    return lr_at(step, cfg.steps, cfg.warmup_steps, 1.0, floor)


def readout(tokens: torch.Tensor) -> torch.Tensor:
    """The image's label evidence: a max over the patch tokens (the [CLS] token left out)."""
    return tokens[:, 1:].amax(1)


def train_vit(cfg: VitTrainConfig, progress: ProgressFn | None = None) -> VitTrainResult:
    """Pre-train the named size's ViT on labelled images (module docstring); returns where it went."""
    cfg.validate()
    start = time.perf_counter()
    out = Path(cfg.out)
    config = med_config(cfg.size, image_size=cfg.image_size, stem=cfg.stem)
    vision = config.vision
    shards = shard_paths(cfg.data)
    # image_size as it trains: None and the size's own resolution are one run
    args = dataclasses.asdict(cfg) | {"data": [str(p) for p in shards], "image_size": vision.image_size}
    finished = _finished_run(out, args)
    if finished is not None:
        return finished
    pixels, labels = _read(cfg, shards, vision.image_size)
    names = sorted({n for ls in labels for n in ls})
    if not names:
        raise CapfiltError(f"{', '.join(cfg.data)}: every image has an empty label list")
    index = {n: i for i, n in enumerate(names)}
    target = torch.zeros(len(labels), len(names))
    for row, ls in enumerate(labels):
        target[row, [index[n] for n in ls]] = 1.0
    order = list(range(len(labels)))
    random.Random(cfg.seed).shuffle(order)
    n_held = int(len(order) * cfg.held_out)
    held, train_rows = order[:n_held], order[n_held:]
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    torch.manual_seed(cfg.seed)
    vit = VisionTransformer(vision).to(device)
    head = nn.Linear(vision.width, len(names)).to(device)
    params = [*vit.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    log.info(
        "ViT pre-training: %d images (%d held out), %d labels, %s %s stem at %d px, %d steps of %d",
        len(labels), n_held, len(names), cfg.size, cfg.stem, vision.image_size, cfg.steps, cfg.batch_size,
    )  # fmt: skip

    def batch(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_pixels(pixels[rows], config.image_mean, config.image_std, device)
        return x, target[rows].to(device)

    make_run_dir(out)
    rng = np.random.default_rng(cfg.seed)
    queue: list[int] = []
    first = 1
    data = _data_digest(pixels, labels)
    _remove_tmp(out)
    state = _saved_state(out, args, names, data)
    if state is not None:
        vit.load_state_dict(state["vit"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        rng.bit_generator.state = json.loads(state["data_rng"])
        queue = state["queue"].tolist()
        torch.set_rng_state(state["torch_rng"])
        first = int(state["step"]) + 1
        log.info("resuming the `train vit` run in %s from step %d", out, first - 1)
    metrics = _metrics_to(out / "metrics.jsonl", first - 1)
    vit.train()
    loss = torch.zeros(())
    try:
        for step in range(first, cfg.steps + 1):
            if len(queue) < cfg.batch_size:
                queue.extend(rng.permutation(train_rows).tolist())
            rows, queue = queue[: cfg.batch_size], queue[cfg.batch_size :]
            x, y = batch(rows)
            loss = nn.functional.binary_cross_entropy_with_logits(head(readout(vit(x))), y)
            if not bool(torch.isfinite(loss)):
                from .train_loop import diverged

                raise diverged(step, f"the loss {float(loss.detach())}", cfg.grad_clip)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if step % cfg.log_every == 0 or step == cfg.steps:
                line = {"step": step, "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0]}
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_state(out, args, names, data, step, vit, head, opt, sched, rng, queue)
            if progress is not None:
                progress(step, cfg.steps, {"bce_loss": loss.item()})
    except KeyboardInterrupt as err:
        saved = _saved_step(out)
        if not cfg.checkpoint_every:
            message = (
                "`train vit` interrupted; with --checkpoint-every 0 no state is saved: a rerun starts over"
            )
        elif saved:
            message = (
                f"`train vit` interrupted; its last saved state is step {saved} in {out}: run the same "
                "command again to resume from it"
            )
        else:
            message = (
                f"`train vit` interrupted before its first state (one every {cfg.checkpoint_every} steps): "
                "a rerun starts over"
            )
        raise KeyboardInterrupt(message) from err
    finally:
        metrics.close()
    accuracy = _accuracy(vit, head, held, batch) if held else None
    vit = vit.cpu()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out / WEIGHTS))
    meta = {
        "size": cfg.size,
        "vision": dataclasses.asdict(vision),
        "labels": names,
        "images": len(labels),
        "held_out_images": n_held,
        "held_out_accuracy": accuracy,
        "final_loss": round(loss.item(), 5),
        "args": dataclasses.asdict(cfg) | {"data": [str(p) for p in shards]},
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a finished run
    (out / STATE).unlink(missing_ok=True)
    _remove_tmp(out)
    wall = time.perf_counter() - start
    log.info("ViT pre-training done in %.0f s; held-out accuracy %s", wall, accuracy)
    return VitTrainResult(out, cfg.steps, names, accuracy, wall)


def _differing(saved: dict[str, Any], args: dict[str, Any]) -> str:
    """ "name: saved X, now Y" for the arguments a resume may not change, "" when none differs
    (`args` holds the image size the run trains at; a saved None is the size's own)."""
    saved = dict(saved)
    if saved.get("image_size") is None and saved.get("size") == args.get("size"):
        with contextlib.suppress(KeyError, ValueError, TypeError):  # another stem: the comparison names it
            saved["image_size"] = med_config(args["size"], stem=saved.get("stem", "patch")).vision.image_size
    differ = sorted(k for k in args if k not in RESUME_EXEMPT and saved.get(k) != args[k])
    return "; ".join(f"{k}: saved {saved.get(k)!r}, now {args[k]!r}" for k in differ)


STATE_KEYS = (
    "step",
    "args",
    "labels",
    "data",
    "vit",
    "head",
    "optimizer",
    "schedule",
    "data_rng",
    "queue",
    "torch_rng",
)


def _data_digest(pixels: torch.Tensor, labels: list[list[str]]) -> str:
    """What identifies the images and labels a run trains on (a state's row indices point into them)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([list(pixels.shape), labels]).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _saved_state(out: Path, args: dict[str, Any], names: list[str], data: str) -> dict[str, Any] | None:
    """The state an interrupted run of these `args` on this `data` (`_data_digest`) left in `out`,
    None when there is none; CapfiltError when it is another run's or unreadable."""
    path = out / STATE
    if not path.exists():
        return None
    try:
        state = _load_state_file(path)
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        saved = json.loads(state["args"])
    except Exception as err:  # a torn or foreign file, a directory: say which, never guess
        raise CapfiltError(
            f"{path} is not a readable `train vit` state ({err}); delete it to start the run again"
        ) from err
    details = _differing(saved, args)
    if details:
        raise CapfiltError(
            f"{out} holds an unfinished `train vit` run with other arguments ({details}); rerun with "
            "those to resume it, or choose a new --out"
        )
    if state.get("labels") != names or state.get("data") != data:
        raise CapfiltError(
            f"{path} was saved by a run on other images or labels than --data holds now (the data "
            "changed since): delete it to train on the data as it is, or choose a new --out"
        )
    return state


def _save_state(
    out: Path,
    args: dict[str, Any],
    names: list[str],
    data: str,
    step: int,
    vit: nn.Module,
    head: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    queue: list[int],
) -> None:
    """Write the run's state after `step` under a temporary name, then rename it: a kill leaves the
    previous state or this one, never half of one."""
    state = {
        "step": step,
        "args": json.dumps(args),
        "labels": names,
        "data": data,
        "vit": {k: v.detach().cpu() for k, v in vit.state_dict().items()},
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),
        "data_rng": json.dumps(rng.bit_generator.state),
        "queue": torch.tensor(queue, dtype=torch.int64),
        "torch_rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    tmp = out / f".{STATE}.tmp"
    with open(tmp, "wb") as f:  # the checksum first: a byte the disk flips is found at the resume
        f.write(STATE_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n")
        f.write(data)
    os.replace(tmp, out / STATE)


def _load_state_file(path: Path) -> dict[str, Any]:
    """A state `_save_state` wrote, its checksum verified (a state of an earlier version, which has
    none, is read as it is); ValueError when the bytes are not those that were written."""
    raw = path.read_bytes()
    if raw.startswith(STATE_MAGIC):
        digest, _, data = raw[len(STATE_MAGIC) :].partition(b"\n")
        if hashlib.sha256(data).hexdigest().encode() != digest:
            raise ValueError("its checksum does not match: the file was damaged after it was written")
        raw = data
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def _remove_tmp(out: Path) -> None:
    """The temporary file of a state write a kill cut short."""
    (out / f".{STATE}.tmp").unlink(missing_ok=True)


def _saved_step(out: Path) -> int | None:
    """The step of the state in `out`, None when there is none (or it cannot be read)."""
    try:
        return int(_load_state_file(out / STATE)["step"])
    except Exception:  # no state, or a torn one: the resume will say which
        return None


def _metrics_to(path: Path, step: int) -> Any:
    """metrics.jsonl open for appending, holding only the lines of steps up to `step` (a killed run
    may have logged past its last state)."""
    kept: list[str] = []
    if step > 0 and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the kill
    tmp = path.with_name(f".{path.name}.tmp")  # rewritten aside, then renamed: a kill loses nothing
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
    return path.open("a")


def _finished_run(out: Path, args: dict[str, Any]) -> VitTrainResult | None:
    """The result of the `train vit` run `out` already holds with these `args` (nothing is trained
    again); CapfiltError when `out` holds another run: a MED training run, or a ViT run of other
    arguments, whose metrics and weights this one would overwrite."""
    from .train_state import list_states

    if out.is_dir() and (list_states(out) or (out / "config.json").is_file()):
        raise CapfiltError(
            f"{out} holds a MED training run (`capfilt train` of another task); choose a new --out"
        )
    if not (out / META).is_file():
        return None
    try:
        meta = json.loads((out / META).read_text())
        saved = meta["args"]
    except (ValueError, KeyError, TypeError) as err:
        raise CapfiltError(
            f"{out}/{META} is not a finished `train vit` run's record ({err}); choose a new --out"
        ) from err
    details = _differing(saved, args)
    if details:
        raise CapfiltError(
            f"{out} holds a finished `train vit` run with other arguments ({details}); choose a new --out"
        )
    log.info("%s already holds this finished `train vit` run; nothing to train", out)
    return VitTrainResult(
        out, int(saved.get("steps", 0)), list(meta.get("labels", [])), meta.get("held_out_accuracy"), 0.0
    )


@torch.no_grad()
def _accuracy(vit: VisionTransformer, head: nn.Linear, rows: list[int], batch: Any) -> float:
    vit.eval()
    right, seen = 0.0, 0
    for first in range(0, len(rows), 256):
        x, y = batch(rows[first : first + 256])
        predicted = head(readout(vit(x))) > 0
        right += (predicted == (y > 0.5)).float().mean(1).sum().item()
        seen += len(y)
    vit.train()
    return round(right / seen, 4)


def load_vit_init(path: str | Path, vision: VisionConfig) -> dict[str, torch.Tensor]:
    """The encoder weights of a `train vit` run at `path`, checked against the MED's `vision` config;
    resized position embeddings are not supported here, so the resolutions must agree."""
    run = Path(path)
    meta_path, weights = run / META, run / WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise CapfiltError(
            f"{run} is not a finished `capfilt train vit` run (no {META} and {WEIGHTS}); train one first"
        )
    saved = json.loads(meta_path.read_text())["vision"]
    wanted = dataclasses.asdict(vision)
    keys = ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "stem")
    differ = [f"{k} {saved.get(k)} (init) vs {wanted[k]} (model)" for k in keys if saved.get(k) != wanted[k]]
    if differ:
        raise CapfiltError(f"--vit-init {run} does not fit this MED's image encoder: {'; '.join(differ)}")
    state = load_file(str(weights))
    bad = next(
        (k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None
    )
    if bad is not None:
        raise CapfiltError(
            f"--vit-init {run}: {bad} holds NaN or infinite values (a run that diverged); train it again"
        )
    return state


def vit_stem(path: str | Path) -> str:
    """The stem of a finished `train vit` run (so a pretrain from it builds the same encoder)."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CapfiltError(f"{path} is not a finished `capfilt train vit` run (no {META}); train one first")
    return str(json.loads(meta_path.read_text())["vision"].get("stem", "patch"))
