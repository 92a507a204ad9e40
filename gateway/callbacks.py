"""The step callback API on the internal listener.

    GET {cb}/steps            the run's step records, in call order
    PUT {cb}/steps/{step_id}  record an output, a failed attempt, a sleep or a wait

`{cb}` is `/v1/runs/{run_id}`. Every call carries its attempt's token as a bearer token, so a
caller can read or write only the run it was invoked for, and only while its attempt is the
run's current one: a superseded attempt gets `409` with the problem type `SUPERSEDED` and
records nothing. Every write is committed (and with `durability: full`, fsynced) before the
answer leaves.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from typing import Any, Final
from urllib.parse import unquote

import structlog
from aiohttp import web

from gateway.auth import bearer_token
from gateway.config import parse_duration
from gateway.engine import ENGINE
from gateway.errors import StoreError
from gateway.model import Step, StepKind, StepStatus
from gateway.problem import Problem
from gateway.store import (
    AttemptFenced,
    Refused,
    StepCall,
    StepWrite,
    UnknownRun,
    WrongToken,
)

log = structlog.get_logger("stepgate.callbacks")

MAX_STEP_ID = 256
DEFAULT_WAIT_TIMEOUT = 24 * 3600.0
_KINDS = ("output", "error", "sleep", "wait")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is not a finite number")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: bytes) -> Any:
    """Parse JSON as RFC 8259 has it: no NaN or Infinity, which would be stored and then make
    the run's step list unreadable to a strict client."""
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="application/json")


def _step_json(step: Step) -> str:
    """One step record; stored JSON is spliced in as is rather than parsed and dumped again."""
    parts = [
        f'"id":{_dump(step.id)}',
        f'"seq":{_dump(step.seq)}',
        f'"kind":{_dump(step.kind)}',
        f'"status":{_dump(step.status)}',
        f'"attempts":{step.attempts}',
    ]
    if step.status == "completed":
        parts.append(f'"output":{step.output if step.output is not None else "null"}')
    if step.error is not None:
        parts.append(f'"error":{step.error}')
    return "{" + ",".join(parts) + "}"


SUPERSEDED: Final = "https://stepgate.dev/problems/superseded"


