"""Run states, legal transitions, and what to do after an invocation. Pure: no I/O.

    running ──> retrying ──> running ...
       │   └──> sleeping | waiting ──> running ...
       └──> completed | failed          (cancelled from any state that has not ended)

An ended run (failed, completed or cancelled) goes back to running only through the admin retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

RUNNING: Final = "running"
RETRYING: Final = "retrying"
SLEEPING: Final = "sleeping"
WAITING: Final = "waiting"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"

STATES: Final = frozenset({RUNNING, RETRYING, SLEEPING, WAITING, COMPLETED, FAILED, CANCELLED})
ENDED: Final = frozenset({COMPLETED, FAILED, CANCELLED})
PARKED: Final = frozenset({RETRYING, SLEEPING, WAITING})

_NEXT: Final[dict[str, frozenset[str]]] = {
    RUNNING: frozenset({RETRYING, SLEEPING, WAITING, COMPLETED, FAILED, CANCELLED}),
    RETRYING: frozenset({RUNNING, CANCELLED}),
    SLEEPING: frozenset({RUNNING, CANCELLED}),
    WAITING: frozenset({RUNNING, CANCELLED}),
    COMPLETED: frozenset({RUNNING}),
    FAILED: frozenset({RUNNING}),
    CANCELLED: frozenset({RUNNING}),
}


class IllegalTransition(ValueError):
    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"a {current} run cannot become {target}")
        self.current = current
        self.target = target


def can_move(current: str, target: str) -> bool:
    return target in _NEXT.get(current, frozenset())


def check_move(current: str, target: str) -> str:
    if not can_move(current, target):
        raise IllegalTransition(current, target)
    return target


def ended_status(response_status: int | None) -> str:
    """A run ends completed with a 2xx or 3xx final response, failed otherwise."""
    if response_status is not None and 200 <= response_status < 400:
        return COMPLETED
    return FAILED


@dataclass(frozen=True, slots=True)
class Result:
    """What one invocation produced, as far as the run's fate is concerned."""

    status: int | None  # upstream response status, None when no response arrived
    failure: str | None  # "connect" | "timeout" when no response arrived
    suspend: bool = False  # 202 with Stepgate-Suspend: true
    no_retry: bool = False  # Stepgate-No-Retry: true on the response


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["end", "retry", "park"]
    status: str  # the run's next state
    reason: str | None = None  # why a retry happens (a metrics label), or why it could not
    counts_as_failure: bool = False


def decide(
    result: Result,
    *,
    retry_reason: str | None,
    failures: int,
    attempts: int,
    run_no_retry: bool,
) -> Decision:
    """Decide a run's next state after an invocation.

    `retry_reason` is the retry policy's verdict on the result (None: not a retriable outcome);
    `failures` counts failed invocations before this one; `attempts` is the policy's budget.
    """
    if result.suspend:
        return Decision("park", SLEEPING)  # sleeping or waiting: the engine looks at the steps
    if result.no_retry or retry_reason is None:
        failed = retry_reason is not None or ended_status(result.status) == FAILED
        return Decision("end", ended_status(result.status), counts_as_failure=failed)
    if run_no_retry:
        return Decision("end", FAILED, reason="non_retriable_step", counts_as_failure=True)
    if failures + 1 >= attempts:
        return Decision("end", FAILED, reason="attempts_exhausted", counts_as_failure=True)
    return Decision("retry", RETRYING, reason=retry_reason, counts_as_failure=True)
