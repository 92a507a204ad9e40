"""On the success path a client must see what the upstream alone would have sent."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory

BIG = os.urandom(3 * 1024 * 1024)
# Framing is hop-by-hop (RFC 9110 §7.6.1) and Date is the time of sending.
IGNORED = {
    "date",
    "transfer-encoding",
    "content-length",
    "stepgate-run-id",
    "keep-alive",
    "connection",
}


async def binary(request: web.Request) -> web.Response:
    return web.Response(
        body=bytes(range(256)),
        content_type="application/x-thing",
        headers={"ETag": '"v1"', "Set-Cookie": "a=1"},
    )


async def empty(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"X-Empty": "yes"})


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=207, headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b"one,", b"two,", b"three"):
        await response.write(part)
    await response.write_eof()
    return response


async def large(request: web.Request) -> web.Response:
    return web.Response(body=BIG, headers={"Content-Type": "application/octet-stream"})


async def not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, text="missing", headers={"X-Reason": "none"})


async def multi_header(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    response.headers.add("Vary", "Accept")
    return response


PATHS = ["/binary", "/empty", "/chunked", "/large", "/missing", "/multi"]


def upstream_app() -> web.Application:
    app = web.Application()
    for path, handler in zip(
        PATHS, (binary, empty, chunked, large, not_found, multi_header), strict=True
    ):
        app.router.add_route("*", path, handler)
    return app


async def fetch(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    async with session.get(url) as resp:
        body = await resp.read()
        headers = sorted(
            (k.lower(), v) for k, v in resp.headers.items() if k.lower() not in IGNORED
        )
        return resp.status, headers, body


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_responses_are_identical_to_the_upstream_alone(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    session: aiohttp.ClientSession,
    durable: bool,
) -> None:
    base = await upstream(upstream_app())
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base, "durable": durable, "max_body": "8MiB"}]
    )
    for path in PATHS:
        direct = await fetch(session, base + path)
        proxied = await fetch(session, gw.url + path)
        assert proxied == direct, path


async def test_plain_route_keeps_content_length_and_streams_chunked(
    gateway: GatewayFactory, upstream: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    base = await upstream(upstream_app())
    gw = await gateway([{"name": "all", "path": "/*", "upstream": base}])
    async with session.get(gw.url + "/large") as resp:
        assert resp.headers["Content-Length"] == str(len(BIG))
        assert await resp.read() == BIG
    async with session.get(gw.url + "/chunked") as resp:
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert await resp.read() == b"one,two,three"


async def test_unknown_paths_and_methods_are_problems(
    gateway: GatewayFactory, upstream: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    base = await upstream(upstream_app())
    gw = await gateway([{"name": "b", "path": "/binary", "upstream": base, "methods": ["POST"]}])
    async with session.get(gw.url + "/nowhere") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
    async with session.get(gw.url + "/binary") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert resp.content_type == "application/problem+json"
    async with session.get(gw.url + "/_stepgate/whatever") as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "target",
    [
        b"/public/../binary",
        b"/admin/..%2f..%2fpublic/x",
        b"/admin/%2e%2e/%2e%2e/public/x",
        b"/admin/%2E%2E/%2E%2E/public/x",
        b"/admin/..%2F..%2Fpublic/x",
        b"/public/x%2F..%2F..%2Fadmin",
        b"/public/..;/admin",
    ],
)
async def test_dot_segments_cannot_escape_a_route(
    gateway: GatewayFactory, upstream: UpstreamFactory, target: bytes
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "pub", "path": "/public/*", "upstream": base}])
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange(gw.gateway.public_port, request)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"application/problem+json" in answer
    assert seen == []


def recorder() -> tuple[web.Application, list[web.Request]]:
    """An upstream that answers 200 to everything and keeps each request it saw."""
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request)
        return web.Response(text="ok")

    async def anonymous(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.popall("Server", None)  # so that any Server field is the gateway's

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    app.on_response_prepare.append(anonymous)
    return app, seen


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_forged_stepgate_headers_with_underscores_never_reach_the_upstream(
    gateway: GatewayFactory, upstream: UpstreamFactory, durable: bool
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "all", "path": "/*", "upstream": base, "durable": durable}])
    answer = await exchange(
        gw.gateway.public_port,
        b"POST /charge HTTP/1.1\r\nHost: shop\r\nContent-Length: 2\r\n"
        b"Stepgate_Callback: http://evil.example/v1/runs/x\r\nStepgate_Token: forged\r\n"
        b"Stepgate_Steps: 1\r\nstepgate_run_id: forged\r\nX_Api_Key: k\r\n"
        b"Connection: close\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    [request] = seen
    names = [name.decode() for name, _ in request.raw_headers]
    assert [name for name in names if "_" in name] == []
    values = [value for _, value in request.raw_headers]
    assert b"forged" not in values and b"http://evil.example/v1/runs/x" not in values
    if durable:
        assert request.headers["Stepgate-Callback"].startswith(gw.internal)
    else:
        assert not [name for name in names if name.lower().startswith("stepgate")]


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_absolute_form_for_another_host_is_400_and_records_nothing(
    gateway: GatewayFactory, upstream: UpstreamFactory, durable: bool
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "d", "path": "/d/*", "upstream": base, "durable": durable}])
    answer = await exchange(
        gw.gateway.public_port,
        b"GET http://evil.example/d/echo HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"application/problem+json" in answer
    assert seen == []
    assert sum((await gw.store.count_by_status()).values()) == 0


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_absolute_form_for_this_host_is_forwarded_in_origin_form(
    gateway: GatewayFactory, upstream: UpstreamFactory, durable: bool
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "d", "path": "/d/*", "upstream": base, "durable": durable}])
    answer = await exchange(
        gw.gateway.public_port,
        b"GET http://shop/d/echo?x=%2F HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    [request] = seen
    assert request.raw_path == "/d/echo?x=%2F"
    assert request.headers["Host"] == "shop"


async def test_the_gateway_never_announces_its_software(
    gateway: GatewayFactory, upstream: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """aiohttp adds `Server: Python/3.x aiohttp/3.x` to every answer: a version leak, and on
    a relayed answer a header the service never sent."""
    app, _ = recorder()
    base = await upstream(app)
    gw = await gateway(
        [
            {"name": "p", "path": "/p", "upstream": base},
            {"name": "d", "path": "/d", "upstream": base, "durable": True},
        ]
    )
    for url in (
        gw.url + "/p",
        gw.url + "/d",
        gw.url + "/nowhere",
        gw.url + "/_stepgate/runs/x",
        gw.internal + "/healthz",
        gw.internal + "/nowhere",
    ):
        async with session.get(url) as resp:
            assert "Server" not in resp.headers, url


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_a_header_value_that_is_not_utf8_is_refused_not_emptied(
    gateway: GatewayFactory, upstream: UpstreamFactory, durable: bool
) -> None:
    """aiohttp's client writes field values as UTF-8 and drops what it cannot encode, so the
    bytes cannot be relayed as they are; the gateway says so instead of sending `ab`."""
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "all", "path": "/*", "upstream": base, "durable": durable}])
    answer = await exchange(
        gw.gateway.public_port,
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"X-Name" in answer.partition(b"\r\n\r\n")[2]
    assert seen == []
    assert sum((await gw.store.count_by_status()).values()) == 0


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


@pytest.mark.parametrize(
    ("route", "path", "status"),
    [
        ({"durable": True, "max_body": 10}, b"/d", b"413"),
        ({}, b"/elsewhere", b"404"),
        ({"methods": ["GET"]}, b"/d", b"405"),
    ],
    ids=["durable-over-max_body", "no-route", "wrong-method"],
)
async def test_expect_continue_gets_the_refusal_without_a_100(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    route: dict[str, object],
    path: bytes,
    status: bytes,
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "d", "path": "/d", "upstream": base, **route}])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
    writer.write(
        b"POST " + path + b" HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    head = await read_head(reader)
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 " + status + b" ")
    # The body was never asked for: the connection cannot be reused (RFC 9110 §10.1.1).
    assert b"Connection: close" in head
    assert seen == []


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_expect_continue_gets_the_100_when_the_body_is_wanted(
    gateway: GatewayFactory, upstream: UpstreamFactory, durable: bool
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "d", "path": "/d", "upstream": base, "durable": durable}])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
    writer.write(
        b"POST /d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    final = await read_head(reader)
    writer.close()
    await writer.wait_closed()
    assert final.startswith(b"HTTP/1.1 200 ")
    assert [await request.read() for request in seen] == [b"abc"]


async def test_an_unknown_expectation_is_417(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    app, seen = recorder()
    base = await upstream(app)
    gw = await gateway([{"name": "d", "path": "/d", "upstream": base}])
    answer = await exchange(
        gw.gateway.public_port,
        b"POST /d HTTP/1.1\r\nHost: h\r\n"
        b"Content-Length: 0\r\nExpect: teapot\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 417 ")
    assert b"application/problem+json" in answer
    assert seen == []


def websocket_app() -> tuple[web.Application, list[web.Request]]:
    """A WebSocket service: echoes text and binary, says `chat` as its subprotocol, sets a
    cookie on the handshake, and declines upgrades on /private with a 403."""
    seen: list[web.Request] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        if request.path == "/private":
            return web.Response(status=403, text="no sockets here")
        ws = web.WebSocketResponse(protocols=["chat"])
        ws.headers["Set-Cookie"] = "s=1"
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                if message.data == "bye":
                    await ws.close(code=4001, message=b"asked to")
                else:
                    await ws.send_str("echo " + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    return app, seen


async def test_websocket_upgrades_are_relayed_on_plain_routes(
    gateway: GatewayFactory, upstream: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    app, seen = websocket_app()
    base = await upstream(app)
    gw = await gateway([{"name": "ws", "path": "/*", "upstream": base, "timeout": "2s"}])
    async with session.ws_connect(gw.url + "/socket?room=1", protocols=["other", "chat"]) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str() == "echo hello"
        payload = bytes(range(256)) * 300  # larger than any one read
        await ws.send_bytes(payload)
        assert await ws.receive_bytes() == payload[::-1]
        await asyncio.sleep(2.5)  # idle for longer than the route's timeout: still open
        await ws.send_str("bye")
        closing = await ws.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001
    [request] = seen
    assert request.raw_path == "/socket?room=1"
    assert request.headers["X-Forwarded-For"] == "127.0.0.1"
    assert request.headers["Via"] == "1.1 stepgate"


async def test_a_websocket_handshake_answer_keeps_its_headers(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    app, _ = websocket_app()
    base = await upstream(app)
    gw = await gateway([{"name": "ws", "path": "/*", "upstream": base}])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
    writer.write(
        b"GET /socket HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await read_head(reader)
    writer.close()
    await writer.wait_closed()
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in lines
    assert b"Set-Cookie: s=1" in lines
    assert {line.lower() for line in lines} >= {b"upgrade: websocket", b"connection: upgrade"}


async def test_a_declined_websocket_upgrade_is_relayed(
    gateway: GatewayFactory, upstream: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    app, _ = websocket_app()
    base = await upstream(app)
    gw = await gateway([{"name": "ws", "path": "/*", "upstream": base}])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(gw.url + "/private")
    assert refused.value.status == 403
    # And the connection still serves plain requests.
    async with session.get(gw.url + "/private") as resp:
        assert resp.status == 403 and await resp.text() == "no sockets here"


async def test_a_websocket_upstream_that_is_down_is_a_502(
    gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw = await gateway([{"name": "ws", "path": "/*", "upstream": f"http://127.0.0.1:{port}"}])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(gw.url + "/socket")
    assert refused.value.status == 502


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_a_compressed_request_body_is_forwarded_as_it_is(
    gateway: GatewayFactory, durable: bool
) -> None:
    """aiohttp's server inflates request bodies by default: forwarded with the client's
    Content-Encoding and Content-Length, the upstream got a cut, uncompressed body (and a
    small gzip bomb became a large buffer in the gateway)."""
    import gzip

    from aiohttp.test_utils import TestServer

    app, seen = recorder()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(auto_decompress=False)  # so that it sees the bytes sent
    try:
        base = f"http://127.0.0.1:{server.port}"
        gw = await gateway([{"name": "all", "path": "/*", "upstream": base, "durable": durable}])
        body = gzip.compress(b"hello world" * 100)
        answer = await exchange(
            gw.gateway.public_port,
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Encoding: gzip\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body,
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        [request] = seen
        assert request.headers["Content-Encoding"] == "gzip"
        assert await request.read() == body
    finally:
        await server.close()
