"""Polls, events, callbacks and invocations on the same runs at the same time.

Each test drives many runs at once, so that whatever can interleave does, and then checks what a
client sees: every wake-up arrives, a `retriable: false` step ends its run, a parked run is
never failed for being parked, a sleep is never cut short, and a poll never answers an old
status. Each of these failed on the engine that kept its own copies of runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.rawsteps import RawSteps, suspended

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

ASYNC = {"Prefer": "respond-async"}


def route(base: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "retry": {"attempts": 3, "initial": "20ms", "max": "20ms"},
        **extra,
    }


async def start_runs(gw: Running, n: int, *, query: str = "") -> list[str]:
    """`n` runs started with respond-async; their poll URLs."""

    async def one(i: int) -> str:
        async with gw.session.post(
            gw.url + f"/work?i={i}{query}", headers=ASYNC, allow_redirects=False
        ) as resp:
            assert resp.status == 202, await resp.text()
            return resp.headers["Location"]

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def poll_until_final(
    gw: Running, location: str, *, wait: str = "0", pause: float = 0.01
) -> tuple[int, bytes]:
    """What an impatient client does: ask again `pause` seconds after each answer until the run
    has ended (every answer a read of the run, interleaved with what the gateway does)."""
    while True:
        async with gw.session.get(gw.url + location + f"&wait={wait}") as resp:
            body = await resp.read()
            if resp.status != 202:
                return resp.status, body
        await asyncio.sleep(pause)


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def statuses(gw: Running) -> Counter[str]:
    async with gw.session.get(f"{gw.internal}/v1/runs?limit=500") as resp:
        return Counter(run["status"] for run in (await resp.json())["runs"])


async def post_event(gw: Running, name: str, data: Any = None) -> int:
    async with gw.session.post(
        f"{gw.internal}/v1/events", json={"name": name, "data": data}
    ) as resp:
        assert resp.status == 202
        return int((await resp.json())["woke"])


class WaitThenAnswer:
    """Waits for the event `go`, then answers with the event's data and the attempt."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.errors: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        steps = RawSteps(request)
        self.calls[request.query["i"]] += 1
        recorded = (await steps.steps()).get("go")
        if recorded is None:
            event = request.query.get("event", "go")
            status, answer = await steps.put("go", {"wait": {"event": event, "timeout": "1h"}})
            if status != 200:
                self.errors.append(str(answer))
                return web.Response(status=500)
            if answer["status"] != "completed":
                return suspended()
        elif recorded["status"] != "completed":
            return suspended()
        return web.json_response({"attempt": steps.attempt, "i": request.query["i"]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/work", self.handle)
        return app


async def test_one_event_wakes_every_long_polled_run_at_once(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    handler = WaitThenAnswer()
    gw = await gateway([route(await upstream(handler.app()))])
    n = 1000
    locations = await start_runs(gw, n)
    await until(lambda: _count(gw, "waiting", n), 60, "every run parks waiting")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as polls:

        async def poll(location: str) -> int:
            async with polls.get(gw.url + location + "&wait=30") as resp:
                await resp.read()
                return resp.status

        polling = [asyncio.ensure_future(poll(loc)) for loc in locations]
        await asyncio.sleep(0.5)  # the long-polls are in: each has read its run
        started = time.monotonic()
        assert await post_event(gw, "go") == n
        answers = await asyncio.wait_for(asyncio.gather(*polling), 40)
        took = time.monotonic() - started
    assert answers == [200] * n
    assert took < 20, f"the last of {n} runs ended {took:.1f}s after the event"
    assert set(handler.calls.values()) == {2} and handler.errors == []


async def _count(gw: Running, status: str, n: int) -> bool:
    page = await gw.store.list_runs(status=status, limit=n)
    return len(page.runs) >= n


async def test_a_poll_during_an_event_wake_does_not_delay_the_resume(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    handler = WaitThenAnswer()
    gw = await gateway([route(await upstream(handler.app()))])
    for round_ in range(20):
        [location] = await start_runs(gw, 1, query=f"&event=go-{round_}")
        run_id = location.split("/")[-1].split("?")[0]
        await until(lambda run_id=run_id: _is(gw, run_id, "waiting"), 10, "the run parks")
        # Polls that read the run while the event is being delivered, and after.
        polls = [
            asyncio.ensure_future(gw.session.get(gw.url + location + "&wait=10")) for _ in range(5)
        ]
        await asyncio.sleep(0)
        started = time.monotonic()
        event = asyncio.ensure_future(post_event(gw, f"go-{round_}"))
        polls += [
            asyncio.ensure_future(gw.session.get(gw.url + location + "&wait=10")) for _ in range(5)
        ]
        await event
        for answer in await asyncio.gather(*polls):
            assert answer.status == 200
            answer.release()
        assert time.monotonic() - started < 3


async def _is(gw: Running, run_id: str, status: str) -> bool:
    run = await gw.store.get_run(run_id)
    return run is not None and run.status == status


async def test_many_runs_that_record_a_wait_and_suspend_all_park(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    handler = WaitThenAnswer()
    gw = await gateway([route(await upstream(handler.app()))])
    n = 600
    locations = await start_runs(gw, n)
    # Everybody polls without pause while the handlers record their waits and suspend.
    polls = [asyncio.ensure_future(poll_until_final(gw, loc)) for loc in locations]
    await until(lambda: _count(gw, "waiting", n), 60, "every run parks waiting")
    page = await gw.store.list_runs(limit=n)
    assert {r.status for r in page.runs} == {"waiting"}
    # No attempt was spent on "suspended without a sleeping or waiting step".
    assert {r.attempt for r in page.runs} == {1}
    assert await post_event(gw, "go") == n
    answers = await asyncio.wait_for(asyncio.gather(*polls), 60)
    assert {status for status, _ in answers} == {200}
    assert set(handler.calls.values()) == {2}


async def test_polls_racing_a_non_retriable_step_never_reinvoke_the_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    calls: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.Response:
        i = request.query["i"]
        calls[i] += 1
        if calls[i] == 1:
            return web.Response(status=503)  # retried: the next attempt is a resumption
        steps = RawSteps(request)
        status, answer = await steps.put(
            "charge", {"error": {"message": "declined", "retriable": False}}
        )
        assert status == 200, answer
        await asyncio.sleep(0.01)
        return web.Response(status=500, text="declined")

    gw = await gateway(
        [
            route(
                await upstream(_app(handler)),
                retry={"attempts": 5, "initial": "20ms", "max": "20ms"},
            )
        ]
    )
    n = 200
    locations = await start_runs(gw, n)
    answers = await asyncio.wait_for(
        asyncio.gather(*(poll_until_final(gw, loc, pause=0) for loc in locations)), 60
    )
    assert set(answers) == {(500, b"declined")}
    assert set(calls.values()) == {2}
    assert await statuses(gw) == {"failed": n}


def _app(handler: Any) -> web.Application:
    app = web.Application()
    app.router.add_post("/work", handler)
    return app


async def test_a_sleep_is_never_cut_short_by_an_immediate_poll(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    invoked: dict[str, list[float]] = {}
    due: dict[str, float] = {}

    async def handler(request: web.Request) -> web.Response:
        i = request.query["i"]
        invoked.setdefault(i, []).append(time.time())
        steps = RawSteps(request)
        recorded = (await steps.steps()).get("nap")
        if recorded is None:
            until_at = datetime.now(UTC) + timedelta(seconds=1.5)
            due[i] = until_at.timestamp()
            status, answer = await steps.put("nap", {"sleep": {"until": until_at.isoformat()}})
            assert status == 200 and answer["status"] == "sleeping", answer
            return suspended()
        return web.Response(text="rested")

    gw = await gateway([route(await upstream(_app(handler)))])
    n = 100
    locations = await start_runs(gw, n)
    answers = await asyncio.wait_for(
        asyncio.gather(*(poll_until_final(gw, loc, pause=0) for loc in locations)), 60
    )
    assert set(answers) == {(200, b"rested")}
    for i, times in invoked.items():
        assert len(times) == 2, times
        assert times[1] >= due[i] - 0.01, f"woken {due[i] - times[1]:.3f}s before the sleep ended"


async def test_a_poll_never_answers_an_old_status(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(text="done")

    gw = await gateway([route(await upstream(_app(handler)))])
    locations = await start_runs(gw, 200)
    await until(lambda: _count(gw, "completed", 200), 30, "every run completes")

    async def poll(location: str) -> tuple[int, str]:
        async with gw.session.get(gw.url + location + "&wait=0") as resp:
            return resp.status, await resp.text()

    answers = await asyncio.gather(*(poll(loc) for loc in locations for _ in range(3)))
    assert set(answers) == {(200, "done")}
