"""Waiting for a condition in tests: a hang guard, never a timing check."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

HANG_GUARD_S = 60.0


def wait_until(pred: Callable[[], T], what: str, timeout: float = HANG_GUARD_S, step: float = 0.002) -> T:
    """Poll ``pred`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)
