"""The durable engine: runs in, invocations out, answers back.

    intake    a request becomes a run (body limit, idempotency attach) and gets its answer
    answers   what the client sees: the recorded response, 303, 202
    invoke    the invocation loop: claim, forward, record
    upstream  the transport seam to the service
    waiters   clients waiting for a run's end

The store holds every run's state and decides every transition; the engine keeps only what is
not state: tasks, waiters and timers. It learns of committed changes from the store's
notifications, which is where runs' ends are logged and timers are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import structlog
from aiohttp import web

from gateway import lifecycle
from gateway.config import Route, Settings
from gateway.engine import intake
from gateway.engine.invoke import Invoker
from gateway.engine.upstream import AiohttpTransport, Transport
from gateway.engine.waiters import EndWaiters
from gateway.errors import StoreError
from gateway.lifecycle import AfterAttempt
from gateway.metrics import Metrics
from gateway.model import ENDED, PARKED, Run
from gateway.scheduler import Scheduler
from gateway.store import Change, Store

__all__ = ["ENGINE", "Engine"]

log = structlog.get_logger("stepgate.engine")


class Engine:
    """Every run of one gateway process, through the store."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        transport: Transport | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.routes = {route.name: route for route in settings.routes}
        self.waiters = EndWaiters(store)
        self.invoker = Invoker(
            settings, store, transport or AiohttpTransport(session), metrics, self.routes
        )
        self.scheduler = Scheduler(store, self.invoker.fire, housekeeping=self.housekeeping)
        self.invoker.on_retry_timer = self.scheduler.add
        self._recovering: asyncio.Task[None] | None = None
        self._taking_over: asyncio.Task[None] | None = None
        self._promoting: asyncio.Task[None] | None = None
        store.route_of = self.routes.get  # flow control reads the limits as configured now
        store.subscribe(self._changed)

    @property
    def internal_url(self) -> str:
        return self.invoker.internal_url

    @internal_url.setter
    def internal_url(self, url: str) -> None:
        self.invoker.internal_url = url  # the real port, once a port 0 is bound

    def _changed(self, change: Change) -> None:
        """The store committed a change to a run, here or on another replica."""
        if change.started and change.run is not None:
            self.invoker.start(change.run)  # a freed slot went to this queued run
        elif change.status in ENDED:
            run = change.run
            if run is not None:  # logged by the replica that ended it
                log.info(
                    f"run.{run.status}",
                    run_id=run.id,
                    route=run.route,
                    attempt=run.attempt,
                    status=run.resp_status,
                    duration_ms=round((run.updated_at - run.created_at) * 1000),
                )
            self.waiters.ended(change.run_id)
        elif change.status in PARKED and change.due_at is not None:
            self.scheduler.add(change.run_id, change.due_at)

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Fence every attempt a crash left running (they resume at once), start the timers.
        A store that refuses the write now gets it again every few seconds."""
        started = time.time()
        try:
            interrupted = await self.invoker.recover(crashed=True, before=started)
        except StoreError as exc:
            log.warning("store.write_failed", during="resume", error=str(exc), retrying=True)
            self._recovering = asyncio.create_task(
                self._recover_later(started), name="stepgate-recover"
            )
        else:
            log.info("gateway.resumed", interrupted=interrupted)
        self._promote()
        self.scheduler.start()
        if self.store.lease is not None:
            self._taking_over = asyncio.create_task(
                self._take_over(self.store.lease), name="stepgate-take-over"
            )

    async def _take_over(self, lease: float) -> None:
        """Every fifth of a lease, fence what replicas that stopped renewing theirs left
        running: counted as crashed attempts, then resumed by whichever replica claims them
        first. A dead replica's runs restart within 1.2 leases of its last renewal."""
        now = time.time()

        def rule(run: Run) -> AfterAttempt:
            return lifecycle.after_interruption(run, self.routes.get(run.route), now, crashed=True)

        while True:
            now = time.time()
            try:
                taken = await self.store.take_over(rule)
            except StoreError as exc:
                log.warning("store.write_failed", during="take_over", error=str(exc))
                taken = []
            if taken:
                self.metrics.taken_over.inc(len(taken))
                log.info(
                    "gateway.took_over",
                    runs=len(taken),
                    run_ids=sorted(after.run.id for after in taken)[:10],
                )
            await asyncio.sleep(lease / 5)

    def _promote(self) -> None:
        """Give queued runs the slots the limits as configured now leave free (at a start, and
        after a reload that may have raised or removed a limit)."""
        if self._promoting is not None and not self._promoting.done():
            return
        self._promoting = asyncio.create_task(self._promote_now(), name="stepgate-promote")

    async def _promote_now(self) -> None:
        try:
            given = await self.store.promote_waiting(time.time())
        except StoreError as exc:
            log.warning("store.write_failed", during="promote", error=str(exc))
            return
        if given:
            log.info("flow.promoted", runs=given)

    async def _recover_later(self, started: float) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                interrupted = await self.invoker.recover(crashed=True, before=started)
            except StoreError:
                continue
            log.info("gateway.resumed", interrupted=interrupted)
            return

    async def close(self) -> None:
        """Graceful stop: let invocations in flight finish for `shutdown_grace`, leave the rest
        to be resumed at the next start."""
        for task in (self._recovering, self._taking_over, self._promoting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.scheduler.stop()
        # Slots freed from now on leave the next runs queued and due, for the next start.
        self.store.start_promoted = False
        await self.invoker.drain(self.settings.shutdown_grace)
        self.waiters.release_all()

    async def housekeeping(self) -> None:
        cutoff = time.time() - self.settings.retention
        purged = await self.store.purge_ended(cutoff)
        await self.store.purge_events(cutoff)
        await self.store.checkpoint()
        if purged:
            log.info("store.purged", runs=purged)

    def reload(self, settings: Settings) -> None:
        """Take new routes and the settings read per use (a SIGHUP); runs keep going, and one
        whose route is gone ends failed at its next attempt's end, as after a restart."""
        self.settings = settings
        self.invoker.settings = settings
        routes = {route.name: route for route in settings.routes}
        self.routes.clear()
        self.routes.update(routes)  # the invoker and the store hold this same dict
        self._promote()

    # -- requests ------------------------------------------------------------------------------

    async def handle(self, request: web.Request, route: Route) -> web.StreamResponse:
        return await intake.handle(self, request, route)

    async def lookup(self, run_id: str) -> Run | None:
        return await self.store.get_run(run_id)

    async def wait_end(self, run: Run, timeout: float) -> Run:
        return await self.waiters.wait_end(run, timeout)

    async def cancel(self, run_id: str) -> Run | None:
        """Cancel a run that has not ended; None if it has. An attempt in flight is fenced."""
        return await self.store.cancel(run_id, time.time())

    async def retry_ended(self, run_id: str) -> Run | None:
        """Re-run an ended run; recorded steps stay recorded. None if it has not ended."""
        return await self.store.retry_ended(run_id, time.time())


ENGINE = web.AppKey("stepgate.engine", Engine)
