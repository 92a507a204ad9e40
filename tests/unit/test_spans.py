"""The span plan of an ended run (gateway/spans.py), from its record alone: no sockets."""

from __future__ import annotations

import json

import pytest

from gateway.model import Attempt, Run, RunStatus, Step, StepKind, StepStatus
from gateway.spans import MAX_STEP_SPANS, PlannedSpan, attempt_failed, plan_run


def run(status: RunStatus = RunStatus.COMPLETED, **changes: object) -> Run:
    base = Run(
        id="r1",
        route="trips",
        status=status,
        attempt=2,
        token="t",
        poll_token="p",
        method="POST",
        target="/trips",
        headers=[],
        body=b"",
        created_at=100.0,
        updated_at=120.0,
        ended_at=120.0,
        resp_status=200,
    )
    return base.but(**changes)


def step(
    name: str,
    created: float,
    updated: float | None = None,
    kind: StepKind = StepKind.RUN,
    status: StepStatus = StepStatus.COMPLETED,
    **changes: object,
) -> Step:
    values: dict[str, object] = {
        "run_id": "r1",
        "id": name,
        "seq": None,
        "kind": kind,
        "status": status,
        "output": None,
        "error": None,
        "attempts": 1 if kind == StepKind.RUN else 0,
        "wake_at": None,
        "event": None,
        "match": None,
        "created_at": created,
        "updated_at": created if updated is None else updated,
    }
    values.update(changes)
    return Step(**values)  # type: ignore[arg-type]


ATTEMPTS = [
    Attempt(1, 100.0, 105.0, "response", 503, None),
    Attempt(2, 110.0, 119.0, "response", 200, None),
]


def by_name(plan: list[PlannedSpan]) -> dict[str, PlannedSpan]:
    return {span.name: span for span in plan}


def test_steps_go_under_the_attempt_that_wrote_them_and_start_at_the_checkpoint_before() -> None:
    steps = [step("charge", 101.0), step("email", 103.0), step("ship", 112.0)]
    plan = plan_run(run(), ATTEMPTS, steps)
    spans = by_name(plan)

    assert [span.name for span in plan] == [
        "run trips", "attempt 1", "attempt 2", "step charge", "step email", "step ship",
    ]  # fmt: skip
    assert spans["run trips"].parent is None
    assert (spans["attempt 1"].parent, spans["attempt 2"].parent) == (0, 0)
    assert (spans["step charge"].parent, spans["step email"].parent) == (1, 1)
    assert spans["step ship"].parent == 2
    # A step is known from its checkpoint: it ran since the one before it, or its attempt's start.
    assert (spans["step charge"].start, spans["step charge"].end) == (100.0, 101.0)
    assert (spans["step email"].start, spans["step email"].end) == (101.0, 103.0)
    assert (spans["step ship"].start, spans["step ship"].end) == (110.0, 112.0)
    assert (spans["attempt 1"].error, spans["attempt 2"].error) == ("HTTP 503", None)
    assert (spans["run trips"].start, spans["run trips"].end) == (100.0, 120.0)


def test_a_step_that_failed_then_succeeded_shows_once_under_the_attempt_that_completed_it() -> None:
    retried = step("charge", 101.0, 111.0, attempts=2, error=json.dumps({"message": "timeout"}))
    spans = by_name(plan_run(run(), ATTEMPTS, [retried]))
    assert spans["step charge"].parent == 2
    assert spans["step charge"].attributes["stepgate.step.attempts"] == 2
    assert spans["step charge"].error is None


def test_a_sleep_spans_from_its_record_to_its_wake_up_under_the_attempt_that_slept() -> None:
    suspended = [
        Attempt(1, 100.0, 102.0, "suspended", 202, None),
        Attempt(2, 110.0, 111.0, "response", 200, None),
    ]
    nap = step("nap", 101.0, 110.0, kind=StepKind.SLEEP, wake_at=110.0)
    spans = by_name(plan_run(run(), suspended, [nap]))
    assert spans["step nap"].parent == 1
    assert (spans["step nap"].start, spans["step nap"].end) == (101.0, 110.0)
    assert spans["attempt 1"].error is None


def test_a_cancelled_wait_ends_with_the_run_and_a_cancelled_run_is_no_error() -> None:
    cancelled = run(RunStatus.CANCELLED, attempt=1, resp_status=None, error="cancelled")
    waiting = step(
        "approval", 101.0, kind=StepKind.WAIT, status=StepStatus.WAITING, event="approved"
    )
    parked = [Attempt(1, 100.0, 102.0, "suspended", 202, None)]
    spans = by_name(plan_run(cancelled, parked, [waiting]))
    assert spans["step approval"].end == 120.0
    assert spans["step approval"].attributes["stepgate.step.event"] == "approved"
    assert spans["step approval"].error is None
    assert spans["run trips"].error is None
    assert "http.response.status_code" not in spans["run trips"].attributes


def test_a_failed_run_and_step_carry_their_errors() -> None:
    failed = run(RunStatus.FAILED, resp_status=None, error="attempts exhausted: timeout")
    broken = step(
        "charge",
        112.0,
        status=StepStatus.FAILED,
        error=json.dumps({"message": "card\ndeclined", "type": "CardError"}),
    )
    spans = by_name(plan_run(failed, ATTEMPTS, [broken]))
    assert spans["run trips"].error == "attempts exhausted: timeout"
    assert spans["step charge"].error == "card declined"  # on one line


def test_an_attempt_left_open_ends_with_the_run_and_steps_without_attempts_hang_on_the_run() -> (
    None
):
    open_attempt = [Attempt(1, 100.0, None, "interrupted", None, "gateway crashed")]
    spans = by_name(plan_run(run(RunStatus.FAILED), open_attempt, [step("a", 101.0)]))
    assert spans["attempt 1"].end == 120.0
    assert spans["attempt 1"].error == "gateway crashed"
    assert spans["step a"].parent == 1
    alone = by_name(plan_run(run(), [], [step("a", 101.0)]))
    assert alone["step a"].parent == 0


def test_steps_past_the_cap_are_counted_not_sent() -> None:
    many = [step(f"s{i}", 101.0 + i / 10_000) for i in range(MAX_STEP_SPANS + 5)]
    plan = plan_run(run(), ATTEMPTS, many)
    assert len(plan) == 3 + MAX_STEP_SPANS
    assert plan[0].attributes["stepgate.steps.omitted"] == 5
    assert plan[0].attributes["stepgate.run.steps"] == MAX_STEP_SPANS + 5


@pytest.mark.parametrize(
    ("attempt", "error"),
    [
        (Attempt(1, 0, 1, "response", 200, None), None),
        (Attempt(1, 0, 1, "response", 302, None), None),
        (Attempt(1, 0, 1, "suspended", 202, None), None),
        (Attempt(1, 0, 1, "response", 404, None), "HTTP 404"),
        (Attempt(1, 0, 1, "timeout", None, None), "timeout"),
        (Attempt(1, 0, 1, "connect", None, None), "connect"),
        (Attempt(1, 0, 1, "response", 200, "run cancelled"), "run cancelled"),
    ],
)
def test_which_attempts_are_errors(attempt: Attempt, error: str | None) -> None:
    assert attempt_failed(attempt) == error
