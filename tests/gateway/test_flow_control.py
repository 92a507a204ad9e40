"""Flow control (issue 12): concurrency slots, throttles, rate limits and the queue, through a
real gateway in front of a real upstream that counts what it holds at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps, Suspend, raw_sleep, suspended

BOTH_DIALECTS = True


class Counting:
    """An upstream that records each call's arrival and how many it holds at once; a call
    waits for `gate` (open unless closed) and then for `work` seconds."""

    def __init__(self, work: float = 0.0) -> None:
        self.work = work
        self.inflight = 0
        self.most = 0
        self.arrivals: list[tuple[float, str]] = []  # (time, the request's X-Name)
        self.gate = asyncio.Event()
        self.gate.set()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            name = request.headers.get("X-Name", "")
            self.arrivals.append((time.monotonic(), name))
            self.inflight += 1
            self.most = max(self.most, self.inflight)
            try:
                await self.gate.wait()
                await asyncio.sleep(self.work)
            finally:
                self.inflight -= 1
            return web.Response(text=f"done {name}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def names(self) -> list[str]:
        return [name for _, name in self.arrivals]


def durable(base: str, **flow: Any) -> dict[str, Any]:
    return {"name": "work", "path": "/work", "upstream": base, "durable": True, **flow}


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the upstream's counters, not an event
            await asyncio.sleep(0.01)


async def post(session: aiohttp.ClientSession, url: str, name: str, **headers: str) -> Any:
    async with session.post(url + "/work", headers={"X-Name": name, **headers}) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def statuses(gw: Any, status: str) -> list[str]:
    async with gw.session.get(gw.internal + f"/v1/runs?status={status}") as resp:
        assert resp.status == 200, await resp.text()
        return [run["id"] for run in (await resp.json())["runs"]]


async def test_eight_requests_against_concurrency_two_never_see_more_than_two_upstream(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting(work=0.1)
    gw = await gateway([durable(await upstream(service.app()), concurrency=2)])
    answers = await asyncio.gather(*(post(gw.session, gw.url, f"r{i}") for i in range(8)))
    assert [(status, text) for status, text, _ in answers] == [
        (200, f"done r{i}") for i in range(8)
    ]
    assert service.most == 2
    assert len(service.arrivals) == 8


async def test_per_key_limits_let_two_tenants_progress_side_by_side(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting()
    service.gate.clear()
    route = durable(
        await upstream(service.app()), concurrency={"limit": 1, "key": "header:X-Tenant"}
    )
    gw = await gateway([route])
    first = [
        asyncio.create_task(post(gw.session, gw.url, "a1", **{"X-Tenant": "a"})),
        asyncio.create_task(post(gw.session, gw.url, "b1", **{"X-Tenant": "b"})),
    ]
    await until(lambda: service.inflight == 2)
    status, _, headers = await post(
        gw.session, gw.url, "a2", **{"X-Tenant": "a", "Prefer": "respond-async"}
    )
    assert status == 202
    assert await statuses(gw, "queued") == [headers["Stepgate-Run-Id"]]
    assert sorted(service.names()) == ["a1", "b1"]  # a's second waits; b was not held up
    service.gate.set()
    assert [status for status, _, _ in await asyncio.gather(*first)] == [200, 200]
    await until(lambda: len(service.arrivals) == 3)
    assert service.names()[-1] == "a2"
    assert service.most == 2


async def test_a_sleeping_run_holds_no_slot(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    calls: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        name = request.headers["X-Name"]
        calls.append(name)
        if name == "sleeper":
            try:
                await raw_sleep(RawSteps(request), "nap", 0.6)
            except Suspend:
                return suspended()
        return web.Response(text=f"done {name}")

    app = web.Application()
    app.router.add_post("/work", handle)
    gw = await gateway([durable(await upstream(app), concurrency=1)])
    sleeper = asyncio.create_task(post(gw.session, gw.url, "sleeper"))
    await until(lambda: calls == ["sleeper"])
    assert (await post(gw.session, gw.url, "other"))[:2] == (200, "done other")
    assert (await sleeper)[:2] == (200, "done sleeper")
    assert calls == ["sleeper", "other", "sleeper"]  # the other ran while it slept


async def test_throttle_spreads_starts_after_the_burst(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting()
    route = durable(await upstream(service.app()), throttle={"limit": 4, "per": "1s", "burst": 2})
    gw = await gateway([route])
    async_ = {"Prefer": "respond-async"}
    answers = await asyncio.gather(
        *(post(gw.session, gw.url, f"r{i}", **async_) for i in range(10))
    )
    assert {status for status, _, _ in answers} == {202}
    await until(lambda: len(service.arrivals) == 10)
    starts = [t for t, _ in service.arrivals]
    after_burst = starts[2:]
    # No 1 s window holds more than the limit. The turns are 0.25 s apart exactly; the window
    # is shortened by what the loop's timers may add to one start and not to the next.
    for i, start in enumerate(after_burst):
        assert sum(1 for other in after_burst[i:] if other < start + 0.9) <= 4
    assert starts[-1] - starts[0] >= 7 * 0.25 - 0.05  # 8 turns after the burst of 2
    # Nothing was dropped: every run completes.
    async with asyncio.timeout(10):
        while len(await statuses(gw, "completed")) < 10:  # noqa: ASYNC110 - the admin API
            await asyncio.sleep(0.05)


async def test_rate_limit_answers_exactly_limit_requests_then_429s_per_key(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting()
    base = await upstream(service.app())
    plain = {
        "name": "plain",
        "path": "/work",
        "upstream": base,
        "rate_limit": {"limit": 3, "per": "1m", "key": "header:X-Api-Key"},
    }
    gw = await gateway([plain])
    answers = [await post(gw.session, gw.url, f"a{i}", **{"X-Api-Key": "a"}) for i in range(5)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429, 429]
    retry_after = int(answers[3][2]["Retry-After"])
    assert 1 <= retry_after <= 20  # one request comes back every 60s / 3
    assert "at most 3 requests per 60s" in answers[3][1]
    assert (await post(gw.session, gw.url, "b0", **{"X-Api-Key": "b"}))[0] == 200
    assert service.names() == ["a0", "a1", "a2", "b0"]  # the refused were not forwarded
    async with gw.session.get(gw.internal + "/metrics") as resp:
        metrics = await resp.text()
    assert 'stepgate_flow_rejected_total{reason="rate_limit",route="plain"} 2.0' in metrics


async def test_rate_limit_on_a_body_key_creates_no_run_beyond_it(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting()
    route = durable(
        await upstream(service.app()),
        rate_limit={"limit": 2, "per": "1h", "key": "body:customer.id"},
    )
    gw = await gateway([route])

    async def order(customer: int) -> int:
        body = {"customer": {"id": customer}}
        async with gw.session.post(gw.url + "/work", json=body) as resp:
            return resp.status

    assert [await order(7) for _ in range(3)] + [await order(8)] == [200, 200, 429, 200]
    assert len(await statuses(gw, "completed")) == 3


async def test_queue_limit_gives_503_and_creates_no_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting()
    service.gate.clear()
    gw = await gateway([durable(await upstream(service.app()), concurrency=1, queue_limit=1)])
    async_ = {"Prefer": "respond-async"}
    assert (await post(gw.session, gw.url, "r0", **async_))[0] == 202
    await until(lambda: service.inflight == 1)
    assert (await post(gw.session, gw.url, "r1", **async_))[0] == 202
    status, text, headers = await post(gw.session, gw.url, "r2", **async_)
    assert status == 503 and "queue_limit" in text and headers["Retry-After"] == "1"
    async with gw.session.get(gw.internal + "/v1/runs") as resp:
        assert len((await resp.json())["runs"]) == 2
    async with gw.session.get(gw.internal + "/metrics") as m:
        text = await m.text()
    assert 'stepgate_flow_rejected_total{reason="queue_full",route="work"} 1.0' in text
    assert 'stepgate_queued{route="work"} 1.0' in text
    service.gate.set()


async def test_a_reload_that_raises_the_limit_starts_queued_runs(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Counting()
    service.gate.clear()
    base = await upstream(service.app())
    gw = await gateway([durable(base, concurrency=1)])
    async_ = {"Prefer": "respond-async"}
    for i in range(3):
        assert (await post(gw.session, gw.url, f"r{i}", **async_))[0] == 202
    await until(lambda: service.inflight == 1)
    assert len(await statuses(gw, "queued")) == 2
    engine = gw.gateway.engine
    engine.reload(engine.settings.__class__(**{**_fields(engine.settings), "routes": (
        _route(engine.routes["work"], concurrency=3),
    )}))  # fmt: skip
    await until(lambda: service.inflight == 3)
    service.gate.set()


def _fields(settings: Any) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def _route(route: Any, *, concurrency: int) -> Any:
    from dataclasses import replace

    from gateway.config import Concurrency

    return replace(route, concurrency=Concurrency(concurrency, None))


async def test_two_replicas_on_postgresql_together_respect_one_limit(
    gateway: GatewayFactory, upstream: UpstreamFactory, pg_url: str
) -> None:
    service = Counting(work=0.1)
    route = durable(await upstream(service.app()), concurrency=2)
    a = await gateway([route], replica_id="a", db=pg_url)
    b = await gateway([route], replica_id="b", db=pg_url)
    answers = await asyncio.gather(
        *(post((a, b)[i % 2].session, (a, b)[i % 2].url, f"r{i}") for i in range(10))
    )
    assert sorted(text for _, text, _ in answers) == sorted(f"done r{i}" for i in range(10))
    assert service.most == 2


async def test_a_killed_gateway_starts_its_queued_runs_after_restart_in_order(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    service = Counting()
    service.gate.clear()
    process = GatewayProcess(tmp_path, [durable(await upstream(service.app()), concurrency=1)])
    await process.start()
    try:
        async with aiohttp.ClientSession() as session:
            async_ = {"Prefer": "respond-async"}
            assert (await post(session, process.url, "r0", **async_))[0] == 202
            await until(lambda: service.inflight == 1)
            for i in range(1, 5):
                assert (await post(session, process.url, f"r{i}", **async_))[0] == 202
            process.kill()
            await process.start()
            service.gate.set()
            async with asyncio.timeout(20):
                while True:
                    runs_url = process.internal + "/v1/runs?status=completed"
                    async with session.get(runs_url) as resp:
                        if len((await resp.json())["runs"]) == 5:
                            break
                    await asyncio.sleep(0.05)
    finally:
        process.stop()
    # The queued runs start in the order they came; the one the crash cut short is retried,
    # and waits for a slot behind them like a new run.
    assert service.names() == ["r0", "r1", "r2", "r3", "r4", "r0"]
    assert service.most <= 2  # the upstream still held the crashed gateway's call to r0


async def test_child_runs_wait_for_their_routes_slots(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    from tests.gateway.test_invoke import Trip, book, routes

    trip = Trip("hold")
    configured = routes(await upstream(trip.app()))
    hotel = next(route for route in configured if route["name"] == "hotel")
    hotel["concurrency"] = 1
    gw = await gateway(configured)
    first, _ = await book(gw)
    second, _ = await book(gw)
    await until(lambda: trip.ran["hotel"] == 1)
    (waiting,) = await statuses(gw, "queued")  # the second child: the first holds the slot
    async with gw.session.get(f"{gw.internal}/v1/runs/{waiting}") as resp:
        assert (await resp.json())["route"] == "hotel"
    assert trip.ran["hotel"] == 1
    trip.release.set()
    for location in (first, second):
        async with gw.session.get(gw.url + location + "&wait=10") as resp:
            assert resp.status == 200
            assert (await resp.json())["hotel"]["room"] == 12
    assert trip.ran["hotel"] == 2
