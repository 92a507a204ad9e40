from __future__ import annotations

import random
from dataclasses import replace
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import RetryPolicy
from gateway.retry import (
    RETRY_AFTER_CAP,
    Outcome,
    backoff,
    backoff_ceiling,
    is_retriable,
    method_may_retry,
    next_delay,
    parse_retry_after,
)

DEFAULT = RetryPolicy(
    attempts=4,
    initial=0.5,
    max=30.0,
    multiplier=2.0,
    on=frozenset({"5xx", "connect", "timeout", "429"}),
    non_idempotent=False,
)
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("on", "status", "failure", "reason"),
    [
        ({"5xx"}, 500, None, "5xx"),
        ({"5xx"}, 503, None, "5xx"),
        ({"5xx"}, 499, None, None),
        ({"5xx"}, 200, None, None),
        ({"5xx"}, None, "connect", None),
        ({"connect"}, None, "connect", "connect"),
        ({"timeout"}, None, "timeout", "timeout"),
        ({"timeout"}, None, "connect", None),
        ({"429", "4xx"}, 429, None, "429"),
        ({"4xx"}, 429, None, "4xx"),
        ({"4xx"}, 404, None, "4xx"),
        ({"409"}, 409, None, "409"),
        ({"409"}, 408, None, None),
        ({"5xx", "connect"}, None, None, None),
    ],
)
def test_is_retriable_returns_the_metrics_reason(
    on: set[str], status: int | None, failure: str | None, reason: str | None
) -> None:
    assert is_retriable(replace(DEFAULT, on=frozenset(on)), status, failure) == reason


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
def test_idempotent_methods_may_retry(method: str) -> None:
    assert method_may_retry(method, DEFAULT)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PROPFIND"])
def test_other_methods_retry_only_when_allowed(method: str) -> None:
    assert not method_may_retry(method, DEFAULT)
    assert method_may_retry(method, replace(DEFAULT, non_idempotent=True))


def test_backoff_grows_exponentially_then_caps() -> None:
    ceilings = [backoff_ceiling(DEFAULT, n) for n in range(1, 9)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_ceiling(DEFAULT, 0) == 0.5  # "no failure yet" is treated as the first
    assert backoff_ceiling(DEFAULT, 10_000) == 30.0  # no OverflowError


def test_backoff_is_equal_jitter() -> None:
    rng = random.Random(7)
    delays = [backoff(DEFAULT, 3, rng) for _ in range(2000)]
    assert all(1.0 <= d <= 2.0 for d in delays)
    # Jitter spreads the delays over the whole upper half, not around one value.
    assert min(delays) < 1.05 and max(delays) > 1.95


policies = st.builds(
    RetryPolicy,
    attempts=st.integers(1, 10),
    initial=st.floats(0.0, 60.0, allow_nan=False),
    max=st.floats(0.001, 3600.0, allow_nan=False),
    multiplier=st.floats(1.0, 10.0, allow_nan=False),
    on=st.just(frozenset({"5xx"})),
    non_idempotent=st.booleans(),
)


@given(policy=policies, failures=st.integers(-3, 5000), seed=st.integers(0, 2**32))
def test_backoff_bounds(policy: RetryPolicy, failures: int, seed: int) -> None:
    delay = backoff(policy, failures, random.Random(seed))
    ceiling = backoff_ceiling(policy, failures)
    assert 0.0 <= ceiling <= policy.max
    assert ceiling / 2 <= delay <= ceiling
    assert 0.0 <= delay <= policy.max


@given(policy=policies, failures=st.integers(1, 5000))
def test_backoff_upper_bound_never_decreases(policy: RetryPolicy, failures: int) -> None:
    assert backoff_ceiling(policy, failures) <= backoff_ceiling(policy, failures + 1)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("-3", 0.0),
        ("9" * 40, 1e15),
        (formatdate(NOW + 30, usegmt=True), 30.0),  # IMF-fixdate
        (formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: now
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # obsolete RFC 850 form
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "  ", "soon", "1.5", "+5", "5s", "-", "١٢"])
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises_or_goes_negative(value: str) -> None:
    parsed = parse_retry_after(value, NOW)
    assert parsed is None or parsed >= 0.0


def test_next_delay_honours_retry_after_on_429_and_503_only() -> None:
    rng = random.Random(1)
    assert next_delay(DEFAULT, 1, 429, "7", NOW, rng) == 7.0
    assert next_delay(DEFAULT, 1, 503, formatdate(NOW + 12, usegmt=True), NOW, rng) == 12.0
    # Longer than max is still honoured (it is the upstream's call), up to the cap.
    assert next_delay(DEFAULT, 1, 503, "3600", NOW, rng) == 3600.0
    assert next_delay(DEFAULT, 1, 503, "99999999", NOW, rng) == RETRY_AFTER_CAP
    for status, header in [(500, "7"), (429, "garbage"), (503, None), (None, "7")]:
        delay = next_delay(DEFAULT, 2, status, header, NOW, rng)
        assert 0.5 <= delay <= 1.0, (status, header)


def test_outcome_labels() -> None:
    assert Outcome(503).label == "5xx"
    assert Outcome(200).label == "2xx"
    assert Outcome(None, "timeout").label == "timeout"
    assert Outcome(None, "connect").label == "connect"
