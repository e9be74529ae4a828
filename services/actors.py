"""The Ray actors that host the captioner and the filter for the REST service, and the router.

Each actor loads one checkpoint into the same `Captioner` / `Filter` class the cleaning job's actor
pools use and answers through a `MicroBatcher`: requests that arrive together share one forward
pass. Within a batch, requests that cannot share one (other generation settings, raw vs cleaned
texts, another threshold) are grouped, one forward pass per group.

Images travel as the cleaning job's decode stage hands them to its model stages: the decoded RGB
image resized (bicubic) to the model's square input, raw uint8 bytes. The API process decodes and
resizes; the actor only rebuilds the PIL image, so what the model sees equals the job's.

`ModelPool` is the router: `replicas` actors per model, each request to the one with the fewest
requests in flight.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capfilt.curate import Curated, score_and_decide
from capfilt.decision import Rule
from capfilt.errors import CapfiltError
from capfilt.model.generate import GenerationConfig

from .batching import MicroBatcher
from .config import ServeConfig
from .errors import ServiceUnavailable

log = logging.getLogger(__name__)

CAPTIONER, FILTER = "captioner", "filter"
TEXTS_PER_IMAGE = 4  # what a filter forward pass is sized for: the web text and a few candidates


class ModelRefused(CapfiltError):
    """The model refused a request's settings (what pydantic could not see): a client error."""


class ModelUnavailable(ServiceUnavailable):
    """No replica could answer (not started yet, or died): the server's problem, a 503."""


class ModelBusy(ServiceUnavailable):
    """Every replica of a model already holds `--max-queue` requests: a 503 that says to come back
    soon, rather than a queue that grows until every client times out."""

    reason = "overloaded"
    retry_after_s = 1


@dataclass(frozen=True)
class ModelInfo:
    role: str  # CAPTIONER or FILTER
    digest: str  # "sha256:...": the checkpoint's, as ledgers name it
    image_size: int  # the square input the model takes
    max_tokens: int  # captioner: the most caption tokens its positions allow (0 for a filter)


# Work items: one request's share of a forward pass. `group` says which items can share one.


@dataclass(frozen=True)
class CaptionItem:
    pixels: bytes  # (S, S, 3) uint8
    generation: GenerationConfig
    seed: int  # this image's sampling seed

    @property
    def group(self) -> tuple[Any, ...]:
        return ("caption", *dataclasses.astuple(dataclasses.replace(self.generation, seed=0)))


@dataclass(frozen=True)
class ScoreItem:
    pixels: bytes
    texts: tuple[str, ...]
    clean_text: bool  # BLIP's caption cleaning, as `capfilt score` does unless --raw-text

    @property
    def group(self) -> tuple[Any, ...]:
        return ("score", self.clean_text)


@dataclass(frozen=True)
class DecideItem:
    """Score a web text and synthetic candidates and apply the decision rule, as the job's filter stage."""

    pixels: bytes
    key: str
    web_text: str | None
    synthetic: tuple[str, ...]
    threshold: float

    @property
    def group(self) -> tuple[Any, ...]:
        return ("decide", self.threshold)


@dataclass
class ForwardStats:
    """Forward passes by batch size (requests per pass) and the time they took."""

    sizes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.seconds += seconds

    def merge(self, other: ForwardStats) -> None:
        for size, n in other.sizes.items():
            self.sizes[size] = self.sizes.get(size, 0) + n
        self.seconds += other.seconds


def pixels_array(pixels: bytes, size: int) -> np.ndarray:
    """Raw (size, size, 3) uint8 bytes as an array view, what Captioner and Filter stack directly
    (as `clean_stages` hands them too)."""
    return np.frombuffer(pixels, np.uint8).reshape(size, size, 3)


