"""Runs, steps and attempts as values, and their statuses. No behaviour beyond reading a value:
the rules live in `gateway.lifecycle` and `gateway.store.rules`, the I/O in `gateway.store`.

Runs are frozen: a change to a run is a transaction in the store, which answers with the run as
it now stands. Nothing in the gateway keeps a copy of a run that it could drift from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

Headers = list[tuple[str, str]]


class RunStatus(StrEnum):
    QUEUED = "queued"  # waiting for a flow-control slot or turn (gateway.flow)
    RUNNING = "running"
    RETRYING = "retrying"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED: Final = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
# Not invoked now; started again by a claim once due (a queued run only once it has a due time).
PARKED: Final = frozenset(
    {RunStatus.QUEUED, RunStatus.RETRYING, RunStatus.SLEEPING, RunStatus.WAITING}
)
_REQUEST_COLUMNS: Final = frozenset({"target", "headers", "body", "request_hash"})
_ANSWER_COLUMNS: Final = frozenset({"resp_headers", "resp_body"})


class StepKind(StrEnum):
    RUN = "run"
    SLEEP = "sleep"
    WAIT = "wait"
    EVENT = "event"  # an event the run sent (step.send_event), recorded so it is sent once
    SIGNAL = "signal"  # parked until its URL is POSTed to, or its time-out
    INVOKE = "invoke"  # parked until the child run it started ends


class StepStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    SLEEPING = "sleeping"
    WAITING = "waiting"


STEP_PARKED: Final = frozenset({StepStatus.SLEEPING, StepStatus.WAITING})


@dataclass(frozen=True, slots=True)
class Run:
    """A run as stored."""

    id: str
    route: str
    status: RunStatus
    attempt: int  # invocations started so far; the current (or last) attempt's number
    token: str  # the run's secret; callbacks carry a per-attempt token derived from it
    poll_token: str
    method: str
    target: str
    headers: Headers
    body: bytes
    created_at: float
    updated_at: float
    failures: int = 0
    no_retry: bool = False
    wake_pending: bool = False  # a parked step completed while an attempt was running
    idem_key: str | None = None
    request_hash: str | None = None
    trace_id: str | None = None
    due_at: float | None = None
    resp_status: int | None = None
    resp_reason: str | None = None
    resp_headers: Headers | None = None
    resp_body: bytes | None = None
    error: str | None = None
    ended_at: float | None = None
    # Flow control (gateway.flow): the key values the run counts under for the route's
    # concurrency and throttle (None: the route has none), and when it joined the queue.
    slot_key: str | None = None
    throttle_key: str | None = None
    queued_at: float | None = None
    # Stored values that did not open with the store_key (changed, or sealed with another
    # key), by column; they read as empty. A run whose request is among them is not replayed.
    unreadable: tuple[str, ...] = ()

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def request_unreadable(self) -> bool:
        return any(column in _REQUEST_COLUMNS for column in self.unreadable)

    @property
    def answer_unreadable(self) -> bool:
        return any(column in _ANSWER_COLUMNS for column in self.unreadable)

    def but(self, **changes: object) -> Run:
        """This run with some fields changed (a new value; the store decides if it stands)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RunHead:
    """What a step write needs of its run: whose token it takes, whether that attempt is still
    the current one, and the route for metrics. Read instead of the whole run, whose request
    and answer a step write has no use for."""

    id: str
    route: str
    status: RunStatus
    attempt: int
    token: str

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True, slots=True)
class Step:
    run_id: str
    id: str
    seq: int | None
    kind: StepKind
    status: StepStatus
    output: str | None  # JSON text, passed through untouched
    error: str | None  # JSON text
    attempts: int
    wake_at: float | None  # sleep deadline or wait time-out
    event: str | None
    match: str | None  # JSON
    created_at: float
    updated_at: float
    # Step policies (protocol v1.1): the policy the last failed attempt carried (JSON, see
    # gateway.policies), whether the step has failed for good, and the run attempt that
    # recorded its last failure (so the end of that attempt knows a policy decides the retry).
    policy: str | None = None
    final: bool = False
    failed_in: int | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    n: int
    started_at: float
    ended_at: float | None
    outcome: str  # response | suspended | connect | timeout | interrupted | superseded
    status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """An upstream response as the gateway keeps it."""

    status: int
    reason: str | None
    headers: Headers  # already filtered for the client
    body: bytes
    suspend: bool
    no_retry: bool
    retry_after: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one invocation produced: a reply, or why none arrived."""

    attempt: int
    started_at: float
    ended_at: float
    reply: UpstreamReply | None
    failure: str | None  # "connect" | "timeout" | "too_large" when no usable reply arrived
    error: str | None = None  # a human-readable reason for a failure
