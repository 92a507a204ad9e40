"""Durable sleeps, waits for events and the events API, through the raw protocol."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps, Suspend, raw_sleep, raw_wait, suspended

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True


def route(base: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "flow",
        "path": "/flow",
        "upstream": base,
        "durable": True,
        "retry": {"attempts": 3, "initial": "20ms"},
        **extra,
    }


class Sleeper:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.executed: Counter[str] = Counter()
        self.attempts: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/flow", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(request.headers["Stepgate-Attempt"])
        steps = RawSteps(request)

        async def before() -> str:
            self.executed["before"] += 1
            return "b"

        try:
            await steps.run("before", before)
            await raw_sleep(steps, "nap", self.seconds)
        except Suspend:
            return suspended()

        async def after() -> str:
            self.executed["after"] += 1
            return "a"

        await steps.run("after", after)
        return web.json_response({"woke": True})


async def test_a_sleeping_run_resumes_and_skips_finished_steps(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    sleeper = Sleeper(1.0)
    gw = await gateway([route(await upstream(sleeper.app()), hold="100ms")])
    started = time.monotonic()
    async with gw.session.post(gw.url + "/flow", allow_redirects=False) as resp:
        assert resp.status == 303
        assert (await resp.json())["status"] == "sleeping"
        location = resp.headers["Location"]
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        assert await resp.json() == {"woke": True}
    assert time.monotonic() - started >= 1.0
    assert sleeper.executed == {"before": 1, "after": 1}
    assert sleeper.attempts == ["1", "2"]


async def test_a_short_sleep_inside_hold_answers_directly(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    sleeper = Sleeper(0.3)
    gw = await gateway([route(await upstream(sleeper.app()), hold="5s")])
    async with gw.session.post(gw.url + "/flow", allow_redirects=False) as resp:
        assert resp.status == 200
        assert await resp.json() == {"woke": True}
    assert sleeper.attempts == ["1", "2"]


async def test_a_sleep_already_due_completes_without_suspending(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    sleeper = Sleeper(-1.0)
    gw = await gateway([route(await upstream(sleeper.app()))])
    async with gw.session.post(gw.url + "/flow") as resp:
        assert resp.status == 200
    assert sleeper.attempts == ["1"]


class Waiter:
    def __init__(self, timeout: str = "1h") -> None:
        self.timeout = timeout
        self.outputs: dict[str, Any] = {}
        self.invocations: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/flow", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        order = request.query["order"]
        self.invocations[order] += 1
        steps = RawSteps(request)
        try:
            paid = await raw_wait(
                steps, "paid", "order.paid", {"data.order_id": order}, self.timeout
            )
        except Suspend:
            return suspended()
        self.outputs[order] = paid
        return web.json_response({"order": order, "paid": paid})


async def start_async(gw: Running, path: str) -> str:
    async with gw.session.post(
        gw.url + path, headers={"Prefer": "respond-async"}, allow_redirects=False
    ) as resp:
        assert resp.status == 202
        return resp.headers["Location"]


async def wait_status(gw: Running, location: str, status: str) -> None:
    run_id = location.split("/")[-1].split("?")[0]
    for _ in range(200):
        run = await gw.store.get_run(run_id)
        if run.status == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"run stayed {run.status}")


async def send_event(gw: Running, body: dict[str, Any]) -> dict[str, Any]:
    async with gw.session.post(gw.internal + "/v1/events", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json()


async def test_an_event_wakes_only_the_matching_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    waiter = Waiter()
    gw = await gateway([route(await upstream(waiter.app()))])
    first = await start_async(gw, "/flow?order=o-1")
    second = await start_async(gw, "/flow?order=o-2")
    await wait_status(gw, first, "waiting")
    await wait_status(gw, second, "waiting")

    answer = await send_event(gw, {"name": "order.paid", "data": {"order_id": "o-2", "sum": 9}})
    assert answer["woke"] == 1
    async with gw.session.get(gw.url + second + "&wait=5") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["paid"]["name"] == "order.paid"
    assert body["paid"]["data"] == {"order_id": "o-2", "sum": 9}
    assert body["paid"]["id"] == answer["id"]
    async with gw.session.get(gw.url + first + "&wait=0") as resp:
        assert resp.status == 202
        assert (await resp.json())["status"] == "waiting"
    assert waiter.invocations == {"o-1": 1, "o-2": 2}


async def test_one_event_wakes_every_matching_wait_and_duplicates_wake_once(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    waiter = Waiter()
    gw = await gateway([route(await upstream(waiter.app()))])
    a = await start_async(gw, "/flow?order=same")
    b = await start_async(gw, "/flow?order=same")
    await wait_status(gw, a, "waiting")
    await wait_status(gw, b, "waiting")
    event = {"name": "order.paid", "data": {"order_id": "same"}, "id": "evt-1"}
    assert (await send_event(gw, event))["woke"] == 2
    repeated = await send_event(gw, event)
    assert repeated["woke"] == 0 and repeated["duplicate"] is True
    for location in (a, b):
        async with gw.session.get(gw.url + location + "&wait=5") as resp:
            assert resp.status == 200
    assert waiter.invocations == {"same": 4}


async def test_a_wait_times_out_with_null(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    waiter = Waiter(timeout="300ms")
    gw = await gateway([route(await upstream(waiter.app()), hold="5s")])
    async with gw.session.post(gw.url + "/flow?order=late") as resp:
        assert resp.status == 200
        assert await resp.json() == {"order": "late", "paid": None}


async def test_an_event_just_before_the_wait_is_not_lost(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    waiter = Waiter()
    gw = await gateway([route(await upstream(waiter.app()))])
    await send_event(gw, {"name": "order.paid", "data": {"order_id": "early"}})
    async with gw.session.post(gw.url + "/flow?order=early") as resp:
        assert resp.status == 200
        assert (await resp.json())["paid"]["data"] == {"order_id": "early"}
    assert waiter.invocations == {"early": 1}


async def test_the_lookback_window_is_configurable(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    waiter = Waiter(timeout="200ms")
    gw = await gateway([route(await upstream(waiter.app()))], events={"lookback": "0ms"})
    await send_event(gw, {"name": "order.paid", "data": {"order_id": "early"}})
    await asyncio.sleep(0.01)
    async with gw.session.post(gw.url + "/flow?order=early") as resp:
        assert resp.status == 200
        assert (await resp.json())["paid"] is None


async def test_cancelling_a_parked_run(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    waiter = Waiter()
    gw = await gateway([route(await upstream(waiter.app()))])
    location = await start_async(gw, "/flow?order=c")
    await wait_status(gw, location, "waiting")
    run_id = location.split("/")[-1].split("?")[0]
    async with gw.session.post(f"{gw.internal}/v1/runs/{run_id}/cancel") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
    async with gw.session.post(f"{gw.internal}/v1/runs/{run_id}/cancel") as resp:
        assert resp.status == 409
    assert (await send_event(gw, {"name": "order.paid", "data": {"order_id": "c"}}))["woke"] == 0
    async with gw.session.get(gw.url + location) as resp:
        assert resp.status == 409
        assert resp.content_type == "application/problem+json"
    assert waiter.invocations == {"c": 1}


async def test_bad_sleep_and_wait_bodies_are_400(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    answers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        for body in (
            {"sleep": {"until": "tomorrow"}},
            {"sleep": {"until": "2030-01-01T00:00:00"}},
            {"sleep": 5},
            {"wait": {"match": {}}},
            {"wait": {"event": "e", "timeout": "soon"}},
            {"wait": {"event": "e", "match": []}},
            {"sleep": {"until": "2030-01-01T00:00:00Z", "for": "5s"}},
        ):
            answers.append((await steps.put("s", body))[0])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/flow", handler)
    gw = await gateway([route(await upstream(app))])
    async with gw.session.post(gw.url + "/flow") as resp:
        assert resp.status == 200
    assert answers == [400] * 7


async def test_a_sleep_that_falls_due_while_the_gateway_is_down(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    sleeper = Sleeper(1.0)
    gw = GatewayProcess(tmp_path, [route(await upstream(sleeper.app()), hold="50ms")])
    await gw.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(gw.url + "/flow", allow_redirects=False) as resp:
                assert resp.status == 303
                location = resp.headers["Location"]
            gw.kill()
            await asyncio.sleep(1.5)  # the deadline passes while nothing runs
            assert sleeper.attempts == ["1"]
            await gw.start()
            async with client.get(gw.url + location + "&wait=10") as resp:
                assert resp.status == 200
                assert await resp.json() == {"woke": True}
        assert sleeper.executed == {"before": 1, "after": 1}
        assert sleeper.attempts == ["1", "2"]
    finally:
        gw.stop()


async def test_one_early_event_completes_only_one_wait_of_a_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        try:
            for name in ("tick", "tick#2"):
                seen.append(await raw_wait(steps, name, "tick", {}, "300ms"))
        except Suspend:
            return suspended()
        return web.json_response([s and s["id"] for s in seen[-2:]])

    app = web.Application()
    app.router.add_post("/flow", handler)
    gw = await gateway([route(await upstream(app), hold="5s")])
    await send_event(gw, {"name": "tick", "data": {}, "id": "only-one"})
    async with gw.session.post(gw.url + "/flow") as resp:
        assert resp.status == 200
        # The early event satisfies the first wait; the second times out instead of
        # receiving the same event again.
        assert await resp.json() == ["only-one", None]
