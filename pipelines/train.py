"""Train a MED: pre-train, or fine-tune the captioner or the filter, on Ray Train or in-process.

    result = train(TrainConfig(task="pretrain", data=["world/web"], out="runs/pre", size="small"))
    train(TrainConfig(task="filter", data=["world/human"], init="runs/pre", out="runs/filter"))

`workers >= 1` runs the loop (`train_loop.run_worker`) on Ray Train's `TorchTrainer`: DDP over
the workers, gloo on CPU, NCCL on GPU. `workers=0` runs the same loop in this process without
Ray: fast to start, for tests and laptops. Either way `out` ends up holding the final checkpoint
(role = task), `metrics.jsonl` and `train_state/` (see `train_state`); rank 0 writes them, so
on a multi-node cluster `out` must be storage every node reaches.

Resume: when `out/train_state` holds a state written with the same arguments (`RESUME_KEYS`),
training continues from the newest one; different arguments raise a CapfiltError naming them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capfilt.data import MAX_WORDS, iter_samples, sample_captions, shard_paths
from capfilt.errors import CapfiltError, forward_to_sigint, signals_interrupt
from capfilt.model.checkpoint import CheckpointError, load_checkpoint, new_checkpoint
from capfilt.model.tokenizer import train_tokenizer
from capfilt.text import pre_caption

from .ray_connect import connect_ray
from .train_config import DEFAULT_LR, RESUME_KEYS, TASK_LOSSES, TASKS, TrainConfig, lr_at
from .train_loop import LoopSpec, ProgressFn, run_worker
from .train_state import (
    METRICS,
    differing,
    list_states,
    make_run_dir,
    read_args,
    read_metrics,
    remove_partial,
    state_step,
    truncate_metrics,
    usable_states,
    write_final,
    write_init,
)
from .train_vit import load_vit_init, vit_stem

__all__ = ["DEFAULT_LR", "TASKS", "TrainConfig", "TrainResult", "lr_at", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Path  # the final MED checkpoint (== out)
    metrics: Path  # out/metrics.jsonl
    steps: int  # steps trained in all, across resumes
    losses: dict[str, float]  # the last logged losses (mean over ranks), "loss" their sum
    wall_s: float  # this call's wall time
    resumed_from: int | None  # the step this call resumed from, if it did


# Arguments whose default (None) depends on the run: naming the value the default took is the same run.
RUN_DEFAULTS = ("stem", "image_size", "warmup_steps", "queue_size")


def _same_default(
    key: str, saved: dict[str, Any], now: dict[str, Any], state: Path, trainer: dict[str, Any]
) -> bool:
    """Whether `key` differs only as a default and the value it took in the saved run (`--stem patch`
    against no `--stem`, `--warmup-steps 12` where 5% of the steps was 12)."""
    if key not in RUN_DEFAULTS or (saved.get(key) is not None and now.get(key) is not None):
        return False
    if key == "stem":
        if saved["task"] != "pretrain" or saved.get("init") is not None:
            return False
        taken: Any = vit_stem(saved["vit_init"]) if saved.get("vit_init") else "patch"
    elif key == "image_size":
        from capfilt.model.checkpoint import checkpoint_size

        taken = checkpoint_size(state)[1]
    elif key == "warmup_steps":
        taken = int(trainer["total_steps"]) // 20
    else:
        taken = trainer.get("queue_size")
    if taken is None:
        return False

    def value(given: Any) -> Any:  # what the run trains with (a queue of 0 is the default too)
        return taken if given is None or (key == "queue_size" and given == 0) else given

    return bool(value(saved.get(key)) == value(now.get(key)))


def train(config: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Train to the end of `config` (or its max_steps), resuming a matching run in `config.out`.

    progress(step, total_steps, losses) is called on the driver after every step (rank 0's losses).
    """
    t0 = time.perf_counter()
    cfg = config.resolved()
    out = Path(cfg.out)
    shards = shard_paths(cfg.data)
    args = cfg.train_args(shards)
    make_run_dir(out)
    remove_partial(out)

    states = usable_states(out)  # the newest whole state: one damaged on disk is set aside
    state = states[-1] if states else None
    resumed_from = None
    if state is not None:
        # States written before an argument existed ran with its default.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        saved = {k: defaults.get(k) for k in RESUME_KEYS} | read_args(state)
        trainer = torch.load(state / "trainer.pt", map_location="cpu", weights_only=True)
        diff = [
            k
            for k in differing(saved, args, RESUME_KEYS)
            if not _same_default(k, saved, args, state, trainer)
        ]
        if diff:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {args.get(k)!r}" for k in diff)
            raise CapfiltError(
                f"{out} holds a training run with other arguments ({details}). Pass the same arguments "
                "to resume it, or choose a new --out to start another run."
            )
        resumed_from = state_step(state)
        target = min(trainer["total_steps"], cfg.max_steps or trainer["total_steps"])
        if resumed_from >= target:
            log.info("%s already finished at step %d; nothing to train", out, resumed_from)
            if not (out / "config.json").is_file():  # killed between its last state and the final copy
                write_final(out, load_checkpoint(state))
            return _result(out, resumed_from, t0, resumed_from)
        truncate_metrics(out, resumed_from)
        start = str(state)
        log.info("resuming %s from step %d", out, resumed_from)
    else:
        if (out / "config.json").is_file():
            raise CapfiltError(f"{out} already holds a checkpoint but no training state; choose a new --out")
        if (out / "vit.json").is_file() or (out / "vit.safetensors").is_file():
            raise CapfiltError(f"{out} holds a `capfilt train vit` run; choose a new --out")
        truncate_metrics(out, 0)
        start = _prepare_start(cfg, shards, out)

    # Workers get absolute paths: a Ray worker's working directory is not the caller's.
    absolute = dataclasses.replace(cfg, data=args["data"], out=str(out.resolve()), init=args["init"])
    threads = cfg.cpus_per_worker if cfg.workers > 0 else None
    spec = LoopSpec(
        absolute, str(Path(start).resolve()), str(state.resolve()) if state else None, args, threads
    )
    if cfg.workers == 0:
        device = torch.device("cuda" if cfg.use_gpu else "cpu")
        try:
            with signals_interrupt():  # SIGTERM and SIGHUP stop it as Ctrl-C does
                steps = run_worker(spec, device, progress)
        except KeyboardInterrupt as err:
            raise KeyboardInterrupt(_interrupted(cfg)) from err
    else:
        steps = _run_ray(spec, progress)
    return _result(out, steps, t0, resumed_from)


