"""The aiohttp, ASGI and WSGI adapters: context from headers, and the answers they substitute."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import stepgate.aiohttp
import stepgate.asgi
import stepgate.wsgi
from aiohttp import web
from aiohttp.test_utils import TestClient
from stepgate import NonRetriableError, Suspend, _transport, step
from stepgate.sync import step as sync_step

from tests.sdk.fakes import FakeAsyncTransport, FakeGateway, FakeSyncTransport

AiohttpClient = Callable[[web.Application], Any]


@pytest.fixture(autouse=True)
def _fake_transports(monkeypatch: pytest.MonkeyPatch, fake_gateway: FakeGateway) -> None:
    # The adapters build invocations with the default transports: the seam.
    monkeypatch.setattr(_transport, "default_async", FakeAsyncTransport(fake_gateway))
    monkeypatch.setattr(_transport, "default_sync", FakeSyncTransport(fake_gateway))


def _problem(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


# --- aiohttp ------------------------------------------------------------------------------


def _aiohttp_app() -> web.Application:
    async def flow(request: web.Request) -> web.Response:
        first = await step.run("first", lambda: "one")
        if request.query.get("sleep"):
            await step.sleep("nap", 60)
        if request.query.get("refuse"):
            raise NonRetriableError("no such traveller", status=422)
        if request.query.get("swallow"):
            try:
                await step.sleep("nap", 60)
            except BaseException:  # a handler that should not, but does
                return web.json_response({"swallowed": True})
        return web.json_response({"first": first})

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post("/flow", flow)
    return app


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    result: TestClient[Any, Any] = await aiohttp_client(_aiohttp_app())
    return result


async def test_aiohttp_without_gateway_headers_runs_plainly(
    client: TestClient[Any, Any],
    fake_gateway: FakeGateway,
) -> None:
    resp = await client.post("/flow")
    assert resp.status == 200
    assert await resp.json() == {"first": "one"}
    assert fake_gateway.calls == []


async def test_aiohttp_records_steps_in_gateway_mode(
    client: TestClient[Any, Any],
    fake_gateway: FakeGateway,
) -> None:
    resp = await client.post("/flow", headers=fake_gateway.headers(steps=0))
    assert resp.status == 200
    assert fake_gateway.puts() == [("first", {"output": "one", "seq": 0})]


async def test_aiohttp_suspend_answers_202(
    client: TestClient[Any, Any],
    fake_gateway: FakeGateway,
) -> None:
    resp = await client.post("/flow?sleep=1", headers=fake_gateway.headers(steps=0))
    assert resp.status == 202
    assert resp.headers["Stepgate-Suspend"] == "true"
    assert await resp.read() == b""


async def test_aiohttp_swallowed_suspend_still_answers_202(
    client: TestClient[Any, Any],
    fake_gateway: FakeGateway,
) -> None:
    resp = await client.post("/flow?swallow=1", headers=fake_gateway.headers(steps=0))
    assert resp.status == 202
    assert resp.headers["Stepgate-Suspend"] == "true"


@pytest.mark.parametrize("gateway_mode", [True, False])
async def test_aiohttp_non_retriable_error_answers_its_problem(
    client: TestClient[Any, Any],
    fake_gateway: FakeGateway,
    gateway_mode: bool,
) -> None:
    headers = fake_gateway.headers(steps=0) if gateway_mode else {}
    resp = await client.post("/flow?refuse=1", headers=headers)
    assert resp.status == 422
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["Stepgate-No-Retry"] == "true"
    assert _problem(await resp.read()) == {
        "type": "about:blank",
        "title": HTTPStatus(422).phrase,
        "status": 422,
        "detail": "no such traveller",
    }


async def test_aiohttp_replay_mismatch_answers_500_no_retry(
    client: TestClient[Any, Any],
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.record("renamed", 0, output="x")
    resp = await client.post("/flow", headers=fake_gateway.headers())
    assert resp.status == 500
    assert resp.headers["Stepgate-No-Retry"] == "true"
    problem = _problem(await resp.read())
    assert problem["status"] == 500
    assert "'first'" in problem["detail"] and "'renamed'" in problem["detail"]


async def test_aiohttp_other_errors_are_left_to_aiohttp(
    aiohttp_client: AiohttpClient, fake_gateway: FakeGateway
) -> None:
    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text="nope")

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_get("/missing", missing)
    client = await aiohttp_client(app)
    resp = await client.get("/missing", headers=fake_gateway.headers(steps=0))
    assert resp.status == 404
    assert "Stepgate-No-Retry" not in resp.headers


# --- ASGI ---------------------------------------------------------------------------------


async def _asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal hand-written ASGI app using steps, and a 500 page on errors like Starlette."""
    query = scope.get("query_string", b"").decode()
    try:
        if query == "raise-plain":
            raise RuntimeError("plain failure")
        value = await step.run("first", lambda: 41)
        if query == "sleep":
            await step.sleep("nap", 60)
        if query == "refuse":
            raise NonRetriableError("bad input", status=400)
    except Exception:
        # like Starlette's ServerErrorMiddleware: send a 500 page, then re-raise
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        raise
    body = json.dumps({"value": value + 1}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _drive(app: Any, headers: dict[str, str], query: str = "") -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/flow",
        "raw_path": b"/flow",
        "root_path": "",
        "scheme": "http",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_asgi_passes_plain_requests_through(fake_gateway: FakeGateway) -> None:
    sent = await _drive(stepgate.asgi.StepgateMiddleware(_asgi_app), {})
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"value": 42}
    assert fake_gateway.calls == []


