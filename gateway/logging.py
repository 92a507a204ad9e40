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

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# The level in force; a reload changes it here, and every logger reads it at each call
# (structlog caches a logger on first use, so a level baked into its class would stay).
_level = [logging.INFO]


class _Logger(structlog.BoundLoggerBase):
    """A bound logger that drops a call below the current level before anything is built."""

    def _at(self, level: int, method: str, event: str | None, kw: dict[str, object]) -> None:
        if level >= _level[0]:
            self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str | None = None, **kw: object) -> None:
        self._at(logging.DEBUG, "debug", event, kw)

    def info(self, event: str | None = None, **kw: object) -> None:
        self._at(logging.INFO, "info", event, kw)

    def warning(self, event: str | None = None, **kw: object) -> None:
        self._at(logging.WARNING, "warning", event, kw)

    def error(self, event: str | None = None, **kw: object) -> None:
        self._at(logging.ERROR, "error", event, kw)

    def exception(self, event: str | None = None, **kw: object) -> None:
        kw.setdefault("exc_info", True)
        self._at(logging.ERROR, "error", event, kw)


def set_level(level: str) -> None:
    """Change the level of every logger at once (a reload)."""
    _level[0] = _LEVELS.get(level, logging.INFO)


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
        wrapper_class=_Logger,
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    set_level(level)


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
