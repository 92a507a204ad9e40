"""Admin and event API on the internal listener.

    GET  /v1/runs                 list, newest first, with filters and a cursor
    GET  /v1/runs/{id}            one run with its whole timeline
    POST /v1/runs/{id}/retry      re-run an ended run from its failed step
    POST /v1/runs/{id}/cancel     cancel a run that has not ended
    POST /v1/events               deliver an event to waiting runs

When `admin_token` is set every one of these needs it as a bearer token.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from gateway.auth import bearer_token, same_secret
from gateway.callbacks import strict_json
from gateway.engine import ENGINE, Engine
from gateway.events import rfc3339
from gateway.lifecycle import STATES
from gateway.model import Run
from gateway.problem import problem

log = structlog.get_logger("stepgate.admin")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50


class _BadQuery(Exception):
    pass


def _authorized(request: web.Request, engine: Engine) -> web.Response | None:
    expected = engine.settings.admin_token
    if expected is None:
        return None
    given = bearer_token(request)
    if given is not None and same_secret(given, expected):
        return None
    return problem(401, detail="this call needs the admin token as a bearer token",
                   headers={"WWW-Authenticate": "Bearer"})


def _time(value: float | None) -> str | None:
    return None if value is None else rfc3339(value)


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "route": run.route,
        "status": str(run.status),
        "attempt": run.attempt,
        "created_at": _time(run.created_at),
        "updated_at": _time(run.updated_at),
    }


def _moment(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _BadQuery(f"{name} must be an RFC 3339 time or Unix seconds") from exc
    if moment.tzinfo is None:
        raise _BadQuery(f"{name} needs a time zone offset")
    return moment.timestamp()


def _encode_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        created, _, run_id = text.partition("~")
        return float(created), run_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise _BadQuery("cursor is not one this gateway gave out") from exc


async def list_runs(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    if (denied := _authorized(request, engine)) is not None:
        return denied
    query = request.query
    try:
        status = query.get("status") or None
        if status is not None and status not in STATES:
            raise _BadQuery(f"status must be one of {', '.join(sorted(STATES))}")
        limit = DEFAULT_LIMIT
        if "limit" in query:
            if not query["limit"].isdigit() or not 1 <= int(query["limit"]) <= MAX_LIMIT:
                raise _BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}")
            limit = int(query["limit"])
        page = await engine.store.list_runs(
            status=status,
            route=query.get("route") or None,
            since=_moment(query["since"], "since") if query.get("since") else None,
            until=_moment(query["until"], "until") if query.get("until") else None,
            limit=limit,
            cursor=_decode_cursor(query["cursor"]) if query.get("cursor") else None,
        )
    except _BadQuery as exc:
        return problem(400, detail=str(exc))
    return web.json_response({
        "runs": [run_summary(run) for run in page.runs],
        "next_cursor": _encode_cursor(page.next_cursor) if page.next_cursor else None,
    })


async def _run_or_problem(request: web.Request, engine: Engine) -> Run | web.Response:
    if (denied := _authorized(request, engine)) is not None:
        return denied
    run = await engine.lookup(request.match_info["run_id"])
    if run is None:
        return problem(404, detail="no such run")
    return run


async def show_run(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _run_or_problem(request, engine)
    if isinstance(run, web.Response):
        return run
    steps = await engine.store.steps(run.id)
    attempts = await engine.store.attempts(run.id)
    detail = run_summary(run) | {
        "method": run.method,
        "target": run.target,
        "trace_id": run.trace_id,
        "ended_at": _time(run.ended_at),
        "due_at": _time(run.due_at),
        "failures": run.failures,
        "error": run.error,
        "response_status": run.resp_status,
        "attempts": [
            {
                "n": a.n,
                "started_at": _time(a.started_at),
                "ended_at": _time(a.ended_at),
                "duration_ms": None if a.ended_at is None
                else round((a.ended_at - a.started_at) * 1000, 3),
                "outcome": a.outcome,
                "status": a.status,
                "error": a.error,
            }
            for a in attempts
        ],
        "steps": [
            {
                "id": s.id,
                "seq": s.seq,
                "kind": s.kind,
                "status": s.status,
                "attempts": s.attempts,
                "created_at": _time(s.created_at),
                "updated_at": _time(s.updated_at),
                "duration_ms": round((s.updated_at - s.created_at) * 1000, 3),
                "output": json.loads(s.output) if s.output is not None else None,
                "output_size": len(s.output) if s.output is not None else 0,
                "error": json.loads(s.error) if s.error is not None else None,
                "wake_at": _time(s.wake_at),
                "event": s.event,
                "match": json.loads(s.match) if s.match else None,
            }
            for s in steps
        ],
    }
    return web.json_response(detail)


async def retry_run(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _run_or_problem(request, engine)
    if isinstance(run, web.Response):
        return run
    retried = await engine.retry_ended(run.id)
    if retried is None:
        return problem(409, detail=f"the run has not ended ({run.status})", run_id=run.id)
    log.info("run.retry_requested", run_id=run.id, route=run.route)
    return web.json_response(run_summary(retried), status=202)


async def cancel_run(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _run_or_problem(request, engine)
    if isinstance(run, web.Response):
        return run
    cancelled = await engine.cancel(run.id)
    if cancelled is None:
        return problem(409, detail=f"the run has ended ({run.status})", run_id=run.id)
    return web.json_response(run_summary(cancelled))


async def post_event(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    if (denied := _authorized(request, engine)) is not None:
        return denied
    try:
        body = strict_json(await request.read())
    except web.HTTPRequestEntityTooLarge:
        return problem(413, detail=f"the body is larger than {request.client_max_size} bytes")
    except (ValueError, UnicodeDecodeError):
        return problem(400, detail="the body is not JSON")
    if not isinstance(body, dict):
        return problem(400, detail='the body must be {"name", "data", "id"?}')
    unknown = set(body) - {"name", "data", "id"}
    if unknown:
        return problem(400, detail=f"unknown field {sorted(unknown)[0]!r}")
    name, event_id = body.get("name"), body.get("id")
    if not isinstance(name, str) or not name:
        return problem(400, detail="name must be a non-empty string")
    if event_id is None:
        event_id = secrets.token_urlsafe(16)
    elif not isinstance(event_id, str) or not event_id or len(event_id) > 256:
        return problem(400, detail="id must be a string of 1 to 256 characters")
    now = time.time()
    data = json.dumps(body.get("data"), separators=(",", ":"))
    woken = await engine.store.deliver_event(event_id, name, data, now)
    if woken is None:
        return web.json_response({"id": event_id, "woke": 0, "duplicate": True}, status=202)
    log.info("event.received", name=name, event_id=event_id, woke=len(woken))
    return web.json_response({"id": event_id, "woke": len(woken)}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{run_id}", show_run)
    app.router.add_post("/v1/runs/{run_id}/retry", retry_run)
    app.router.add_post("/v1/runs/{run_id}/cancel", cancel_run)
    app.router.add_post("/v1/events", post_event)
