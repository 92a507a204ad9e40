"""The real transports against servers on loopback: keep-alive reuse, failures, and steps end
to end over HTTP (the fake gateway's logic served by aiohttp)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from stepgate import CallbackError, GatewayUnavailableError, step
from stepgate._context import Invocation
from stepgate._transport import AsyncTransport, SyncTransport

from tests.sdk.fakes import RUN_ID, TOKEN, FakeGateway, active

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


class Recorder:
    """An aiohttp app that answers like the gateway and notes which connection each call used."""

    def __init__(self) -> None:
        self.gateway = FakeGateway()
        self.peers: list[Any] = []
        self.authorizations: list[str | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self.callback)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/close", self.close)
        return app

    async def callback(self, request: web.Request) -> web.Response:
        self.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        self.authorizations.append(request.headers.get("Authorization"))
        body = await request.read()
        reply = self.gateway.handle(
            request.method, request.raw_path, request.headers.get("Authorization"), body or None
        )
        return web.Response(status=reply.status, body=reply.body, content_type="application/json")

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b'{"parts":', b"[1,2", b",3]}"):
            await response.write(part)
        await response.write_eof()
        return response

    async def close(self, request: web.Request) -> web.Response:
        response = web.json_response({"closing": True})
        response.force_close()
        return response


@pytest.fixture
async def recorder(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    server = await aiohttp_server(rec.app())
    yield rec, f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def transport() -> AsyncIterator[AsyncTransport]:
    client = AsyncTransport(timeout=5)
    yield client
    await client.aclose()


def _steps_url(base: str) -> str:
    return f"{base}/v1/runs/{RUN_ID}/steps"


async def test_async_transport_reuses_one_connection(
    recorder: tuple[Recorder, str],
    transport: AsyncTransport,
) -> None:
    rec, base = recorder
    odd_id = "charge card/é#2?"
    for i in range(4):
        reply = await transport.request(
            "PUT", f"{_steps_url(base)}/step-{i}", TOKEN, json.dumps({"output": i}).encode()
        )
        assert reply.status == 201
    reply = await transport.request(
        "PUT", f"{_steps_url(base)}/charge%20card%2F%C3%A9%232%3F", TOKEN, b'{"output": "x"}'
    )
    assert reply.status == 201
    reply = await transport.request("GET", _steps_url(base), TOKEN)
    assert reply.status == 200
    ids = [s["id"] for s in json.loads(reply.body)["steps"]]
    assert ids == ["step-0", "step-1", "step-2", "step-3", odd_id]
    assert len(rec.peers) == 6
    assert len(set(rec.peers)) == 1  # one TCP connection served every call
    assert set(rec.authorizations) == {f"Bearer {TOKEN}"}


async def test_async_transport_parallel_calls(
    recorder: tuple[Recorder, str],
    transport: AsyncTransport,
) -> None:
    rec, base = recorder
    replies = await asyncio.gather(
        *(
            transport.request("PUT", f"{_steps_url(base)}/p{i}", TOKEN, b'{"output":1}')
            for i in range(4)
        )
    )
    assert [r.status for r in replies] == [201] * 4
    parallel = set(rec.peers)
    for _ in range(4):
        await transport.request("GET", _steps_url(base), TOKEN)
    assert set(rec.peers) == parallel  # later calls reuse the pooled connections


async def test_async_transport_reads_chunked_and_honours_close(
    recorder: tuple[Recorder, str],
    transport: AsyncTransport,
) -> None:
    _, base = recorder

    def idle() -> int:
        pool = transport._pools[asyncio.get_running_loop()]
        return sum(len(conns) for conns in pool.idle.values())

    reply = await transport.request("GET", f"{base}/chunked", TOKEN)
    assert json.loads(reply.body) == {"parts": [1, 2, 3]}
    assert idle() == 1  # a complete chunked answer leaves the connection reusable
    reply = await transport.request("GET", f"{base}/close", TOKEN)
    assert json.loads(reply.body) == {"closing": True}
    assert idle() == 0  # "Connection: close" is honoured


async def _raw_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _stale_keepalive_server() -> tuple[list[int], Callable[..., Awaitable[None]]]:
    """Answers once per connection as if keeping it alive, then closes it without saying so."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    return connections, serve


async def test_async_transport_retries_a_stale_kept_alive_connection(
    transport: AsyncTransport,
) -> None:
    connections, serve = _stale_keepalive_server()
    server, port = await _raw_server(serve)
    async with server:
        for _ in range(3):
            reply = await transport.request("GET", f"http://127.0.0.1:{port}/x", TOKEN)
            assert (reply.status, reply.body) == (200, b"{}")
    assert len(connections) == 3


