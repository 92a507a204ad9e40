"""The step callback API on the internal listener.

    GET {cb}/steps            the run's step records, in call order
    PUT {cb}/steps/{step_id}  record an output, a failed attempt, a sleep or a wait

`{cb}` is `/v1/runs/{run_id}`. Every call carries the run's own token as a bearer token, so a
caller can read or write only the run it was invoked for. Every write is committed (and with
`durability: full`, fsynced) before the answer leaves.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import structlog
from aiohttp import web

from gateway.auth import bearer_token, same_secret
from gateway.config import parse_duration
from gateway.engine import ENGINE, Engine
from gateway.problem import problem
from gateway.store import Run, Step, StepWrite

log = structlog.get_logger("stepgate.callbacks")

MAX_STEP_ID = 256
DEFAULT_WAIT_TIMEOUT = 24 * 3600.0
_KINDS = ("output", "error", "sleep", "wait")


class BadRequest(Exception):
    """A malformed callback; the message goes to the caller as the problem detail."""

    status = 400


class TooLarge(BadRequest):
    status = 413


class Conflict(BadRequest):
    """The call contradicts the record (a step id recorded as another kind of step)."""

    status = 409


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


async def _authorize(request: web.Request, engine: Engine) -> Run | web.Response:
    token = bearer_token(request)
    if token is None:
        return problem(401, detail="send the run's token as `Authorization: Bearer <token>`",
                       headers={"WWW-Authenticate": "Bearer"})
    run = await engine.lookup(request.match_info["run_id"])
    if run is None:
        return problem(404, detail="no such run")
    if not same_secret(token, run.token):
        return problem(401, detail="wrong token for this run",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return run


async def list_steps(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _authorize(request, engine)
    if isinstance(run, web.StreamResponse):
        return run
    steps = await engine.store.steps(run.id)
    return _json_response('{"steps":[' + ",".join(_step_json(s) for s in steps) + "]}")


def _step_id(request: web.Request) -> str:
    raw = request.raw_path.partition("?")[0]
    encoded = raw.split("/steps/", 1)[1]
    try:
        step_id = unquote(encoded, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest("the step id is not valid percent-encoded UTF-8") from exc
    if not step_id or len(step_id) > MAX_STEP_ID:
        raise BadRequest(f"a step id has 1 to {MAX_STEP_ID} characters")
    return step_id


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise TooLarge(f"the body is larger than {request.client_max_size} bytes") from exc
    try:
        body = strict_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    kinds = [k for k in _KINDS if k in body]
    if len(kinds) != 1:
        raise BadRequest("the body needs exactly one of output, error, sleep or wait")
    unknown = set(body) - {*_KINDS, "seq"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    seq = body.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise BadRequest("seq must be a non-negative integer")
    return body


async def put_step(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    run = await _authorize(request, engine)
    if isinstance(run, web.StreamResponse):
        return run
    try:
        step_id = _step_id(request)
        body = await _body(request)
        if run.ended:
            return problem(409, detail=f"the run has ended ({run.status})", run_id=run.id)
        response = await _record(engine, run, step_id, body)
    except BadRequest as exc:
        return problem(exc.status, detail=str(exc))
    engine.metrics.checkpoint_duration.observe(time.perf_counter() - started)
    return response


async def _record(engine: Engine, run: Run, step_id: str, body: dict[str, Any]) -> web.Response:
    now = time.time()
    seq = body.get("seq")
    store = engine.store
    if "output" in body:
        write = await store.put_step(run.id, step_id, seq=seq, kind="run", status="completed",
                                     output=_dump(body["output"]), now=now)
        _check_kind(write, "run")
        _recorded(engine, run, write)
        return _json_response(
            f'{{"status":"completed","output":{write.step.output}}}', 201 if write.created else 200
        )
    if "error" in body:
        error = _error(body["error"])
        no_retry = error.get("retriable") is False
        write = await store.put_step(run.id, step_id, seq=seq, kind="run", status="failed",
                                     error=_dump(error), no_retry=no_retry, now=now)
        _check_kind(write, "run")
        if write.created and no_retry:
            run.no_retry = True
        _recorded(engine, run, write)
        if write.step.status == "completed":
            return _json_response(f'{{"status":"completed","output":{write.step.output}}}')
        return _json_response(f'{{"status":"failed","attempts":{write.step.attempts}}}')
    if "sleep" in body:
        until = _until(body["sleep"])
        due = until <= now
        write = await store.put_step(
            run.id, step_id, seq=seq, kind="sleep",
            status="completed" if due else "sleeping", output="null" if due else None,
            wake_at=until, now=now,
        )
        _check_kind(write, "sleep")
        _recorded(engine, run, write)
        return _json_response(_dump({"status": write.step.status}))
    match, event, timeout = _wait(body["wait"])
    write = await store.register_wait(
        run.id, step_id, seq=seq, event=event, match=_dump(match), timeout_at=now + timeout,
        lookback_since=now - engine.settings.events_lookback, now=now,
    )
    _check_kind(write, "wait")
    _recorded(engine, run, write)
    if write.step.status == "completed":
        return _json_response(f'{{"status":"completed","output":{write.step.output or "null"}}}')
    return _json_response('{"status":"waiting"}')


def _recorded(engine: Engine, run: Run, write: StepWrite) -> None:
    if not write.created:
        return
    engine.metrics.step(run.route, write.step.status)
    log.debug("step.recorded", run_id=run.id, route=run.route, attempt=run.attempt,
             step=write.step.id, kind=write.step.kind, status=write.step.status)


def _check_kind(write: StepWrite, kind: str) -> None:
    if write.step.kind != kind:
        raise Conflict(
            f"step {write.step.id!r} is recorded as a {write.step.kind} step, not a {kind} step"
        )


def _error(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("message"), str):
        raise BadRequest("error must be an object with a string message")
    if "type" in value and not isinstance(value["type"], str):
        raise BadRequest("error.type must be a string")
    if "retriable" in value and not isinstance(value["retriable"], bool):
        raise BadRequest("error.retriable must be true or false")
    return value


def _until(value: object) -> float:
    if not isinstance(value, dict) or not isinstance(value.get("until"), str):
        raise BadRequest('sleep must be {"until": "<RFC 3339 timestamp>"}')
    unknown = set(value) - {"until"}
    if unknown:
        raise BadRequest(f"unknown field sleep.{sorted(unknown)[0]}")
    text = value["until"]
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(f"sleep.until is not an RFC 3339 timestamp: {text!r}") from exc
    if moment.tzinfo is None:
        raise BadRequest("sleep.until needs a time zone offset (RFC 3339), e.g. Z")
    return moment.timestamp()


def _wait(value: object) -> tuple[dict[str, Any], str, float]:
    if not isinstance(value, dict):
        raise BadRequest('wait must be {"event", "match"?, "timeout"?}')
    unknown = set(value) - {"event", "match", "timeout"}
    if unknown:
        raise BadRequest(f"unknown field wait.{sorted(unknown)[0]}")
    event = value.get("event")
    if not isinstance(event, str) or not event:
        raise BadRequest("wait.event must be a non-empty string")
    match = value.get("match")
    if match is None:
        match = {}
    if not isinstance(match, dict):
        raise BadRequest("wait.match must be an object of dotted paths to values")
    timeout = value.get("timeout", DEFAULT_WAIT_TIMEOUT)
    if isinstance(timeout, str):
        try:
            timeout = parse_duration(timeout)
        except ValueError as exc:
            raise BadRequest(f"wait.timeout: {exc}") from exc
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
        raise BadRequest("wait.timeout must be a duration such as 30s or 1h")
    return match, event, float(timeout)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runs/{run_id}/steps", list_steps)
    app.router.add_put("/v1/runs/{run_id}/steps/{step_id:.+}", put_step)
