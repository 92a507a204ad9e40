"""Step policies, pure: the policy a failed attempt carries, its back-off, the store's rule that
makes a step final, and the decision after an invocation that failed on such a step."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import lifecycle
from gateway.config import parse_settings
from gateway.model import Outcome, Run, RunStatus, Step, StepKind, StepStatus, UpstreamReply
from gateway.policies import PolicyError, StepPolicy, delay, load, parse_policy
from gateway.store.rules import StepCall, merge_step

ROUTE = parse_settings(
    {
        "routes": [
            {
                "name": "r",
                "path": "/r",
                "upstream": "http://127.0.0.1:9",
                "durable": True,
                "retry": {"attempts": 2, "initial": "10s", "max": "10s"},
            }
        ]
    },
    source="test",
).routes[0]
POLICY = StepPolicy(attempts=3, initial=0.1, max=0.4, multiplier=2.0)


def test_a_policy_is_parsed_with_defaults_and_stored_as_it_reads_back() -> None:
    assert parse_policy({"attempts": 5}) == StepPolicy(5, 1.0, 60.0, 2.0)
    assert parse_policy({"attempts": 2, "initial": "2m"}) == StepPolicy(2, 120.0, 120.0, 2.0)
    full = parse_policy({"attempts": 5, "initial": "250ms", "max": "1m", "multiplier": 1.5})
    assert full == StepPolicy(5, 0.25, 60.0, 1.5)
    assert load(full.dump()) == full
    assert full.dump() == '{"attempts":5,"initial":"250ms","max":"60s","multiplier":1.5}'


@pytest.mark.parametrize(
    ("value", "status", "detail"),
    [
        ([], 400, "must be an object"),
        ({"attempts": 1, "extra": 1}, 400, "unknown field policy.extra"),
        ({"attempts": "3"}, 400, "whole number"),
        ({"attempts": 1001}, 400, "from 1 to 1000"),
        ({"attempts": 1, "initial": "1w"}, 400, "unknown duration unit"),
        ({"attempts": 1, "initial": "-1s"}, 400, "policy.initial"),
        ({"attempts": 1, "max": "25h"}, 400, "at most 1d"),
        ({"attempts": 1, "multiplier": float("nan")}, 400, "from 1 to 100"),
        ({"attempts": 1, "multiplier": 101}, 400, "from 1 to 100"),
        ({"attempts": 1, "initial": "2s", "max": "1s"}, 422, "longer than policy.max"),
    ],
)
def test_a_bad_policy_is_refused_with_its_status(value: Any, status: int, detail: str) -> None:
    with pytest.raises(PolicyError, match=detail) as refused:
        parse_policy(value)
    assert refused.value.status == status


policies = st.builds(
    StepPolicy,
    attempts=st.integers(1, 1000),
    initial=st.floats(0, 86_400),
    max=st.floats(0.001, 86_400),
    multiplier=st.floats(1, 100),
).filter(lambda p: p.initial <= p.max)


@given(policy=policies, failures=st.integers(1, 2000), seed=st.integers())
def test_the_back_off_stays_within_half_the_ceiling_and_the_max(
    policy: StepPolicy, failures: int, seed: int
) -> None:
    wait = delay(policy, failures, random.Random(seed))
    if policy.initial == 0:
        ceiling = 0.0
    else:  # in logarithms: multiplier ** (failures - 1) may overflow a float
        grown = math.log(policy.initial) + (failures - 1) * math.log(policy.multiplier)
        ceiling = policy.max if grown >= math.log(policy.max) else math.exp(grown)
    assert ceiling / 2 * (1 - 1e-9) <= wait <= ceiling * (1 + 1e-9)
    assert wait <= 86_400


def step(**changes: Any) -> Step:
    base = Step("r1", "s", 0, StepKind.RUN, StepStatus.FAILED, None, '{"message":"no"}', 1, None,
                None, None, 1.0, 1.0, POLICY.dump(), False, 1)  # fmt: skip
    return replace(base, **changes)


FAILED = StepCall(StepKind.RUN, StepStatus.FAILED, 0, error='{"message":"no"}', policy=POLICY)


def test_the_attempt_that_reaches_the_budget_makes_the_step_final() -> None:
    first = merge_step(None, FAILED, "r1", "s", 1.0, attempt=1).step
    assert (first.attempts, first.final, first.failed_in) == (1, False, 1)
    second = merge_step(first, FAILED, "r1", "s", 2.0, attempt=2).step
    third = merge_step(second, FAILED, "r1", "s", 3.0, attempt=3).step
    assert (second.final, third.final, third.attempts, third.failed_in) == (False, True, 3, 3)
    # First write wins: nothing changes a final step.
    output = StepCall(StepKind.RUN, StepStatus.COMPLETED, 0, output="1")
    for call in (output, FAILED, StepCall(StepKind.RUN, StepStatus.FAILED, 0, error="{}")):
        write = merge_step(third, call, "r1", "s", 4.0, attempt=4)
        assert not write.created and write.step is third


def test_without_a_policy_a_step_is_never_final() -> None:
    call = StepCall(StepKind.RUN, StepStatus.FAILED, 0, error="{}")
    current = None
    for attempt in range(1, 50):
        current = merge_step(current, call, "r1", "s", 1.0, attempt=attempt).step
        assert not current.final and current.policy is None


def running(attempt: int = 2, **changes: Any) -> Run:
    now = time.time()
    run = Run("r1", "r", RunStatus.RUNNING, attempt, "t", "p", "POST", "/r", [], b"", now, now)
    return run.but(**changes)


def ended(attempt: int, status: int | None = 500, *, no_retry: bool = False) -> Outcome:
    reply = (
        None
        if status is None
        else UpstreamReply(status, None, [], b"", status == 202, no_retry, None)
    )
    return Outcome(attempt, 1.0, 2.0, reply, None if status is not None else "connect")


def decide(run: Run, outcome: Outcome, steps: list[Step]) -> lifecycle.AfterAttempt:
    return lifecycle.after_attempt(run, outcome, ROUTE, steps, 100.0, random.Random(7))


def test_a_failure_on_a_policy_step_is_retried_on_its_back_off_not_the_routes() -> None:
    after = decide(running(), ended(2), [step(attempts=2, failed_in=2)])
    assert after.run.status == RunStatus.RETRYING
    assert after.retry_reason == "step_policy"
    assert after.run.failures == 0
    assert after.delay is not None and 0.1 <= after.delay <= 0.2  # not the route's 10 s
    # A connection failure too; and with two such steps, the longer wait.
    slow = step(id="t", attempts=3, failed_in=2)
    both = decide(running(), ended(2, None), [step(attempts=1, failed_in=2), slow])
    assert both.delay is not None and 0.2 <= both.delay <= 0.4


def test_a_final_step_retries_at_once_and_other_outcomes_keep_their_meaning() -> None:
    final = step(attempts=3, final=True, failed_in=2)
    at_once = decide(running(), ended(2), [final])
    assert (at_once.run.status, at_once.delay, at_once.run.failures) == (
        RunStatus.RETRYING,
        0.0,
        0,
    )
    assert at_once.run.error == "step 's' failed for good after 3 attempt(s)"
    # The handler answered: its answer ends the run, compensated or not.
    assert decide(running(), ended(2, 409), [final]).run.status == RunStatus.FAILED
    assert decide(running(), ended(2, 200), [final]).run.status == RunStatus.COMPLETED
    no_retry = decide(running(), ended(2, no_retry=True), [final])
    assert no_retry.run.status == RunStatus.FAILED
    marked = decide(running(no_retry=True), ended(2), [final])
    assert marked.run.status == RunStatus.FAILED


def test_a_policy_failure_of_an_earlier_attempt_counts_against_the_route() -> None:
    after = decide(running(attempt=3), ended(3), [step(attempts=3, final=True, failed_in=2)])
    assert after.retry_reason == "5xx"
    assert after.run.failures == 1
