"""Clients waiting for a run to end: holds, long-polls, `Idempotency-Key` attaches.

Nothing here knows a run's state. A waiter subscribes first, then reads the store, then sleeps
until the store says it committed the run's end (or the time is up): a change committed between
the read and the sleep still wakes it, so no wake-up is lost. While a shared store cannot tell
of other replicas' changes (`live_notifications`), the waiter reads again every half second.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.model import Run
from gateway.store import Store


class EndWaiters:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._closing = False

    def ended(self, run_id: str) -> None:
        """The store committed the end of this run."""
        for waiter in self._waiters.pop(run_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def release_all(self) -> None:
        """Shutting down: let every waiter answer with what it has."""
        self._closing = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiters.clear()

    async def wait_end(self, run: Run, timeout: float) -> Run:
        """Wait up to `timeout` seconds for the run to end; return it as last read."""
        if run.ended or timeout <= 0:
            return run
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(run.id, []).append(waiter)
            try:
                current = await self._store.get_run(run.id)
                if current is None:  # purged meanwhile: what we had is all there is
                    return run
                run = current
                remaining = deadline - loop.time()
                if run.ended or remaining <= 0 or self._closing:
                    return run
                # Without notifications from the other replicas, read again now and then.
                live = self._store.live_notifications
                try:
                    await asyncio.wait_for(waiter, remaining if live else min(remaining, 0.5))
                except TimeoutError:
                    if live or loop.time() >= deadline:
                        return run
            finally:
                waiters = self._waiters.get(run.id)
                if waiters is not None:
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[run.id]
