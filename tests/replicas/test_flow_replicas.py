"""Flow control across real gateway processes on one PostgreSQL database (issue 12): a slot
held by a replica that is killed is freed when another replica takes its lease over."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import UpstreamFactory
from tests.gateway.procs import GatewayProcess

LEASE = 2.0


async def test_a_killed_replicas_slot_goes_to_the_run_queued_on_another(
    tmp_path: Path, pg_url: str, upstream: UpstreamFactory
) -> None:
    calls: list[tuple[str, str, str]] = []  # (upstream, X-Name, attempt)
    forever = asyncio.Event()

    def app(name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            calls.append((name, request.headers["X-Name"], request.headers["Stepgate-Attempt"]))
            if name == "A":
                await forever.wait()  # A is killed while it holds this call
            return web.Response(text=f"{request.headers['X-Name']} by {name}")

        served = web.Application()
        served.router.add_post("/work", handle)
        return served

    gateways = {}
    for name in "AB":
        home = tmp_path / name
        home.mkdir()
        route = {
            "name": "work",
            "path": "/work",
            "upstream": await upstream(app(name)),
            "durable": True,
            "concurrency": 1,
            "retry": {"attempts": 3, "initial": "50ms", "max": "50ms"},
        }
        gateways[name] = GatewayProcess(
            home, [route], store=pg_url, lease=f"{LEASE:g}s", replica_id=f"replica-{name}"
        )
    a, b = gateways["A"], gateways["B"]
    await asyncio.gather(a.start(), b.start())
    try:
        async with aiohttp.ClientSession() as session:
            async_ = {"Prefer": "respond-async"}
            async with session.post(a.url + "/work", headers={"X-Name": "r1", **async_}) as r:
                assert r.status == 202
                first = r.headers["Location"]
            async with asyncio.timeout(5):
                while not calls:  # noqa: ASYNC110 - the upstream's record
                    await asyncio.sleep(0.02)
            async with session.post(b.url + "/work", headers={"X-Name": "r2", **async_}) as r:
                assert r.status == 202
                second = r.headers["Location"]
            async with session.get(b.internal + "/v1/runs?status=queued") as r:
                assert len((await r.json())["runs"]) == 1  # A's run holds the one slot
            a.kill()
            killed = time.monotonic()
            answers = []
            for location in (second, first):
                async with session.get(b.url + location + "&wait=30") as r:
                    answers.append((r.status, await r.text()))
            elapsed = time.monotonic() - killed
    finally:
        forever.set()
        await asyncio.gather(*(asyncio.to_thread(gw.stop) for gw in gateways.values()))
    assert answers == [(200, "r2 by B"), (200, "r1 by B")]
    # The queued run started when A's lease was taken over; A's own run, retried, queued
    # behind it like a new run.
    assert calls == [("A", "r1", "1"), ("B", "r2", "1"), ("B", "r1", "2")]
    assert elapsed < LEASE * 1.2 + 5
