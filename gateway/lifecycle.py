"""Run states, legal transitions, and what follows from each thing that happens to a run.

Pure: no I/O, no clock (the time comes in as `now`). The store calls these inside the
transaction that reads the run, so every decision is made on the run as committed, never on a
copy that may have moved on.

    running ──> retrying ──> running ...
       │   └──> sleeping | waiting ──> running ...
       └──> completed | failed          (cancelled from any state that has not ended)

    queued ──> running                  (flow control: a new, retried or woken run waits its
                                         turn; see gateway.flow)

An ended run (failed, completed or cancelled) goes back to running only through the admin retry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from gateway import policies, retry
from gateway.config import Route
from gateway.model import (
    ENDED,
    PARKED,
    STEP_PARKED,
    Attempt,
    Outcome,
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    UpstreamReply,
)

STATES: Final = frozenset(RunStatus)

_NEXT: Final[dict[RunStatus, frozenset[RunStatus]]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset(RunStatus) - {RunStatus.RUNNING, RunStatus.QUEUED},
    RunStatus.RETRYING: frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.SLEEPING: frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.WAITING: frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.COMPLETED: frozenset({RunStatus.RUNNING, RunStatus.RETRYING}),
    RunStatus.FAILED: frozenset({RunStatus.RUNNING, RunStatus.RETRYING}),
    RunStatus.CANCELLED: frozenset({RunStatus.RUNNING, RunStatus.RETRYING}),
}

SUSPENDED_WITH_NOTHING_PARKED: Final = "the handler suspended without a sleeping or waiting step"
REQUEST_UNREADABLE: Final = (
    "the stored request does not open with the store_key (it was "
    "changed, or sealed with another key), so it cannot be replayed"
)


class IllegalTransition(ValueError):
    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"a {current} run cannot become {target}")
        self.current = current
        self.target = target


def can_move(current: RunStatus, target: RunStatus) -> bool:
    return target in _NEXT.get(current, frozenset())


def check_move(current: RunStatus, target: RunStatus) -> RunStatus:
    if not can_move(current, target):
        raise IllegalTransition(current, target)
    return target


def ended_status(response_status: int | None) -> RunStatus:
    """A run ends completed with a 2xx or 3xx final response, failed otherwise."""
    if response_status is not None and 200 <= response_status < 400:
        return RunStatus.COMPLETED
    return RunStatus.FAILED


@dataclass(frozen=True, slots=True)
class Result:
    """What one invocation produced, as far as the run's fate is concerned."""

    status: int | None  # upstream response status, None when no response arrived
    failure: str | None  # "connect" | "timeout" | "too_large" when no usable response arrived
    suspend: bool = False  # 202 with Stepgate-Suspend: true
    no_retry: bool = False  # Stepgate-No-Retry: true on the response


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["end", "retry", "park"]
    status: RunStatus  # the run's next state
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
        return Decision("park", RunStatus.SLEEPING)  # sleeping or waiting: see `after_attempt`
    if result.no_retry or retry_reason is None:
        failed = retry_reason is not None or ended_status(result.status) == RunStatus.FAILED
        return Decision("end", ended_status(result.status), counts_as_failure=failed)
    if run_no_retry:
        return Decision(
            "end", RunStatus.FAILED, reason="non_retriable_step", counts_as_failure=True
        )
    if failures + 1 >= attempts:
        return Decision(
            "end", RunStatus.FAILED, reason="attempts_exhausted", counts_as_failure=True
        )
    return Decision("retry", RunStatus.RETRYING, reason=retry_reason, counts_as_failure=True)


def _ended(run: Run, status: RunStatus, now: float, error: str | None) -> Run:
    return run.but(
        status=status, ended_at=now, updated_at=now, due_at=None, error=error, wake_pending=False
    )


@dataclass(frozen=True, slots=True)
class AfterAttempt:
    """The run after an invocation, the attempt's record, and what the engine should report."""

    run: Run
    attempt: Attempt
    decision: Decision | None  # None: the attempt had been fenced, the run did not change
    retry_reason: str | None = None
    delay: float | None = None


def outcome_label(outcome: Outcome) -> str:
    reply = outcome.reply
    if reply is not None and reply.suspend:
        return "suspended"
    return outcome.failure or "response"


def attempt_record(outcome: Outcome, error: str | None = None) -> Attempt:
    reply = outcome.reply
    return Attempt(
        outcome.attempt,
        outcome.started_at,
        outcome.ended_at,
        outcome_label(outcome),
        reply.status if reply is not None else None,
        error if error is not None else outcome.error,
    )


