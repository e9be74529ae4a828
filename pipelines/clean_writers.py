"""Writing finished shards beside the pipeline, so that one driver keeps up with many GPUs.

A finished shard's files (its D' tar, index, ledger and stats; `clean_output`) cost the driver
about 0.15 ms a pair in Python (docs/operations.md: 6,500 pairs/s for 64 px images on one core of
the project's Xeon), which caps what one job can take from its GPUs. With `writers` > 1 each shard is written by one of that many worker processes, while the
driver goes on taking rows from Ray Data. The driver alone appends manifest lines, each once all of
its shard's files are renamed, so a manifest line still means a finished shard: what a stop or a
crash leaves is what `--resume` already handles. With `writers` = 1 the driver writes in its own
thread, as before this module.

Worker processes are started by `spawn` (Ray's threads make `fork` unsafe): a script that calls
`clean()` with writers > 1 needs the usual `if __name__ == "__main__":` guard (`clean()` refuses to
run inside a starting writer). They ignore SIGINT and SIGTERM, so a Ctrl-C in a terminal or a
`ray job stop` stops the driver, which then waits for the shards being written (their work is
kept) and drops the ones not begun; and they end when the driver does, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import Any

from capfilt.errors import CapfiltError

from .clean_output import Shard, record_shard, write_human_files, write_web_files

log = logging.getLogger(__name__)

Written = tuple[dict[str, Any], dict[str, Any]]  # a shard's stats and its manifest line
QUEUED_PER_WRITER = 2  # shards handed to the writers and not yet recorded, per writer: bounds the rows held


class _Collect(logging.Handler):
    """The log records of one write in a worker process, to be logged again by the driver."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _in_worker(write: Callable[..., Written], *args: Any) -> tuple[Written, list[tuple[str, int, str]]]:
    """Run `write(*args)` in a worker process; returns its result and what it logged."""
    collect = _Collect()
    capfilt = logging.getLogger("capfilt")
    capfilt.addHandler(collect)
    capfilt.setLevel(logging.INFO)
    capfilt.propagate = False  # the driver logs them, in its own format
    try:
        return write(*args), collect.records
    finally:
        capfilt.removeHandler(collect)


PARENT_POLL_S = 1.0


# Ctrl-C and a closed terminal (SIGINT, SIGHUP to the terminal's process group) and SIGTERM (`ray
# job stop` signals the job's processes) are the driver's to handle: it stops as `signals_interrupt`
# says, keeping the shards being written, and the writers end with it.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _start_writer(driver: int) -> None:
    """A writer process's start: the stop signals are ignored (they came blocked from the driver:
    one sent while the process started is dropped here), and the process ends with the driver
    (killed, it leaves no writer behind: a pool's workers otherwise outlive it)."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_with, args=(driver,), name="capfilt-exit-with-driver", daemon=True).start()


def _exit_with(driver: int) -> None:
    while os.getppid() == driver:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # a shard half written stays .tmp: --resume removes it and writes the shard again


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Processes started inside start with the stop signals blocked: Python's import of torch and
    the rest takes seconds, and a Ctrl-C then killed a writer before `_start_writer` could ignore
    it. The driver still gets its signals: they are blocked in this thread only, meanwhile."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _died(shard: Shard) -> CapfiltError:
    return CapfiltError(
        f"a process writing shard {shard.name} ({shard.source}) died: killed, out of memory, or started "
        'from a Python script that calls clean() outside `if __name__ == "__main__":` (spawn runs the '
        "script again in each writer); rerun with --resume to write it again"
    )


def starting_a_writer() -> bool:
    """True while a writer process is starting: `spawn` imports the driver's main script again
    there, and a script without the `__main__` guard would start a whole second job."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


class ShardWriters:
    """Writes finished shards with `writers` processes (or in this thread when 1) and appends each
    one's manifest line as it completes; `on_written(stats)` hears of each. Use as a context
    manager: leaving it waits for every shard handed over, and raises the first failed write's
    error (a full disk names its file: `clean_output._writing`). After an error or a stop, shards
    being written are waited for and recorded; shards not begun are dropped."""

    def __init__(self, out: Path, writers: int, on_written: Callable[[dict[str, Any]], None]) -> None:
        self.out, self.on_written = out, on_written
        self.pool: ProcessPoolExecutor | None = None
        if writers > 1:
            with _stop_signals_blocked():  # also multiprocessing's resource tracker, started here
                self.pool = ProcessPoolExecutor(
                    writers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_writer,
                    initargs=(os.getpid(),),
                )
        self.limit = QUEUED_PER_WRITER * writers
        self.pending: dict[Future[tuple[Written, list[tuple[str, int, str]]]], Shard] = {}

    def web(self, shard: Shard, rows: list[dict[str, Any]]) -> None:
        """Write a cleaned shard from its ledger rows (`clean_output.write_web_files`)."""
        self._write(shard, write_web_files, self.out, shard, rows)

    def human(self, shard: Shard) -> None:
        """Copy a human-annotated shard into D' (`clean_output.write_human_files`)."""
        self._write(shard, write_human_files, self.out, shard)

    def _write(self, shard: Shard, write: Callable[..., Written], *args: Any) -> None:
        if self.pool is None:
            self._record(*write(*args))
            return
        while len(self.pending) >= self.limit:
            self._collect()
        try:
            with _stop_signals_blocked():  # the pool starts its processes here, as work arrives
                future = self.pool.submit(_in_worker, write, *args)
        except BrokenProcessPool as err:  # a writer died since the last shard was recorded
            # Name a shard it held (the one being handed over reached none); `_settle` logs the rest.
            held = min(self.pending.values(), key=lambda s: s.id, default=shard)
            raise _died(held) from err
        self.pending[future] = shard

    def _collect(self) -> None:
        """Wait for a write to end, then record every shard whose write has ended; raises the
        error of a failed one, the others left pending."""
        done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda f: self.pending[f].id):
            shard = self.pending.pop(future)
            if future.cancelled():  # dropped by `_settle`: never begun
                continue
            try:
                written, logged = future.result()
            except BrokenProcessPool as err:
                raise _died(shard) from err
            for name, level, message in logged:
                logging.getLogger(name).log(level, "%s", message)
            self._record(*written)

    def drain(self) -> None:
        """Wait for every shard handed over and record it; raises the first failed write's error."""
        while self.pending:
            self._collect()

    def _record(self, stats: dict[str, Any], entry: dict[str, Any]) -> None:
        record_shard(self.out, entry)
        self.on_written(stats)

    def _settle(self) -> None:
        """After an error or a stop: drop the shards not begun, wait for the ones being written
        and record those that succeeded (a resume need not write them again)."""
        for future in self.pending:
            future.cancel()
        while self.pending:
            try:
                self._collect()
            except Exception as err:  # already stopping for another reason: say so and go on
                log.warning("%s", err)

    def __enter__(self) -> ShardWriters:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.pool is None:
            return
        stopped = True
        try:
            if kind is None:
                try:
                    self.drain()
                    stopped = False
                except BaseException:
                    self._settle()
                    raise
            else:
                self._settle()
        finally:
            # A second Ctrl-C while settling: do not wait again (the interpreter's exit still does).
            self.pool.shutdown(wait=not stopped, cancel_futures=True)
