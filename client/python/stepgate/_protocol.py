"""The step protocol as pure functions: ids, request bodies, answers. No I/O.

`_step` (async) and `sync` (blocking) drive these with their transports, so both speak exactly
the same wire format. JSON shapes (see the gateway's callback API):

    GET {cb}/steps              -> {"steps": [{"id", "seq", "kind", "status", "output"?, ...}]}
    PUT {cb}/steps/{id}  {"output": v, "seq": k}                       -> 201 | 200 first output
                         {"error": {"message", "type", "retriable"}, "seq": k,
                          "policy"?: {"attempts", "initial", "max", "multiplier"}}
                                          -> 200 {"status": "failed", "attempts", "final"?}
                         {"sleep": {"until": RFC 3339}, "seq": k}
                         {"wait": {"event", "match", "timeout"}, "seq": k}
    POST {cb}/events     {"name", "data", "step": id, "seq": k}      -> 201 | 200 {"id", ...}
                         {"signal": {"timeout"}, "seq": k}    -> {"status", "url", "output"?}

Either call may be answered 409 with the problem type SUPERSEDED_TYPE (protocol v1.1): the
gateway has given up on the attempt that sent it, and nothing was recorded.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

from stepgate._transport import Reply
from stepgate.errors import (
    CallbackError,
    NonRetriableError,
    StepFailed,
    StepgateError,
    StepOutputError,
)

Kind = Literal["run", "sleep", "wait", "event", "signal", "invoke"]

MAX_STEP_ID = 256
# Room for the "#NNNN" repeat suffix inside the gateway's 256-character limit.
MAX_NAME = MAX_STEP_ID - 8
MAX_ERROR_MESSAGE = 4000
DEFAULT_WAIT_TIMEOUT = 24 * 3600.0
# The problem type of a callback refused because its attempt is fenced; other 409s (a step id
# recorded as another kind of step) are "about:blank".
SUPERSEDED_TYPE = "https://stepgate.dev/problems/superseded"

# One encoder, built once: json.dumps with options builds a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


@dataclass(frozen=True, slots=True)
class Call:
    """One step call: its id and position (`seq`) are fixed when the call is made."""

    name: str
    step_id: str
    seq: int
    kind: Kind


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the run recorded for a step before this invocation."""

    step_id: str
    seq: int
    kind: str | None
    status: str
    output: Any
    url: str | None = None  # a signal step's URL
    final: bool = False  # failed for good (step policies): raise StepFailed, do not run it
    error: dict[str, Any] | None = None
    attempts: int | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long a step's retries wait (step policies): after the n-th failed attempt about
    `min(max, initial * multiplier ** (n - 1))`, with jitter. Durations are timedeltas or
    seconds."""

    initial: timedelta | float = 1.0
    max: timedelta | float = 60.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        initial = to_seconds(self.initial, "Backoff initial")
        maximum = to_seconds(self.max, "Backoff max")
        if maximum <= 0 or maximum > MAX_BACKOFF:
            raise ValueError(f"Backoff max must be more than 0 and at most 1 day, got {self.max!r}")
        if initial > maximum:
            raise ValueError(
                f"Backoff initial ({self.initial!r}) is longer than max ({self.max!r})"
            )
        multiplier = self.multiplier
        if (
            not isinstance(multiplier, int | float)
            or isinstance(multiplier, bool)
            or not 1 <= multiplier <= MAX_MULTIPLIER
        ):
            raise ValueError(f"Backoff multiplier must be from 1 to 100, got {multiplier!r}")

    def wire(self) -> dict[str, Any]:
        return {
            "initial": format_duration(to_seconds(self.initial, "Backoff initial")),
            "max": format_duration(to_seconds(self.max, "Backoff max")),
            "multiplier": self.multiplier,
        }


MAX_RETRIES = 999  # the gateway takes at most 1000 attempts of a step
MAX_BACKOFF = 86_400.0
MAX_MULTIPLIER = 100.0


@dataclass(frozen=True, slots=True)
class Options:
    """A step's own policy: `retries` more attempts after the first failed one, on `backoff`;
    `timeout`: seconds one attempt may take before it is cut off (None: no limit)."""

    retries: int | None = None
    backoff: Backoff | None = None
    timeout: float | None = None

    @property
    def policy(self) -> dict[str, Any] | None:
        """The `policy` member of a failed attempt's PUT; None leaves it to the route."""
        if self.retries is None:
            return None
        return {"attempts": self.retries + 1, **(self.backoff or Backoff()).wire()}


NO_OPTIONS = Options()


