"""Errors a user can cause, and stops a user asks for. The CLI turns the errors into exit code 2
and their message, and a KeyboardInterrupt into exit code 130 and its message."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any


class CapfiltError(ValueError):
    """Bad input from the user: the message names the input and says what to do."""


def changed_arguments(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """ "name: saved X, now Y" for every argument a rerun gives another value than its run was
    started with (a resume must not mix two runs' results)."""
    return [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as Ctrl-C does, so that what
    a scheduler, `ray job stop` or a closed terminal sends stops a command the way Ctrl-C stops it:
    work under way stopped, finished work kept, a message on how to go on. (A Ray driver otherwise
    aborts on SIGTERM with exit 134.) A signal set to be ignored (SIGHUP under `nohup`) stays
    ignored. Enter it after `ray.init`, which installs Ray's handler; on leaving, the handlers
    Python knew come back. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    # A signal set to be ignored stays so: `nohup` ignores SIGHUP so the job outlives its terminal.
    wanted = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) is not signal.SIG_IGN]
    saved = {sig: signal.signal(sig, interrupt) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def forward_to_sigint() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP call whatever handles SIGINT when they arrive (Ray Train's trainer
    installs its own Ctrl-C handler, which stops the workers); signals set to be ignored stay so.
    Returns the handlers replaced, for the caller to put back. Outside the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    replaced: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old = signal.signal(sig, forward)
            replaced[sig] = signal.SIG_DFL if old is None else old
    return replaced
