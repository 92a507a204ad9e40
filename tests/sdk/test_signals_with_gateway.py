"""`step.signal` behind the real gateway, async (aiohttp) and blocking (WSGI): the handle's URL
is handed out from a step, `wait()` parks the run until the URL is POSTed to, and the replay
returns the POSTed body, or None once the time-out has passed."""

from __future__ import annotations

import socketserver
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import stepgate.aiohttp
import stepgate.wsgi
from aiohttp import web
from stepgate import StepgateError, step
from stepgate.sync import step as sync_step

from tests.conftest import GatewayFactory, Running, UpstreamFactory

BOTH_DIALECTS = True


class Desk:
    """Books a trip that needs an approval: the approver's link is 'mailed' by a step."""

    def __init__(self, timeout: float = 3600) -> None:
        self.timeout = timeout
        self.mailed: list[str] = []
        self.ran: Counter[str] = Counter()

    def mail(self, url: str) -> str:
        self.ran["mail"] += 1
        self.mailed.append(url)
        return "sent"

    async def handle(self, request: web.Request) -> web.Response:
        approval = await step.signal("approve", timeout=self.timeout)
        await step.run("mail", self.mail, approval.url)
        decision = await approval.wait()
        return web.json_response({"decision": decision, "url": approval.url})

    def handle_sync(self, environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        import json

        approval = sync_step.signal("approve", timeout=self.timeout)
        sync_step.run("mail", self.mail, approval.url)
        decision = approval.wait()
        start("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"decision": decision, "url": approval.url}).encode()]


class _Threading(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve_wsgi() -> Iterator[Callable[[Any], str]]:
    servers: list[WSGIServer] = []

    def start(app: Any) -> str:
        server = make_server("127.0.0.1", 0, app, server_class=_Threading, handler_class=_Quiet)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["async", "sync"])
async def desk_gateway(
    request: pytest.FixtureRequest,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    serve_wsgi: Callable[[Any], str],
) -> AsyncIterator[Callable[[float], Any]]:
    async def start(timeout: float = 3600) -> tuple[Desk, Running]:
        desk = Desk(timeout)
        if request.param == "async":
            app = web.Application(middlewares=[stepgate.aiohttp.middleware])
            app.router.add_post("/trips", desk.handle)
            base = await upstream(app)
        else:
            base = serve_wsgi(stepgate.wsgi.StepgateMiddleware(desk.handle_sync))
        route = {"name": "trips", "path": "/trips", "upstream": base, "durable": True}
        return desk, await gateway([{**route, "hold": "100ms"}])

    yield start


async def _park(gw: Running) -> str:
    async with gw.session.post(gw.url + "/trips", json={}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        return resp.headers["Location"]


async def test_a_posted_signal_resumes_the_handler(desk_gateway: Callable[..., Any]) -> None:
    desk, gw = await desk_gateway()
    location = await _park(gw)
    (url,) = desk.mailed
    async with gw.session.post(gw.url + url, json={"approved": True}) as resp:
        assert resp.status == 202
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        assert await resp.json() == {"decision": {"approved": True}, "url": url}
    assert desk.ran == {"mail": 1}  # the replay took the mail from the record
    async with gw.session.post(gw.url + url, json={"approved": False}) as resp:
        assert resp.status == 409


async def test_a_signal_that_times_out_gives_none(desk_gateway: Callable[..., Any]) -> None:
    desk, gw = await desk_gateway(0.3)
    location = await _park(gw)
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        assert (await resp.json())["decision"] is None
    assert desk.ran == {"mail": 1}


def test_signal_needs_the_gateway_and_a_positive_timeout() -> None:
    with pytest.raises(StepgateError, match="signal 'approve' needs the Stepgate gateway"):
        step.signal("approve")
    with pytest.raises(StepgateError, match="signal 'approve' needs the Stepgate gateway"):
        sync_step.signal("approve")
    with pytest.raises(ValueError, match="positive timeout"):
        step.signal("approve", timeout=0)
