"""The spans that tell an ended run's story, planned from its record: pure, no I/O and no
OpenTelemetry (gateway/tracing.py turns a plan into spans and sends them).

    run {route}          the run, from the request's arrival to its end       (server)
    ├── attempt 1        one invocation of the upstream                       (client)
    │   └── step charge  a step this attempt recorded
    └── attempt 2
        └── step ship

The gateway hears of a step only when it is checkpointed, so a `run` step's span ends at its
checkpoint and starts at the checkpoint before it in the same attempt (or at the attempt's
start): for a handler that runs its steps one after another, that is the step's own time plus
whatever the handler did between steps. A sleep or a wait spans from its record to its wake-up,
which may be after its attempt has suspended. A step belongs to the attempt that was running
when it was written (attempts are fenced, so one never overlaps the next); a step that failed
and then succeeded shows once, under the attempt that recorded its outcome, and a replayed step
only under the attempt that first recorded it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from gateway.model import Attempt, Run, RunStatus, Step, StepKind, StepStatus

__all__ = ["MAX_STEP_SPANS", "PlannedSpan", "attempt_failed", "plan_run"]

# Spans one run may have for its steps; past this they are left out and counted on the run
# span (`stepgate.steps.omitted`), so a run of a million steps cannot flood the exporter.
MAX_STEP_SPANS: Final = 1000
_MAX_DESCRIPTION: Final = 256

Attributes = Mapping[str, str | int]


@dataclass(frozen=True, slots=True)
class PlannedSpan:
    name: str
    kind: Literal["server", "client", "internal"]
    start: float  # seconds since the epoch
    end: float
    parent: int | None  # the index of the parent in the plan; None: the run's own parent
    attributes: Attributes
    error: str | None = None  # the span's status is an error, with this description


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 3] + "..."


def attempt_failed(attempt: Attempt) -> str | None:
    """Why an attempt counts as failed (its span's error), or None: it answered 2xx or 3xx, or
    suspended. The same line as a run's end: a 4xx final answer is a failed run."""
    if attempt.error is not None:
        return _short(attempt.error)
    if attempt.outcome == "suspended":
        return None
    if attempt.outcome != "response":
        return attempt.outcome
    if attempt.status is None or not 200 <= attempt.status < 400:
        return f"HTTP {attempt.status}"
    return None


def _step_error(step: Step) -> str | None:
    if step.status != StepStatus.FAILED:
        return None
    message: object = step.error
    try:
        value = json.loads(step.error or "null")
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        message = value["message"]
    return _short(message) if isinstance(message, str) and message.strip() else "failed"


def _recorded_at(step: Step) -> float:
    """When the attempt that owns a step wrote it: a run step's outcome, a parked step's
    record (its completion comes from outside any attempt)."""
    return step.updated_at if step.kind == StepKind.RUN else step.created_at


def _owner(attempts: Sequence[Attempt], at: float) -> int | None:
    """The index of the attempt running at `at`: the one whose time holds it, else the last
    one started before it (a callback answered on another replica, whose clock differs),
    else the first."""
    if not attempts:
        return None
    for index, attempt in enumerate(attempts):
        ended = math.inf if attempt.ended_at is None else attempt.ended_at
        if attempt.started_at <= at <= ended:
            return index
    before = [index for index, attempt in enumerate(attempts) if attempt.started_at <= at]
    return before[-1] if before else 0


def plan_run(run: Run, attempts: Sequence[Attempt], steps: Sequence[Step]) -> list[PlannedSpan]:
    """The spans of an ended run: the run's first, then each attempt's, then the steps'."""
    end = run.ended_at if run.ended_at is not None else run.updated_at
    ordered = sorted(attempts, key=lambda attempt: attempt.n)
    shown = sorted(steps, key=lambda step: (_recorded_at(step), step.seq or 0, step.id))
    omitted = max(0, len(shown) - MAX_STEP_SPANS)
    shown = shown[:MAX_STEP_SPANS]

    run_attributes: dict[str, str | int] = {
        "stepgate.run_id": run.id,
        "stepgate.route": run.route,
        "stepgate.run.status": str(run.status),
        "stepgate.run.attempts": run.attempt,
        "stepgate.run.steps": len(steps),
        "http.request.method": run.method,
    }
    if run.resp_status is not None:
        run_attributes["http.response.status_code"] = run.resp_status
    if omitted:
        run_attributes["stepgate.steps.omitted"] = omitted
    failed = None
    if run.status == RunStatus.FAILED:
        failed = run.error or (f"HTTP {run.resp_status}" if run.resp_status else "failed")
    plan = [
        PlannedSpan(
            f"run {run.route}",
            "server",
            run.created_at,
            max(end, run.created_at),
            None,
            run_attributes,
            _short(failed) if failed else None,
        )
    ]

    for attempt in ordered:
        attributes: dict[str, str | int] = {
            "stepgate.run_id": run.id,
            "stepgate.attempt": attempt.n,
            "stepgate.attempt.outcome": attempt.outcome,
        }
        if attempt.status is not None:
            attributes["http.response.status_code"] = attempt.status
        attempt_end = attempt.ended_at if attempt.ended_at is not None else end
        plan.append(
            PlannedSpan(
                f"attempt {attempt.n}",
                "client",
                attempt.started_at,
                max(attempt_end, attempt.started_at),
                0,
                attributes,
                attempt_failed(attempt),
            )
        )

    # The checkpoint before each step in its attempt: where a run step's span starts.
    last_checkpoint: dict[int | None, float] = {}
    for step in shown:
        at = _recorded_at(step)
        owner = _owner(ordered, at)
        parent = 0 if owner is None else owner + 1
        if step.kind == StepKind.RUN:
            opened = ordered[owner].started_at if owner is not None else run.created_at
            start = min(max(last_checkpoint.get(owner, opened), opened), at)
            finish = at
        else:
            start = step.created_at
            finish = step.updated_at if step.status == StepStatus.COMPLETED else max(end, at)
        last_checkpoint[owner] = at
        attributes = {
            "stepgate.run_id": run.id,
            "stepgate.step.id": step.id,
            "stepgate.step.kind": str(step.kind),
            "stepgate.step.status": str(step.status),
        }
        if step.kind == StepKind.RUN:
            attributes["stepgate.step.attempts"] = step.attempts
        if step.seq is not None:
            attributes["stepgate.step.seq"] = step.seq
        if step.event is not None:
            attributes["stepgate.step.event"] = step.event
        plan.append(
            PlannedSpan(
                f"step {step.id}",
                "internal",
                start,
                max(finish, start),
                parent,
                attributes,
                _step_error(step),
            )
        )
    return plan
