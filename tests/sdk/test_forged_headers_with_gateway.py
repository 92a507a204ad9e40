"""Issue 10: a client forging step results through stepgate.wsgi with underscore header names.

WSGI (like CGI) maps `Stepgate_Callback` and `Stepgate-Callback` to the same environ key. A
client that sends `Stepgate_Callback` pointing at its own server, with `Stepgate_Steps: 1`,
could make the SDK fetch "recorded" steps from it and skip the real ones. The upstream here is
wsgiref, which keeps underscore names and comma-joins duplicates. Two defences close it: the
SDK refuses merged values (what a durable route produces), and the gateway drops client header
names with underscores (gateway/proxy.py), which also covers a plain route, where the forged
headers would arrive alone.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import stepgate.wsgi
from aiohttp import web
from stepgate.sync import step

from tests.conftest import GatewayFactory, Running, UpstreamFactory


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Attacker:
    """The client's own server, posing as the callback API with a forged record."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def app(self) -> web.Application:
        async def any_call(request: web.Request) -> web.Response:
            self.calls.append(f"{request.method} {request.path}")
            if request.method == "GET":
                return web.json_response(
                    {
                        "steps": [
                            {
                                "id": "charge",
                                "seq": 0,
                                "kind": "run",
                                "status": "completed",
                                "attempts": 1,
                                "output": "forged",
                            }
                        ]
                    }
                )
            return web.json_response({"status": "completed", "output": "forged"}, status=201)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_call)
        return app


@pytest.fixture
async def shop() -> AsyncIterator[tuple[str, list[str]]]:
    """A WSGI service on a threaded wsgiref server: one step, `charge`, counted."""
    ran: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        value = step.run("charge", lambda: ran.append("charge") or "charged")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"charge": value}).encode()]

    server = make_server(
        "127.0.0.1",
        0,
        stepgate.wsgi.StepgateMiddleware(app),
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), daemon=True, name="wsgi-shop"
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", ran
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def _start(
    gateway: GatewayFactory, upstream: UpstreamFactory, shop_url: str
) -> tuple[Running, Attacker, dict[str, str]]:
    attacker = Attacker()
    attacker_url = await upstream(attacker.app())
    gw = await gateway(
        [
            {
                "name": "pay",
                "path": "/pay",
                "upstream": shop_url,
                "durable": True,
                "hold": "5s",
                "retry": {"attempts": 1},
            },
            {"name": "plain-pay", "path": "/plain-pay", "upstream": shop_url},
        ]
    )
    forged = {
        "Stepgate_Callback": f"{attacker_url}/v1/runs/forged",
        "Stepgate_Token": "forged",
        "Stepgate_Steps": "1",
        "Stepgate_Run_Id": "forged",
    }
    return gw, attacker, forged


async def test_on_a_durable_route_the_forgery_never_reaches_the_attackers_server(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    shop: tuple[str, list[str]],
) -> None:
    shop_url, ran = shop
    gw, attacker, forged = await _start(gateway, upstream, shop_url)
    async with gw.session.post(gw.url + "/pay", headers=forged, data=b"{}") as resp:
        body = await resp.read()
    assert attacker.calls == []
    assert b"forged" not in body
    assert len(ran) <= 1


# The gateway's part: it drops client header names with underscores (gateway/proxy.py), so the
# forged headers never arrive; without that the SDK's refusal answers 400 on the durable route
# and the plain route passes the forged headers on.
@pytest.mark.parametrize("path", ["/pay", "/plain-pay"])
async def test_forged_underscore_headers_never_reach_the_service(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    shop: tuple[str, list[str]],
    path: str,
) -> None:
    shop_url, ran = shop
    gw, attacker, forged = await _start(gateway, upstream, shop_url)
    async with gw.session.post(gw.url + path, headers=forged, data=b"{}") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"charge": "charged"}
    assert attacker.calls == []
    assert ran == ["charge"]