class ModelHost:
    """One actor: a Captioner or a Filter behind a micro-batcher. Created by `ModelPool.start`."""

    def __init__(
        self,
        role: str,
        checkpoint: str,
        device: str,
        threads: int,
        max_batch: int,
        max_wait_s: float,
        precision: str = "exact",
    ) -> None:
        import torch

        from capfilt.inference import Captioner, Filter
        from capfilt.model.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        ckpt = load_checkpoint(checkpoint, device=device)
        self.role = role
        self.captioner: Captioner | None = None
        self.filters: dict[bool, Filter] = {}
        if role == CAPTIONER:
            self.captioner = Captioner(ckpt, device=device, batch_size=max_batch, precision=precision)
            max_tokens = ckpt.config.text.max_positions - len(self.captioner.prompt_ids) + 1
        else:  # one set of weights, texts cleaned or raw
            # batch_size bounds the texts per ITM forward too: a pass of max_batch images brings several each
            cleaned = Filter(
                ckpt,
                device=device,
                batch_size=max_batch * TEXTS_PER_IMAGE,
                clean_text=True,
                precision=precision,
            )
            raw = copy.copy(cleaned)  # the same model (fast mode's converted copy too), raw texts
            raw.clean_text = False
            self.filters = {True: cleaned, False: raw}
            max_tokens = 0
        self.info_ = ModelInfo(role, ckpt.digest, ckpt.config.vision.image_size, max_tokens)
        self.forwards = ForwardStats()
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(self._run, max_batch, max_wait_s)

    async def info(self) -> ModelInfo:
        return self.info_

    async def submit(self, item: CaptionItem | ScoreItem | DecideItem) -> Any:
        return await self.batcher.submit(item)

    async def stats(self) -> ForwardStats:
        return self.forwards

    def _run(self, items: Sequence[Any]) -> list[Any]:
        """One forward pass per group of compatible items; results in the items' order."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group, []).append(i)
        results: list[Any] = [None] * len(items)
        for members in groups.values():
            batch = [items[i] for i in members]
            start = time.perf_counter()
            try:
                out: Sequence[Any] = self._forward(batch)
            except ValueError as err:  # settings the model refuses: those requests' error, not the batch's
                out = [ModelRefused(str(err))] * len(batch)
            self.forwards.record(len(batch), time.perf_counter() - start)
            for i, result in zip(members, out):
                results[i] = result
        return results

    def _forward(self, batch: list[Any]) -> Sequence[Any]:
        size = self.info_.image_size
        images = [pixels_array(item.pixels, size) for item in batch]
        first = batch[0]
        if isinstance(first, CaptionItem):
            assert self.captioner is not None
            return self.captioner.caption(images, first.generation, seeds=[item.seed for item in batch])
        if isinstance(first, ScoreItem):
            return self.filters[first.clean_text].score(images, [list(item.texts) for item in batch])
        if isinstance(first, DecideItem):
            return score_and_decide(
                self.filters[True],
                images,
                [item.key for item in batch],
                [item.web_text for item in batch],
                [list(item.synthetic) for item in batch],
                Rule(threshold=first.threshold),
            )
        raise TypeError(f"unknown work item {type(first).__name__}")


MAX_RESTARTS = -1  # Ray restarts a dead model actor without limit


class ModelPool:
    """The router: `replicas` actors per model; each request goes to the least busy one."""

    def __init__(self, actors: dict[str, list[Any]], max_queue: int = 256) -> None:
        self.actors, self.max_queue = actors, max_queue
        self.in_flight = {role: [0] * len(handles) for role, handles in actors.items()}
        self._info_refs = {role: [h.info.remote() for h in handles] for role, handles in actors.items()}
        self.info: dict[str, ModelInfo] = {}
        # Replicas seen dead by a call, each with a ping (`info`) sent since: Ray restarts a dead
        # actor (MAX_RESTARTS), which loads its checkpoint again. Requests go to the other replicas
        # meanwhile; with none up for a model the service is not ready (/readyz 503), so a
        # balancer sends its traffic elsewhere.
        self._down: dict[tuple[str, int], Any] = {}

    @classmethod
    def start(cls, config: ServeConfig) -> ModelPool:
        """Start the actors (Ray must be initialised); they load their checkpoints in the background."""
        import ray

        remote = ray.remote(ModelHost).options(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            max_concurrency=1000,
            max_restarts=MAX_RESTARTS,  # killed (out of memory, say): Ray starts it again
            max_task_retries=0,  # its requests in flight fail with a 503; one may be what killed it
        )
        actors = {
            role: [
                remote.remote(
                    role,
                    path,
                    config.device,
                    config.threads,
                    config.max_batch,
                    config.max_wait_ms / 1000,
                    config.precision,
                )
                for _ in range(config.replicas)
            ]
            for role, path in ((CAPTIONER, config.captioner), (FILTER, config.filter))
        }
        return cls(actors, config.max_queue)

    def ready(self) -> bool:
        """Whether every actor has loaded its model, and each model has a replica up (one that no
        call found dead, or that answers again). Raises ModelUnavailable when one failed to load
        at the start."""
        import ray

        if len(self.info) == len(self._info_refs):
            return self._restarted()
        refs = [r for refs in self._info_refs.values() for r in refs]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(done) < len(refs):
            return False
        try:
            infos = {role: ray.get(role_refs) for role, role_refs in self._info_refs.items()}
        except ray.exceptions.RayError as err:
            raise ModelUnavailable(f"a model actor failed to start: {err}") from err
        self.info = {role: role_infos[0] for role, role_infos in infos.items()}
        return True

    def _restarted(self) -> bool:
        """Whether each model has a replica up: those seen dead count again once their ping
        answers (the others are pinged again)."""
        import ray

        for (role, i), ping in list(self._down.items()):
            done, _ = ray.wait([ping], timeout=0)
            if not done:
                continue
            try:
                ray.get(ping)
            except ray.exceptions.RayError:  # still down, or out of restarts: ask again next time
                self._down[(role, i)] = self.actors[role][i].info.remote()
            else:
                log.info("the %s replica %d answers again", role, i)
                del self._down[(role, i)]
        return not self.restarting()

    def restarting(self) -> list[str]:
        """The models none of whose replicas is up: every one was seen dead and has not answered since."""
        return [
            role
            for role, handles in self.actors.items()
            if all((role, i) in self._down for i in range(len(handles)))
        ]

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every actor has loaded its model; ModelUnavailable after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ModelUnavailable(f"the model actors did not load within {timeout_s:.0f} s")
            time.sleep(0.1)

    async def call(self, role: str, item: CaptionItem | ScoreItem | DecideItem) -> Any:
        """Send `item` to the least busy replica of `role` and wait for its result. ModelBusy when
        every replica already holds `max_queue` requests. Cancelled (its client hung up), the call
        cancels its request in the actor too: one not yet in a forward pass never runs."""
        import ray

        counts = self.in_flight[role]
        live = [j for j in range(len(counts)) if (role, j) not in self._down] or range(len(counts))
        i = min(live, key=counts.__getitem__)
        if counts[i] >= self.max_queue:
            raise ModelBusy(
                f"the {role} model has {self.max_queue} requests waiting on each of its {len(counts)} "
                "replicas (--max-queue); retry shortly"
            )
        counts[i] += 1
        ref = self.actors[role][i].submit.remote(item)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)  # an async actor's task: CancelledError in its coroutine, its item dropped
            raise
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, BaseException) else err
            if isinstance(cause, ModelRefused):
                raise ModelRefused(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as err:
            # Ray's message names the actor, its pid and node: the log's, not the client's.
            log.warning("the %s replica %d failed a request: %s", role, i, err)
            if (role, i) not in self._down:
                self._down[(role, i)] = self.actors[role][i].info.remote()
            raise ModelUnavailable(
                f"the {role} model stopped while serving (killed or out of memory) and is being restarted; "
                "retry shortly"
            ) from None
        finally:
            counts[i] -= 1

    async def caption(self, pixels: bytes, generation: GenerationConfig, seed: int) -> list[str]:
        return await self.call(CAPTIONER, CaptionItem(pixels, generation, seed))

    async def score(self, pixels: bytes, texts: Sequence[str], clean_text: bool) -> list[Any]:
        return await self.call(FILTER, ScoreItem(pixels, tuple(texts), clean_text))

    async def decide(
        self, pixels: bytes, key: str, web_text: str | None, synthetic: Sequence[str], threshold: float
    ) -> Curated:
        return await self.call(FILTER, DecideItem(pixels, key, web_text, tuple(synthetic), threshold))

    def stats(self, timeout_s: float = 2.0) -> dict[str, ForwardStats]:
        """Forward-pass statistics summed over each model's replicas ({} when they cannot answer)."""
        import ray

        out: dict[str, ForwardStats] = {}
        try:
            for role, handles in self.actors.items():
                total = ForwardStats()
                for stats in ray.get([h.stats.remote() for h in handles], timeout=timeout_s):
                    total.merge(stats)
                out[role] = total
        except ray.exceptions.RayError as err:
            log.warning("model actors did not report their statistics: %s", err)
        return out

    def shutdown(self) -> None:
        import ray

        for handles in self.actors.values():
            for h in handles:
                ray.kill(h)
