"""The step callback API on the internal listener.

    GET {cb}/steps            the run's step records, in call order
    PUT {cb}/steps/{step_id}  record an output, a failed attempt, a sleep or a wait
    POST {cb}/events          send an event as the run's step (sent once, however often the
                              handler is replayed)

`{cb}` is `/v1/runs/{run_id}`. Every call carries its attempt's token as a bearer token, so a
caller can read or write only the run it was invoked for, and only while its attempt is the
run's current one: a superseded attempt gets `409` with the problem type `SUPERSEDED` and
records nothing. Every write is committed (and with `durability: full`, fsynced) before the
answer leaves.

Bodies are parsed by `gateway.jsonin`; what a PUT may hold (depth, numbers, text, `seq`, how far
ahead a step may park) is bounded so that every record can be read back and shown, and the
bounds are listed in docs/protocol.md, "Limits".
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from urllib.parse import unquote

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import flow, jsonin
from gateway.auth import bearer_token, sent_event_id
from gateway.config import Concurrency, Rate, Route, parse_duration
from gateway.engine import ENGINE, Engine
from gateway.engine.intake import new_secret
from gateway.errors import StoreError
from gateway.events import MAX_NAME, is_name
from gateway.model import Run, RunStatus, Step, StepKind, StepStatus
from gateway.policies import PolicyError, StepPolicy, parse_policy
from gateway.problem import Problem
from gateway.proxy import forward_request_headers
from gateway.store import (
    AttemptFenced,
    Refused,
    StepCall,
    StepWrite,
    UnknownRun,
    WrongToken,
)
from gateway.store.rules import signal_url

log = structlog.get_logger("stepgate.callbacks")

MAX_STEP_ID = 256
DEFAULT_WAIT_TIMEOUT = 24 * 3600.0
# seq is stored in an SQLite INTEGER (8 bytes) and counts a handler's steps: 2**31 is plenty.
MAX_SEQ = 2**31 - 1
# How far ahead a step may park: a wait's time-out and a sleep's end. A year, so an annual
# reminder fits; beyond it the moment is most likely a unit mistake, and year 9999 would no
# longer render as a time.
MAX_PARK = 366 * 86400.0
# A sleep may end in the past (it completes at once), but not before 1970: older moments are
# clock or parsing errors, and year 1 cannot be rendered in UTC.
MIN_UNTIL = 0.0
# Longer duration and timestamp texts are not durations or timestamps anyone writes.
_MAX_TEXT = 64
_KINDS = ("output", "error", "sleep", "wait", "signal", "invoke")


_dump = jsonin.dump


def _json_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="application/json")


def _step_json(step: Step, links: Links | None = None) -> str:
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
    if step.final:
        parts.append('"final":true')
    if links is not None:
        parts += linked_members(step, links)
    return "{" + ",".join(parts) + "}"


@dataclass(frozen=True, slots=True)
class Links:
    """What a run's signal and invoke steps point at: the URLs of its signals and the child runs
    of its invokes, by step id."""

    urls: dict[str, str] = field(default_factory=dict)
    children: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def of(cls, engine: Engine, run_id: str, steps: list[Step]) -> Links:
        """Read only for a run that has such steps (most have none)."""
        kinds = {step.kind for step in steps}
        urls: dict[str, str] = {}
        children: dict[str, str] = {}
        if StepKind.SIGNAL in kinds:
            base = engine.settings.public_url
            urls = {
                step_id: signal_url(base, ref.id, ref.token)
                for step_id, ref in (await engine.store.signals(run_id)).items()
            }
        if StepKind.INVOKE in kinds:
            _, below = await engine.store.links(run_id)
            children = {link.step_id: link.child_id for link in below}
        return cls(urls, children)


def linked_members(step: Step, links: Links) -> list[str]:
    """A signal step's `url`; an invoke step's child `run_id`."""
    if step.kind == StepKind.SIGNAL and step.id in links.urls:
        return [f'"url":{_dump(links.urls[step.id])}']
    if step.kind == StepKind.INVOKE and step.id in links.children:
        return [f'"run_id":{_dump(links.children[step.id])}']
    return []


SUPERSEDED: Final = "https://stepgate.dev/problems/superseded"


def _refusal(exc: Refused | StoreError) -> Problem:
    """The answer to a callback that a store transaction refused."""
    if isinstance(exc, AttemptFenced):
        run = exc.run
        if run.ended:
            detail = f"the run has ended ({run.status}); attempt {exc.attempt} may record nothing"
        else:
            detail = (
                f"attempt {exc.attempt} was superseded (the run is {run.status}, "
                f"attempt {run.attempt}); stop: nothing more of it is recorded"
            )
        return Problem(
            409,
            detail,
            title="Attempt superseded",
            type=SUPERSEDED,
            run_id=run.id,
            attempt=exc.attempt,
            current_attempt=run.attempt,
            run_status=str(run.status),
        )
    if isinstance(exc, UnknownRun):
        return Problem(404, "no such run")
    if isinstance(exc, WrongToken):
        return Problem(
            401,
            "wrong token for this run",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    log.warning("store.write_failed", during="callback", error=str(exc))
    return Problem(
        503,
        "the run store is not available; nothing was recorded, try again",
        headers={"Retry-After": "1"},
    )


def _token(request: web.Request) -> str:
    token = bearer_token(request)
    if token is None:
        raise Problem(
            401,
            "send the attempt's token as `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token


async def list_steps(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    token = _token(request)
    try:
        run = await engine.store.check_callback(request.match_info["run_id"], token)
        steps = await engine.store.steps(run.id)
        links = await Links.of(engine, run.id, steps)
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    return _json_response('{"steps":[' + ",".join(_step_json(s, links) for s in steps) + "]}")


def _step_id(request: web.Request) -> str:
    raw = request.raw_path.partition("?")[0]
    encoded = raw.split("/steps/", 1)[1]
    try:
        step_id = unquote(encoded, errors="strict")
    except UnicodeDecodeError as exc:
        raise Problem(400, "the step id is not valid percent-encoded UTF-8") from exc
    if not is_name(step_id, MAX_STEP_ID):
        raise Problem(400, f"a step id has 1 to {MAX_STEP_ID} characters, none of them NUL")
    return step_id


async def _body(request: web.Request) -> dict[str, Any]:
    body = await jsonin.read_object(request)
    kinds = [k for k in _KINDS if k in body]
    if len(kinds) != 1:
        raise Problem(400, "the body needs exactly one of output, error, sleep or wait")
    unknown = set(body) - {*_KINDS, "seq", "policy"}
    if unknown:
        raise Problem(400, f"unknown field {sorted(unknown)[0]!r}")
    if "policy" in body and "error" not in body:
        raise Problem(400, "policy goes only with an error (a failed attempt)")
    seq = body.get("seq")
    if seq is not None and (
        not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ
    ):
        raise Problem(400, f"seq must be a whole number from 0 to {MAX_SEQ}")
    return body


async def put_step(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    engine = request.app[ENGINE]
    token = _token(request)
    run_id = request.match_info["run_id"]
    try:  # who is asking comes first: a stranger's body is never read, let alone parsed
        await engine.store.authenticate(run_id, token)
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    step_id = _step_id(request)
    body = await _body(request)
    now = time.time()
    call = await _invoke_call(engine, run_id, body, now) if "invoke" in body else _call(body, now)
    try:
        write = await engine.store.put_step(
            run_id,
            token,
            step_id,
            call,
            now=now,
            lookback_since=now - engine.settings.events_lookback,
        )
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    _check_kind(write, call.kind)
    if write.created:
        engine.metrics.step(write.route, write.step.status)
        log.debug(
            "step.recorded",
            run_id=write.step.run_id,
            route=write.route,
            step=write.step.id,
            kind=str(write.step.kind),
            status=str(write.step.status),
            attempts=write.step.attempts,
            final=write.step.final,
        )
    if write.started is not None:
        start_child(engine, write.started, parent=run_id, step=step_id)
    engine.metrics.checkpoint_duration.observe(time.perf_counter() - started)
    if call.kind in (StepKind.SIGNAL, StepKind.INVOKE):
        return _linked_answer(engine, write)
    return _answer(write, call)


def _call(body: dict[str, Any], now: float) -> StepCall:
    """The validated body of a step PUT as what to record."""
    seq = body.get("seq")
    if "output" in body:
        return StepCall(StepKind.RUN, StepStatus.COMPLETED, seq, output=_dump(body["output"]))
    if "error" in body:
        error = _error(body["error"])
        return StepCall(
            StepKind.RUN,
            StepStatus.FAILED,
            seq,
            error=_dump(error),
            no_retry=error.get("retriable") is False,
            policy=_policy(body["policy"]) if "policy" in body else None,
        )
    if "sleep" in body:
        until = _until(body["sleep"], now)
        due = until <= now
        return StepCall(
            StepKind.SLEEP,
            StepStatus.COMPLETED if due else StepStatus.SLEEPING,
            seq,
            output="null" if due else None,
            wake_at=until,
        )
    if "signal" in body:
        return StepCall(
            StepKind.SIGNAL,
            StepStatus.WAITING,
            seq,
            wake_at=now + _signal_timeout(body["signal"]),
            signal_id=secrets.token_urlsafe(16),
            signal_token=secrets.token_urlsafe(24),
        )
    match, event, timeout = _wait(body["wait"])
    return StepCall(
        StepKind.WAIT,
        StepStatus.WAITING,
        seq,
        wake_at=now + timeout,
        event=event,
        match=_dump(match),
    )


def _answer(write: StepWrite, call: StepCall) -> web.Response:
    step = write.step
    if step.status == StepStatus.COMPLETED:
        status = 201 if write.created and call.kind == StepKind.RUN else 200
        output = step.output if step.output is not None else "null"
        return _json_response(f'{{"status":"completed","output":{output}}}', status)
    if step.status == StepStatus.FAILED:
        final = ',"final":true' if step.final else ""
        return _json_response(f'{{"status":"failed","attempts":{step.attempts}{final}}}')
    return _json_response(_dump({"status": str(step.status)}))


def _check_kind(write: StepWrite, kind: StepKind) -> None:
    if write.step.kind != kind:
        raise Problem(
            409,
            f"step {write.step.id!r} is recorded as a {write.step.kind} step, not a {kind} step",
        )


def _policy(value: object) -> StepPolicy:
    try:
        return parse_policy(value)
    except PolicyError as exc:
        raise Problem(exc.status, str(exc)) from exc


def _error(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("message"), str):
        raise Problem(400, "error must be an object with a string message")
    if "type" in value and not isinstance(value["type"], str):
        raise Problem(400, "error.type must be a string")
    if "retriable" in value and not isinstance(value["retriable"], bool):
        raise Problem(400, "error.retriable must be true or false")
    return value


def _until(value: object, now: float) -> float:
    if not isinstance(value, dict) or not isinstance(value.get("until"), str):
        raise Problem(400, 'sleep must be {"until": "<RFC 3339 timestamp>"}')
    unknown = set(value) - {"until"}
    if unknown:
        raise Problem(400, f"unknown field sleep.{sorted(unknown)[0]}")
    text = value["until"]
    try:
        if len(text) > _MAX_TEXT:
            raise ValueError(text)
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise Problem(
            400, f"sleep.until is not an RFC 3339 timestamp: {text[:_MAX_TEXT]!r}"
        ) from exc
    if moment.tzinfo is None:
        raise Problem(400, "sleep.until needs a time zone offset (RFC 3339), e.g. Z")
    until = moment.timestamp()
    if until < MIN_UNTIL:
        raise Problem(400, "sleep.until must be 1970-01-01T00:00:00Z or later")
    if until > now + MAX_PARK:
        raise Problem(400, f"sleep.until must be at most {MAX_PARK / 86400:.0f} days ahead")
    return until


def _wait(value: object) -> tuple[dict[str, Any], str, float]:
    if not isinstance(value, dict):
        raise Problem(400, 'wait must be {"event", "match"?, "timeout"?}')
    unknown = set(value) - {"event", "match", "timeout"}
    if unknown:
        raise Problem(400, f"unknown field wait.{sorted(unknown)[0]}")
    event = value.get("event")
    if not is_name(event):
        raise Problem(
            400, f"wait.event must be a string of 1 to {MAX_NAME} characters, without NUL"
        )
    match = value.get("match")
    if match is None:
        match = {}
    if not isinstance(match, dict):
        raise Problem(400, "wait.match must be an object of dotted paths to values")
    return match, event, _timeout(value.get("timeout", DEFAULT_WAIT_TIMEOUT))


def _timeout(value: object, key: str = "wait.timeout") -> float:
    if isinstance(value, str):
        try:
            if len(value) > _MAX_TEXT:
                raise ValueError(f"{value[:_MAX_TEXT]!r}... is not a duration")
            value = parse_duration(value)
        except (ValueError, ArithmeticError) as exc:
            raise Problem(400, f"{key}: {exc}") from exc
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise Problem(400, f"{key} must be a duration such as 30s or 1h")
    if value > MAX_PARK:  # compared before float(): an int may be too large for one
        raise Problem(400, f"{key} must be at most {MAX_PARK / 86400:.0f}d")
    return float(value)


# -- signals and child runs (protocol v1.1: step.signal, step.invoke) ----------------------------


def _signal_timeout(value: object) -> float:
    if not isinstance(value, dict):
        raise Problem(400, 'signal must be {"timeout"?: "<duration>"}')
    unknown = set(value) - {"timeout"}
    if unknown:
        raise Problem(400, f"unknown field signal.{sorted(unknown)[0]}")
    return _timeout(value.get("timeout", DEFAULT_WAIT_TIMEOUT), "signal.timeout")


async def _invoke_call(engine: Engine, run_id: str, body: dict[str, Any], now: float) -> StepCall:
    """An invoke PUT: the child run it would start (a POST of `body` as JSON to the route's
    path), recorded only if the step is new."""
    value = body["invoke"]
    if not isinstance(value, dict):
        raise Problem(400, 'invoke must be {"route": "<durable route name>", "body"?: <json>}')
    unknown = set(value) - {"route", "body"}
    if unknown:
        raise Problem(400, f"unknown field invoke.{sorted(unknown)[0]}")
    name = value.get("route")
    if not isinstance(name, str) or not name:
        raise Problem(400, "invoke.route must be the name of a durable route")
    route = engine.routes.get(name)
    if route is None:
        raise Problem(422, f"invoke.route: no route is named {name[:MAX_STEP_ID]!r}")
    if not route.durable:
        raise Problem(
            422, f"invoke.route: route {name!r} is not durable, so it cannot run as a child run"
        )
    try:
        parent = await engine.store.get_run(run_id)
        depth = await _depth(engine, run_id)
    except StoreError as exc:
        raise _refusal(exc) from exc
    if depth >= MAX_CHILD_DEPTH:
        raise Problem(
            422,
            f"invoke: this run is a child run {depth} levels deep, and child runs nest at most "
            f"{MAX_CHILD_DEPTH} deep (does a route invoke itself?)",
        )
    payload = _dump(value.get("body")).encode()
    if len(payload) > route.max_body:
        raise Problem(
            413, f"invoke.body is larger than {route.max_body} bytes, the limit of route {name!r}"
        )
    return StepCall(
        StepKind.INVOKE,
        StepStatus.WAITING,
        body.get("seq"),
        child=child_run(route, payload, parent, now),
    )


# Child runs of child runs of ...: a route that invokes itself would otherwise start runs
# without end, each parked on the next.
MAX_CHILD_DEPTH: Final = 16


async def _depth(engine: Engine, run_id: str) -> int:
    """How many parents the run has (0 for a run that is no child run)."""
    depth = 0
    while depth < MAX_CHILD_DEPTH:
        parent, _ = await engine.store.links(run_id)
        if parent is None:
            break
        run_id = parent.parent_id
        depth += 1
    return depth


def child_run(route: Route, payload: bytes, parent: Run | None, now: float) -> Run:
    """A child run of `route`, as a client's POST of `payload` to its path would make it; it
    shares the parent's trace."""
    given = {"Content-Type": "application/json"}
    trace = (
        next((v for k, v in parent.headers if k.lower() == "traceparent"), None) if parent else None
    )
    if trace is not None:
        given["traceparent"] = trace
    headers, trace_id = forward_request_headers(given, peer=None, scheme="http", host=None)
    seen = CIMultiDictProxy(CIMultiDict(headers))

    def key(limit: Concurrency | Rate | None) -> str | None:  # flow control's, as a client's
        return None if limit is None else flow.key_value(limit.key, seen, "", payload)

    return Run(
        id=secrets.token_urlsafe(16),
        route=route.name,
        status=RunStatus.RUNNING,
        attempt=1,
        token=new_secret(),
        poll_token=new_secret(),
        method="POST",
        target=route.base if route.prefix else route.path,
        headers=list(headers.items()),
        body=payload,
        created_at=now,
        updated_at=now,
        trace_id=trace_id,
        slot_key=key(route.concurrency),
        throttle_key=key(route.throttle),
    )


