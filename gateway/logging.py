"""Structured logs: structlog, one JSON object a line on stdout (or a console format).

Event names are stable (`run.started`, `run.attempt`, `step.recorded`, …); values are key-value
fields, never formatted into the message. Levels keep the success path to one line a run:

    info   run.completed / run.failed / run.cancelled (one a run), and everything off the happy
           path: run.attempt after the first, run.retry_scheduled, run.redirected, run.parked
    debug  run.started, the first run.attempt, step.recorded

Lines that an unauthenticated client can cause (`http.bad_request`, `http.connection_refused`)
go through a `Throttle`, so that nobody can flood the log: past its rate they are dropped and
counted, and the next line that gets through says how many (`suppressed`).
"""

from __future__ import annotations

import logging
import sys
import time
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


class Throttle:
    """A token bucket for one kind of log line: `rate` lines a second, bursts of `burst`.

    `admit()` is None for a line to drop, otherwise how many were dropped since the last one
    that got through (0 mostly), to be logged with it as `suppressed`."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()
        self._dropped = 0

    def admit(self) -> int | None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self._dropped += 1
            return None
        self._tokens -= 1.0
        dropped, self._dropped = self._dropped, 0
        return dropped
