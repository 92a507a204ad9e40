"""The scheduler against a backlog: more runs due than one load reads, fired into an invoker
that has not claimed them yet (so the store still has every one of them due)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, cast

from gateway import scheduler as scheduler_module
from gateway.scheduler import Scheduler
from gateway.store import Store


class Backlog:
    """A store whose runs stay due: nothing claims them while the test runs."""

    def __init__(self, due: list[tuple[float, str]]) -> None:
        self.rows = sorted(due)
        self.loads = 0

    async def due(
        self, before: float, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[float, str]]:
        self.loads += 1
        rows = [row for row in self.rows if row[0] <= before and (after is None or row > after)]
        return rows[:limit]


async def test_a_backlog_larger_than_one_load_is_read_once_and_fired_once(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(scheduler_module, "_BATCH", 100)
    now = time.time()
    store = Backlog([(now - 10 + i / 1000, f"r{i:04d}") for i in range(250)])
    fired: Counter[str] = Counter()
    scheduler = Scheduler(cast(Store, store), lambda run_id: fired.update([run_id]))
    scheduler.start()
    await asyncio.sleep(0.3)
    await scheduler.stop()
    assert sorted(fired) == [row[1] for row in store.rows]
    assert set(fired.values()) == {1}, "a run still due in the store was fired again"
    assert store.loads <= 4, f"{store.loads} loads of the store for 250 due runs"


async def test_a_scheduler_stopped_as_a_timer_wakes_it_stops() -> None:
    # The wake-up and the cancel land in one turn of the loop. asyncio.wait_for (3.11)
    # returned the finished wait instead of raising the cancel, and the scheduler slept on.
    async def housekeeping() -> None:
        pass

    scheduler = Scheduler(cast(Store, Backlog([])), lambda run_id: None, housekeeping=housekeeping)
    scheduler.start()
    await asyncio.sleep(0.05)  # it waits for its next load, half a horizon away
    stopping = asyncio.ensure_future(scheduler.stop())  # its cancel comes first in the turn
    scheduler.add("r1", time.time() + 5)  # then the wake-up
    done, _ = await asyncio.wait({stopping}, timeout=2)
    assert done, "the scheduler went on after it was stopped"