def start_child(engine: Engine, child: Run, *, parent: str, step: str) -> None:
    """Invoke a child run that a step write has just created, as a background run."""
    log.info("run.child_started", run_id=child.id, route=child.route, parent=parent, step=step)
    engine.invoker.spawn(child.id, engine.invoker.in_background(child))


def _linked_answer(engine: Engine, write: StepWrite) -> web.Response:
    step = write.step
    members: dict[str, Any] = {"status": str(step.status)}
    links = Links(
        urls={step.id: signal_url(engine.settings.public_url, *write.signal)}
        if write.signal
        else {},
        children={step.id: write.child_id} if write.child_id else {},
    )
    text = _dump(members)[:-1]
    if step.status == StepStatus.COMPLETED:
        text += f',"output":{step.output if step.output is not None else "null"}'
    elif step.status == StepStatus.FAILED and step.error is not None:
        text += f',"error":{step.error}'
    if step.final:
        text += ',"final":true'
    extra = linked_members(step, links)
    return _json_response(text + "".join("," + member for member in extra) + "}")


# --- POST {cb}/events: an event sent by the run, recorded as its step ----------------------

_EVENT_KEYS: Final = frozenset({"name", "data", "step", "seq"})


async def _event_body(request: web.Request) -> tuple[str, str, str, int | None]:
    """name, data (JSON text), step id and seq of a POST {cb}/events."""
    body = await jsonin.read_object(request)
    unknown = set(body) - _EVENT_KEYS
    if unknown:
        raise Problem(400, f"unknown field {sorted(unknown)[0]!r}")
    name, step_id, seq = body.get("name"), body.get("step"), body.get("seq")
    if not is_name(name):
        raise Problem(400, f"name must be a string of 1 to {MAX_NAME} characters, without NUL")
    if not is_name(step_id, MAX_STEP_ID):
        raise Problem(
            400, f"step must be the step id, a string of 1 to {MAX_STEP_ID} characters, no NUL"
        )
    if seq is not None and (
        not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ
    ):
        raise Problem(400, f"seq must be a whole number from 0 to {MAX_SEQ}")
    return name, _dump(body.get("data")), step_id, seq