async def test_sync_transport_retries_a_stale_kept_alive_connection() -> None:
    connections, serve = _stale_keepalive_server()
    server, port = await _raw_server(serve)
    client = SyncTransport(timeout=5)

    def calls() -> list[int]:
        try:
            return [
                client.request("GET", f"http://127.0.0.1:{port}/x", TOKEN).status for _ in range(3)
            ]
        finally:
            client.close()

    async with server:
        assert await asyncio.to_thread(calls) == [200, 200, 200]
    assert len(connections) == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_gateway_is_a_clear_error(transport: AsyncTransport) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1/runs/r/steps"
    with pytest.raises(GatewayUnavailableError, match="unreachable"):
        await transport.request("GET", url, TOKEN)
    client = SyncTransport(timeout=5)
    with pytest.raises(GatewayUnavailableError, match="unreachable"):
        await asyncio.to_thread(client.request, "GET", url, TOKEN)


async def test_a_silent_gateway_times_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server, port = await _raw_server(never_answer)
    client = AsyncTransport(timeout=0.2)
    sync_client = SyncTransport(timeout=0.2)
    async with server:
        with pytest.raises(GatewayUnavailableError, match=r"did not answer within 0\.2 s"):
            await client.request("GET", f"http://127.0.0.1:{port}/x", TOKEN)
        with pytest.raises(GatewayUnavailableError, match="did not answer"):
            await asyncio.to_thread(sync_client.request, "GET", f"http://127.0.0.1:{port}/x", TOKEN)
    await client.aclose()


@pytest.mark.parametrize("url", ["https://gw.internal/v1/runs/r", "ftp://x/y", "gw:8081/v1"])
async def test_only_plain_http_callbacks_are_supported(url: str) -> None:
    with pytest.raises(CallbackError, match="not http://"):
        await AsyncTransport().request("GET", url, TOKEN)
    with pytest.raises(CallbackError, match="not http://"):
        SyncTransport().request("GET", url, TOKEN)


async def test_sync_transport_reuses_one_connection_per_thread(
    recorder: tuple[Recorder, str],
) -> None:
    rec, base = recorder
    client = SyncTransport(timeout=5)

    def calls() -> list[int]:
        try:
            statuses = [
                client.request("PUT", f"{_steps_url(base)}/s{i}", TOKEN, b'{"output":1}').status
                for i in range(3)
            ]
            statuses.append(client.request("GET", _steps_url(base), TOKEN).status)
            return statuses
        finally:
            client.close()

    assert await asyncio.to_thread(calls) == [201, 201, 201, 200]
    assert len(rec.peers) == 4
    assert len(set(rec.peers)) == 1


async def test_pooled_connections_close_when_their_loop_shuts_down(
    recorder: tuple[Recorder, str],
) -> None:
    _, base = recorder
    client = AsyncTransport(timeout=5)
    pooled: list[Any] = []

    async def use() -> None:
        await client.request("GET", _steps_url(base), TOKEN)
        pool = client._pools[asyncio.get_running_loop()]
        pooled.extend(conn for conns in pool.idle.values() for conn in conns)

    # asyncio.run shuts its loop's async generators down, which closes the pool.
    await asyncio.to_thread(asyncio.run, use())
    assert len(pooled) == 1
    assert pooled[0].writer.transport.is_closing()
    assert client._pools == {}


async def test_steps_end_to_end_over_http(recorder: tuple[Recorder, str]) -> None:
    rec, base = recorder
    client = AsyncTransport(timeout=5)
    ran: list[str] = []

    def invocation(steps: int) -> Invocation:
        return Invocation(
            callback=f"{base}/v1/runs/{RUN_ID}",
            token=TOKEN,
            run_id=RUN_ID,
            recorded_count=steps,
            transport=client,
        )

    async def quote(city: str) -> dict[str, Any]:
        ran.append(city)
        return {"city": city, "price": 100}

    with active(invocation(0)):
        first = await asyncio.gather(
            step.run("quote", quote, "Oslo"), step.run("quote", quote, "Rome")
        )
    with active(invocation(len(rec.gateway.steps))):
        again = await asyncio.gather(
            step.run("quote", quote, "Oslo"), step.run("quote", quote, "Rome")
        )
        assert await step.run("book", lambda: "booked") == "booked"
    await client.aclose()
    assert first == again
    assert ran == ["Oslo", "Rome"]
    assert {s["id"]: s["seq"] for s in rec.gateway.steps.values()} == {
        "quote": 0,
        "quote#2": 1,
        "book": 2,
    }


async def test_aclose_closes_this_loops_connections(recorder: tuple[Recorder, str]) -> None:
    _, base = recorder
    client = AsyncTransport(timeout=5)
    await client.request("GET", _steps_url(base), TOKEN)
    pool = client._pools[asyncio.get_running_loop()]
    (conn,) = [conn for conns in pool.idle.values() for conn in conns]
    await client.aclose()
    assert conn.writer.transport.is_closing()
    assert client._pools == {}
    # the transport stays usable: a later call opens a new pool
    assert (await client.request("GET", _steps_url(base), TOKEN)).status == 200
    await client.aclose()
