"""Structured JSON logs (structlog), one object per line on stderr."""

from __future__ import annotations

import logging
import sys

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
