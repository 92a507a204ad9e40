"""Timers for every run: retry back-off, sleeps and wait time-outs.

The truth is the indexed `runs.due_at` column. Only timers falling due within `horizon` seconds
are held in memory, in a heap, so a hundred thousand parked runs cost memory only for the few
that are due soon. Timers that fell due while the gateway was down are simply in the past and
fire at the first load.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Callable

import structlog

from gateway.store import Store

log = structlog.get_logger("stepgate.scheduler")

_BATCH = 10_000  # timers read from the store at a time


class Scheduler:
    def __init__(
        self,
        store: Store,
        fire: Callable[[str], None],
        *,
        horizon: float = 60.0,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_every: float = 600.0,
    ) -> None:
        self._store = store
        self._fire = fire
        self._horizon = horizon
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # run id -> the due time its heap entry stands for
        self._loaded_until = 0.0  # every timer due before this is in the heap
        self._after: tuple[float, str] | None = None  # where a load that filled its batch ended
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._housekeeping = housekeeping
        self._housekeeping_every = housekeeping_every

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stepgate-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def pending(self) -> int:
        return len(self._due)

    def add(self, run_id: str, due: float) -> None:
        """A run's due time was committed to the store; fire it then."""
        if due > time.time() + self._horizon:
            return  # a later load from the store picks it up
        self._push(run_id, due)
        if self._heap[0][1] == run_id:
            self._wakeup.set()

    def _push(self, run_id: str, due: float) -> None:
        if self._due.get(run_id) == due:
            return
        self._due[run_id] = due
        heapq.heappush(self._heap, (due, run_id))

    async def _load(self, now: float) -> None:
        until = now + self._horizon
        rows = await self._store.due(until, _BATCH, self._after)
        for due, run_id in rows:
            self._push(run_id, due)
        if len(rows) == _BATCH:
            # More remain: the next load reads on from here. Reading from the start again
            # would find these same runs still due (fired, but not claimed yet) and never
            # reach the rest.
            self._after = rows[-1]
        else:
            self._after = None
            self._loaded_until = until

    def _next_load(self, now: float) -> float:
        """Half a horizon after the last load; or, while a backlog is read batch by batch,
        once the heap has drained. Not merely because the heap is empty: the runs it just
        fired are still due in the store until their claims are committed."""
        if self._after is not None:
            return math.inf if self._heap else now
        return self._loaded_until - self._horizon / 2

    async def _run(self) -> None:
        next_housekeeping = 0.0 if self._housekeeping is not None else math.inf
        while True:
            now = time.time()
            if now >= next_housekeeping and self._housekeeping is not None:
                next_housekeeping = now + self._housekeeping_every
                try:
                    await self._housekeeping()  # type: ignore[misc]
                except Exception:
                    log.exception("scheduler.housekeeping_failed")
            if now >= self._next_load(now):
                try:
                    await self._load(now)
                except Exception:
                    log.exception("scheduler.load_failed")
            while self._heap and self._heap[0][0] <= now:
                due, run_id = heapq.heappop(self._heap)
                if self._due.get(run_id) == due:
                    del self._due[run_id]
                    self._fire(run_id)
            wake_at = min(next_housekeeping, self._next_load(now))
            if self._heap:
                wake_at = min(wake_at, self._heap[0][0])
            delay = max(0.0, wake_at - time.time())
            self._wakeup.clear()
            # Not asyncio.wait_for: on 3.11 a wake-up landing in the same turn as stop()'s
            # cancel made it return the wake-up and drop the cancel, and the scheduler slept on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()
