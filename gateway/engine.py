"""The durable run loop: record a request as a run, invoke the upstream, decide, repeat.

Every transition is committed to the store before it is acted on. One invocation at a time per
run; each is a named task kept in `_inflight`. What comes next after an invocation is decided by
`gateway.runs.decide` (pure) and `gateway.retry` (pure); timers go through the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import retry, runs
from gateway.config import Route, Settings
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.prefer import Preferences, parse_prefer
from gateway.problem import problem
from gateway.proxy import (
    RelayedResponse,
    forward_request_headers,
    forward_response_headers,
    header_true,
)
from gateway.scheduler import Scheduler
from gateway.store import Attempt, DuplicateIdempotencyKey, Run, Store

log = structlog.get_logger("stepgate.engine")

POLL_PREFIX = "/_stepgate/runs/"
_STRIP_ON_RECORD = frozenset({"content-length"})
# Invocations nobody waits on (retries, wake-ups, resumption, respond-async) at once: a burst
# of them must queue here, not open a connection each to the upstream.
_BACKGROUND_CONCURRENCY = 256


@dataclass(frozen=True, slots=True)
class Response:
    """An upstream response as the gateway keeps it."""

    status: int
    reason: str | None
    headers: list[tuple[str, str]]  # already filtered for the client
    body: bytes
    suspend: bool
    no_retry: bool
    retry_after: str | None


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def request_hash(method: str, target: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), target.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def poll_location(run: Run) -> str:
    return f"{POLL_PREFIX}{run.id}?token={run.poll_token}"


def retry_after_seconds(run: Run, now: float) -> int:
    if run.due_at is not None and run.due_at > now:
        return max(1, math.ceil(run.due_at - now))
    return 1


def pending_body(run: Run, *, with_attempt: bool = False) -> dict[str, object]:
    body: dict[str, object] = {
        "run_id": run.id,
        "status": run.status,
        "poll_url": poll_location(run),
    }
    if with_attempt:
        body["attempt"] = run.attempt
    return body


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


class Engine:
    """Owns every live run of one gateway process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        session: aiohttp.ClientSession,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._session = session
        self.internal_url = settings.internal_url  # the real port, once a port 0 is bound
        self._routes = {route.name: route for route in settings.routes}
        self._live: dict[str, Run] = {}  # runs in flight, or with a client waiting on them
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._end_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake_pending: set[str] = set()
        self._background_slots = asyncio.Semaphore(_BACKGROUND_CONCURRENCY)
        self._rng = random.Random()
        self._closing = False
        self.scheduler = Scheduler(store, self.fire, housekeeping=self.housekeeping)

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every run that has not ended, then start the timers."""
        now = time.time()
        open_runs = await self.store.open_runs()
        interrupted = [run for run in open_runs if run.status == runs.RUNNING]
        for first in range(0, len(interrupted), 1000):  # concurrent writes share commits
            chunk = interrupted[first:first + 1000]
            await asyncio.gather(*(self._interrupted(run, now, crashed=True) for run in chunk))
        self.scheduler.start()
        log.info("gateway.resumed", open_runs=len(open_runs), interrupted=len(interrupted))

    async def _interrupted(self, run: Run, now: float, *, crashed: bool) -> None:
        """An invocation was cut short. A crash counts as a failed attempt; a shutdown doesn't."""
        route = self._routes.get(run.route)
        attempt = Attempt(run.attempt, run.updated_at, now, "interrupted", None,
                          "gateway crashed" if crashed else "gateway shut down")
        if crashed:
            run.failures += 1
        run.updated_at = now
        if route is None:
            self._end(run, runs.FAILED, now, f"route {run.route!r} is no longer configured")
        elif crashed and (run.no_retry or run.failures >= route.retry.attempts):
            self._end(run, runs.FAILED, now, "attempts exhausted (gateway crashed mid-attempt)")
        else:
            run.status = runs.RETRYING
            run.due_at = now
        await self.store.save_run(run, attempt=attempt)

    async def close(self) -> None:
        """Graceful stop: let invocations in flight finish for `shutdown_grace`, leave the rest
        to be resumed at the next start."""
        self._closing = True
        await self.scheduler.stop()
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
            cut_short = [run for run in self._live.values() if run.status == runs.RUNNING]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            now = time.time()
            for run in cut_short:
                if run.status == runs.RUNNING:
                    await self._interrupted(run, now, crashed=False)
        for waiters in self._end_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()

    async def housekeeping(self) -> None:
        cutoff = time.time() - self.settings.retention
        purged = await self.store.purge_ended(cutoff)
        await self.store.purge_events(cutoff)
        if purged:
            log.info("store.purged", runs=purged)

    # -- the client's request ----------------------------------------------------------------

    async def handle(self, request: web.Request, route: Route) -> web.StreamResponse:
        arrival = time.monotonic()
        body = await read_body(request, route.max_body)
        if body is None:
            return problem(413, detail=f"the request body is larger than {route.max_body} bytes, "
                           f"the limit of route {route.name!r}")
        headers, trace_id = forward_request_headers(
            request.headers, peer=request.remote, scheme=request.scheme,
            host=request.headers.get("Host"),
        )
        prefer = parse_prefer(request.headers.getall("Prefer", ()))
        now = time.time()
        key = request.headers.get("Idempotency-Key")
        target = request.raw_path
        run = Run(
            id=secrets.token_urlsafe(16), route=route.name, status=runs.RUNNING, attempt=1,
            token=new_secret(), poll_token=new_secret(), method=request.method, target=target,
            headers=list(headers.items()), body=body, created_at=now, updated_at=now,
            idem_key=key, request_hash=request_hash(request.method, target, body) if key else None,
            trace_id=trace_id,
        )
        try:
            await self.store.create_run(run)
        except StoreError as exc:
            if not isinstance(exc, DuplicateIdempotencyKey):
                log.error("store.write_failed", route=route.name, error=str(exc))
                return problem(503, detail="the run store is not available; nothing was recorded",
                               headers={"Retry-After": "1"})
            assert key is not None and run.request_hash is not None
            return await self._attach(route, key, run.request_hash, arrival, prefer)
        self._live[run.id] = run
        log.debug("run.started", run_id=run.id, route=route.name, trace_id=trace_id)
        if prefer.respond_async:
            self._spawn(run.id, self._in_background(self._invoke(run, route, started=now)))
            return self._accepted(run)
        task = self._spawn(run.id, self._invoke(run, route, started=now))
        await asyncio.shield(task)  # the first invocation is always awaited
        return await self._answer(run, route, arrival, prefer)

    async def _attach(
        self, route: Route, key: str, digest: str, arrival: float, prefer: Preferences
    ) -> web.StreamResponse:
        existing = await self.store.find_idempotent(route.name, key)
        if existing is None:  # purged between our insert and this read
            return problem(409, detail="the run for this Idempotency-Key just expired; retry")
        if existing.request_hash != digest:
            return problem(422, detail="this Idempotency-Key was used with a different request",
                           headers={"Stepgate-Run-Id": existing.id})
        run = self._live.get(existing.id, existing)
        if prefer.respond_async and not run.ended:
            return self._accepted(run)
        return await self._answer(run, route, arrival, prefer)

    async def _answer(
        self, run: Run, route: Route, arrival: float, prefer: Preferences
    ) -> web.StreamResponse:
        if not run.ended:
            hold = route.hold if prefer.wait is None else min(prefer.wait, route.hold)
            remaining = arrival + hold - time.monotonic()
            if remaining > 0:
                run = await self.wait_end(run, remaining)
        if run.ended:
            return final_response(run)
        log.info("run.redirected", run_id=run.id, route=route.name, attempt=run.attempt)
        return web.json_response(
            pending_body(run),
            status=303,
            headers={
                "Location": poll_location(run),
                "Retry-After": str(retry_after_seconds(run, time.time())),
                "Stepgate-Run-Id": run.id,
            },
        )

    def _accepted(self, run: Run) -> web.Response:
        return web.json_response(
            pending_body(run),
            status=202,
            headers={
                "Location": poll_location(run),
                "Retry-After": str(retry_after_seconds(run, time.time())),
                "Preference-Applied": "respond-async",
                "Stepgate-Run-Id": run.id,
            },
        )

    # -- looking runs up -----------------------------------------------------------------------

    async def lookup(self, run_id: str) -> Run | None:
        live = self._live.get(run_id)
        if live is not None:
            return live
        return await self.store.get_run(run_id)

    async def wait_end(self, run: Run, timeout: float) -> Run:
        """Wait up to `timeout` seconds for the run to end; return its latest record."""
        if run.ended or timeout <= 0:
            return run
        current = self._live.get(run.id)
        if current is None:
            current = await self.store.get_run(run.id) or run
            if current.ended:
                return current
            self._live[run.id] = current
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._end_waiters.setdefault(run.id, []).append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            waiters = self._end_waiters.get(run.id)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._end_waiters[run.id]
            self._release(run.id)
        return current

    def _release(self, run_id: str) -> None:
        """Forget a run's in-memory record once nobody needs it; the store has it all."""
        if run_id not in self._inflight and run_id not in self._end_waiters:
            self._live.pop(run_id, None)

    # -- invocations ---------------------------------------------------------------------------

    def _spawn(self, run_id: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"stepgate-run:{run_id}")
        self._inflight[run_id] = task
        task.add_done_callback(lambda _: self._invocation_done(run_id))
        return task

    def _invocation_done(self, run_id: str) -> None:
        self._inflight.pop(run_id, None)
        self._release(run_id)

    def fire(self, run_id: str) -> None:
        """The scheduler's call: the run's due time has come (or an event woke it)."""
        if self._closing or run_id in self._inflight:
            return
        self._spawn(run_id, self._resume(run_id))

    def wake(self, run_id: str, due: float) -> None:
        """An event completed a wait of this run (already committed, with the run's due_at)."""
        if run_id in self._inflight:
            self._wake_pending.add(run_id)
            return
        live = self._live.get(run_id)
        if live is not None and live.status in (runs.SLEEPING, runs.WAITING):
            live.due_at = due
        self.scheduler.add(run_id, due)

    async def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        async with self._background_slots:
            await work

    async def _resume(self, run_id: str) -> None:
        async with self._background_slots:
            run = await self.lookup(run_id)
            now = time.time()
            if run is None or run.ended or run.due_at is None or run.due_at > now + 0.001:
                return  # a stale timer: the run moved on
            self._live[run.id] = run
            route = self._routes.get(run.route)
            if route is None:
                self._end(run, runs.FAILED, now, f"route {run.route!r} is no longer configured")
                await self.store.save_run(run)
                self._notify_end(run)
                return
            if run.status in (runs.SLEEPING, runs.WAITING):
                await self.store.complete_due_steps(run.id, now)
            parked_as = run.status
            runs.check_move(parked_as, runs.RUNNING)
            run.status = runs.RUNNING
            run.attempt += 1
            run.due_at = None
            run.updated_at = now
            if not await self.store.save_run(run, expect=parked_as):
                self._live.pop(run.id, None)  # cancelled meanwhile: our copy is stale
                return
            await self._invoke(run, route, started=now)

    async def _invoke(self, run: Run, route: Route, *, started: float) -> None:
        """One invocation of the upstream and everything that follows from its result."""
        # Each invocation is its own task, so these bindings end with it.
        structlog.contextvars.bind_contextvars(
            run_id=run.id, route=route.name, attempt=run.attempt, trace_id=run.trace_id
        )
        steps = 0 if run.attempt == 1 else await self.store.count_steps(run.id)
        if run.attempt == 1:
            log.debug("run.attempt")
        else:
            log.info("run.attempt")
        response, failure = await self._forward(run, route, steps)
        status = response.status if response else None
        self.metrics.upstream_attempt(route.name, retry.Outcome(status, failure).label)  # type: ignore[arg-type]
        now = time.time()
        if run.status == runs.CANCELLED:  # cancelled while the upstream worked
            await self.store.save_run(run, attempt=Attempt(
                run.attempt, started, now, failure or "response",
                response.status if response else None, "run cancelled"))
            return
        result = runs.Result(
            status=status,
            failure=failure,
            suspend=bool(response and response.suspend),
            no_retry=bool(response and response.no_retry),
        )
        reason = retry.is_retriable(route.retry, status, failure)
        decision = runs.decide(
            result, retry_reason=reason, failures=run.failures,
            attempts=route.retry.attempts, run_no_retry=run.no_retry,
        )
        outcome = "suspended" if result.suspend else (failure or "response")
        error = f"{failure} error" if failure else None
        attempt = Attempt(run.attempt, started, now, outcome, status, error)
        if response is not None and not result.suspend:
            run.resp_status = response.status
            run.resp_headers = response.headers
            run.resp_body = response.body
        if decision.counts_as_failure:
            run.failures += 1
        run.updated_at = now
        if decision.action == "park":
            await self._park(run, route, now)
            await self.store.save_run(run, attempt=attempt)
            if run.ended:
                self._notify_end(run)
            elif run.due_at is not None:
                self.scheduler.add(run.id, run.due_at)
            return
        if decision.action == "retry":
            assert reason is not None
            delay = retry.next_delay(route.retry, run.failures, status,
                                     response.retry_after if response else None, now, self._rng)
            run.status = runs.RETRYING
            run.due_at = now + delay
            run.error = f"{reason}: {failure or status}"
            await self.store.save_run(run, attempt=attempt)
            self.metrics.retry(route.name, reason)
            log.info("run.retry_scheduled", reason=reason, delay_ms=round(delay * 1000))
            self.scheduler.add(run.id, run.due_at)
            return
        error = None if status is not None else f"no response from the upstream ({failure})"
        if decision.reason is not None:
            error = decision.reason.replace("_", " ")
        self._end(run, decision.status, now, error)
        await self.store.save_run(run, attempt=attempt)
        self._notify_end(run)

    async def _park(self, run: Run, route: Route, now: float) -> None:
        parked = await self.store.parked_steps(run.id)
        woken = run.id in self._wake_pending
        self._wake_pending.discard(run.id)
        if parked or woken:
            sleeping = any(step.kind == "sleep" for step in parked)
            run.status = runs.SLEEPING if sleeping else runs.WAITING
            deadlines = [step.wake_at for step in parked if step.wake_at is not None]
            run.due_at = now if woken or not deadlines else min(deadlines)
            log.info("run.parked", status=run.status)
        else:
            # The handler suspended with nothing to wait for: a handler bug. Treat it as a
            # failed attempt rather than re-invoking it in a tight loop.
            run.failures += 1
            run.error = "the handler suspended without a sleeping or waiting step"
            if run.failures >= route.retry.attempts:
                self._end(run, runs.FAILED, now, run.error)
                return
            run.status = runs.RETRYING
            run.due_at = now + retry.backoff(route.retry, run.failures, self._rng)

    def _end(self, run: Run, status: str, now: float, error: str | None) -> None:
        run.status = status
        run.ended_at = now
        run.updated_at = now
        run.due_at = None
        run.error = error

    def _notify_end(self, run: Run) -> None:
        """Tell everyone waiting on the run that it ended; call after the end is committed."""
        log.info(
            f"run.{run.status}", run_id=run.id, route=run.route, attempt=run.attempt,
            status=run.resp_status, duration_ms=round((run.updated_at - run.created_at) * 1000),
        )
        for waiter in self._end_waiters.pop(run.id, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _forward(
        self, run: Run, route: Route, steps: int
    ) -> tuple[Response | None, str | None]:
        headers = CIMultiDict(run.headers)
        headers["Stepgate-Run-Id"] = run.id
        headers["Stepgate-Attempt"] = str(run.attempt)
        headers["Stepgate-Callback"] = f"{self.internal_url}/v1/runs/{run.id}"
        headers["Stepgate-Token"] = run.token
        headers["Stepgate-Steps"] = str(steps)
        url = URL(route.upstream + run.target, encoded=True)
        try:
            async with self._session.request(
                run.method, url, headers=headers, data=run.body or None,
                timeout=aiohttp.ClientTimeout(total=route.timeout), allow_redirects=False,
            ) as upstream:
                body = await upstream.read()
                return _response(upstream.status, upstream.reason, upstream.headers, body), None
        except TimeoutError:
            return None, "timeout"
        except (aiohttp.ClientError, OSError):
            return None, "connect"

    # -- control -------------------------------------------------------------------------------

    async def cancel(self, run: Run) -> bool:
        """Cancel a run that has not ended; False if it ended (or moved on) meanwhile."""
        now = time.time()
        was = run.status
        self._end(run, runs.CANCELLED, now, "cancelled")
        if not await self.store.save_run(run, expect=was):
            return False
        self._notify_end(run)
        return True

    async def retry_ended(self, run: Run) -> bool:
        """Re-run an ended run; recorded steps stay recorded. False if it changed meanwhile."""
        now = time.time()
        was = run.status
        runs.check_move(was, runs.RUNNING)
        run.status = runs.RETRYING
        run.ended_at = None
        run.failures = 0
        run.no_retry = False
        run.due_at = now
        run.updated_at = now
        if not await self.store.save_run(run, expect=was):
            return False
        self.scheduler.add(run.id, now)
        return True


def _response(
    status: int, reason: str | None, headers: CIMultiDictProxy[str], body: bytes
) -> Response:
    kept = [
        (name, value)
        for name, value in forward_response_headers(headers).items()
        if name.lower() not in _STRIP_ON_RECORD
    ]
    return Response(
        status=status,
        reason=reason,
        headers=kept,
        body=body,
        suspend=status == 202 and header_true(headers.get("Stepgate-Suspend")),
        no_retry=header_true(headers.get("Stepgate-No-Retry")),
        retry_after=headers.get("Retry-After"),
    )


def final_response(run: Run) -> web.StreamResponse:
    """What the client (or a poll) gets for a run that has ended."""
    extra = {"Stepgate-Run-Id": run.id}
    if run.status == runs.CANCELLED:
        return problem(409, detail="the run was cancelled", headers=extra, run_id=run.id)
    if run.resp_status is None:
        return problem(502, detail=run.error or "no response was received from the upstream",
                       headers=extra, run_id=run.id)
    return RecordedResponse(run)


class RecordedResponse(RelayedResponse):
    """A recorded upstream response, replayed byte for byte, head and body in one write.

    Not a web.Response: that would invent a Content-Type for a body the upstream sent
    without one."""

    def __init__(self, run: Run) -> None:
        assert run.resp_status is not None
        super().__init__(status=run.resp_status, reason=None)
        for name, value in run.resp_headers or ():
            self.headers.add(name, value)
        self.headers["Stepgate-Run-Id"] = run.id
        self._recorded_body = run.resp_body or b""
        self.content_length = len(self._recorded_body)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        await self.write_eof(b"" if request.method == "HEAD" else self._recorded_body)
        return writer


ENGINE = web.AppKey("stepgate.engine", Engine)
