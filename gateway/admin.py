"""Admin and event API on the internal listener.

    GET  /v1/runs                 list, newest first, with filters and a cursor
    GET  /v1/runs/{id}            one run with its whole timeline
    POST /v1/runs/{id}/retry      re-run an ended run from its failed step
    POST /v1/runs/{id}/cancel     cancel a run that has not ended
    POST /v1/runs/retry           the same for the runs the filters select (status, route,
    POST /v1/runs/cancel            since, until; at least one), at most `limit`; `dry_run`
                                    counts only: {"count", "more", "dry_run"}
    GET  /v1/replicas             the gateways serving the store
    POST /v1/reload               read the config file again (gateway.app.reload_endpoint)
    POST /v1/events               deliver an event to waiting runs

When `admin_token` is set every one of these needs it as a bearer token.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

import structlog
from aiohttp import web

from gateway import jsonin
from gateway.auth import bearer_token, same_secret
from gateway.callbacks import Links, linked_members
from gateway.engine import ENGINE, Engine
from gateway.errors import StoreError
from gateway.events import MAX_NAME, is_name, rfc3339
from gateway.lifecycle import STATES
from gateway.model import Run, Step
from gateway.problem import Problem

log = structlog.get_logger("stepgate.admin")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
# Unix seconds as the admin API takes them, ASCII only: float() also reads "nan", "inf" and
# digits of other scripts.
_SECONDS: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _seconds(text: str) -> float | None:
    """Unix seconds as written in a query or a cursor, or None if it is not a finite number."""
    if len(text) > 40 or not _SECONDS.fullmatch(text):
        return None
    seconds = float(text)
    return seconds if math.isfinite(seconds) else None


def authorize(request: web.Request, engine: Engine) -> None:
    expected = engine.settings.admin_token
    if expected is None:
        return
    given = bearer_token(request)
    if given is None or not same_secret(given, expected):
        raise Problem(
            401,
            "this call needs the admin token as a bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


@contextmanager
def _store() -> Iterator[None]:
    """A store that cannot answer is a 503 the caller may retry, not a 500."""
    try:
        yield
    except StoreError as exc:
        log.warning("store.write_failed", during="admin", error=str(exc))
        raise Problem(
            503,
            "the run store is not available; nothing was changed, try again",
            headers={"Retry-After": "1"},
        ) from exc


def _time(value: float | None) -> str | None:
    """A stored moment in RFC 3339, or None when there is none or it is not a date
    (a row written before the bounds on sleeps and waits may hold one past year 9999)."""
    if value is None:
        return None
    try:
        return rfc3339(value)
    except (OverflowError, ValueError, OSError):
        return None


def _ms(start: float, end: float | None) -> float | None:
    if end is None:
        return None
    duration = round((end - start) * 1000, 3)
    return duration if math.isfinite(duration) and abs(duration) < 1e15 else None


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
    if (seconds := _seconds(value)) is not None:
        return seconds
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise Problem(400, f"{name} must be an RFC 3339 time or Unix seconds") from exc
    if moment.tzinfo is None:
        raise Problem(400, f"{name} needs a time zone offset")
    return moment.timestamp()


def _limit(value: str | None, *, default: int = DEFAULT_LIMIT, most: int = MAX_LIMIT) -> int:
    if value is None:
        return default
    # isdigit() alone takes "²" (superscript two), which int() then refuses.
    if not re.fullmatch(r"[0-9]{1,6}", value) or not 1 <= int(value) <= most:
        raise Problem(400, f"limit must be a whole number from 1 to {most}")
    return int(value)


def _encode_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        created, _, run_id = text.partition("~")
        moment = _seconds(created)
        if moment is None:
            raise ValueError(created)
        return moment, run_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise Problem(400, "cursor is not one this gateway gave out") from exc


def _filters(query: Mapping[str, str]) -> dict[str, Any]:
    """The filters of GET /v1/runs and of the bulk actions: status, route, since, until."""
    status = query.get("status") or None
    if status is not None and status not in STATES:
        raise Problem(400, f"status must be one of {', '.join(sorted(STATES))}")
    return {
        "status": status,
        "route": query.get("route") or None,
        "since": _moment(query["since"], "since") if query.get("since") else None,
        "until": _moment(query["until"], "until") if query.get("until") else None,
    }


async def list_runs(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    authorize(request, engine)
    query = request.query
    filters = _filters(query)
    limit = _limit(query.get("limit"))
    cursor = _decode_cursor(query["cursor"]) if query.get("cursor") else None
    with _store():
        page = await engine.store.list_runs(**filters, limit=limit, cursor=cursor)
    return web.json_response(
        {
            "runs": [run_summary(run) for run in page.runs],
            "next_cursor": _encode_cursor(page.next_cursor) if page.next_cursor else None,
        }
    )


async def _run(request: web.Request, engine: Engine) -> Run:
    authorize(request, engine)
    with _store():
        run = await engine.lookup(request.match_info["run_id"])
    if run is None:
        raise Problem(404, "no such run")
    return run


def _raw_object(fields: dict[str, Any], raw: dict[str, str | None]) -> str:
    """A JSON object of `fields`, then of `raw`: members whose values are stored JSON texts,
    spliced in as they are (null for None) rather than parsed and dumped again."""
    head = jsonin.dump(fields)[:-1]
    tail = "".join(
        f",{jsonin.dump(name)}:{'null' if text is None else text}" for name, text in raw.items()
    )
    return head + tail + "}" if fields else "{" + tail[1:] + "}"


def _step(step: Step, links: Links | None = None) -> str:
    text = _raw_object(
        {
            "id": step.id,
            "seq": step.seq,
            "kind": step.kind,
            "status": step.status,
            "attempts": step.attempts,
            "created_at": _time(step.created_at),
            "updated_at": _time(step.updated_at),
            "duration_ms": _ms(step.created_at, step.updated_at),
            "output_size": len(step.output) if step.output is not None else 0,
            "wake_at": _time(step.wake_at),
            "event": step.event,
            "final": step.final,
        },
        {
            "output": step.output,
            "error": step.error,
            "match": step.match or None,
            "policy": step.policy,
        },
    )
    extra = linked_members(step, links) if links is not None else []
    return text[:-1] + "".join("," + member for member in extra) + "}"


async def show_run(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _run(request, engine)
    with _store():
        steps = await engine.store.steps(run.id)
        attempts = await engine.store.attempts(run.id)
        links = await Links.of(engine, run.id, steps)
        parent, children = await engine.store.links(run.id)
        child_runs = [await engine.lookup(link.child_id) for link in children]
    detail = run_summary(run) | {
        "method": run.method,
        "target": run.target,
        "trace_id": run.trace_id,
        "ended_at": _time(run.ended_at),
        "due_at": _time(run.due_at),
        "failures": run.failures,
        "error": run.error,
        "response_status": run.resp_status,
        "unreadable": list(run.unreadable),
        # step.invoke: the run whose step started this one, and the runs its steps started.
        "parent_id": parent.parent_id if parent else None,
        "parent_step": parent.step_id if parent else None,
        "children": [
            {"id": link.child_id, "step": link.step_id}
            | ({"route": child.route, "status": str(child.status)} if child else {})
            for link, child in zip(children, child_runs, strict=True)
        ],
        "attempts": [
            {
                "n": a.n,
                "started_at": _time(a.started_at),
                "ended_at": _time(a.ended_at),
                "duration_ms": _ms(a.started_at, a.ended_at),
                "outcome": a.outcome,
                "status": a.status,
                "error": a.error,
            }
            for a in attempts
        ],
    }
    body = _raw_object(detail, {"steps": "[" + ",".join(_step(s, links) for s in steps) + "]"})
    return web.Response(text=body, content_type="application/json")


async def retry_run(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _run(request, engine)
    with _store():
        retried = await engine.retry_ended(run.id)
    if retried is None:
        raise Problem(409, f"the run has not ended ({run.status})", run_id=run.id)
    log.info("run.retry_requested", run_id=run.id, route=run.route)
    return web.json_response(run_summary(retried), status=202)


async def cancel_run(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    run = await _run(request, engine)
    with _store():
        cancelled = await engine.cancel(run.id)
    if cancelled is None:
        raise Problem(409, f"the run has ended ({run.status})", run_id=run.id)
    return web.json_response(run_summary(cancelled))


_BULK_PAGE = 500
BULK_LIMIT = 10_000  # runs one bulk call acts on at most, unless it names its own limit
MAX_BULK_LIMIT = 100_000


async def _bulk(
    request: web.Request,
    act: Callable[[Engine, str], Awaitable[Run | None]],
    qualifies: Callable[[Run], bool],
) -> web.StreamResponse:
    """`act` on the runs the filters select, one transaction a run (each is a compare-and-set,
    so a run that moved on meanwhile is passed over), at most `limit` of them; answers how many
    it acted on and whether more qualify. With `dry_run=true` it only counts them."""
    engine = request.app[ENGINE]
    authorize(request, engine)
    query = request.query
    unknown = set(query) - {"status", "route", "since", "until", "limit", "dry_run"}
    if unknown:
        raise Problem(
            400,
            f"unknown parameter {sorted(unknown)[0]!r}: the filters are status, route, since "
            "and until, besides limit and dry_run",
        )
    filters = _filters(query)
    if not any(value is not None for value in filters.values()):
        raise Problem(
            400,
            "name at least one filter (status, route, since, until): a bulk "
            "action on every run is not taken by accident",
        )
    limit = _limit(query.get("limit"), default=BULK_LIMIT, most=MAX_BULK_LIMIT)
    dry_run = query.get("dry_run", "false")
    if dry_run not in ("true", "false"):
        raise Problem(400, "dry_run must be true or false")
    count, more = 0, False
    cursor: tuple[float, str] | None = None
    with _store():
        while not more:
            page = await engine.store.list_runs(**filters, limit=_BULK_PAGE, cursor=cursor)
            for run in page.runs:
                if not qualifies(run):
                    continue
                if count == limit:
                    more = True
                    break
                if dry_run == "true" or await act(engine, run.id) is not None:
                    count += 1
            if page.next_cursor is None:
                break
            created, _, last_id = page.next_cursor.partition("~")
            cursor = (float(created), last_id)
    if dry_run == "false":
        log.info(
            "runs.bulk",
            path=request.path,
            count=count,
            more=more,
            **{k: v for k, v in filters.items() if v is not None},
        )
    return web.json_response({"count": count, "more": more, "dry_run": dry_run == "true"})


async def retry_runs(request: web.Request) -> web.StreamResponse:
    return await _bulk(
        request, lambda engine, run_id: engine.retry_ended(run_id), lambda run: run.ended
    )


async def cancel_runs(request: web.Request) -> web.StreamResponse:
    return await _bulk(
        request, lambda engine, run_id: engine.cancel(run_id), lambda run: not run.ended
    )


async def post_event(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    authorize(request, engine)
    body = await jsonin.read_object(request)
    unknown = set(body) - {"name", "data", "id"}
    if unknown:
        raise Problem(400, f"unknown field {sorted(unknown)[0]!r}")
    name, event_id = body.get("name"), body.get("id")
    if not is_name(name):
        raise Problem(400, f"name must be a string of 1 to {MAX_NAME} characters, without NUL")
    if event_id is None:
        event_id = secrets.token_urlsafe(16)
    elif not is_name(event_id):
        raise Problem(400, f"id must be a string of 1 to {MAX_NAME} characters, without NUL")
    now = time.time()
    with _store():
        woken = await engine.store.deliver_event(event_id, name, jsonin.dump(body.get("data")), now)
    if woken is None:
        return web.json_response({"id": event_id, "woke": 0, "duplicate": True}, status=202)
    log.info("event.received", name=name, event_id=event_id, woke=len(woken))
    return web.json_response({"id": event_id, "woke": len(woken)}, status=202)


async def list_replicas(request: web.Request) -> web.StreamResponse:
    """The gateways serving this store: every live replica on PostgreSQL, this one on SQLite."""
    engine = request.app[ENGINE]
    authorize(request, engine)
    with _store():
        replicas = await engine.store.replicas()
    return web.json_response(
        {
            "self": engine.store.replica_id,
            "lease_s": engine.store.lease,
            "replicas": [
                {
                    "id": r.id,
                    "started_at": _time(r.started_at),
                    "last_seen": _time(r.last_seen),
                    "runs": r.runs,
                }
                for r in replicas
            ],
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/replicas", list_replicas)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_post("/v1/runs/retry", retry_runs)
    app.router.add_post("/v1/runs/cancel", cancel_runs)
    app.router.add_get("/v1/runs/{run_id}", show_run)
    app.router.add_post("/v1/runs/{run_id}/retry", retry_run)
    app.router.add_post("/v1/runs/{run_id}/cancel", cancel_run)
    app.router.add_post("/v1/events", post_event)
