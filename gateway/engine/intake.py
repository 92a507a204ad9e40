"""A client's request to a durable route becomes a run: bounded body, one store write, the
first invocation awaited, then the answer (`gateway.engine.answers`). A repeated
`Idempotency-Key` attaches to the run it first created instead."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway import flow, ratelimit
from gateway.config import Concurrency, Rate, Route
from gateway.engine import answers
from gateway.errors import StoreError
from gateway.model import Run, RunStatus
from gateway.prefer import Preferences, parse_prefer
from gateway.problem import problem
from gateway.proxy import forward_request_headers
from gateway.store import DuplicateIdempotencyKey, QueueFull

if TYPE_CHECKING:
    from gateway.engine import Engine

log = structlog.get_logger("stepgate.engine")


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def request_hash(method: str, target: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), target.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


# Seconds an answered first attempt's record is awaited after the hold has run out.
RECORD_GRACE = 1.0


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit`."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def handle(engine: Engine, request: web.Request, route: Route) -> web.StreamResponse:
    arrival = time.monotonic()
    body = await read_body(request, route.max_body)
    if body is None:
        return problem(
            413,
            detail=f"the request body is larger than {route.max_body} bytes, "
            f"the limit of route {route.name!r}",
        )
    if route.rate_limit is not None and not ratelimit.checked_before_body(route):
        refused = await ratelimit.refusal(engine.store, engine.metrics, route, request, body)
        if refused is not None:
            return refused
    headers, trace_id = forward_request_headers(
        request.headers,
        peer=request.remote,
        scheme=request.scheme,
        host=request.headers.get("Host"),
    )
    prefer = parse_prefer(request.headers.getall("Prefer", ()))
    now = time.time()
    key = request.headers.get("Idempotency-Key")
    target = request.raw_path
    run = Run(
        id=secrets.token_urlsafe(16),
        route=route.name,
        status=RunStatus.RUNNING,
        attempt=1,
        token=new_secret(),
        poll_token=new_secret(),
        method=request.method,
        target=target,
        headers=list(headers.items()),
        body=body,
        created_at=now,
        updated_at=now,
        idem_key=key,
        request_hash=request_hash(request.method, target, body) if key else None,
        trace_id=trace_id,
        slot_key=_key(route.concurrency, request, body),
        throttle_key=_key(route.throttle, request, body),
    )
    try:
        run = await engine.store.create_run(run)
    except QueueFull:
        engine.metrics.flow_rejected(route.name, "queue_full")
        return problem(
            503,
            detail=f"route {route.name!r} has {route.queue_limit} runs queued, its "
            "queue_limit; nothing was recorded",
            headers={"Retry-After": "1"},
        )
    except DuplicateIdempotencyKey:
        assert key is not None and run.request_hash is not None
        return await _attach(engine, route, key, run.request_hash, arrival, prefer)
    except StoreError as exc:
        log.error("store.write_failed", route=route.name, during="create", error=str(exc))
        return problem(
            503,
            detail="the run store is not available; nothing was recorded",
            headers={"Retry-After": "1"},
        )
    if run.status == RunStatus.QUEUED:
        log.info("run.queued", run_id=run.id, route=route.name, trace_id=trace_id)
        if prefer.respond_async:
            return answers.accepted(run)
        return await answer(engine, run, route, arrival, prefer)
    log.debug("run.started", run_id=run.id, route=route.name, trace_id=trace_id)
    invoker = engine.invoker
    if prefer.respond_async:
        invoker.spawn(run.id, invoker.in_background(run))
        return answers.accepted(run)
    replied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = invoker.spawn(run.id, invoker.invoke(run, replied))
    # The first invocation is always awaited (it is bounded by the route's timeout), and a
    # client that goes away does not cut it short. Its record is awaited until the hold is
    # over, and at least RECORD_GRACE after the answer (a slow upload may have used the hold
    # up): a store that refuses writes keeps the client no longer than that.
    first: set[asyncio.Future[Any]] = {task, replied}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    hold_left = arrival + _hold(route, prefer) - time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=max(hold_left, RECORD_GRACE))
    if done:
        run = task.result() or run
    return await answer(engine, run, route, arrival, prefer)


def _key(limit: Concurrency | Rate | None, request: web.Request, body: bytes) -> str | None:
    """The run's key value under a limit of its route; None when the route has no such limit."""
    if limit is None:
        return None
    return flow.key_value(limit.key, request.headers, request.query_string, body)


def _hold(route: Route, prefer: Preferences) -> float:
    return route.hold if prefer.wait is None else min(prefer.wait, route.hold)


async def _attach(
    engine: Engine, route: Route, key: str, digest: str, arrival: float, prefer: Preferences
) -> web.StreamResponse:
    try:
        existing = await engine.store.find_idempotent(route.name, key)
    except StoreError:
        return problem(503, detail="the run store is not available", headers={"Retry-After": "1"})
    if existing is None:  # purged between our insert and this read
        return problem(409, detail="the run for this Idempotency-Key just expired; retry")
    if existing.request_hash != digest:
        return problem(
            422,
            detail="this Idempotency-Key was used with a different request",
            headers={"Stepgate-Run-Id": existing.id},
        )
    if prefer.respond_async and not existing.ended:
        return answers.accepted(existing)
    return await answer(engine, existing, route, arrival, prefer)


async def answer(
    engine: Engine, run: Run, route: Route, arrival: float, prefer: Preferences
) -> web.StreamResponse:
    if not run.ended:
        remaining = arrival + _hold(route, prefer) - time.monotonic()
        if remaining > 0:
            try:
                run = await engine.waiters.wait_end(run, remaining)
            except StoreError:
                pass  # answer with what we have: the poll URL works once the store is back
    if run.ended:
        return answers.final_response(run)
    log.info("run.redirected", run_id=run.id, route=route.name, attempt=run.attempt)
    return answers.redirect(run)