def check_options(retries: object, backoff: object, timeout: timedelta | float | None) -> Options:
    if retries is None and backoff is None and timeout is None:
        return NO_OPTIONS
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        raise TypeError(f"retries is a whole number, got {type(retries).__name__}")
    if retries is not None and not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be from 0 to {MAX_RETRIES}, got {retries}")
    if isinstance(backoff, timedelta | int | float) and not isinstance(backoff, bool):
        backoff = Backoff(initial=backoff, max=max(to_seconds(backoff, "backoff"), 60.0))
    elif backoff is not None and not isinstance(backoff, Backoff):
        raise TypeError(
            f"backoff is a stepgate.Backoff or a duration, got {type(backoff).__name__}"
        )
    if backoff is not None and retries is None:
        raise ValueError("backoff needs retries=N (how many times the step is retried)")
    seconds = None
    if timeout is not None:
        seconds = to_seconds(timeout, "timeout")
        if seconds <= 0:
            raise ValueError("a step timeout must be longer than 0")
    return Options(retries, backoff, seconds)


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a step name is a str, got {type(name).__name__}")
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"a step name has 1 to {MAX_NAME} characters, got {len(name)}")
    if "#" in name:
        # "#" separates the repeat counter (name#2); allowing it could make two steps share an id.
        raise ValueError(f"a step name cannot contain '#': {name!r}")
    return name


def step_id_for(name: str, repeat: int) -> str:
    return name if repeat == 1 else f"{name}#{repeat}"


@functools.lru_cache(maxsize=1024)  # handlers reuse the same few step ids on every run
def quote_step_id(step_id: str) -> str:
    """Percent-encode like JavaScript's encodeURIComponent, so every SDK builds the same URL."""
    return quote(step_id, safe="!'()*")


def output_body(call: Call, value: object, run_id: str | None) -> bytes:
    try:
        encoded = _encode(value)
    except (TypeError, ValueError) as exc:
        raise StepOutputError(
            f"step {call.step_id!r} returned {type(value).__name__}, which is not JSON"
            f" ({exc}); return dicts, lists, str, int, float, bool or None",
            run_id=run_id,
            step_id=call.step_id,
        ) from exc
    return f'{{"output":{encoded},"seq":{call.seq}}}'.encode()


def check_output(call: Call, value: object) -> None:
    """Outside the gateway: fail on a non-JSON output now, not first in production."""
    output_body(call, value, None)


def error_object(exc: BaseException) -> dict[str, Any]:
    """A step's error as it is recorded: `{"message", "type", "retriable"}`."""
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else (f"{kind.__module__}.{kind.__qualname__}")
    )
    message = str(exc) or name
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 1] + "…"
    # A step that stored a non-JSON output would fail the same way on every retry.
    retriable = not isinstance(exc, NonRetriableError | StepOutputError)
    return {"message": message, "type": name, "retriable": retriable}


def error_body(call: Call, exc: BaseException, options: Options = NO_OPTIONS) -> bytes:
    error = error_object(exc)
    policy = options.policy
    if policy is None:
        return _encode({"error": error, "seq": call.seq}).encode()
    return _encode({"error": error, "seq": call.seq, "policy": policy}).encode()


def event_body(call: Call, data: object) -> bytes:
    try:
        encoded = _encode({"name": call.name, "data": data, "step": call.step_id, "seq": call.seq})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"send_event {call.name!r}: data must be JSON ({exc})") from exc
    return encoded.encode()


def final_failure(
    call: Call, run_id: str, error: object, attempts: object, cause: BaseException | None = None
) -> StepFailed:
    """The StepFailed for a step the gateway recorded as failed for good."""
    recorded = error if isinstance(error, dict) else None
    if recorded is None and cause is not None:  # recorded just now: what this attempt sent
        recorded = {k: v for k, v in error_object(cause).items() if k != "retriable"}
    count = attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else None
    message = recorded.get("message") if recorded is not None else None
    text = f"step {call.step_id!r} failed for good"
    if count is not None:
        text += f" after {count} attempt{'s' if count != 1 else ''}"
    if isinstance(message, str):
        text += f": {message}"
    return StepFailed(text, step_id=call.step_id, run_id=run_id, error=recorded, attempts=count)


def event_id(output: object, run_id: str, call: Call) -> str:
    """The event id of a send_event's answer or record."""
    found = output.get("id") if isinstance(output, dict) else None
    if not isinstance(found, str):
        raise CallbackError(
            f"the gateway's record of send_event {call.step_id!r} has no event id: {output!r}",
            run_id=run_id,
            step_id=call.step_id,
        )
    return found


def is_final(data: dict[str, Any]) -> bool:
    """Whether a step PUT's answer says the step has failed for good."""
    return data.get("status") == "failed" and data.get("final") is True


