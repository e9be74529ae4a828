"""Progress of long commands on stderr: rich's live bar on a terminal, and elsewhere (nohup, `ray
job logs`, a pod's log) a plain line every `CAPFILT_PROGRESS_EVERY` seconds (default 30), where a
live bar would print nothing at all."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import Progress, ProgressColumn

PROGRESS_EVERY_ENV = "CAPFILT_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


@contextmanager
def progress_bar(*columns: str | ProgressColumn) -> Iterator[Progress | LineProgress]:
    """A transient rich `Progress` of `columns` when stderr is a terminal, else a `LineProgress`;
    both take `add_task` and `update` as rich's does."""
    console = Console(stderr=True)
    if console.is_terminal:
        with Progress(*columns, console=console, transient=True) as bar:
            yield bar
        return
    lines = LineProgress(sys.stderr, every_s=_every_s())
    try:
        yield lines
    finally:
        lines.close()


def _every_s() -> float:
    raw = os.environ.get(PROGRESS_EVERY_ENV, "")
    try:
        every = float(raw) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S
    return max(0.0, every) if math.isfinite(every) else DEFAULT_EVERY_S


class LineProgress:
    """rich `Progress`'s `add_task`/`update` as log lines, a task's description first: `clean:
    12/60 (20%), samples 12,000 (251.0/s), 3m12s left, 48s elapsed`, at most one a task every `every_s` seconds, and the last state on close.
    Rates and the time left count only the work done since a task's first update, so a resumed
    job's skipped part does not read as speed. Between updates (a model loading, a long training
    stage) a heartbeat thread repeats the last state every `every_s` seconds."""

    def __init__(self, stream: TextIO, every_s: float = DEFAULT_EVERY_S, heartbeat: bool = True) -> None:
        self.stream, self.every_s, self.heartbeat = stream, every_s, heartbeat
        self._tasks: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self._tasks.append(
            {"description": description, "total": total, "completed": 0, "fields": dict(fields)}
        )
        return len(self._tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        with self._lock:
            self._update(self._tasks[task_id], completed, total, description, fields)
        if self._heartbeat is None and self.heartbeat and self.every_s > 0:
            self._heartbeat = threading.Thread(target=self._beat, name="progress-lines", daemon=True)
            self._heartbeat.start()

    def _update(
        self,
        task: dict[str, Any],
        completed: float | None,
        total: float | None,
        description: str | None,
        fields: dict[str, Any],
    ) -> None:
        if completed is not None:
            task["completed"] = completed
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        task["fields"].update(fields)
        now = time.monotonic()
        if "start" not in task:  # the first update: what was done before this run started
            task["start"] = (now, task["completed"], _numbers(task["fields"]))
            task["printed"] = now
            return
        if now - task["printed"] >= self.every_s:
            self._print(task, now)

    def _beat(self) -> None:
        while not self._stop.wait(min(self.every_s, 1.0)):
            with self._lock:
                now = time.monotonic()
                for task in self._tasks:
                    if "start" in task and now - task["printed"] >= self.every_s:
                        self._print(task, now)

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self._lock:
            now = time.monotonic()
            for task in self._tasks:
                if "start" in task and task.get("printed_state") != _state(task):
                    self._print(task, now)

    def _print(self, task: dict[str, Any], now: float) -> None:
        task["printed"], task["printed_state"] = now, _state(task)
        t0, done0, numbers0 = task["start"]
        elapsed = now - t0
        done, total = task["completed"], task["total"]
        parts = [f"{_n(done)}/{_n(total)} ({100 * done / total:.0f}%)" if total else _n(done)]
        for name, value in task["fields"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rate = (value - numbers0.get(name, 0)) / elapsed if elapsed > 0 else 0.0
                parts.append(f"{name} {_n(value)} ({rate:,.1f}/s)")
            elif str(value):
                parts.append(str(value))
        if total and elapsed > 0 and done > done0 and done < total:
            parts.append(f"{_duration((total - done) * elapsed / (done - done0))} left")
        parts.append(f"{_duration(elapsed)} elapsed")
        self.stream.write(f"{task['description']}: {', '.join(parts)}\n")
        self.stream.flush()


def _numbers(fields: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _state(task: dict[str, Any]) -> tuple[Any, ...]:
    return task["completed"], task["total"], task["description"], tuple(task["fields"].items())


def _n(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
