"""The rules of flow control (gateway.flow): the token bucket's turns and verdicts, the key a
request counts under, and what a run becomes when it may or may not start."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import flow
from gateway.config import Concurrency, FlowKey, Rate, Route, parse_settings
from gateway.model import Run, RunStatus

rates = st.builds(
    lambda limit, per, burst: Rate(limit, per, min(burst, limit * 4), None),
    st.integers(1, 50),
    st.sampled_from([0.1, 1.0, 60.0]),
    st.integers(1, 100),
)
gaps = st.lists(st.floats(0, 2.0, allow_nan=False), min_size=1, max_size=60)


@given(rates, gaps)
def test_throttle_turns_never_come_faster_than_the_rate_after_the_burst(
    rate: Rate, arrivals: list[float]
) -> None:
    now, tat, starts = 1000.0, None, []
    for gap in arrivals:
        now += gap
        start, tat = flow.turn(rate, tat, now)
        assert start >= now  # never before the request came
        starts.append(start)
    assert starts == sorted(starts)  # first come, first served
    for i, first in enumerate(starts):
        for j in range(i + 1, len(starts)):
            # j - i further starts need at least (j - i - burst + 1) intervals after the first
            assert starts[j] - first >= (j - i - rate.burst + 1) * rate.interval - 1e-6


@given(rates, gaps)
def test_a_rate_limit_allows_the_burst_then_one_per_interval(
    rate: Rate, arrivals: list[float]
) -> None:
    now, tat, allowed_at = 1000.0, None, []
    for gap in arrivals:
        now += gap
        wait, after = flow.allowed(rate, tat, now)
        if after is None:
            assert wait > 0
            # Honest: at now + wait exactly, the same bucket takes the request.
            assert flow.allowed(rate, tat, now + wait)[1] is not None
        else:
            assert wait == 0
            tat = after
            allowed_at.append(now)
    span = allowed_at[-1] - allowed_at[0] if allowed_at else 0.0
    assert len(allowed_at) <= rate.burst + span / rate.interval + 1e-6


def test_a_quick_burst_is_allowed_exactly_limit_requests() -> None:
    rate = Rate(3, 60.0, 3, None)
    tat, verdicts = None, []
    for _ in range(5):
        wait, after = flow.allowed(rate, tat, 50.0)
        verdicts.append(wait == 0)
        tat = after if after is not None else tat
    assert verdicts == [True, True, True, False, False]
    assert flow.allowed(rate, tat, 50.0)[0] == 20.0  # one comes back every 60 s / 3


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def test_key_values_come_from_a_header_the_query_or_a_json_body() -> None:
    tenant = FlowKey("header", "X-Tenant", "header:X-Tenant")
    assert flow.key_value(tenant, _headers(x_tenant="acme"), "", b"") == "acme"
    assert flow.key_value(tenant, _headers(), "", b"") == ""
    user = FlowKey("query", "user", "query:user")
    assert flow.key_value(user, _headers(), "a=1&user=bo%20b&user=x", b"") == "bo b"
    path = FlowKey("body", "order.items.0.sku", "body:order.items.0.sku")
    body = json.dumps({"order": {"items": [{"sku": "A-1"}]}}).encode()
    assert flow.key_value(path, _headers(), "", body) == "A-1"
    customer = FlowKey("body", "customer", "body:customer")
    assert flow.key_value(customer, _headers(), "", b'{"customer": 42}') == "42"
    assert flow.key_value(customer, _headers(), "", b'{"customer": {"b": 1, "a": 2}}') == (
        '{"a":2,"b":1}'
    )
    for not_there in (b"not json", b"[1]", b'{"customer": null}', b"{}", b"\xff"):
        assert flow.key_value(customer, _headers(), "", not_there) == ""


def test_long_and_nul_key_values_count_by_their_hash() -> None:
    user = FlowKey("query", "user", "query:user")
    long = flow.key_value(user, _headers(), "user=" + "x" * 500, b"")
    assert long.startswith("sha256:") and len(long) == 71
    assert flow.key_value(user, _headers(), "user=a%00b", b"").startswith("sha256:")
    assert long != flow.key_value(user, _headers(), "user=" + "x" * 501, b"")


def _run(status: RunStatus = RunStatus.RUNNING, **fields: object) -> Run:
    run = Run("r", "work", status, 1, "t", "p", "POST", "/w", [], b"", 1.0, 1.0, slot_key="")
    return run.but(**fields)


def _route(**flows: object) -> Route:
    base = {"name": "work", "path": "/w", "upstream": "http://127.0.0.1:1", "durable": True}
    return parse_settings({"routes": [{**base, **flows}]}, source="t").routes[0]


def test_a_new_run_starts_while_slots_are_free_and_nobody_waits() -> None:
    route = _route(concurrency=2)
    assert isinstance(route.concurrency, Concurrency)
    started = flow.admit(_run(), route, flow.Seen(held=1), 5.0).run
    assert (started.status, started.attempt) == (RunStatus.RUNNING, 1)
    full = flow.admit(_run(), route, flow.Seen(held=2), 5.0).run
    assert (full.status, full.attempt, full.due_at, full.queued_at) == (
        RunStatus.QUEUED,
        0,  # no attempt made yet: the claim that starts it makes the first
        None,
        5.0,
    )
    # A free slot does not let a newcomer pass the runs already waiting.
    behind = flow.admit(_run(), route, flow.Seen(held=1, waiting=1), 5.0).run
    assert behind.status == RunStatus.QUEUED


def test_a_throttled_run_waits_for_its_turn_holding_its_slot() -> None:
    route = _route(concurrency=5, throttle={"limit": 2, "per": "1s", "burst": 1})
    first = flow.admit(_run(), route, flow.Seen(), 10.0)
    assert first.run.status == RunStatus.RUNNING and first.tat == 10.5
    second = flow.admit(_run(), route, flow.Seen(held=1, tat=first.tat), 10.0)
    assert (second.run.status, second.run.due_at, second.tat) == (RunStatus.QUEUED, 10.5, 11.0)
    assert flow.holds_slot(second.run) and not flow.holds_slot(_run(RunStatus.QUEUED))


def test_a_retried_run_keeps_its_attempts_when_it_queues() -> None:
    route = _route(concurrency=1)
    retrying = _run(RunStatus.RETRYING, attempt=3, due_at=4.0)
    queued = flow.admit(retrying, route, flow.Seen(held=1), 5.0).run
    assert (queued.status, queued.attempt, queued.queued_at) == (RunStatus.QUEUED, 3, 5.0)
    # Given a slot later, it keeps its place in the queue's order and starts its 4th attempt.
    given_later = flow.given_slot(queued, route, None, 9.0, start=True).run
    assert (given_later.status, given_later.attempt) == (RunStatus.RUNNING, 4)
    kept = flow.given_slot(queued, route, None, 9.0, start=False).run
    assert (kept.status, kept.due_at, kept.queued_at) == (RunStatus.QUEUED, 9.0, 5.0)