def sleep_body(call: Call, until: datetime) -> bytes:
    stamp = until.astimezone(UTC).isoformat(timespec="microseconds")
    return _encode({"sleep": {"until": stamp}, "seq": call.seq}).encode()


def wait_body(call: Call, event: str, match: Mapping[str, Any], timeout: float) -> bytes:
    wait = {"event": event, "match": dict(match), "timeout": format_duration(timeout)}
    try:
        return _encode({"wait": wait, "seq": call.seq}).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"wait_for_event {call.name!r}: match values must be JSON ({exc})") from exc


def format_duration(seconds: float) -> str:
    """Seconds -> "30s" or "1500ms", a form every gateway duration parser accepts."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{math.ceil(seconds * 1000)}ms"


def to_seconds(value: timedelta | float, what: str) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} is a timedelta or seconds, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite, non-negative duration, got {value!r}")
    return seconds


def check_moment(moment: object) -> datetime:
    if not isinstance(moment, datetime):
        raise TypeError(f"sleep_until takes a datetime, got {type(moment).__name__}")
    if moment.utcoffset() is None:
        # A naive time would mean a different instant on the gateway's host.
        raise ValueError("sleep_until needs a timezone-aware datetime (e.g. tzinfo=timezone.utc)")
    return moment


def check_wait(
    event: object, match: Mapping[str, Any] | None, timeout: timedelta | float
) -> tuple[str, Mapping[str, Any], float]:
    if not isinstance(event, str) or not event:
        raise ValueError("wait_for_event needs a non-empty event name (event=...)")
    if match is None:
        match = {}
    elif not isinstance(match, Mapping) or not all(isinstance(k, str) for k in match):
        raise TypeError("match maps dotted paths (str) such as 'data.order_id' to values")
    seconds = to_seconds(timeout, "timeout")
    if seconds <= 0:
        raise ValueError("a wait needs a positive timeout")
    return event, match, seconds


def now() -> datetime:
    return datetime.now(UTC)


def answer(reply: Reply, *, what: str, run_id: str, step_id: str | None = None) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else becomes a CallbackError."""
    if not 200 <= reply.status < 300:
        detail = _problem_detail(reply.body)
        raise CallbackError(
            f"the gateway answered {reply.status} to {what}" + (f": {detail}" if detail else ""),
            status=reply.status,
            run_id=run_id,
            step_id=step_id,
        )
    try:
        data = json.loads(reply.body)
    except ValueError as exc:
        raise CallbackError(
            f"the gateway answered {what} with invalid JSON",
            status=reply.status,
            run_id=run_id,
            step_id=step_id,
        ) from exc
    if not isinstance(data, dict):
        raise CallbackError(
            f"the gateway answered {what} with {type(data).__name__}, not an object",
            status=reply.status,
            run_id=run_id,
            step_id=step_id,
        )
    return data


def parked(data: dict[str, Any], parked_status: str, run_id: str, call: Call) -> bool:
    """True if a sleep/wait answer says "not yet", False if "completed"."""
    status = data.get("status")
    if status == "completed":
        return False
    if status == parked_status:
        return True
    raise CallbackError(
        f"the gateway answered {call.kind} {call.step_id!r} with status {status!r}",
        run_id=run_id,
        step_id=call.step_id,
    )


def superseded_problem(reply: Reply) -> dict[str, Any] | None:
    """The problem of a callback refused because its attempt is fenced, else None."""
    if reply.status != 409:
        return None
    try:
        problem = json.loads(reply.body)
    except ValueError:
        return None
    if isinstance(problem, dict) and problem.get("type") == SUPERSEDED_TYPE:
        return problem
    return None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, shortened, for a log line about an expected failure."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name


def _problem_detail(body: bytes) -> str:
    try:
        problem = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(problem, dict):
        return str(problem.get("detail") or problem.get("title") or "")
    return ""


def parse_steps(reply: Reply, run_id: str) -> dict[int, Recorded]:
    """GET {cb}/steps -> the recorded steps by seq."""
    data = answer(reply, what="GET steps", run_id=run_id)
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise CallbackError("the gateway's step list has no 'steps' array", run_id=run_id)
    recorded: dict[int, Recorded] = {}
    for position, item in enumerate(steps):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise CallbackError(
                f"the gateway's step list has a malformed entry: {item!r}", run_id=run_id
            )
        seq = item.get("seq")
        if not isinstance(seq, int):
            seq = position  # the list is in call order
        error = item.get("error")
        attempts = item.get("attempts")
        url = item.get("url")
        recorded[seq] = Recorded(
            item["id"],
            seq,
            item.get("kind"),
            str(item.get("status")),
            item.get("output"),
            final=item.get("final") is True,
            error=error if isinstance(error, dict) else None,
            attempts=attempts if isinstance(attempts, int) else None,
            url=url if isinstance(url, str) else None,
        )
    return recorded


