"""Structured JSON logs (structlog), one object per line on stderr."""

from __future__ import annotations

import logging
import sys
import threading
import time

import structlog


def setup_logging(level: str = "info", json: bool = True) -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # os-ken logs through the standard library; keep it quiet unless it matters.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format='{"level": "%(levelname)s", "logger": "%(name)s", '
                               '"event": "%(message)s"}')


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


class LogBudget:
    """At most ``burst`` lines per kind at once, refilled at ``per_second``: a flood of
    events (thousands of new hosts a second) must not swamp the journal, or cost the
    packet-in path a write per event. ``take()`` says whether to log this one and how many
    were left out since the last line logged (report it in that line)."""

    def __init__(self, per_second: float = 20.0, burst: int = 50) -> None:
        self.per_second = per_second
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._skipped = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[bool, int]:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
            self._last = now
            if self._tokens < 1.0:
                self._skipped += 1
                return False, 0
            self._tokens -= 1.0
            skipped, self._skipped = self._skipped, 0
            return True, skipped
