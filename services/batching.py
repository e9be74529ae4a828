"""Dynamic micro-batching: requests that arrive within a few milliseconds share one forward pass.

A `MicroBatcher` lives in an asyncio event loop (a Ray async actor's). `submit(item)` queues the
item and waits for its result; one worker task takes the first queued item, gathers more until
`max_batch` are in hand or `max_wait_s` has passed since that first item arrived, and runs the
whole batch in a worker thread, so the loop keeps queueing while the model computes. Requests that
queue up during a forward pass go out together in the next one, so under load batches fill up
without waiting at all; a lone request waits at most `max_wait_s`.

`run(items)` returns one result per item, in order; an exception in place of a result fails that
item alone (a group of incompatible requests can fail without failing its neighbours).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    arrived: float


class MicroBatcher(Generic[T, R]):
    """Queue items; run them in batches of at most `max_batch` (1: every item alone)."""

    def __init__(
        self,
        run: Callable[[Sequence[T]], Sequence[R | BaseException]],
        max_batch: int,
        max_wait_s: float,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        pending = _Pending(item, loop.create_future(), loop.time())
        self._queue.put_nowait(pending)
        return await pending.future

    async def _gather(self) -> list[_Pending[T, R]]:
        """The next batch: the first queued item and whatever joins it before its deadline."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = batch[0].arrived + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]  # a cancelled caller needs no forward pass

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self.run, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as err:  # a failed forward pass fails its requests, never the worker
                results = [err] * len(batch)
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