def _refusal(exc: Refused | StoreError) -> Problem:
    """The answer to a callback that a store transaction refused."""
    if isinstance(exc, AttemptFenced):
        run = exc.run
        if run.ended:
            detail = f"the run has ended ({run.status}); attempt {exc.attempt} may record nothing"
        else:
            detail = (f"attempt {exc.attempt} was superseded (the run is {run.status}, "
                      f"attempt {run.attempt}); stop: nothing more of it is recorded")
        return Problem(409, detail, title="Attempt superseded", type=SUPERSEDED, run_id=run.id,
                       attempt=exc.attempt, current_attempt=run.attempt,
                       run_status=str(run.status))
    if isinstance(exc, UnknownRun):
        return Problem(404, "no such run")
    if isinstance(exc, WrongToken):
        return Problem(401, "wrong token for this run",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    log.warning("store.write_failed", during="callback", error=str(exc))
    return Problem(503, "the run store is not available; nothing was recorded, try again",
                   headers={"Retry-After": "1"})


def _token(request: web.Request) -> str:
    token = bearer_token(request)
    if token is None:
        raise Problem(401, "send the attempt's token as `Authorization: Bearer <token>`",
                      headers={"WWW-Authenticate": "Bearer"})
    return token


async def list_steps(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    token = _token(request)
    try:
        run = await engine.store.check_callback(request.match_info["run_id"], token)
        steps = await engine.store.steps(run.id)
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    return _json_response('{"steps":[' + ",".join(_step_json(s) for s in steps) + "]}")


def _step_id(request: web.Request) -> str:
    raw = request.raw_path.partition("?")[0]
    encoded = raw.split("/steps/", 1)[1]
    try:
        step_id = unquote(encoded, errors="strict")
    except UnicodeDecodeError as exc:
        raise Problem(400, "the step id is not valid percent-encoded UTF-8") from exc
    if not step_id or len(step_id) > MAX_STEP_ID:
        raise Problem(400, f"a step id has 1 to {MAX_STEP_ID} characters")
    return step_id


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise Problem(413, f"the body is larger than {request.client_max_size} bytes") from exc
    try:
        body = strict_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise Problem(400, "the body must be a JSON object")
    kinds = [k for k in _KINDS if k in body]
    if len(kinds) != 1:
        raise Problem(400, "the body needs exactly one of output, error, sleep or wait")
    unknown = set(body) - {*_KINDS, "seq"}
    if unknown:
        raise Problem(400, f"unknown field {sorted(unknown)[0]!r}")
    seq = body.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise Problem(400, "seq must be a non-negative integer")
    return body


async def put_step(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    token = _token(request)
    step_id = _step_id(request)
    body = await _body(request)
    now = time.time()
    call = _call(body, now)
    try:
        write = await engine.store.put_step(
            request.match_info["run_id"], token, step_id, call, now=now,
            lookback_since=now - engine.settings.events_lookback,
        )
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    _check_kind(write, call.kind)
    if write.created:
        engine.metrics.step(write.route, write.step.status)
        log.debug("step.recorded", run_id=write.step.run_id, route=write.route,
                  step=write.step.id, kind=str(write.step.kind), status=str(write.step.status))
    engine.metrics.checkpoint_duration.observe(time.perf_counter() - started)
    return _answer(write, call)


def _call(body: dict[str, Any], now: float) -> StepCall:
    """The validated body of a step PUT as what to record."""
    seq = body.get("seq")
    if "output" in body:
        return StepCall(StepKind.RUN, StepStatus.COMPLETED, seq, output=_dump(body["output"]))
    if "error" in body:
        error = _error(body["error"])
        return StepCall(StepKind.RUN, StepStatus.FAILED, seq, error=_dump(error),
                        no_retry=error.get("retriable") is False)
    if "sleep" in body:
        until = _until(body["sleep"])
        due = until <= now
        return StepCall(StepKind.SLEEP, StepStatus.COMPLETED if due else StepStatus.SLEEPING,
                        seq, output="null" if due else None, wake_at=until)
    match, event, timeout = _wait(body["wait"])
    return StepCall(StepKind.WAIT, StepStatus.WAITING, seq, wake_at=now + timeout, event=event,
                    match=_dump(match))


def _answer(write: StepWrite, call: StepCall) -> web.Response:
    step = write.step
    if step.status == StepStatus.COMPLETED:
        status = 201 if write.created and call.kind == StepKind.RUN else 200
        output = step.output if step.output is not None else "null"
        return _json_response(f'{{"status":"completed","output":{output}}}', status)
    if step.status == StepStatus.FAILED:
        return _json_response(f'{{"status":"failed","attempts":{step.attempts}}}')
    return _json_response(_dump({"status": str(step.status)}))


def _check_kind(write: StepWrite, kind: StepKind) -> None:
    if write.step.kind != kind:
        raise Problem(
            409, f"step {write.step.id!r} is recorded as a {write.step.kind} step, "
            f"not a {kind} step"
        )


def _error(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("message"), str):
        raise Problem(400, "error must be an object with a string message")
    if "type" in value and not isinstance(value["type"], str):
        raise Problem(400, "error.type must be a string")
    if "retriable" in value and not isinstance(value["retriable"], bool):
        raise Problem(400, "error.retriable must be true or false")
    return value


def _until(value: object) -> float:
    if not isinstance(value, dict) or not isinstance(value.get("until"), str):
        raise Problem(400, 'sleep must be {"until": "<RFC 3339 timestamp>"}')
    unknown = set(value) - {"until"}
    if unknown:
        raise Problem(400, f"unknown field sleep.{sorted(unknown)[0]}")
    text = value["until"]
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise Problem(400, f"sleep.until is not an RFC 3339 timestamp: {text!r}") from exc
    if moment.tzinfo is None:
        raise Problem(400, "sleep.until needs a time zone offset (RFC 3339), e.g. Z")
    return moment.timestamp()


def _wait(value: object) -> tuple[dict[str, Any], str, float]:
    if not isinstance(value, dict):
        raise Problem(400, 'wait must be {"event", "match"?, "timeout"?}')
    unknown = set(value) - {"event", "match", "timeout"}
    if unknown:
        raise Problem(400, f"unknown field wait.{sorted(unknown)[0]}")
    event = value.get("event")
    if not isinstance(event, str) or not event:
        raise Problem(400, "wait.event must be a non-empty string")
    match = value.get("match")
    if match is None:
        match = {}
    if not isinstance(match, dict):
        raise Problem(400, "wait.match must be an object of dotted paths to values")
    timeout = value.get("timeout", DEFAULT_WAIT_TIMEOUT)
    if isinstance(timeout, str):
        try:
            timeout = parse_duration(timeout)
        except ValueError as exc:
            raise Problem(400, f"wait.timeout: {exc}") from exc
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
        raise Problem(400, "wait.timeout must be a duration such as 30s or 1h")
    return match, event, float(timeout)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runs/{run_id}/steps", list_steps)
    app.router.add_put("/v1/runs/{run_id}/steps/{step_id:.+}", put_step)
