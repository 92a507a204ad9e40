"""Structured logs: structlog, one JSON object a line on stdout (or a console format).

Event names are stable (`run.started`, `run.attempt`, `step.recorded`, …); values are key-value
fields, never formatted into the message. Levels keep the success path to one line a run:

    info   run.completed / run.failed / run.cancelled (one a run), and everything off the happy
           path: run.attempt after the first, run.retry_scheduled, run.redirected, run.parked
    debug  run.started, the first run.attempt, step.recorded
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor
    factory: Callable[..., object]
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        factory = structlog.PrintLoggerFactory(sys.stdout)
    else:
        # orjson renders a line several times faster than json; it is on every run's path.
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