def _result(out: Path, steps: int, t0: float, resumed_from: int | None) -> TrainResult:
    rows = read_metrics(out)
    losses = {k: v for k, v in rows[-1].items() if k.endswith("loss")} if rows else {}
    return TrainResult(out, out / METRICS, steps, losses, time.perf_counter() - t0, resumed_from)


def _prepare_start(cfg: TrainConfig, shards: list[Path], out: Path) -> str:
    """Check the data holds a global batch; return the checkpoint training starts from: `init`,
    or (from-scratch pretrain) a new MED with a WordPiece vocabulary trained on the data's texts."""
    texts = [pre_caption(c, MAX_WORDS) for s in iter_samples(shards) for c in sample_captions(s)]
    if not texts:
        raise CapfiltError(
            f"{', '.join(cfg.data)} hold no image-text pairs: each sample needs an image member and a text "
            "(.txt, or a caption in its .json); check the paths name img2dataset webdataset shards"
        )
    empty = sum(1 for t in texts if not t)
    if empty == len(texts):
        raise CapfiltError(
            f"{', '.join(cfg.data)}: every one of the {len(texts)} texts is empty after BLIP's caption "
            "cleaning (lower case, punctuation removed): there is nothing to learn; check the .txt "
            "members or the .json captions"
        )
    if empty * 2 > len(texts):
        log.warning(
            "%d of the %d texts in %s are empty after BLIP's caption cleaning; the model learns from them as they are",
            empty,
            len(texts),
            ", ".join(cfg.data),
        )
    if len(texts) < cfg.global_batch:
        raise CapfiltError(
            f"{', '.join(cfg.data)} hold {len(texts)} pairs, fewer than one global batch of "
            f"{cfg.global_batch}: lower --batch-size or --workers"
        )
    if cfg.init is not None:
        try:
            ckpt = load_checkpoint(cfg.init, image_size=cfg.image_size)
        except CheckpointError as err:
            raise CapfiltError(str(err)) from err
        needs = TASK_LOSSES[cfg.task]
        if (needs["itc"] or needs["itm"]) and not ckpt.config.has_encoder:
            raise CapfiltError(f"{cfg.init} has no text encoder; {cfg.task} training needs one (ITC/ITM)")
        if needs["lm"] and not ckpt.config.has_decoder:
            raise CapfiltError(f"{cfg.init} has no text decoder; {cfg.task} training needs one (LM)")
        return str(cfg.init)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    stem = cfg.stem or (vit_stem(cfg.vit_init) if cfg.vit_init else "patch")
    provenance = {"vit_init": str(Path(cfg.vit_init).resolve())} if cfg.vit_init else None
    ckpt = new_checkpoint(
        cfg.size, tokenizer, role="pretrain", image_size=cfg.image_size, provenance=provenance, stem=stem
    )
    if cfg.vit_init:  # BLIP's ViT starts from ImageNet; ours from a `train vit` run
        ckpt.med.visual_encoder.load_state_dict(load_vit_init(cfg.vit_init, ckpt.config.vision))
    log.info(
        "new %s MED%s, vocabulary of %d trained on %d texts",
        cfg.size,
        f" with the image encoder of {cfg.vit_init}" if cfg.vit_init else "",
        tokenizer.ids.vocab_size,
        len(texts),
    )
    return str(write_init(out, ckpt))


