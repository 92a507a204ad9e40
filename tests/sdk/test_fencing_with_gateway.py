"""Attempt fencing end to end: a real gateway gives up on a slow attempt, and its handler stops.

The route's timeout is 1 s and the handler's second step takes 2 s the first time it runs.
Attempt 1 times out; attempt 2 replays the first step, runs the second and the third, and
answers. When attempt 1's second step finally returns, the gateway refuses to record it
(409 superseded): that handler raises Superseded and never runs its third step. So no step the
run recorded ran twice; only the second step ran twice, and the run kept attempt 2's output.
The same through aiohttp, ASGI (served by a small aiohttp bridge) and WSGI with stepgate.sync.
"""

from __future__ import annotations

import asyncio
import json
import socketserver
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import stepgate.aiohttp
import stepgate.asgi
import stepgate.wsgi
from aiohttp import web
from stepgate import Superseded, step
from stepgate.sync import step as sync_step

from tests.conftest import GatewayFactory, UpstreamFactory

SLOW = 2.0  # the second step's first execution, against the route's 1 s timeout
ROUTE = {
    "name": "book",
    "path": "/book",
    "durable": True,
    "timeout": "1s",
    "hold": "10s",
    "retry": {"attempts": 3, "initial": "50ms", "max": "50ms"},
}


class Trip:
    """Three counted steps; what each attempt's handler went through."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()
        self.superseded: list[int] = []  # attempts whose handler got the signal
        self.caught: list[BaseException] = []  # what the handler's `except Exception` saw
        self.done: dict[int, threading.Event] = {1: threading.Event(), 2: threading.Event()}

    async def work_async(self, name: str, attempt: int) -> str:
        self.ran[name] += 1
        if name == "second" and self.ran[name] == 1:
            await asyncio.sleep(SLOW)
        return f"{name} by attempt {attempt}"

    async def book(self, attempt: int) -> dict[str, str]:
        outputs: dict[str, str] = {}
        try:
            for name in ("first", "second", "third"):
                outputs[name] = await step.run(name, self.work_async, name, attempt)
        except Exception as exc:
            self.caught.append(exc)
        except Superseded:
            self.superseded.append(attempt)
            raise
        finally:
            self.done.setdefault(attempt, threading.Event()).set()
        return outputs

    def book_sync(self, attempt: int) -> dict[str, str]:
        outputs: dict[str, str] = {}
        try:
            for name in ("first", "second", "third"):
                outputs[name] = sync_step.run(name, self.work_sync, name, attempt)
        except Exception as exc:
            self.caught.append(exc)
        except Superseded:
            self.superseded.append(attempt)
            raise
        finally:
            self.done.setdefault(attempt, threading.Event()).set()
        return outputs

    def work_sync(self, name: str, attempt: int) -> str:
        self.ran[name] += 1
        if name == "second" and self.ran[name] == 1:
            time.sleep(SLOW)
        return f"{name} by attempt {attempt}"


async def _check(trip: Trip, gw: Any) -> None:
    started = time.monotonic()
    async with gw.session.post(gw.url + "/book", json={}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        run_id = resp.headers["Stepgate-Run-Id"]
    assert time.monotonic() - started < SLOW, "attempt 2 answered before attempt 1 woke up"
    assert body == {
        "first": "first by attempt 1",
        "second": "second by attempt 2",
        "third": "third by attempt 2",
    }
    # Attempt 1's handler is still in its slow step; let it reach the gateway and stop.
    assert await asyncio.to_thread(trip.done[1].wait, SLOW + 5)
    assert trip.superseded == [1]
    assert trip.caught == []
    assert trip.ran == {"first": 1, "second": 2, "third": 1}
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    assert run["status"] == "completed"
    assert [a["outcome"] for a in run["attempts"]] == ["timeout", "response"]
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["second"]["output"] == "second by attempt 2"
    assert [steps[name]["attempts"] for name in ("first", "second", "third")] == [1, 1, 1]


def _attempt(headers: Any) -> int:
    return int(headers.get("Stepgate-Attempt", "0"))


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Like tests.conftest's, but as web.run_app serves: a handler whose client went away is not
    cancelled (aiohttp's test server cancels it), so attempt 1 lives on as in production."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_aiohttp_handler_of_a_timed_out_attempt_stops(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip()

    async def book(request: web.Request) -> web.Response:
        return web.json_response(await trip.book(_attempt(request.headers)))

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post("/book", book)
    gw = await gateway([{**ROUTE, "upstream": await upstream(app)}])
    await _check(trip, gw)


# --- ASGI, served through a minimal aiohttp bridge -----------------------------------------

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _asgi_bridge(asgi: ASGIApp) -> web.Application:
    """Serve an ASGI app from aiohttp: enough HTTP/1.1 for one request-response at a time."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path.encode(),
            "root_path": "",
            "scheme": "http",
            "query_string": request.query_string.encode(),
            "headers": [(k.lower(), v) for k, v in request.raw_headers],
            "client": None,
            "server": None,
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asgi(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in start["headers"]
            if k.lower() != b"content-length"
        }
        return web.Response(status=start["status"], headers=headers, body=payload)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_asgi_handler_of_a_timed_out_attempt_stops(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        attempt = int(headers.get("stepgate-attempt", "0"))
        body = json.dumps(await trip.book(attempt)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    gw = await gateway(
        [{**ROUTE, "upstream": await upstream(_asgi_bridge(stepgate.asgi.StepgateMiddleware(app)))}]
    )
    await _check(trip, gw)


# --- WSGI with stepgate.sync, on a threaded wsgiref server ---------------------------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # attempt 1 answers a connection the gateway has closed: expected here


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
async def wsgi_upstream() -> AsyncIterator[Callable[[Any], str]]:
    servers: list[tuple[WSGIServer, threading.Thread]] = []

    def start(app: Any) -> str:
        server = make_server(
            "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), daemon=True, name="wsgi-upstream"
        )
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_wsgi_handler_of_a_timed_out_attempt_stops(
    gateway: GatewayFactory,
    wsgi_upstream: Callable[[Any], str],
) -> None:
    trip = Trip()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = json.dumps(trip.book_sync(int(environ.get("HTTP_STEPGATE_ATTEMPT", "0"))))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    upstream = wsgi_upstream(stepgate.wsgi.StepgateMiddleware(app))
    gw = await gateway([{**ROUTE, "upstream": upstream}])
    await _check(trip, gw)
