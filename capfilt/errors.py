"""Errors a user can cause. The CLI turns them into exit code 2 and their message."""

from __future__ import annotations

from collections.abc import Mapping
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
