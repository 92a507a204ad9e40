"""Flow control: which of a route's runs may be invoked now, and which wait their turn.

Pure: no I/O, no clock. The store applies these inside the transaction that starts or ends an
invocation (see `gateway.store.base`), on counts it reads from the runs themselves, so no
counter can drift from the runs it counts and the limits hold across replicas.

- `concurrency`: a slot is held by every `running` run of the route and key value, and by every
  `queued` run that has been given its turn (a due time). Sleeping, waiting and retrying runs
  hold none.
- `throttle`: a token bucket per key value, kept as its theoretical arrival time (`tat`, the
  generic cell rate algorithm): a start is due at `max(now, tat - (burst - 1) * interval)` and
  moves `tat` one interval on. A run whose start is due later waits `queued` until then.
- A run that may not start is `queued`: with no due time when it waits for a slot (oldest
  first), with one when it has its slot and waits for its throttle turn.
- `rate_limit` uses the same bucket to refuse a request instead (`429` with `Retry-After`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from multidict import CIMultiDictProxy

from gateway.config import FlowKey, Rate, Route
from gateway.jsonin import BadJSON, loads
from gateway.lifecycle import next_attempt
from gateway.model import Run, RunStatus

# A key value longer than this (or holding a NUL) is kept as its hash: it names the same
# bucket and slot count without storing a client's long header or body value in every run.
MAX_KEY_LENGTH: Final = 200


def key_value(
    key: FlowKey | None, headers: CIMultiDictProxy[str], query_string: str, body: bytes
) -> str:
    """The request's value of `key` ("" when the request has none)."""
    if key is None:
        return ""
    if key.source == "header":
        value = ", ".join(headers.getall(key.name, ()))
    elif key.source == "query":
        value = next((v for k, v in parse_qsl(query_string, True) if k == key.name), "")
    else:
        value = _body_value(key.name, body)
    if len(value) > MAX_KEY_LENGTH or "\x00" in value:  # NUL: PostgreSQL's text has none
        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return value


def _body_value(path: str, body: bytes) -> str:
    try:
        node = loads(body)
    except BadJSON:
        return ""
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return ""
    if node is None:
        return ""
    if isinstance(node, str):
        return node
    return json.dumps(node, separators=(",", ":"), sort_keys=True)


def bucket(kind: str, route: str, key: str) -> str:
    """The name of a token bucket in the store."""
    return f"{kind}\x1f{route}\x1f{key}"


def turn(rate: Rate, tat: float | None, now: float) -> tuple[float, float]:
    """When the next start may happen (never before `now`) and the bucket's `tat` after it."""
    if tat is None:  # a bucket never used, or dropped: full
        return now, now + rate.interval
    start = max(now, tat - (rate.burst - 1) * rate.interval)
    return start, max(start, tat) + rate.interval


def allowed(rate: Rate, tat: float | None, now: float) -> tuple[float, float | None]:
    """A rate limit's verdict: (seconds until it would allow one, 0 when it does now; the
    bucket's new `tat`, None when it refuses and the bucket stays as it is)."""
    start, after = turn(rate, tat, now)
    if start > now:
        return start - now, None
    return 0.0, after


@dataclass(frozen=True, slots=True)
class Seen:
    """What a transaction read of one flow before it decides: the slots held (running runs
    and queued ones given their turn), the runs waiting for a slot, the throttle's `tat`."""

    held: int = 0
    waiting: int = 0
    tat: float | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    run: Run  # running (it starts now) or queued
    tat: float | None  # the throttle bucket's new value; None: leave it


def admit(run: Run, route: Route, seen: Seen, now: float) -> Admission:
    """A run that is due to be invoked (new, retried or woken) starts now, or queues: behind
    the runs already waiting for a slot, or for its throttle turn."""
    limit = route.concurrency
    if limit is not None and run.slot_key is None:
        run = run.but(slot_key="")  # recorded before the route had a concurrency limit
    if limit is not None and (seen.held >= limit.limit or seen.waiting > 0):
        return Admission(queued(run, now, due=None), None)
    return take_turn(run, route, seen.tat, now)


def take_turn(run: Run, route: Route, tat: float | None, now: float) -> Admission:
    """A run that has a slot (or needs none) takes its throttle turn: it starts now, or queues
    (holding its slot) until its turn is due."""
    if route.throttle is None:
        return Admission(started(run, now), None)
    start, after = turn(route.throttle, tat, now)
    if start <= now:
        return Admission(started(run, now), after)
    return Admission(queued(run, now, due=start), after)


def started(run: Run, now: float) -> Run:
    """The run as it starts its next invocation (a new run is on its first already)."""
    return run if run.status == RunStatus.RUNNING else next_attempt(run, now)


def queued(run: Run, now: float, *, due: float | None) -> Run:
    """The run waiting for a slot (`due` None) or, holding one, for its throttle turn. A new run
    has made no attempt yet; a queued one keeps its place (`queued_at`) when it is given its
    turn."""
    attempt = 0 if run.status == RunStatus.RUNNING else run.attempt
    return run.but(
        status=RunStatus.QUEUED,
        attempt=attempt,
        due_at=due,
        queued_at=run.queued_at if run.status == RunStatus.QUEUED else now,
        updated_at=now,
        wake_pending=False,
    )


def holds_slot(run: Run) -> bool:
    return run.status == RunStatus.RUNNING or (
        run.status == RunStatus.QUEUED and run.due_at is not None
    )


def given_slot(run: Run, route: Route, tat: float | None, now: float, *, start: bool) -> Admission:
    """A run that waited for a slot has one now. It starts at once when its throttle turn has
    come and `start` says so; else it stays queued, due at its turn, and a claim starts it."""
    admission = take_turn(run, route, tat, now)
    if admission.run.status == RunStatus.QUEUED or start:
        return admission
    return Admission(queued(run, now, due=now), admission.tat)
