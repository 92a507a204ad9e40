from __future__ import annotations

from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True


async def test_durable_success_passes_through(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    seen = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="hello", headers={"X-Up": "1"})

    app = web.Application()
    app.router.add_post("/process", handler)
    base = await upstream(app)
    gw = await gateway([{"name": "p", "path": "/process", "upstream": base, "durable": True}])
    async with gw.session.post(gw.url + "/process", data=b"abc") as resp:
        assert resp.status == 200
        assert await resp.read() == b"hello"
        assert resp.headers["X-Up"] == "1"
        assert "Stepgate-Run-Id" in resp.headers
    assert seen[0]["Stepgate-Attempt"] == "1"
