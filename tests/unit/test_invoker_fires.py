"""Wake-ups of a run that is still waiting for one of the invoker's background slots: the claim
it is waiting to make covers them, so none of them costs a claim of its own."""

from __future__ import annotations

import asyncio
import types
from collections import Counter
from typing import Any, cast

from gateway.config import Settings
from gateway.engine import invoke
from gateway.engine.invoke import Invoker
from gateway.engine.upstream import Transport
from gateway.metrics import Metrics
from gateway.model import Run
from gateway.store import Store


class Claims:
    """A store whose claims find nothing due (stale timers); r0's waits until let go."""

    def __init__(self) -> None:
        self.claims: Counter[str] = Counter()
        self.let_go = asyncio.Event()

    async def claim(self, run_id: str, now: float) -> Run | None:
        self.claims[run_id] += 1
        if run_id == "r0":
            await self.let_go.wait()
        return None


async def test_wake_ups_of_a_run_waiting_for_a_slot_cost_one_claim(monkeypatch: Any) -> None:
    monkeypatch.setattr(invoke, "BACKGROUND_CONCURRENCY", 1)
    store = Claims()
    settings = types.SimpleNamespace(internal_url="http://127.0.0.1:1")
    invoker = Invoker(
        cast(Settings, settings), cast(Store, store), cast(Transport, None), Metrics(), {}
    )
    invoker.fire("r0")  # takes the only slot and keeps it
    await asyncio.sleep(0.01)
    for _ in range(5):  # r1's timer and wake-ups, while it waits for the slot
        invoker.fire("r1")
    store.let_go.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not invoker.inflight:
            break
    assert not invoker.inflight
    assert store.claims == {"r0": 1, "r1": 1}
