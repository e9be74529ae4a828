"""`capfilt train pretrain|captioner|filter|vit`: the command line of `pipelines.train` (and of
`pipelines.train_vit` for vit).

capfilt/cli.py wires it in with `add_train_parser(sub)` and prints what `run_train` returns.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

from capfilt.model.config import STEMS

from .train_config import BATCHING, TASKS, TrainConfig

T = TypeVar("T")
ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total, losses)


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `train` command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "train",
        help="pre-train a MED, or fine-tune the captioner (LM) or the filter (ITC+ITM), on Ray Train",
        description=(
            "Train on img2dataset webdataset shards. Resumes from OUT/train_state when run again with the "
            "same arguments. Metrics go to OUT/metrics.jsonl, the final checkpoint to OUT."
        ),
    )
    p.add_argument(
        "task",
        choices=(*TASKS, "vit"),
        help="pretrain: ITC+ITM+LM; captioner: LM with prompt; filter: ITC+ITM; vit: the image encoder "
        "alone on labelled images (BLIP's ImageNet init), for pretrain --vit-init",
    )
    p.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help="shard directories, tars or globs"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoint, metrics, state)")
    p.add_argument(
        "--size",
        default=None,
        help="MED size of a from-scratch pretrain (default: small); a run from --init keeps that checkpoint's",
    )
    p.add_argument(
        "--stem",
        choices=STEMS,
        default=None,
        help="image encoder stem of a from-scratch pretrain: patch (BLIP's linear patch embedding) or "
        "conv (3x3 convolutions, which learn object shape sooner on small data; cannot be exported to "
        "transformers); a fine-tuning keeps its --init's (default: patch)",
    )
    p.add_argument(
        "--vit-init",
        metavar="DIR",
        default=None,
        help="a `capfilt train vit` run whose image encoder starts a from-scratch pretrain (its stem too)",
    )
    p.add_argument(
        "--init",
        metavar="CKPT",
        default=None,
        help="checkpoint to start from (required for captioner, filter)",
    )
    p.add_argument("--epochs", type=int, default=5, help="passes over the data (default: 5)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a fixed budget of optimiser steps instead of --epochs (the data is cycled)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pairs (vit: images) per worker and step (default: 32; vit: 64)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 3e-4 pretrain; fine-tuning 1e-5 for base and large, else 1e-4)",
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of steps)"
    )
    p.add_argument(
        "--min-lr",
        type=float,
        default=None,
        help="end of the cosine decay (default: 1e-6; vit: none, the rate stays at its peak)",
    )
    p.add_argument(
        "--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (default: 1.0)"
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=500, help="steps between resumable states (default: 500)"
    )
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics lines (default: 10)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray Train workers (DDP); 0 trains in this process (default: 1)",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        choices=[0, 1],
        default=0,
        help="GPUs per worker: 1 trains on GPUs with NCCL, 0 on CPUs with gloo (default: 0)",
    )
    p.add_argument("--gpu", dest="num_gpus", action="store_const", const=1, help="same as --num-gpus 1")
    p.add_argument(
        "--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker (default: 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (`train vit`: use --steps)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training resolution (default: the model's; 384 when fine-tuning base or large)",
    )
    p.add_argument("--queue-size", type=int, default=None, help="ITC queue length (default: up to 8 batches)")
    p.add_argument(
        "--vocab-size", type=int, default=2000, help="WordPiece vocabulary, from scratch (default: 2000)"
    )
    p.add_argument(
        "--hard-negatives-ramp",
        type=int,
        default=0,
        metavar="STEPS",
        help="steps over which ITM's negatives go from uniform draws to BLIP's similarity-ranked "
        "ones; 0: BLIP's from the start (default: 0)",
    )
    p.add_argument(
        "--text-negatives",
        action="store_true",
        help="ITM also learns from each text with one token swapped for a confusable one (learnt from "
        "the captions' contexts), against its own image; off: BLIP's in-batch negatives only",
    )
    p.add_argument(
        "--batching",
        choices=BATCHING,
        default="random",
        help="which pairs meet in a batch: random (BLIP), or groups of look-alike texts, which give "
        "ITC and ITM hard negatives (default: random)",
    )
    p.add_argument(
        "--similar-group",
        type=int,
        default=4,
        help="pairs per group of look-alike texts with --batching similar (default: 4)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    p.set_defaults(train_defaults={dest: p.get_default(dest) for dest in _NOT_FOR_VIT})
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.size is not None and args.init is not None:
        from pathlib import Path

        from capfilt.errors import CapfiltError
        from capfilt.model.checkpoint import checkpoint_size

        init_size = checkpoint_size(args.init)[0] if Path(args.init).exists() else None
        if init_size != args.size:
            raise CapfiltError(
                f"--size {args.size}: a run from --init keeps that checkpoint's size"
                f"{f' ({init_size})' if init_size else ''}: drop --size"
            )
    return TrainConfig(
        task=args.task,
        data=list(args.data),
        out=args.out,
        size=args.size or "small",
        stem=args.stem,
        vit_init=args.vit_init,
        init=args.init,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=32 if args.batch_size is None else args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_lr=1e-6 if args.min_lr is None else args.min_lr,
        grad_clip=args.grad_clip,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        workers=args.workers,
        use_gpu=args.num_gpus > 0,
        cpus_per_worker=args.cpus_per_worker,
        seed=args.seed,
        max_steps=args.max_steps,
        image_size=args.image_size,
        queue_size=args.queue_size,
        vocab_size=args.vocab_size,
        batching=args.batching,
        hard_negatives_ramp=args.hard_negatives_ramp,
        text_negatives=args.text_negatives,
        similar_group=args.similar_group,
        ray_address=args.ray_address,
    )


def _with_loss_bar(label: str, run: Callable[[ProgressFn], T]) -> T:
    """`run(progress)` under a transient bar on stderr of the steps and the latest losses."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from capfilt.progress import progress_bar

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
    )
    with progress_bar(*columns) as bar:
        task = bar.add_task(f"train {label}", total=None, losses="starting")

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            shown = " ".join(f"{k.removesuffix('_loss')}={v:.3f}" for k, v in losses.items())
            bar.update(task, completed=step, total=total, losses=shown or "starting")

        return run(progress)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train with a progress bar of the losses on stderr; returns the summary the CLI prints."""
    from .train import train

    if args.task == "vit":
        return _run_train_vit(args)
    config = config_from_args(args)
    result = _with_loss_bar(config.task, lambda progress: train(config, progress))
    summary = {
        "task": config.task,
        "checkpoint": str(result.checkpoint),
        "metrics": str(result.metrics),
        "steps": result.steps,
        "losses": result.losses,
        "wall_s": round(result.wall_s, 3),
        "resumed_from": result.resumed_from,
    }
    return summary


# Options of `train` that shape a MED run and mean nothing to `train vit`: refused rather than ignored.
_NOT_FOR_VIT = (
    "init",
    "vit_init",
    "max_steps",
    "queue_size",
    "text_negatives",
    "ray_address",
    "epochs",
    "workers",
    "cpus_per_worker",
    "vocab_size",
    "hard_negatives_ramp",
    "batching",
    "similar_group",
)


def _run_train_vit(args: argparse.Namespace) -> dict[str, Any]:
    """`capfilt train vit`: in this process (one device), a progress bar of the loss on stderr."""

    from capfilt.errors import CapfiltError

    from .train_vit import VitTrainConfig, train_vit

    defaults = getattr(args, "train_defaults", {})
    given = [f"--{k.replace('_', '-')}" for k in _NOT_FOR_VIT if getattr(args, k) != defaults.get(k)]
    if given:
        raise CapfiltError(f"`train vit` takes no {', '.join(given)}: it trains the image encoder alone")
    config = VitTrainConfig(
        data=list(args.data),
        out=args.out,
        size=args.size or "small",
        stem=args.stem or "patch",
        image_size=args.image_size,
        steps=2000 if args.steps is None else args.steps,
        batch_size=64 if args.batch_size is None else args.batch_size,
        lr=1e-3 if args.lr is None else args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_steps=50 if args.warmup_steps is None else args.warmup_steps,
        grad_clip=args.grad_clip,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        use_gpu=args.num_gpus > 0,
        seed=args.seed,
    )
    result = _with_loss_bar("vit", lambda progress: train_vit(config, progress))
    return {
        "task": "vit",
        "out": str(result.out),
        "steps": result.steps,
        "labels": len(result.labels),
        "held_out_accuracy": result.held_out_accuracy,
        "wall_s": round(result.wall_s, 3),
    }
