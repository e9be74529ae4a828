"""The training loop one worker runs: in this process (`workers=0`) or on each Ray Train worker.

Every rank builds the same MED from the same start checkpoint, reads the same in-memory dataset
and takes its own slice of each global batch (`EpochBatches`); DDP averages the gradients, so
the weights stay identical, and `MEDObjectives` gathers every rank's momentum features into the
ITC queues, so the queues stay identical too. Rank 0 alone writes metrics and checkpoints.

Determinism, which makes a resumed run equal an uninterrupted one: the data order of epoch e is
a permutation seeded by (seed, e); the loop resumes mid-epoch by skipping batches; the learning
rate and ITC alpha are functions of the step; each rank's torch RNG (ITM's hard negatives) is
saved with the state and restored.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn

from capfilt.errors import CapfiltError
from capfilt.model.checkpoint import Checkpoint, load_checkpoint
from capfilt.model.losses import MEDObjectives, alpha_ramp, hardness_ramp
from capfilt.model.med import MED
from capfilt.pairs import Collator, PairDataset

from .train_batches import confusable_tokens, random_order, similar_order, text_features
from .train_config import TASK_LOSSES, TrainConfig, default_queue_size, lr_at
from .train_debug import DebugChecks
from .train_state import METRICS, read_state, write_final, write_state

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total steps, losses)


@dataclass
class LoopSpec:
    """Everything a worker needs; picklable, so Ray ships it to the workers."""

    config: TrainConfig  # resolved
    start: str  # checkpoint the MED (and tokenizer) is built from: init, scratch init or a state
    state: str | None  # training state to resume from (then `start` is that state's checkpoint)
    train_args: dict[str, Any]  # written into every state, compared when resuming
    threads: int | None = None  # torch threads of this worker; None leaves torch's default


class EpochBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's batches of one epoch.

    A permutation of all pairs (random, or grouped by similar texts: `train_batches`), seeded by
    (seed, epoch), is cut into global batches (an incomplete last one dropped, so every step has the
    same global batch and the ITC queue stays aligned); rank r takes the r-th slice of each, and
    every rank computes the same permutation. Batches before `start` are skipped (resume mid-epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        epoch: int,
        start: int = 0,
        order: Callable[[torch.Generator], list[int]] | None = None,
        image_ids: Sequence[int] | None = None,
    ) -> None:
        """order: the epoch's permutation from the epoch's generator (`train_batches`); None: random.
        image_ids (the filter's fine-tuning, several captions an image): every rank's batch gets
        two images at least, which ITM's negatives need (see `two_images_a_batch`)."""
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start
        self.order = order or (lambda g: random_order(n, g))
        self.image_ids = image_ids
        self.steps = n // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self.order(g)
        if self.image_ids is not None:
            order = two_images_a_batch(order, self.image_ids, self.batch_size)
        global_batch = self.batch_size * self.world
        for k in range(self.start, self.steps):
            first = k * global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


def two_images_a_batch(order: list[int], image_ids: Sequence[int], batch_size: int) -> list[int]:
    """`order` with every run of `batch_size` pairs (a rank's batch) holding two images at least:
    a batch of one image's captions gets its last pair swapped with the next later pair of another
    image. Batches that already hold two images are left as they are, so only an order that would
    have stopped the run changes; every rank computes the same. (A random batch of 4 pairs over
    images of 5 captions was one image's now and then: "ITM needs at least two different images".)"""
    order = list(order)
    for first in range(0, len(order) - batch_size + 1, batch_size):
        last = first + batch_size - 1
        image = image_ids[order[first]]
        if batch_size < 2 or any(image_ids[i] != image for i in order[first + 1 : last + 1]):
            continue
        other = next((j for j in range(last + 1, len(order)) if image_ids[order[j]] != image), None)
        if other is None:  # the epoch's last batches: a pair from an earlier batch that keeps two images
            other = next(
                (j for j in range(first) if _keeps_two(order, image_ids, batch_size, j, image)), None
            )
        if other is not None:  # none: every pair is of this image, and nothing can help
            order[last], order[other] = order[other], order[last]
    return order


def _keeps_two(order: list[int], image_ids: Sequence[int], batch_size: int, j: int, image: int) -> bool:
    """Whether the pair at `j` is of another image than `image`, and its batch, given a pair of
    `image` in its place, still holds two images."""
    if image_ids[order[j]] == image:
        return False
    start = j - j % batch_size
    rest = {image_ids[order[i]] for i in range(start, start + batch_size) if i != j}
    return len(rest | {image}) >= 2


def set_trainable(med: MED, task: str) -> list[str]:
    """Freeze the branches `task` does not use, so DDP needs no unused-parameter search; returns
    the frozen names. Filter: the decoder's causal self-attention and the LM head's own layers
    (its weight is the word embedding, used by the encoder). Captioner: the encoder's
    self-attention, the ITC projections and the ITM head."""
    frozen = []
    for name, p in med.named_parameters():  # a tied weight is listed once, under its first name
        if task == "filter":
            used = ".causal_attention." not in name and not name.startswith("lm_head.")
        elif task == "captioner":
            used = ".attention." not in name and not name.startswith(
                ("vision_proj.", "text_proj.", "itm_head.")
            )
        else:
            used = True
        p.requires_grad_(used)
        if not used:
            frozen.append(name)
    return frozen


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_rng_states(device: torch.device, world: int) -> list[dict[str, Tensor]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    mine = _rng_state(device)
    if world == 1:
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
    return states


def _ddp(objectives: MEDObjectives, device: torch.device) -> nn.Module:
    """Wrap for DDP. The queues (buffers) stay equal through the all-gather in MEDObjectives, so
    they are not broadcast every step (`forward_sync_buffers`, `broadcast_buffers` before torch 2.14)."""
    ddp = nn.parallel.DistributedDataParallel
    ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(objectives, device_ids=ids, forward_sync_buffers=False)
    return ddp(objectives, device_ids=ids, broadcast_buffers=False)


def run_worker(spec: LoopSpec, device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> int:
    """Train from `spec` to its last step on this rank; returns the step reached."""
    return _Worker(spec, torch.device(device), progress).run()


@dataclass
class Schedule:
    """Step counts of a run, fixed by the data size and the global batch."""

    steps_per_epoch: int
    total: int  # epochs * steps_per_epoch: the span of the cosine schedule
    target: int  # where this call stops: total, or max_steps if smaller
    warmup: int
    queue_size: int


def diverged(step: int, what: str, grad_clip: float) -> CapfiltError:
    """The error a run stops with at its first loss that is not finite (before that step changes a
    weight or saves one): a NaN checkpoint would only fail later, where it is used."""
    remedy = "a lower --lr" + ("" if grad_clip > 0 else ", or --grad-clip 1.0")
    return CapfiltError(
        f"training diverged at step {step}: {what} is not finite. Nothing of that step was saved; the run "
        f"directory keeps its last checkpoint (rerunning resumes from it with the same arguments). Start "
        f"again with {remedy}"
    )


class _Worker:
    """One rank's run: set up from a start checkpoint (or a state), then step, log and save."""

    def __init__(self, spec: LoopSpec, device: torch.device, progress: ProgressFn | None) -> None:
        cfg = self.cfg = spec.config
        if device.type == "cuda" and device.index is None:  # "cuda": the current device, by number
            device = torch.device("cuda", torch.cuda.current_device())
        self.spec, self.device, self.progress = spec, device, progress
        self.rank, self.world = _dist()
        self.out = Path(cfg.out)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) use the current device
        self.ckpt = load_checkpoint(
            spec.start, image_size=None if spec.state else cfg.image_size, device=device
        )
        med = self.ckpt.med.train()
        frozen = set_trainable(med, cfg.task)
        log.info("rank %d/%d: %s, %d parameter tensors frozen", self.rank, self.world, cfg.task, len(frozen))
        mc = med.config
        prompt = mc.prompt if cfg.task == "captioner" else ""
        self.dataset = PairDataset(
            cfg.data, image_size=mc.vision.image_size, mean=mc.image_mean, std=mc.image_std, prompt=prompt
        )
        self.collate = Collator(self.ckpt.tokenizer, mc.max_text_tokens)
        self.order: Callable[[torch.Generator], list[int]] | None = None
        if cfg.batching == "similar":
            features = text_features(self.dataset.texts)
            image_ids, group = self.dataset.image_ids, cfg.similar_group
            self.order = lambda g: similar_order(features, image_ids, group, g)
        self.schedule = s = self._schedule(len(self.dataset))
        torch.manual_seed(cfg.seed)  # the random initial ITC queues: the same on every rank and run
        self.objectives = MEDObjectives(
            med,
            **TASK_LOSSES[cfg.task],
            queue_size=s.queue_size,
            momentum=cfg.momentum,
            prompt_length=len(self.ckpt.tokenizer.prompt_ids(prompt)) if cfg.task == "captioner" else 0,
        ).to(device)
        if cfg.text_negatives and self.objectives.itm:
            self.objectives.token_swaps = self._token_swaps().to(device)
        self.params = [p for p in self.objectives.parameters() if p.requires_grad]
        assert cfg.lr is not None
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step, self.wall_before = 0, 0.0
        if spec.state:
            self._load_state(Path(spec.state))
        else:
            torch.manual_seed(cfg.seed + self.rank)  # ranks draw different hard negatives
        self.model: nn.Module = _ddp(self.objectives, device) if self.world > 1 else self.objectives
        self.debug = DebugChecks(self.objectives, self.rank, self.world) if cfg.debug_checks else None
        self.t0 = self.t_log = time.perf_counter()
        self.step_log = self.step

    def _token_swaps(self) -> Tensor:
        """Confusable tokens of this run's captions, tokenised as the collator does (no specials)."""
        tok = self.ckpt.tokenizer
        ids = tok.hf(list(self.dataset.texts), add_special_tokens=False)["input_ids"]
        special = [tok.hf.convert_tokens_to_ids(t) for t in tok.hf.all_special_tokens]
        swaps = confusable_tokens(
            ids, self.ckpt.config.text.vocab_size, special, image_ids=self.dataset.image_ids
        )
        log.info("text negatives: %d tokens have confusable ones", int((swaps[:, 0] >= 0).sum()))
        return swaps

    def _schedule(self, pairs: int) -> Schedule:
        cfg = self.cfg
        per_epoch = pairs // cfg.global_batch
        if per_epoch < 1:
            raise CapfiltError(
                f"{pairs} usable pairs are fewer than one global batch of {cfg.global_batch}: "
                "lower --batch-size or --workers"
            )
        total = cfg.steps or cfg.epochs * per_epoch
        return Schedule(
            steps_per_epoch=per_epoch,
            total=total,
            target=min(total, cfg.max_steps) if cfg.max_steps else total,
            warmup=cfg.warmup_steps if cfg.warmup_steps is not None else total // 20,
            queue_size=cfg.queue_size or default_queue_size(cfg.global_batch, per_epoch),
        )

    def _load_state(self, path: Path) -> None:
        trainer, objectives_state = read_state(path)
        missing, unexpected = self.objectives.load_state_dict(objectives_state, strict=False)
        missing = [k for k in missing if not k.startswith("med.")]  # the MED came from the checkpoint
        assert not missing and not unexpected, f"training state mismatch: {missing} {unexpected}"
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.step, self.wall_before = int(trainer["step"]), float(trainer["wall_s"])
        _set_rng_state(trainer["rng"][self.rank], self.device)  # workers is a resume key
        log.info("resumed from %s at step %d", path, self.step)

    def run(self) -> int:
        cfg, s = self.cfg, self.schedule
        metrics = (self.out / METRICS).open("a") if self.rank == 0 else None
        if self.progress:
            self.progress(self.step, s.target, {})
        try:
            while self.step < s.target:
                epoch = self.step // s.steps_per_epoch
                sampler = EpochBatches(
                    len(self.dataset),
                    cfg.batch_size,
                    self.rank,
                    self.world,
                    cfg.seed,
                    epoch,
                    start=self.step % s.steps_per_epoch,
                    order=self.order,
                    image_ids=self.dataset.image_ids if cfg.task == "filter" else None,
                )
                # Its own generator: iter() of a DataLoader draws a seed from the global RNG, which
                # a run resumed mid-epoch would draw once more than an uninterrupted one (the hard
                # negatives drawn after it would differ). The batches come from `sampler` alone.
                loader = torch.utils.data.DataLoader(
                    self.dataset,
                    batch_sampler=sampler,
                    collate_fn=self.collate,
                    generator=torch.Generator().manual_seed(0),
                )
                for batch in loader:
                    losses = self._train_step({k: v.to(self.device) for k, v in batch.items()})
                    if self.step % cfg.log_every == 0 or self.step == s.target:
                        self._log(losses, epoch, metrics)
                    if (
                        cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    ) or self.step == s.target:
                        self._save(epoch)
                    if self.step >= s.target:
                        break
        finally:
            if metrics:
                metrics.close()
        if self.debug:
            self.debug.write(self.out, self.step)
        return self.step

    def _train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One optimisation step on this rank's batch -> its losses (detached) and "loss", their sum."""
        cfg, s = self.cfg, self.schedule
        self.lr = lr_at(self.step, s.total, s.warmup, cfg.lr or 0.0, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.alpha = alpha_ramp(self.step, s.steps_per_epoch, cfg.alpha, 2 if cfg.task == "pretrain" else 1)
        self.hardness = hardness_ramp(self.step, cfg.hard_negatives_ramp)
        if self.debug:
            self.debug.before()
        try:
            losses = self.model(
                batch["pixels"],
                batch["input_ids"],
                batch["attention_mask"],
                alpha=self.alpha,
                hardness=self.hardness,
                image_ids=batch["image_ids"] if cfg.task == "filter" else None,
            )
        except FloatingPointError as err:  # the hard negatives' similarities were already NaN
            raise diverged(self.step + 1, str(err), cfg.grad_clip) from None
        loss = torch.stack(list(losses.values())).sum()
        if not bool(torch.isfinite(loss)):  # nothing of this step is applied or saved
            bad = ", ".join(
                f"{k} {float(v.detach())}" for k, v in losses.items() if not bool(torch.isfinite(v))
            )
            raise diverged(self.step + 1, bad, cfg.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.debug:
            self.debug.after(self.step, batch)
        out = {k: v.detach() for k, v in losses.items()} | {"loss": loss.detach()}
        if self.progress:
            self.progress(self.step, s.target, {k: float(v) for k, v in out.items()})
        return out

    def _log(self, losses: dict[str, Tensor], epoch: int, metrics: TextIO | None) -> None:
        """Append a metrics line (losses averaged over ranks: a collective, every rank calls it)."""
        names = list(losses)
        mean = torch.stack([losses[k] for k in names]).float()
        if self.world > 1:
            dist.all_reduce(mean)
            mean /= self.world
        now = time.perf_counter()
        if metrics:
            row = {
                "step": self.step,
                "epoch": epoch,
                "lr": self.lr,
                "alpha": self.alpha if self.objectives.itc else None,
                "hardness": self.hardness if self.objectives.itm else None,
                **{k: round(float(v), 6) for k, v in zip(names, mean)},
                "examples_per_s": round(
                    (self.step - self.step_log) * self.cfg.global_batch / (now - self.t_log), 3
                ),
                "wall_s": round(self.wall_before + now - self.t0, 3),
            }
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        self.t_log, self.step_log = now, self.step

    def _save(self, epoch: int) -> None:
        """Write the training state (rank 0; every rank sends its RNG state), and at the last step
        the final checkpoint."""
        rng = _all_rng_states(self.device, self.world)
        if self.rank != 0:
            return
        cfg, s = self.cfg, self.schedule
        trainer = {
            "step": self.step,
            "epoch": epoch,
            "total_steps": s.total,
            "steps_per_epoch": s.steps_per_epoch,
            "queue_size": s.queue_size,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "wall_s": self.wall_before + time.perf_counter() - self.t0,
        }
        state = {k: v for k, v in self.objectives.state_dict().items() if not k.startswith("med.")}
        trained = {
            "task": cfg.task,
            "data": self.spec.train_args["data"],
            "init": cfg.init,
            "vit_init": cfg.vit_init,
            "size": cfg.size,
            "epochs": cfg.epochs,
            "global_batch": cfg.global_batch,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "steps": self.step,
        }
        saved = Checkpoint(self.objectives.med, self.ckpt.tokenizer, cfg.task, {"trained": trained})
        write_state(self.out, self.step, saved, state, trainer, self.spec.train_args)
        if self.step == s.target:
            write_final(self.out, saved)
