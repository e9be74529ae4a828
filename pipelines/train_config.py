"""The one configuration object of training: the CLI, the bootstrap loop and tests all build it.

Three tasks, as BLIP trains them:
    pretrain   ITC + ITM + LM on (noisy) web pairs; from scratch (a WordPiece vocabulary trained on
               the data's texts) or from `init`
    captioner  LM on human pairs, text = prompt + caption, prompt tokens not scored; from `init`
    filter     ITC + ITM on human pairs, every caption of an image a positive; from `init`
Captioner and filter start from the same pre-trained MED and are trained separately.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capfilt.errors import CapfiltError
from capfilt.model.config import FINETUNE_IMAGE_SIZE, SIZES, STEMS

TASKS = ("pretrain", "captioner", "filter")
BATCHING = ("random", "similar")  # which pairs meet in a batch: pipelines/train_batches.py
# Which of MEDObjectives' losses each task sums (BLIP: pretrain.py, train_caption.py, train_retrieval.py).
TASK_LOSSES: dict[str, dict[str, bool]] = {
    "pretrain": {"itc": True, "itm": True, "lm": True},
    "captioner": {"itc": False, "itm": False, "lm": True},
    "filter": {"itc": True, "itm": True, "lm": False},
}
# From-scratch pre-training of our small MEDs takes a larger rate than BLIP's 1e-5 fine-tuning of
# ViT-B; fine-tuning a model pre-trained on our small worlds learns well at 1e-4.
DEFAULT_LR = {"pretrain": 3e-4, "captioner": 1e-4, "filter": 1e-4}
# Fine-tuning a BLIP-shaped MED (base, large) takes BLIP's recipe: lr 1e-5 at 384 px (blip.md).
BLIP_FINETUNE_LR = {"base": 1e-5, "large": 1e-5}
# Arguments that must be the same to resume from a saved state (they fix the model, the data order,
# the schedule and the losses). max_steps, checkpoint_every, log_every and the hardware may change.
RESUME_KEYS = (
    "task",
    "data",
    "size",
    "stem",
    "vit_init",
    "init",
    "epochs",
    "steps",
    "batch_size",
    "workers",
    "seed",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr",
    "grad_clip",
    "queue_size",
    "momentum",
    "alpha",
    "image_size",
    "vocab_size",
    "batching",
    "similar_group",
    "hard_negatives_ramp",
    "text_negatives",
)


@dataclass
class TrainConfig:
    task: str  # "pretrain" | "captioner" | "filter"
    data: list[str]  # shard directories, tar files or glob patterns (img2dataset webdataset layout)
    out: str  # run directory: final checkpoint, metrics.jsonl, train_state/ (resume), ray_results/
    size: str = "small"  # named MED size for a from-scratch pretrain (model.config.SIZES)
    stem: str | None = None  # image encoder stem of a from-scratch pretrain; None: "patch" (BLIP's)
    vit_init: str | None = None  # a `train vit` run whose encoder starts a from-scratch pretrain
    init: str | None = None  # checkpoint to start from; required for captioner and filter
    epochs: int = 5
    steps: int | None = None  # a fixed budget of optimiser steps instead of epochs (the data is cycled)
    batch_size: int = 32  # per worker; the global batch is batch_size * max(1, workers)
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR[task] (fine-tuning base/large: 1e-5)
    weight_decay: float = 0.05  # AdamW, on every parameter as BLIP
    warmup_steps: int | None = None  # linear warm-up; None: 5% of the run's steps
    min_lr: float = 1e-6  # the cosine decays to this at the last step
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off (BLIP does not clip)
    checkpoint_every: int = 500  # steps between training states; 0: only at the end
    log_every: int = 10  # steps between metrics lines (the last step is always logged)
    workers: int = 1  # Ray Train workers (DDP); 0: the same loop in this process, without Ray
    use_gpu: bool = False  # one GPU per worker (NCCL); else CPU (gloo)
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker; also the worker's torch threads
    seed: int = 0
    queue_size: int | None = None  # ITC queue; None: up to 8 global batches (BLIP's 57600 is for 14M pairs)
    momentum: float = 0.995  # EMA of the momentum encoders
    alpha: float = 0.4  # ITC distillation weight, ramped up over the first epoch
    # None: the size's resolution; fine-tuning a base or large MED from `init`: 384, as BLIP; else
    # the init checkpoint's own
    image_size: int | None = None
    max_steps: int | None = None  # stop after this many steps (the schedule still spans `epochs`)
    vocab_size: int = 2000  # WordPiece vocabulary of a from-scratch pretrain (smaller corpora give fewer)
    ray_address: str | None = None  # None: Ray's own default (RAY_ADDRESS, else a new local cluster)
    hard_negatives_ramp: int = 0  # steps over which ITM negatives go from uniform to BLIP's draw; 0: BLIP's
    batching: str = "random"  # "random" (BLIP) or "similar": groups of look-alike texts per batch
    similar_group: int = 4  # pairs per group of look-alikes when batching is "similar"
    text_negatives: bool = False  # ITM also sees each text with one confusable token swapped; False: BLIP's
    debug_checks: bool = False  # tests: each rank writes weight and queue checks to out/debug/

    @property
    def world_size(self) -> int:
        return max(1, self.workers)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def resolved(self) -> TrainConfig:
        """A validated copy with defaults filled in (`lr`); CapfiltError names a bad argument."""
        cfg = dataclasses.replace(self, data=[self.data] if isinstance(self.data, str) else list(self.data))
        size = None
        if cfg.task in ("captioner", "filter") and cfg.init is not None and Path(cfg.init).exists():
            from capfilt.model.checkpoint import checkpoint_size  # torch: not when the CLI is built

            size, init_image_size = checkpoint_size(cfg.init)
            if (
                size in BLIP_FINETUNE_LR
                and cfg.image_size is None
                and init_image_size != FINETUNE_IMAGE_SIZE[size]
            ):
                cfg.image_size = FINETUNE_IMAGE_SIZE[size]  # BLIP fine-tunes its 224 px pre-training at 384
        if cfg.lr is None:
            cfg.lr = BLIP_FINETUNE_LR.get(size or "", DEFAULT_LR.get(cfg.task, 1e-4))
        validate(cfg)
        return cfg

    def train_args(self, shards: list[Path]) -> dict[str, Any]:
        """The values of RESUME_KEYS for this run, with data as the resolved shard paths."""
        args = {k: getattr(self, k) for k in RESUME_KEYS}
        args["data"] = [str(p.resolve()) for p in shards]
        args["init"] = str(Path(self.init).resolve()) if self.init else None
        args["vit_init"] = str(Path(self.vit_init).resolve()) if self.vit_init else None
        args["workers"] = self.world_size  # 0 (in-process) and 1 worker train alike
        return args


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise CapfiltError(message)


def validate(cfg: TrainConfig) -> None:
    """Check every argument before any work starts."""
    _need(cfg.task in TASKS, f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    _need(bool(cfg.data), "no training data: pass --data with shard directories, tars or globs")
    _need(bool(cfg.out), "no output directory: pass --out DIR")
    _need(cfg.size in SIZES, f"unknown size {cfg.size!r}; choose one of {', '.join(SIZES)}")
    if cfg.task in ("captioner", "filter"):
        _need(
            cfg.init is not None,
            f"{cfg.task} fine-tuning starts from a pre-trained MED: pass --init CKPT "
            "(the output of `capfilt train pretrain`)",
        )
    if cfg.init is not None:
        _need(Path(cfg.init).exists(), f"init checkpoint not found: {cfg.init}")
        _need(
            cfg.stem is None,
            "--stem shapes a new MED; a run from --init keeps that checkpoint's stem: drop --stem",
        )
        _need(
            cfg.vit_init is None,
            "--vit-init starts a new MED's image encoder; a run from --init keeps that checkpoint's: "
            "drop --vit-init",
        )
    if cfg.vit_init is not None:
        _need(
            cfg.task == "pretrain", f"--vit-init starts a from-scratch pretrain, not {cfg.task} fine-tuning"
        )
        _need(Path(cfg.vit_init).is_dir(), f"--vit-init run not found: {cfg.vit_init}")
    _need(
        cfg.stem is None or cfg.stem in STEMS, f"unknown stem {cfg.stem!r}; choose one of {', '.join(STEMS)}"
    )
    _need(cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}")
    _need(cfg.steps is None or cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}")
    least = 1 if cfg.task == "captioner" else 2  # ITC and ITM need negatives within the batch
    _need(
        cfg.batch_size >= least, f"batch size must be at least {least} for {cfg.task}, got {cfg.batch_size}"
    )
    assert cfg.lr is not None
    _need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, got {cfg.lr}")
    _need(0 <= cfg.min_lr <= cfg.lr, f"min_lr must lie in [0, lr={cfg.lr}], got {cfg.min_lr}")
    _need(cfg.weight_decay >= 0, f"weight decay must not be negative, got {cfg.weight_decay}")
    _need(
        cfg.warmup_steps is None or cfg.warmup_steps >= 0,
        f"warm-up steps must not be negative, got {cfg.warmup_steps}",
    )
    _need(cfg.grad_clip >= 0, f"grad_clip must not be negative (0 turns it off), got {cfg.grad_clip}")
    _need(cfg.checkpoint_every >= 0, f"checkpoint_every must not be negative, got {cfg.checkpoint_every}")
    _need(cfg.log_every >= 1, f"log_every must be at least 1, got {cfg.log_every}")
    _need(cfg.workers >= 0, f"workers must not be negative (0 trains in-process), got {cfg.workers}")
    _need(cfg.cpus_per_worker >= 1, f"cpus_per_worker must be at least 1, got {cfg.cpus_per_worker}")
    _need(0 <= cfg.momentum < 1, f"momentum must lie in [0, 1), got {cfg.momentum}")
    _need(0 <= cfg.alpha <= 1, f"alpha must lie in [0, 1], got {cfg.alpha}")
    _need(cfg.max_steps is None or cfg.max_steps >= 1, f"max_steps must be at least 1, got {cfg.max_steps}")
    _need(
        cfg.hard_negatives_ramp >= 0,
        f"hard_negatives_ramp must not be negative (0 draws BLIP's hard negatives from the start), "
        f"got {cfg.hard_negatives_ramp}",
    )
    _need(cfg.batching in BATCHING, f"unknown batching {cfg.batching!r}; choose one of {', '.join(BATCHING)}")
    if cfg.batching == "similar":
        _need(
            cfg.similar_group >= 2 and cfg.batch_size % cfg.similar_group == 0,
            f"similar batching needs a group of at least 2 that divides the batch size {cfg.batch_size}, "
            f"got {cfg.similar_group}",
        )
    _need(cfg.vocab_size >= 50, f"vocab_size must be at least 50, got {cfg.vocab_size}")
    if cfg.queue_size is not None:
        _need(
            cfg.queue_size > 0 and cfg.queue_size % cfg.global_batch == 0,
            f"queue size must be a positive multiple of the global batch {cfg.global_batch} "
            f"(batch size {cfg.batch_size} x {cfg.world_size} workers), got {cfg.queue_size}",
        )
    _need(cfg.image_size is None or cfg.image_size > 0, f"image size must be positive, got {cfg.image_size}")
    if cfg.image_size is not None and cfg.init is None:
        patch = SIZES[cfg.size](None).vision.patch_size
        _need(
            cfg.image_size > 0 and cfg.image_size % patch == 0,
            f"image size must be a positive multiple of the patch size {patch} of size {cfg.size!r}, "
            f"got {cfg.image_size}",
        )
    if cfg.use_gpu and cfg.workers == 0:  # Ray workers find their GPUs on their own nodes
        import torch

        _need(torch.cuda.is_available(), "--gpu asked for, but torch sees no CUDA device here")


def default_queue_size(global_batch: int, steps_per_epoch: int) -> int:
    """Up to 8 global batches, and at most half an epoch: a queue longer than the data would hold
    stale copies of the very pairs in the batch as negatives."""
    return global_batch * max(1, min(8, steps_per_epoch // 2))


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate of step `step` (from 0): linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
