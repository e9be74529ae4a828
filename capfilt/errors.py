"""Errors a user can cause. The CLI turns them into exit code 2 and their message."""

from __future__ import annotations


class CapfiltError(ValueError):
    """Bad input from the user: the message names the input and says what to do."""
