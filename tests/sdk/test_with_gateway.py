"""The SDK against the real gateway: parallel steps, a wait woken by an event, and replay."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import stepgate.aiohttp
from aiohttp import web
from stepgate import step

from tests.conftest import GatewayFactory, UpstreamFactory


class Shop:
    def __init__(self) -> None:
        self.executed: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[stepgate.aiohttp.middleware])
        app.router.add_post("/orders/{id}", self.order)
        return app

    async def order(self, request: web.Request) -> web.Response:
        order_id = int(request.match_info["id"])

        def counted(name: str, value: Any) -> Any:
            self.executed[name] += 1
            return value

        quote, stock = await asyncio.gather(
            step.run("quote", counted, "quote", {"total": 30}),
            step.run("stock", counted, "stock", True),
        )
        paid = await step.wait_for_event(
            "paid", event="order.paid", match={"data.order_id": order_id}, timeout=30
        )
        await step.sleep("settle", 0.1)
        receipt = await step.run("receipt", counted, "receipt", f"R-{order_id}")
        return web.json_response(
            {
                "quote": quote,
                "stock": stock,
                "receipt": receipt,
                "paid_by": paid["data"]["by"] if paid else None,
            }
        )


async def test_a_wait_for_event_resumes_the_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    shop = Shop()
    gw = await gateway(
        [
            {
                "name": "orders",
                "path": "/orders/*",
                "upstream": await upstream(shop.app()),
                "durable": True,
            }
        ]
    )
    async with gw.session.post(
        gw.url + "/orders/7", headers={"Prefer": "respond-async"}, allow_redirects=False
    ) as resp:
        assert resp.status == 202
        location = resp.headers["Location"]
    await asyncio.sleep(0.2)  # let the first invocation park at the wait
    for order_id in (8, 7):  # the other order's event must not wake this run
        async with gw.session.post(
            gw.internal + "/v1/events",
            json={"name": "order.paid", "data": {"order_id": order_id, "by": "card"}},
        ) as resp:
            assert resp.status == 202
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {
            "quote": {"total": 30},
            "stock": True,
            "receipt": "R-7",
            "paid_by": "card",
        }
    assert shop.executed == {"quote": 1, "stock": 1, "receipt": 1}