async def test_asgi_gateway_mode_records_and_suspends(fake_gateway: FakeGateway) -> None:
    app = stepgate.asgi.StepgateMiddleware(_asgi_app)
    sent = await _drive(app, fake_gateway.headers(steps=0), "sleep")
    assert sent[0]["status"] == 202
    assert (b"stepgate-suspend", b"true") in sent[0]["headers"]
    assert sent[1]["body"] == b""
    assert [sid for sid, _ in fake_gateway.puts()] == ["first", "nap"]


async def test_asgi_non_retriable_error_replaces_the_framework_500(
    fake_gateway: FakeGateway,
) -> None:
    app = stepgate.asgi.middleware(_asgi_app)
    sent = await _drive(app, fake_gateway.headers(steps=0), "refuse")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 400
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"stepgate-no-retry"] == b"true"
    assert _problem(sent[1]["body"])["detail"] == "bad input"


async def test_asgi_other_errors_forward_what_the_app_sent(fake_gateway: FakeGateway) -> None:
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "query_string": b"raise-plain",
        "headers": [
            (k.lower().encode(), v.encode()) for k, v in fake_gateway.headers(steps=0).items()
        ],
    }
    with pytest.raises(RuntimeError):
        await stepgate.asgi.StepgateMiddleware(_asgi_app)(scope, receive, send)
    assert sent[0]["status"] == 500
    assert sent[1]["body"] == b"Internal Server Error"


async def test_asgi_passes_lifespan_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    async def nothing() -> dict[str, Any]:
        return {}

    async def ignore(message: MutableMapping[str, Any]) -> None:
        return None

    await stepgate.asgi.StepgateMiddleware(app)({"type": "lifespan"}, nothing, ignore)
    assert seen == ["lifespan"]


# --- WSGI ---------------------------------------------------------------------------------


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    query = environ.get("QUERY_STRING", "")
    if query == "refuse":
        raise NonRetriableError("bad input", status=409)
    value = sync_step.run("first", lambda: 1)
    if query == "sleep":
        sync_step.sleep("nap", 60)
    start_response("200 OK", [("Content-Type", "application/json")])

    def body() -> Iterator[bytes]:
        # A lazily produced body that still takes a step: the context must last through it.
        yield b'{"value": '
        yield str(value + sync_step.run("in-body", lambda: 1)).encode()
        yield b"}"

    return body()


def _call_wsgi(
    app: Any, headers: dict[str, str], query: str = ""
) -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/flow",
        "QUERY_STRING": query,
        "wsgi.input": None,
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started["status"], started["headers"] = status, dict(headers)
        return None

    body = b"".join(app(environ, start_response))
    return started["status"], started["headers"], body


def test_wsgi_plain_and_gateway_mode(fake_gateway: FakeGateway) -> None:
    app = stepgate.wsgi.StepgateMiddleware(_wsgi_app)
    assert _call_wsgi(app, {})[2] == b'{"value": 2}'
    assert fake_gateway.calls == []
    status, _, body = _call_wsgi(app, fake_gateway.headers(steps=0))
    assert (status, body) == ("200 OK", b'{"value": 2}')
    assert [sid for sid, _ in fake_gateway.puts()] == ["first", "in-body"]


def test_wsgi_suspend_and_problem(fake_gateway: FakeGateway) -> None:
    app = stepgate.wsgi.middleware(_wsgi_app)
    status, headers, body = _call_wsgi(app, fake_gateway.headers(steps=0), "sleep")
    assert (status, headers["Stepgate-Suspend"], body) == ("202 Accepted", "true", b"")
    for gateway_mode in (True, False):
        status, headers, body = _call_wsgi(
            app, fake_gateway.headers(steps=0) if gateway_mode else {}, "refuse"
        )
        assert status == "409 Conflict"
        assert headers["Stepgate-No-Retry"] == "true"
        assert headers["Content-Type"] == "application/problem+json"
        assert _problem(body)["detail"] == "bad input"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_wsgi_over_wsgiref_on_loopback(fake_gateway: FakeGateway) -> None:
    server = make_server(
        "127.0.0.1", 0, stepgate.wsgi.StepgateMiddleware(_wsgi_app), handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="wsgiref", daemon=True
    )
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/flow?sleep"

    def post() -> tuple[int, str | None]:
        request = urllib.request.Request(url, data=b"", headers=fake_gateway.headers(steps=0))
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Stepgate-Suspend"]

    try:
        assert await asyncio.to_thread(post) == (202, "true")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_suspend_is_not_an_exception() -> None:
    assert not issubclass(Suspend, Exception)
    assert issubclass(Suspend, BaseException)
