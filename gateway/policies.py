"""Step policies (protocol v1.1): a step's own retry budget and back-off. Pure: no I/O, no clock.

A failed-attempt PUT may carry `"policy": {"attempts", "initial"?, "max"?, "multiplier"?}`.
The store counts the step's failed attempts in the transaction that records one
(`gateway.store.rules.merge_step`); the count reaching `attempts` makes the step final. After
the invocation, `gateway.lifecycle.after_attempt` retries the run on the step's back-off,
counted against the step and not against the route's `retry.attempts`.

The bounds keep every policy one that can be stored, shown and acted on: a run is never parked
for longer than a day by a step's back-off (as by `Retry-After`, `gateway.retry`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any, Final

from gateway.config import parse_duration

MAX_ATTEMPTS: Final = 1000
MAX_DELAY: Final = 86_400.0  # seconds: a day, like the cap on Retry-After
MAX_MULTIPLIER: Final = 100.0
DEFAULT_INITIAL: Final = 1.0
DEFAULT_MAX: Final = 60.0
DEFAULT_MULTIPLIER: Final = 2.0
_KEYS: Final = frozenset({"attempts", "initial", "max", "multiplier"})
_MAX_TEXT: Final = 64


class PolicyError(ValueError):
    """A policy that cannot be taken; `status`: 400 when malformed, 422 when contradictory."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class StepPolicy:
    attempts: int  # failed attempts of the step that may happen, the first included
    initial: float  # seconds
    max: float  # seconds
    multiplier: float

    def dump(self) -> str:
        """The policy as it is stored with the step (and shown in the timeline)."""
        return json.dumps(
            {
                "attempts": self.attempts,
                "initial": _format(self.initial),
                "max": _format(self.max),
                "multiplier": self.multiplier,
            },
            separators=(",", ":"),
        )


def _format(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def parse_policy(value: object) -> StepPolicy:
    """A PUT's `policy` member, validated (raises PolicyError)."""
    if not isinstance(value, dict):
        raise PolicyError(
            'policy must be an object {"attempts", "initial"?, "max"?, "multiplier"?}'
        )
    unknown = set(value) - _KEYS
    if unknown:
        raise PolicyError(f"unknown field policy.{sorted(unknown)[0]}")
    attempts = value.get("attempts")
    if not isinstance(attempts, int) or isinstance(attempts, bool):
        raise PolicyError("policy.attempts must be a whole number")
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise PolicyError(f"policy.attempts must be from 1 to {MAX_ATTEMPTS}")
    initial = _duration(value, "initial", DEFAULT_INITIAL, allow_zero=True)
    maximum = _duration(value, "max", max(DEFAULT_MAX, initial), allow_zero=False)
    if initial > maximum:
        raise PolicyError(
            f"policy.initial ({_format(initial)}) is longer than policy.max ({_format(maximum)})",
            422,
        )
    multiplier = value.get("multiplier", DEFAULT_MULTIPLIER)
    if not isinstance(multiplier, int | float) or isinstance(multiplier, bool):
        raise PolicyError("policy.multiplier must be a number")
    if not (math.isfinite(multiplier) and 1 <= multiplier <= MAX_MULTIPLIER):
        raise PolicyError(f"policy.multiplier must be from 1 to {MAX_MULTIPLIER:g}")
    return StepPolicy(attempts, initial, maximum, float(multiplier))


def _duration(value: dict[str, Any], key: str, default: float, *, allow_zero: bool) -> float:
    if key not in value:
        return default
    text = value[key]
    if not isinstance(text, str):
        raise PolicyError(f'policy.{key} must be a duration text such as "500ms", "1s" or "1m"')
    try:
        if len(text) > _MAX_TEXT:
            raise ValueError(f"{text[:_MAX_TEXT]!r}... is not a duration")
        seconds = parse_duration(text)
    except (ValueError, ArithmeticError) as exc:
        raise PolicyError(f"policy.{key}: {exc}") from exc
    if seconds > MAX_DELAY:
        raise PolicyError(f"policy.{key} must be at most 1d")
    if seconds == 0 and not allow_zero:
        raise PolicyError(f"policy.{key} must be longer than 0")
    return seconds


def load(text: str | None) -> StepPolicy | None:
    """A stored policy (written by `StepPolicy.dump`), or None."""
    if text is None:
        return None
    data = json.loads(text)
    return StepPolicy(
        int(data["attempts"]),
        parse_duration(data["initial"]),
        parse_duration(data["max"]),
        float(data["multiplier"]),
    )


def delay(policy: StepPolicy, failures: int, rng: random.Random) -> float:
    """The wait before the step's next attempt after its `failures`-th failure: the route's
    back-off formula (equal jitter, `gateway.retry`) with the step's own numbers."""
    exponent = max(failures, 1) - 1
    if policy.initial <= 0.0:
        return 0.0
    try:
        ceiling = min(policy.max, policy.initial * policy.multiplier**exponent)
    except OverflowError:
        ceiling = policy.max
    half = ceiling / 2.0
    return half + rng.random() * half
