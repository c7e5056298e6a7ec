"""Bounded waiting for lab conditions (tests and benchmarks share 2 busy cores, so every
wait is generous and bounded, and none is a timing assertion)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def eventually(pred: Callable[[], Any], timeout_s: float = 10.0, step_s: float = 0.05) -> bool:
    """True as soon as ``pred()`` is; False if it never was within ``timeout_s`` (it is
    asked once more at the deadline, so a slow last step still counts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)
