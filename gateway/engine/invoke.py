"""The invocation loop: claim a run's next attempt, forward it, record what came back.

Each invocation is a named task in `Invoker.inflight`. The store decides every transition (see
`gateway.store.base`); the loop only sends the request and hands the outcome over. A timer or a
wake-up that arrives while the run is being invoked is remembered and fired again when that
invocation is done, and the claim in the store tells whether it still stands, so neither a
lost nor a stale wake-up can do harm.

When the store refuses a write (locked, full, read-only), the outcome of the attempt is kept
and its write retried with back-off until it goes through: the run stays `running` in the store
meanwhile, and finishes once the store takes writes again, without a restart.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import structlog

from gateway import lifecycle
from gateway.auth import attempt_token
from gateway.config import Route, Settings
from gateway.engine.upstream import Invocation, Transport
from gateway.errors import StoreError
from gateway.lifecycle import AfterAttempt
from gateway.metrics import Metrics
from gateway.model import Outcome, Run, Step
from gateway.retry import Outcome as RetryOutcome
from gateway.routing import upstream_target
from gateway.store import Store

log = structlog.get_logger("stepgate.engine")

# Invocations nobody waits on (retries, wake-ups, resumption, respond-async) at once: a burst
# of them must queue here, not open a connection each to the upstream.
BACKGROUND_CONCURRENCY: Final = 256
_STORE_RETRY_FIRST: Final = 0.05
_STORE_RETRY_MAX: Final = 2.0


class Invoker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        transport: Transport,
        metrics: Metrics,
        routes: dict[str, Route],
    ) -> None:
        self.settings = settings
        self.store = store
        self.transport = transport
        self.metrics = metrics
        self.routes = routes
        self.internal_url = settings.internal_url
        self.inflight: dict[str, asyncio.Task[Run | None]] = {}
        self._refire: set[str] = set()
        self._waiting: set[str] = set()  # resumptions queued for a slot, not yet claiming
        self._slots = asyncio.Semaphore(BACKGROUND_CONCURRENCY)
        self._rng = random.Random()
        self.closing = False
        # How to try a claim again later (the engine hands in its scheduler's `add`).
        self.on_retry_timer: Callable[[str, float], None] = lambda run_id, due: None

    # -- tasks ---------------------------------------------------------------------------------

    def spawn(self, run_id: str, work: Coroutine[Any, Any, Run | None]) -> asyncio.Task[Run | None]:
        task = asyncio.create_task(work, name=f"stepgate-run:{run_id}")
        self.inflight[run_id] = task
        task.add_done_callback(lambda _: self._done(run_id))
        return task

    def _done(self, run_id: str) -> None:
        self.inflight.pop(run_id, None)
        self._waiting.discard(run_id)  # also when it was cancelled before it began
        if run_id in self._refire:
            self._refire.discard(run_id)
            self.fire(run_id)

    def fire(self, run_id: str) -> None:
        """A run's due time has come (a timer or a wake-up): start its next attempt if the store
        agrees it is due."""
        if self.closing or run_id in self._waiting:
            return  # the claim it is waiting to make reads the store after this wake-up
        if run_id in self.inflight:
            self._refire.add(run_id)
            return
        self._waiting.add(run_id)  # from now until its claim begins
        self.spawn(run_id, self._resume(run_id))

    def start(self, run: Run) -> None:
        """Send the invocation the store started for a queued run (its slot came free)."""
        self.spawn(run.id, self.in_background(run))

    async def in_background(self, run: Run) -> Run | None:
        async with self._slots:
            return await self.invoke(run)

    async def _resume(self, run_id: str) -> Run | None:
        async with self._slots:
            self._waiting.discard(run_id)  # (`_done` does it if cancelled before this)
            try:
                run = await self.store.claim(run_id, time.time())
            except StoreError as exc:
                log.warning("store.write_failed", run_id=run_id, during="claim", error=str(exc))
                self.on_retry_timer(run_id, time.time() + 1.0)
                return None
            if run is None:
                return None  # a stale timer: the run moved on, or is not due yet
            return await self.invoke(run)

    # -- one invocation ------------------------------------------------------------------------

    async def invoke(self, run: Run, replied: asyncio.Future[None] | None = None) -> Run:
        """One invocation of the upstream and its record; returns the run as committed.
        `replied` is set once the upstream's outcome is in, before it is recorded."""
        # Each invocation is its own task, so these bindings end with it.
        structlog.contextvars.bind_contextvars(
            run_id=run.id, route=run.route, attempt=run.attempt, trace_id=run.trace_id
        )
        log.debug("run.attempt")
        route = self.routes.get(run.route)
        if route is None or run.request_unreadable:
            now = time.time()
            outcome = Outcome(
                run.attempt,
                now,
                now,
                None,
                "connect",
                f"route {run.route!r} is no longer configured"
                if route is None
                else lifecycle.REQUEST_UNREADABLE,
            )
        else:
            outcome = await self._send(run, route)
            self.metrics.upstream_attempt(
                route.name,
                RetryOutcome(
                    outcome.reply.status if outcome.reply else None,
                    outcome.failure,  # type: ignore[arg-type]
                ).label,
            )
        if replied is not None and not replied.done():
            replied.set_result(None)
        after = await self._finish(run, outcome, route)
        if after is None:
            return run
        self._report(after)
        return after.run

    async def _send(self, run: Run, route: Route) -> Outcome:
        try:
            steps = 0 if run.attempt == 1 else await self.store.count_steps(run.id)
        except StoreError:
            steps = 1  # unknown: the SDK asks for the record itself
        headers = list(run.headers)
        headers += [
            ("Stepgate-Run-Id", run.id),
            ("Stepgate-Attempt", str(run.attempt)),
            ("Stepgate-Callback", f"{self.internal_url}/v1/runs/{run.id}"),
            ("Stepgate-Token", attempt_token(run.token, run.attempt)),
            ("Stepgate-Steps", str(steps)),
        ]
        call = Invocation(
            run.attempt,
            run.method,
            route.upstream + upstream_target(route, run.target),
            headers,
            run.body,
            route.timeout,
            route.max_response,
        )
        return await self.transport.send(call)

    async def _finish(self, run: Run, outcome: Outcome, route: Route | None) -> AfterAttempt | None:
        rng = self._rng

        def rule(stored: Run, parked: Sequence[Step]) -> AfterAttempt:
            return lifecycle.after_attempt(stored, outcome, route, parked, time.time(), rng)

        delay = _STORE_RETRY_FIRST
        while True:
            try:
                return await self.store.finish_attempt(run.id, outcome, rule)
            except StoreError as exc:
                if self.closing:
                    # Left running in the store: the next start counts it as cut short.
                    log.warning("store.write_failed", during="finish", error=str(exc))
                    return None
                if delay == _STORE_RETRY_FIRST:
                    log.warning(
                        "store.write_failed", during="finish", error=str(exc), retrying=True
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _STORE_RETRY_MAX)

    def _report(self, after: AfterAttempt) -> None:
        decision = after.decision
        if decision is None:
            log.info("run.attempt_superseded", outcome=after.attempt.outcome)
            return
        if decision.action == "retry" and after.retry_reason is not None:
            self.metrics.retry(after.run.route, after.retry_reason)
            log.info(
                "run.retry_scheduled",
                reason=after.retry_reason,
                delay_ms=round((after.delay or 0) * 1000),
            )
        elif decision.action == "retry":
            log.info(
                "run.retry_scheduled",
                reason="suspended_with_nothing_parked",
                delay_ms=round((after.delay or 0) * 1000),
            )
        elif decision.action == "park":
            log.info("run.parked", status=str(after.run.status))

    # -- lifetime ------------------------------------------------------------------------------

    async def recover(self, *, crashed: bool, before: float = math.inf) -> int:
        """Fence every attempt the store still has running that started before `before`: at
        start-up they were cut short by a crash (a failed attempt); at shutdown, by us (not
        counted)."""
        now = time.time()

        def rule(run: Run) -> AfterAttempt:
            return lifecycle.after_interruption(
                run, self.routes.get(run.route), now, crashed=crashed
            )

        return len(await self.store.recover(rule, before=before))

    async def drain(self, grace: float) -> None:
        """Let invocations in flight finish for `grace` seconds, cut the rest short, and fence
        what they leave running."""
        self.closing = True
        tasks = list(self.inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                try:
                    await self.recover(crashed=False)
                except StoreError as exc:
                    log.warning("store.write_failed", during="shutdown", error=str(exc))