async def post_event(request: web.Request) -> web.StreamResponse:
    """Send an event from the run, once: its id is derived from the run and the step, the
    event is delivered (a repeated id is delivered once), then recorded as the step. A step
    recorded already answers its event's id and sends nothing."""
    engine = request.app[ENGINE]
    token = _token(request)
    run_id = request.match_info["run_id"]
    try:
        await engine.store.authenticate(run_id, token)
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    name, data, step_id, seq = await _event_body(request)
    try:
        run = await engine.store.check_callback(run_id, token)
        recorded = next((s for s in await engine.store.steps(run_id) if s.id == step_id), None)
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    if recorded is not None:  # a replay: sent before, or the id is another kind of step
        _check_kind(StepWrite(False, recorded), StepKind.EVENT)
        return _json_response(_sent(recorded), 200)
    event_id = sent_event_id(run.token, step_id)
    now = time.time()
    output = _dump({"id": event_id, "name": name})
    try:
        woken = await engine.store.deliver_event(event_id, name, data, now)
        write = await engine.store.put_step(
            run_id,
            token,
            step_id,
            StepCall(StepKind.EVENT, StepStatus.COMPLETED, seq, output=output),
            now=now,
            lookback_since=now,
        )
    except (Refused, StoreError) as exc:
        raise _refusal(exc) from exc
    _check_kind(write, StepKind.EVENT)
    if not write.created:
        return _json_response(_sent(write.step), 200)
    engine.metrics.step(write.route, write.step.status)
    log.info(
        "event.sent",
        run_id=run_id,
        route=write.route,
        step=step_id,
        name=name,
        event_id=event_id,
        woke=len(woken or ()),
    )
    return _json_response(_dump({"id": event_id, "woke": len(woken or ())}), 201)


def _sent(step: Step) -> str:
    """The answer for an event step recorded before: its event's id."""
    output = json.loads(step.output) if step.output is not None else None
    event_id = output.get("id") if isinstance(output, dict) else None
    return _dump({"id": event_id})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runs/{run_id}/steps", list_steps)
    app.router.add_put("/v1/runs/{run_id}/steps/{step_id:.+}", put_step)
    app.router.add_post("/v1/runs/{run_id}/events", post_event)
