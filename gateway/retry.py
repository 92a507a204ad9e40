"""When to try an upstream again, and how long to wait first. Pure: no I/O, no clock.

Back-off uses "equal jitter": after the n-th failure the ceiling is
`min(max, initial * multiplier ** (n - 1))` and the delay is drawn uniformly from
`[ceiling / 2, ceiling]`. Half the ceiling is always waited, so a struggling upstream is never
hit again at once (as "full jitter" can do), and the random half still spreads clients that
failed together.

`Retry-After` (RFC 9110 §10.2.3) on a 429 or 503 replaces the computed back-off: the upstream
knows better than our guess. It is capped at `RETRY_AFTER_CAP` (one day) so a bogus date or a
huge number cannot park a run for years; callers that hold a client connection (plain routes)
apply their own, much lower, limit.
"""

from __future__ import annotations

import math
import random
from calendar import timegm
from dataclasses import dataclass
from email.utils import parsedate_tz
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from gateway.config import RetryPolicy

FailureKind = Literal["connect", "timeout"]

# RFC 9110 §9.2.2: methods whose intended effect is the same however often they are repeated.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

RETRY_AFTER_CAP: Final = 86_400.0
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one upstream attempt produced: a response status, or a failure with no response.

    `failure` is "connect" when no usable response came back (refused, reset, malformed) and
    "timeout" when none came back within the attempt's time limit.
    """

    status: int | None
    failure: FailureKind | None = None

    @property
    def label(self) -> str:
        """A low-cardinality label for metrics: "2xx" ... "5xx", "connect" or "timeout"."""
        if self.failure is not None:
            return self.failure
        if self.status is None:
            return "connect"
        return f"{self.status // 100}xx"


def is_retriable(policy: RetryPolicy, status: int | None, failure: str | None) -> str | None:
    """The reason to retry (a metrics label from `policy.on`), or None when the outcome is final.

    `failure` is a `FailureKind` when no response arrived; any other label retries only if the
    policy names it. An answer over `max_response` ("too_large") is answered to the client as a
    502, so it is retried as a 502 would be. A configured exact code ("429") wins over its class
    ("4xx"), so the label says what happened.
    """
    on = policy.on
    if failure == "too_large":
        status, failure = 502, None
    if failure is not None:
        return failure if failure in on else None
    if status is None:
        return None
    code = str(status)
    if code in on:
        return code
    klass = f"{status // 100}xx"
    return klass if klass in on else None


def method_may_retry(method: str, policy: RetryPolicy) -> bool:
    """Whether a plain route may send this request again (durable routes retry any method)."""
    return method in IDEMPOTENT_METHODS or policy.non_idempotent


def backoff_ceiling(policy: RetryPolicy, failures: int) -> float:
    """The largest delay `backoff` can return after `failures` failed attempts."""
    exponent = max(failures, 1) - 1
    try:
        ceiling = policy.initial * policy.multiplier**exponent
    except OverflowError:
        ceiling = math.inf
    # NaN cannot come from a validated policy, but must never turn into a negative sleep.
    if not ceiling > 0.0:
        return 0.0
    return min(policy.max, ceiling) if policy.max > 0.0 else 0.0


def backoff(policy: RetryPolicy, failures: int, rng: random.Random) -> float:
    """Equal-jitter exponential delay in seconds after `failures` (>= 1) failed attempts."""
    ceiling = backoff_ceiling(policy, failures)
    half = ceiling / 2.0
    return half + rng.random() * half


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` value, `now` being the current Unix time.

    Accepts delta-seconds and HTTP-dates (IMF-fixdate and the two obsolete forms, parsed as
    leniently as RFC 9110 §5.6.7 encourages). A date in the past and a negative number (not
    valid, but unambiguous) mean "now" (0); anything unparseable is None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    digits = text[1:] if text[0] == "-" else text
    if digits.isascii() and digits.isdigit():
        if text[0] == "-":
            return 0.0
        # Far beyond any cap; also keeps int() clear of its 4300-digit guard.
        return float(int(digits)) if len(digits) <= 15 else 1e15
    try:
        parts = parsedate_tz(text)
        if parts is None:
            return None
        # HTTP-dates are always GMT; honour an explicit numeric zone if a sender added one.
        when = timegm(parts[:9]) - (parts[9] or 0)
    except (ValueError, OverflowError, TypeError):
        return None
    return max(0.0, when - now)


def next_delay(
    policy: RetryPolicy,
    failures: int,
    status: int | None,
    retry_after: str | None,
    now: float,
    rng: random.Random,
) -> float:
    """The wait before the next attempt: `Retry-After` on 429/503 if usable, else `backoff`."""
    if status in _RETRY_AFTER_STATUSES:
        asked = parse_retry_after(retry_after, now)
        if asked is not None:
            return min(asked, RETRY_AFTER_CAP)
    return backoff(policy, failures, rng)
