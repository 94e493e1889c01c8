"""Waiting in tests on a condition, never on a sleep raced against a timer of the code under test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.5) -> T:
    """The first true value of ``condition()``, called every ``poll`` seconds; AssertionError naming ``what``
    when none came within ``timeout`` seconds (a bound for a busy machine, not a figure under test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(poll)
