"""The store's domain rules, pure: every dialect calls these inside its transaction, on the rows
it just read, so the rules hold however writes interleave.

- a step write comes only from the run's current attempt (attempt fencing);
- first write wins: a completed step never changes, a parked one only by completing;
- attempts count the failed and successful writes of a `run` step;
- a failed attempt under a policy that brings the count to the policy's `attempts` makes the
  step final: it stays failed and takes no further write (step policies, protocol v1.1);
- a wait is completed by the first matching event of the look-back window that no other wait
  of the run took, or later by every matching event;
- an event that completes a wait of a running run leaves a pending wake-up for when it parks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gateway import jsonin
from gateway.events import event_object, matches_text
from gateway.model import STEP_PARKED, Run, RunHead, RunStatus, Step, StepKind, StepStatus
from gateway.policies import StepPolicy


@dataclass(frozen=True, slots=True)
class StepCall:
    """What a handler asked to record for one step (already validated)."""

    kind: StepKind
    status: StepStatus
    seq: int | None = None
    output: str | None = None  # JSON
    error: str | None = None  # JSON
    wake_at: float | None = None
    event: str | None = None
    match: str | None = None  # JSON
    no_retry: bool = False  # a failed step with retriable: false
    policy: StepPolicy | None = None  # a failed attempt's own retry policy (protocol v1.1)
    # A new signal's id and secret (kept only if this call creates the step).
    signal_id: str | None = None
    signal_token: str | None = None
    # A new invoke's child run (created only if this call creates the step).
    child: Run | None = None


@dataclass(frozen=True, slots=True)
class StepWrite:
    """What a step PUT stored: whether this call created the record, and the record after it."""

    created: bool
    step: Step
    route: str = ""  # the run's route, for metrics and logs
    signal: tuple[str, str] | None = None  # a signal step's (id, token)
    child_id: str | None = None  # an invoke step's child run
    started: Run | None = None  # the child run this write created, to be invoked now


def fenced(run: Run | RunHead, attempt: int) -> bool:
    """Whether a callback from `attempt` must be refused: only the current attempt of a running
    run may record steps. Every other one was given up on (crashed, timed out, cancelled)."""
    return run.status != RunStatus.RUNNING or run.attempt != attempt


def merge_step(
    current: Step | None,
    call: StepCall,
    run_id: str,
    step_id: str,
    now: float,
    attempt: int | None = None,
) -> StepWrite:
    """First write wins: a completed or parked record is kept as it is (a parked one changes
    only when a wake-up completes it), and so is a final one (an invoke whose child run
    failed is one). A failed record takes the next write. `attempt` is the run attempt
    writing, kept with a failure."""
    if current is not None and (
        current.status != StepStatus.FAILED or current.kind != call.kind or current.final
    ):
        return StepWrite(created=False, step=current)  # the caller refuses a kind mismatch
    attempts = (current.attempts if current else 0) + (1 if call.kind == StepKind.RUN else 0)
    failed = call.status == StepStatus.FAILED
    policy = call.policy if failed else None
    final = policy is not None and attempts >= policy.attempts
    # A step that succeeds after failing keeps its last error, for the timeline.
    last_error = call.error if call.error is not None or current is None else current.error
    seq = call.seq if current is None or call.seq is not None else current.seq
    step = Step(
        run_id,
        step_id,
        seq,
        call.kind,
        call.status,
        call.output,
        last_error,
        attempts,
        call.wake_at,
        call.event,
        call.match,
        current.created_at if current else now,
        now,
        policy.dump() if policy is not None else (current.policy if current else None),
        final,
        attempt if failed else (current.failed_in if current else None),
    )
    return StepWrite(created=True, step=step)


def dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def taken_event_ids(outputs: Iterable[str]) -> set[str]:
    """The ids of the events that already completed a wait of the run (from the waits' outputs)."""
    taken: set[str] = set()
    for output in outputs:
        value = json.loads(output)
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            taken.add(value["id"])
    return taken


def lookback_match(
    name: str,
    match: str,
    events: Iterable[tuple[str, str, float]],
    taken: set[str],
) -> str | None:
    """The output of a new wait completed from the look-back window, or None: the first event
    (id, data JSON, ts) in time order that matches and that no other wait of the run took."""
    for event_id, data, ts in events:
        if event_id in taken:
            continue
        candidate = event_object(event_id, name, json.loads(data), ts)
        if matches_text(match, candidate):
            return dump(candidate)
    return None


def wait_is_completed_by(step: Step, event: dict[str, Any]) -> bool:
    return (
        step.kind == StepKind.WAIT
        and step.status == StepStatus.WAITING
        and matches_text(step.match, event)
    )


def woken(run: Run, now: float) -> Run:
    """A parked step of `run` was completed: a parked run falls due now; a running one will be
    re-invoked as soon as its current attempt parks."""
    if run.status in (RunStatus.SLEEPING, RunStatus.WAITING):
        return run.but(due_at=now)
    if run.status == RunStatus.RUNNING:
        return run.but(wake_pending=True)
    return run


def is_parked(step: Step) -> bool:
    return step.status in STEP_PARKED


# -- signals and child runs ----------------------------------------------------------------------

SIGNALS_PATH = "/_stepgate/signals/"


def signal_url(public_url: str, signal_id: str, token: str) -> str:
    """Where a signal is POSTed to: on the public listener, relative unless `public_url` is set."""
    return f"{public_url}{SIGNALS_PATH}{signal_id}?token={token}"


class SignalVerdict(StrEnum):
    DELIVER = "deliver"  # the step waits: complete it with the POSTed body
    DONE = "done"  # completed already: by an earlier POST, or timed out
    ENDED = "ended"  # the run has ended; nothing waits for it any more


def signal_verdict(run: Run, step: Step | None, now: float) -> SignalVerdict:
    """What a POST to a signal's URL does, decided on the run and step as stored. A signal whose
    time-out has passed is over even before the timer has completed it: the handler gets null."""
    if run.ended:
        return SignalVerdict.ENDED
    if step is None or step.status != StepStatus.WAITING:
        return SignalVerdict.DONE
    if step.wake_at is not None and step.wake_at <= now:
        return SignalVerdict.DONE
    return SignalVerdict.DELIVER


CHILD_FAILED = "ChildRunFailed"


def child_result(child: Run) -> tuple[StepStatus, str | None, str | None]:
    """The parent's invoke step once its child run has ended: (status, output, error). The output
    is the child's final response body, JSON-decoded when it is JSON, else its text; a child that
    did not complete fails the step for good, with the child's final status."""
    if child.status == RunStatus.COMPLETED:
        return StepStatus.COMPLETED, dump(response_value(child)), None
    error: dict[str, Any] = {
        "message": f"the child run {child.id} ({child.route}) ended {child.status}"
        + (f" with {child.resp_status}" if child.resp_status is not None else ""),
        "type": CHILD_FAILED,
        "retriable": False,
        "status": child.resp_status,
        "run_id": child.id,
    }
    if child.error:
        error["detail"] = child.error
    return StepStatus.FAILED, None, dump(error)


def response_value(run: Run) -> Any:
    """A run's final response body as a JSON value: decoded if it says it is JSON and parses,
    else as text (undecodable bytes replaced); null when there is none."""
    body = run.resp_body
    if not body:
        return None
    kind = next((v for k, v in run.resp_headers or () if k.lower() == "content-type"), "")
    if "json" in kind.lower():
        try:  # bounded as every JSON the gateway stores is (NaN, depth, ...)
            return jsonin.loads(body)
        except jsonin.BadJSON:
            pass
    return body.decode("utf-8", "replace")
