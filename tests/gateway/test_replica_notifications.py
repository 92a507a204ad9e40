"""Two replicas in one process on one PostgreSQL database: a client waiting on one hears that
the other ended the run, and still does, by reading the store, while the connection that
carries notifications is down; the connection comes back by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory


class Held:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        async def work(request: web.Request) -> web.Response:
            self.arrived.set()
            await self.release.wait()
            return web.Response(text="done")

        app = web.Application()
        app.router.add_post("/work", work)
        return app


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - a flag of the store's, not an event
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_a_waiter_on_one_replica_hears_the_other_end_the_run_even_without_notify(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
) -> None:
    held = Held()
    route = {
        "name": "work",
        "path": "/work",
        "upstream": await upstream(held.app()),
        "durable": True,
    }
    a = await gateway([route], replica_id="a")
    b = await gateway([route], replica_id="b")
    assert b.store.live_notifications
    # The database drops b's listening connection (a failover, an idle-connection killer).
    conn = await asyncpg.connect(b.store.url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'stepgate-listen b'"
        )
    finally:
        await conn.close()
    await until(lambda: not b.store.live_notifications)

    async with a.session.post(a.url + "/work", headers={"Prefer": "respond-async"}) as resp:
        location = resp.headers["Location"]
    await asyncio.wait_for(held.arrived.wait(), 5)
    polling = asyncio.create_task(b.session.get(b.url + location + "&wait=20"))
    await asyncio.sleep(0.2)
    held.release.set()
    ended = time.monotonic()
    resp = await asyncio.wait_for(polling, 10)
    assert resp.status == 200 and await resp.text() == "done"
    assert time.monotonic() - ended < 2.0  # read from the store, not at the end of the wait
    resp.release()

    await until(lambda: b.store.live_notifications)  # re-established by itself
