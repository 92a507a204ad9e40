"""Crash tests: SIGKILL a real gateway process mid-run, start it again, and check that no
accepted run is lost and no recorded step runs twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps


@pytest.fixture
async def procs() -> AsyncIterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for proc in started:
        proc.stop()


async def wait_for_status(url: str, run_id: str, status: str, timeout: float = 15) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/v1/runs/{run_id}") as resp:
                run = await resp.json()
            if run["status"] == status:
                return run
            assert asyncio.get_running_loop().time() < deadline, run
            await asyncio.sleep(0.05)


async def test_sigkill_mid_run_loses_nothing_and_repeats_no_step(
    tmp_path: Path, upstream: UpstreamFactory, procs: list[GatewayProcess]
) -> None:
    executed: Counter[str] = Counter()
    in_second_step = asyncio.Event()
    attempts: list[str] = []
    run_ids: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        attempts.append(request.headers["Stepgate-Attempt"])
        run_ids.append(request.headers["Stepgate-Run-Id"])
        body = await request.read()
        steps = RawSteps(request)

        async def first() -> str:
            executed["first"] += 1
            return "one"

        async def second() -> str:
            executed["second"] += 1
            if len(attempts) == 1:
                in_second_step.set()
                await asyncio.sleep(30)  # the gateway is killed meanwhile
            return "two"

        a = await steps.run("first", first)
        b = await steps.run("second", second)
        return web.json_response({"a": a, "b": b, "body": body.decode()})

    app = web.Application()
    app.router.add_post("/work", handler)
    base = await upstream(app)
    route = {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "retry": {"attempts": 3, "initial": "50ms"},
    }
    gw = GatewayProcess(tmp_path, [route])
    procs.append(gw)
    await gw.start()

    async with aiohttp.ClientSession() as client:
        request = asyncio.ensure_future(client.post(gw.url + "/work", data=b"payload"))
        await asyncio.wait_for(in_second_step.wait(), 10)
        gw.kill()
        with pytest.raises(aiohttp.ClientError):
            await request

    await gw.start()
    run = await wait_for_status(gw.internal, run_ids[0], "completed")
    assert executed == {"first": 1, "second": 2}  # `second` never finished the first time
    assert attempts == ["1", "2"]
    assert [a["outcome"] for a in run["attempts"]] == ["interrupted", "response"]
    assert {s["id"]: s["attempts"] for s in run["steps"]} == {"first": 1, "second": 1}


async def test_run_accepted_before_a_crash_is_not_lost(
    tmp_path: Path, upstream: UpstreamFactory, procs: list[GatewayProcess]
) -> None:
    calls: list[str] = []
    hang = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.headers["Stepgate-Attempt"])
        if len(calls) == 1:
            hang.set()
            await asyncio.sleep(30)
        return web.Response(text="finally")

    app = web.Application()
    app.router.add_post("/work", handler)
    base = await upstream(app)
    route = {"name": "work", "path": "/work", "upstream": base, "durable": True}
    gw = GatewayProcess(tmp_path, [route])
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as client:
        async with client.post(
            gw.url + "/work", headers={"Prefer": "respond-async"}, allow_redirects=False
        ) as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        await asyncio.wait_for(hang.wait(), 10)
        gw.kill()
        await gw.start()
        async with client.get(gw.url + location + "&wait=10") as resp:
            assert resp.status == 200
            assert await resp.text() == "finally"
    assert calls == ["1", "2"]


async def test_sigterm_lets_the_attempt_in_flight_finish(
    tmp_path: Path, upstream: UpstreamFactory, procs: list[GatewayProcess]
) -> None:
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(0.5)
        return web.Response(text="graceful")

    app = web.Application()
    app.router.add_post("/work", handler)
    base = await upstream(app)
    gw = GatewayProcess(
        tmp_path,
        [{"name": "work", "path": "/work", "upstream": base, "durable": True}],
        shutdown_grace="5s",
    )
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as client:
        request = asyncio.ensure_future(client.post(gw.url + "/work"))
        await asyncio.wait_for(started.wait(), 10)
        assert gw.proc is not None
        gw.proc.terminate()
        resp = await request
        assert resp.status == 200
        assert await resp.text() == "graceful"
        resp.release()
    assert await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, 10) == 0