# ----------------------------------------------------------------------------- Ray Train


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the TorchTrainer: Ray has set up the process group already."""
    import ray.train
    import ray.train.torch

    spec: LoopSpec = loop_config["spec"]
    queue = loop_config["queue"]
    progress: ProgressFn | None = None
    if queue is not None and ray.train.get_context().get_world_rank() == 0:

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            queue.put_nowait((step, total, losses))

    steps = run_worker(spec, ray.train.torch.get_device(), progress)
    ray.train.report({"steps": steps})


def _check_resources(cfg: TrainConfig, total: dict[str, float]) -> None:
    """CapfiltError when the cluster cannot place the workers at all (Ray would wait for ever)."""
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpus = cfg.workers * cfg.cpus_per_worker
    if need_cpus > cpus:
        raise CapfiltError(
            f"--workers {cfg.workers} x --cpus-per-worker {cfg.cpus_per_worker} need {need_cpus} CPUs; this "
            f"Ray cluster has {cpus:g}: lower them, or pass --ray-address of a larger cluster"
        )
    if cfg.use_gpu and cfg.workers > gpus:
        raise CapfiltError(
            f"--workers {cfg.workers} with --gpu need {cfg.workers} GPUs; this Ray cluster has {gpus:g}"
        )


def _user_error(err: BaseException) -> CapfiltError | None:
    """The CapfiltError a Ray worker raised, found through Ray's wrappers (causes, contexts and
    the errors they carry), or None when the failure is not a user's mistake."""
    seen: set[int] = set()
    todo: list[object] = [err]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, CapfiltError) and type(item).__module__.startswith("capfilt"):
            return CapfiltError(str(item))  # ours, not a Ray wrapper that inherits from it
        todo += [item.__cause__, item.__context__, getattr(item, "cause", None), getattr(item, "error", None)]
        for value in vars(item).values() if hasattr(item, "__dict__") else ():
            if isinstance(value, dict):
                todo += list(value.values())
            elif isinstance(value, (list, tuple)):
                todo += list(value)
    match = re.search(r"CapfiltError: (.+)", str(err))  # a wrapper that kept only the text
    return CapfiltError(match.group(1).strip()) if match else None


def _run_ray(spec: LoopSpec, progress: ProgressFn | None) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    cfg = spec.config
    started = not ray.is_initialized()
    if started:  # address None: Ray's default, RAY_ADDRESS or else a new local cluster
        connect_ray(cfg.ray_address)
    if started and cfg.ray_address is None and not os.environ.get("RAY_ADDRESS"):  # this machine alone
        try:
            _check_resources(cfg, ray.cluster_resources())
        except CapfiltError:
            ray.shutdown()
            raise
    # (A Ray Queue is falsy while empty: always compare it with None.)
    queue = Queue(actor_options={"num_cpus": 0}) if progress is not None else None
    done = threading.Event()

    def relay() -> None:  # Ray queue -> progress callback, on the driver
        assert queue is not None and progress is not None
        while True:
            try:
                progress(*queue.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return

    relay_thread = threading.Thread(target=relay, daemon=True) if queue is not None else None
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    interrupted = threading.Event()

    class Trainer(TorchTrainer):  # type: ignore[misc, valid-type]
        """Ray's trainer, whose Ctrl-C handler (it aborts the run, then exits 1 with no word) first
        notes the interrupt, so that the user hears what happened and how to go on."""

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            rays = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                interrupted.set()
                if callable(rays):
                    rays(signum, frame)

            signal.signal(signal.SIGINT, handler)

    trainer = (Trainer if hasattr(TorchTrainer, "_register_sigint_handler") else TorchTrainer)(
        _ray_worker,
        train_loop_config={"spec": spec, "queue": queue},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            storage_path=str((Path(cfg.out) / "ray_results").resolve()),
            name=f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}",
        ),
    )
    sigint = signal.getsignal(signal.SIGINT)  # Ray's handler must not outlive the run
    # SIGTERM and SIGHUP (a scheduler, `ray job stop`, a closed terminal) go the way of Ctrl-C:
    # Ray's own SIGTERM handler aborted the driver (exit 134, no word) and the workers trained on.
    others = forward_to_sigint()
    try:
        if relay_thread is not None:
            relay_thread.start()
        trainer.fit()
    except BaseException as err:
        if interrupted.is_set():
            raise KeyboardInterrupt(_interrupted(cfg)) from err
        if not isinstance(err, Exception):
            raise
        user = _user_error(err)  # Ray wraps a worker's CapfiltError: the user's mistake, not a crash
        if user is not None:
            raise user from err
        raise RuntimeError(f"training on Ray failed: {err}") from err
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
            for sig, handler in others.items():
                signal.signal(sig, handler)
        done.set()
        if relay_thread is not None:
            relay_thread.join()
        if queue is not None:
            queue.shutdown()
        if started:
            ray.shutdown()
    if interrupted.is_set():  # Ray's abort can also end the run without an error
        raise KeyboardInterrupt(_interrupted(cfg))
    states = list_states(Path(cfg.out))
    return state_step(states[-1]) if states else 0


def _interrupted(cfg: TrainConfig) -> str:
    states = list_states(Path(cfg.out))
    where = f"its last saved state is step {state_step(states[-1])}" if states else "no state was saved yet"
    return (
        f"training interrupted; {where} in {cfg.out} (one every --checkpoint-every steps): "
        "run the same command again to resume from it"
    )