def nested_step(name: str, outer: str) -> StepgateError:
    # A nested step would shift every later seq on replay once its outer step is replayed.
    return StepgateError(
        f"step {name!r} is called inside step {outer!r}; steps cannot nest (call it from the"
        " handler instead)",
        step_id=outer,
    )


def needs_gateway(name: str, what: str = "wait_for_event") -> StepgateError:
    return StepgateError(
        f"{what} {name!r} needs the Stepgate gateway: this request did not come through"
        " a durable route (no Stepgate-Callback/Stepgate-Token headers)"
    )


# -- signals (step.signal) ------------------------------------------------------------------


def check_timeout(timeout: timedelta | float, what: str) -> float:
    seconds = to_seconds(timeout, "timeout")
    if seconds <= 0:
        raise ValueError(f"{what} needs a positive timeout")
    return seconds


def signal_body(call: Call, timeout: float) -> bytes:
    return _encode({"signal": {"timeout": format_duration(timeout)}, "seq": call.seq}).encode()


@dataclass(frozen=True, slots=True)
class SignalState:
    """A signal as the gateway has it: its URL, and its output once it is completed."""

    url: str
    completed: bool
    output: Any = None


def recorded_signal(record: Recorded | None) -> SignalState | None:
    """The signal a replay finds recorded (a PUT is needed only without one)."""
    if record is None or record.url is None or record.status not in ("completed", "waiting"):
        return None
    return SignalState(record.url, record.status == "completed", record.output)


def signal_state(data: dict[str, Any], run_id: str, call: Call) -> SignalState:
    """The answer to a signal PUT: waiting with its URL, or completed with its output too."""
    url, status = data.get("url"), data.get("status")
    if not isinstance(url, str) or status not in ("completed", "waiting"):
        raise CallbackError(
            f"the gateway answered signal {call.step_id!r} with status {status!r}"
            + ("" if isinstance(url, str) else " and no url"),
            run_id=run_id,
            step_id=call.step_id,
        )
    return SignalState(url, status == "completed", data.get("output"))


def event_output(output: Any) -> dict[str, Any] | None:
    """A wait's output: the event object, or None when the wait timed out."""
    return output if isinstance(output, dict) else None


def tag(exc: BaseException, run_id: str, call: Call) -> None:
    """Say which step raised, for errors of ours that do not know yet."""
    if isinstance(exc, StepgateError) and exc.step_id is None:
        exc.run_id, exc.step_id = run_id, call.step_id


# -- child runs (step.invoke) ---------------------------------------------------------------


def check_invoke(name: str, route: object, body: object) -> str:
    """The JSON of an invoke's `{"route", "body"}`, checked before the call takes its seq."""
    if not isinstance(route, str) or not route:
        raise ValueError(f"invoke {name!r} needs route=, the name of a durable route")
    try:
        return _encode({"route": route, "body": body})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"invoke {name!r}: the body must be JSON ({exc})") from exc


def invoke_body(call: Call, invoke: str) -> bytes:
    """{"invoke": {"route", "body"}, "seq"}: the child run is a POST of `body` as JSON."""
    return f'{{"invoke":{invoke},"seq":{call.seq}}}'.encode()


def child_failure(call: Call, run_id: str, error: object) -> StepFailed:
    """The StepFailed for an invoke whose child run ended failed; `status` is the child's final
    HTTP status (None when it got none, or was cancelled)."""
    recorded = error if isinstance(error, dict) else None
    status = recorded.get("status") if recorded is not None else None
    message = recorded.get("message") if recorded is not None else None
    text = f"step {call.step_id!r} failed for good: " + (
        message if isinstance(message, str) else "its child run failed"
    )
    return StepFailed(
        text,
        step_id=call.step_id,
        run_id=run_id,
        error=recorded,
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
    )


def settled_invoke(record: Recorded) -> bool:
    """Whether a replay answers an invoke from its record: one that failed but is not final (an
    operator retried the run) starts a new child run instead."""
    return record.status in ("completed", "waiting") or (record.status == "failed" and record.final)


def invoke_outcome(data: dict[str, Any], run_id: str, call: Call) -> tuple[str, Any]:
    """An invoke's state from its record or PUT answer: ("completed", output), ("waiting",
    None) or ("failed", the StepFailed to raise)."""
    status = data.get("status")
    if status == "completed":
        return "completed", data.get("output")
    if status == "waiting":
        return "waiting", None
    if status == "failed":
        return "failed", child_failure(call, run_id, data.get("error"))
    raise CallbackError(
        f"the gateway answered invoke {call.step_id!r} with status {status!r}",
        run_id=run_id,
        step_id=call.step_id,
    )
