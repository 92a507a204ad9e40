"""The store budget of a durable run's success path (issue 15): one write when the run starts,
one per step, one when it ends, and no read at all; flow control adds none."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory
from tests.gateway.rawsteps import RawSteps

BOTH_DIALECTS = True

WRITES = ("create_run", "claim", "finish_attempt", "put_step", "deliver_event", "cancel")
READS = ("get_run", "find_idempotent", "steps", "count_steps", "attempts", "_select_runs")


def counting(store: Any, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    calls: Counter[str] = Counter()
    for name in WRITES + READS:
        method = getattr(store, name)

        async def counted(*args: Any, _name: str = name, _method: Any = method, **kw: Any) -> Any:
            calls[_name] += 1
            return await _method(*args, **kw)

        monkeypatch.setattr(store, name, counted)
    return calls


def handler(steps: int) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        raw = RawSteps(request)
        for n in range(steps):

            async def work(n: int = n) -> int:
                return n

            await raw.run(f"s{n}", work)
        return web.json_response({"steps": steps})

    app = web.Application()
    app.router.add_post("/work", handle)
    return app


@pytest.mark.parametrize("flow", [{}, {"concurrency": 4}], ids=["plain", "concurrency"])
@pytest.mark.parametrize("steps", [0, 3])
async def test_a_successful_run_costs_one_write_per_start_step_and_end_and_no_read(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    flow: dict[str, Any],
) -> None:
    route = {
        "name": "work",
        "path": "/work",
        "upstream": await upstream(handler(steps)),
        "durable": True,
        **flow,
    }
    gw = await gateway([route])
    calls = counting(gw.store, monkeypatch)
    async with gw.session.post(gw.url + "/work", json={}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"steps": steps}
    expected = Counter({"create_run": 1, "finish_attempt": 1})
    if steps:
        expected["put_step"] = steps
    assert dict(calls) == dict(expected)