def after_attempt(
    run: Run,
    outcome: Outcome,
    route: Route | None,
    steps: Sequence[Step],
    now: float,
    rng: random.Random,
) -> AfterAttempt:
    """The run after one of its invocations ended. `run` is as stored; `steps` are its steps
    that still sleep or wait, and those that failed under a step policy in this attempt. An
    attempt that is no longer the run's current one changes nothing."""
    parked = [step for step in steps if step.status in STEP_PARKED]
    if run.status != RunStatus.RUNNING or run.attempt != outcome.attempt:
        why = "run cancelled" if run.status == RunStatus.CANCELLED else "attempt superseded"
        return AfterAttempt(run, attempt_record(outcome, why), None)
    if route is None:
        ended = _ended(run, RunStatus.FAILED, now, f"route {run.route!r} is no longer configured")
        return AfterAttempt(ended, attempt_record(outcome), Decision("end", RunStatus.FAILED))
    if run.request_unreadable:  # an earlier attempt's answer would hide why it ended
        unanswered = run.but(resp_status=None, resp_reason=None, resp_headers=None, resp_body=None)
        ended = _ended(unanswered, RunStatus.FAILED, now, REQUEST_UNREADABLE)
        return AfterAttempt(ended, attempt_record(outcome), Decision("end", RunStatus.FAILED))
    reply = outcome.reply
    usable = reply if outcome.failure is None else None
    status = usable.status if usable is not None else None
    result = Result(
        status=status,
        failure=outcome.failure,
        suspend=bool(usable and usable.suspend),
        no_retry=bool(usable and usable.no_retry),
    )
    reason = retry.is_retriable(route.retry, status, outcome.failure)
    by_policy = _policy_failures(run, steps)
    if by_policy and not (result.suspend or result.no_retry or run.no_retry):
        if reason is not None or status is None or status >= 500:
            return _policy_retry(run, outcome, usable, by_policy, now, rng)
    decision = decide(
        result,
        retry_reason=reason,
        failures=run.failures,
        attempts=route.retry.attempts,
        run_no_retry=run.no_retry,
    )
    record = attempt_record(outcome)
    changes: dict[str, object] = {"updated_at": now}
    if usable is not None and not result.suspend:
        changes.update(
            resp_status=usable.status,
            resp_reason=usable.reason,
            resp_headers=usable.headers,
            resp_body=usable.body,
        )
    failures = run.failures + (1 if decision.counts_as_failure else 0)
    changes["failures"] = failures
    current = run.but(**changes)
    if decision.action == "park":
        return _park(current, route, parked, now, rng, record, decision)
    if decision.action == "retry":
        assert reason is not None
        delay = retry.next_delay(
            route.retry, failures, status, usable.retry_after if usable else None, now, rng
        )
        retrying = current.but(
            status=RunStatus.RETRYING,
            due_at=now + delay,
            error=f"{reason}: {outcome.failure or status}",
            wake_pending=False,
        )
        return AfterAttempt(retrying, record, decision, retry_reason=reason, delay=delay)
    if status is not None:
        error = None
    elif outcome.error is not None:
        error = outcome.error
    else:
        error = f"no response from the upstream ({outcome.failure})"
    if decision.reason is not None:
        # Keep the cause: "attempts exhausted" alone does not say what went wrong.
        why = decision.reason.replace("_", " ")
        error = why if error is None else f"{why}: {error}"
    return AfterAttempt(_ended(current, decision.status, now, error), record, decision)


def _policy_failures(run: Run, steps: Sequence[Step]) -> list[Step]:
    """The steps that failed under their own policy in the run's current attempt."""
    return [
        step
        for step in steps
        if step.status == StepStatus.FAILED
        and step.policy is not None
        and step.failed_in == run.attempt
    ]


POLICY_RETRY: Final = "step_policy"


def _policy_retry(
    run: Run,
    outcome: Outcome,
    reply: UpstreamReply | None,
    failed: Sequence[Step],
    now: float,
    rng: random.Random,
) -> AfterAttempt:
    """The invocation failed on steps with a policy of their own: retry on their back-off (the
    longest of them), counted against the steps, not against the route's `retry.attempts`. A
    step whose attempts are spent is final: the run is invoked again at once, and the SDK raises
    StepFailed in the handler for it to compensate."""
    final = [step for step in failed if step.final]
    if final:
        delay = 0.0
        error = f"step {final[0].id!r} failed for good after {final[0].attempts} attempt(s)"
    else:
        delays = []
        for step in failed:
            policy = policies.load(step.policy)
            assert policy is not None
            delays.append(policies.delay(policy, step.attempts, rng))
        delay = max(delays)
        step = failed[0]
        budget = policies.load(step.policy)
        assert budget is not None
        error = f"step {step.id!r} failed (attempt {step.attempts} of {budget.attempts})"
    changes: dict[str, object] = {}
    if reply is not None:
        changes.update(
            resp_status=reply.status,
            resp_reason=reply.reason,
            resp_headers=reply.headers,
            resp_body=reply.body,
        )
    retrying = run.but(
        status=RunStatus.RETRYING,
        due_at=now + delay,
        updated_at=now,
        error=error,
        wake_pending=False,
        **changes,
    )
    decision = Decision("retry", RunStatus.RETRYING, reason=POLICY_RETRY)
    return AfterAttempt(
        retrying, attempt_record(outcome), decision, retry_reason=POLICY_RETRY, delay=delay
    )


def _park(
    run: Run,
    route: Route,
    parked: Sequence[Step],
    now: float,
    rng: random.Random,
    record: Attempt,
    decision: Decision,
) -> AfterAttempt:
    if parked or run.wake_pending:
        sleeping = any(step.kind == StepKind.SLEEP for step in parked)
        status = RunStatus.SLEEPING if sleeping else RunStatus.WAITING
        deadlines = [step.wake_at for step in parked if step.wake_at is not None]
        # A step without a deadline (a child run's end) has no timer: it is woken only.
        due = now if run.wake_pending else min(deadlines, default=None)
        parked_run = run.but(status=status, due_at=due, wake_pending=False)
        return AfterAttempt(parked_run, record, Decision("park", status))
    # The handler suspended with nothing to wait for: a handler bug. Treat it as a failed
    # attempt rather than re-invoking it in a tight loop.
    failures = run.failures + 1
    if failures >= route.retry.attempts:
        ended = _ended(
            run.but(failures=failures), RunStatus.FAILED, now, SUSPENDED_WITH_NOTHING_PARKED
        )
        return AfterAttempt(
            ended, record, Decision("end", RunStatus.FAILED, counts_as_failure=True)
        )
    delay = retry.backoff(route.retry, failures, rng)
    retrying = run.but(
        status=RunStatus.RETRYING,
        failures=failures,
        due_at=now + delay,
        error=SUSPENDED_WITH_NOTHING_PARKED,
    )
    return AfterAttempt(
        retrying, record, Decision("retry", RunStatus.RETRYING, counts_as_failure=True), delay=delay
    )


def after_interruption(run: Run, route: Route | None, now: float, *, crashed: bool) -> AfterAttempt:
    """An invocation was cut short and is fenced here. A crash counts as a failed attempt; a
    graceful shutdown doesn't. Either way the run is due again at once."""
    record = Attempt(
        run.attempt,
        run.updated_at,
        now,
        "interrupted",
        None,
        "gateway crashed" if crashed else "gateway shut down",
    )
    failures = run.failures + (1 if crashed else 0)
    current = run.but(failures=failures, updated_at=now)
    if route is None:
        ended = _ended(
            current, RunStatus.FAILED, now, f"route {run.route!r} is no longer configured"
        )
        return AfterAttempt(ended, record, Decision("end", RunStatus.FAILED))
    if crashed and (run.no_retry or failures >= route.retry.attempts):
        ended = _ended(
            current, RunStatus.FAILED, now, "attempts exhausted (gateway crashed mid-attempt)"
        )
        return AfterAttempt(ended, record, Decision("end", RunStatus.FAILED))
    retrying = current.but(status=RunStatus.RETRYING, due_at=now)
    return AfterAttempt(retrying, record, Decision("retry", RunStatus.RETRYING))


def claim(run: Run, now: float) -> Run | None:
    """A parked run whose time has come starts its next attempt; None when it is not due (a
    stale timer) or not parked any more."""
    if run.status not in PARKED or run.due_at is None or run.due_at > now + 0.001:
        return None
    return next_attempt(run, now)


def next_attempt(run: Run, now: float) -> Run:
    """The run as it starts its next invocation (out of a queue, too)."""
    return run.but(
        status=RunStatus.RUNNING,
        attempt=run.attempt + 1,
        due_at=None,
        queued_at=None,
        updated_at=now,
        wake_pending=False,
    )


def cancel(run: Run, now: float) -> Run | None:
    if run.status in ENDED:
        return None
    return _ended(run, RunStatus.CANCELLED, now, "cancelled")


def retry_ended(run: Run, now: float) -> Run | None:
    """Re-run an ended run at once; its recorded steps stay recorded."""
    if run.status not in ENDED:
        return None
    return run.but(
        status=RunStatus.RETRYING,
        ended_at=None,
        failures=0,
        no_retry=False,
        due_at=now,
        updated_at=now,
        wake_pending=False,
    )
