"""A durable route answers like the service behind it, down to the bytes of the head: the reason
phrase as sent, header names in the service's case, a HEAD answer's Content-Length."""

from __future__ import annotations

import asyncio

import structlog
import structlog.testing
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True


async def raw_head(port: int, request: bytes) -> tuple[bytes, dict[bytes, bytes], list[bytes]]:
    """Send `request` over a fresh socket; the status line, the fields, and the names as sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    lines = head.split(b"\r\n")[:-2]
    names = [line.split(b":", 1)[0] for line in lines[1:]]
    fields = {
        name.lower(): line.split(b":", 1)[1].strip()
        for name, line in zip(names, lines[1:], strict=True)
    }
    return lines[0], fields, names


async def service(request: web.Request) -> web.StreamResponse:
    if request.method == "HEAD":
        response = web.StreamResponse(status=200)
        response.headers["Content-Length"] = "1000"
        response.headers["ETag"] = '"v1"'
        return response
    return web.Response(
        status=204, reason="NO CONTENT", headers={"ETag": '"v1"', "X-Custom-CASE": "kept"}
    )


async def test_reason_phrase_header_case_and_head_length_pass_through(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    app = web.Application()
    app.router.add_route("*", "/thing", service)
    base = await upstream(app)
    gw = await gateway([{"name": "thing", "path": "/thing", "upstream": base, "durable": True}])
    port = gw.gateway.public_port
    status, fields, names = await raw_head(
        port, b"POST /thing HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == b"HTTP/1.1 204 NO CONTENT"
    assert b"ETag" in names and b"X-Custom-CASE" in names
    status, fields, _ = await raw_head(port, b"HEAD /thing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == b"HTTP/1.1 200 OK"
    assert fields[b"content-length"] == b"1000"  # the service's, not the empty body's


async def raw_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with a latin-1 file name, bytes that are not UTF-8, as some services do."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="caf\xe9.txt"'
        b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    await writer.drain()
    writer.close()


async def test_a_header_value_that_is_not_utf8_keeps_its_bytes(
    gateway: GatewayFactory,
) -> None:
    """A durable route re-encoded it: caf\xe9 arrived as caf\xc3\xa9, direct and on the poll."""
    server = await asyncio.start_server(raw_service, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        gw = await gateway([{"name": "file", "path": "/file", "upstream": base, "durable": True}])
        port = gw.gateway.public_port
        _, fields, _ = await raw_head(port, b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
        assert fields[b"content-disposition"] == b'attachment; filename="caf\xe9.txt"'
        async with gw.session.get(gw.url + "/file", headers={"Prefer": "respond-async"}) as resp:
            location = resp.headers["Location"]
        poll = f"GET {location}&wait=10 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        _, fields, _ = await raw_head(port, poll)
        assert fields[b"content-disposition"] == b'attachment; filename="caf\xe9.txt"'
    finally:
        server.close()


async def test_a_get_poll_of_a_head_run_is_framed_by_what_it_sends(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """The HEAD answer's Content-Length (1000) was sent on a GET poll with no body after it,
    so the client waited for 1000 bytes that never came."""
    app = web.Application()
    app.router.add_route("*", "/thing", service)
    gw = await gateway(
        [{"name": "thing", "path": "/thing", "upstream": await upstream(app), "durable": True}]
    )
    async with gw.session.head(gw.url + "/thing", headers={"Prefer": "respond-async"}) as resp:
        location = resp.headers["Location"]
    async with gw.session.get(gw.url + location + "&wait=10", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "0"
        assert await resp.read() == b""
    async with gw.session.head(gw.url + location) as resp:
        assert resp.headers["Content-Length"] == "1000"  # a HEAD poll: the service's own


async def test_a_retry_logs_its_attempt_at_debug(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    calls: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(status=503 if len(calls) == 1 else 200)

    app = web.Application()
    app.router.add_post("/work", flaky)
    gw = await gateway(
        [
            {
                "name": "work",
                "path": "/work",
                "upstream": await upstream(app),
                "durable": True,
                "retry": {"initial": "10ms"},
            }
        ]
    )
    with structlog.testing.capture_logs() as logs:
        async with gw.session.post(gw.url + "/work") as resp:
            assert resp.status == 200
    levels = {(entry["event"], entry["log_level"]) for entry in logs}
    assert ("run.retry_scheduled", "info") in levels and ("run.completed", "info") in levels
    # The README: attempts show at debug, the first and the retry alike.
    assert {level for event, level in levels if event == "run.attempt"} == {"debug"}


async def test_a_slow_upload_does_not_turn_a_first_answer_into_a_303(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """The first invocation is always awaited and its answer given as it is (DESIGN, "What the
    client sees"): a body that took longer than `hold` to arrive used to leave no time to record
    the answer, and the client got a 303 for a run the service had answered in milliseconds."""

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="took " + (await request.text()))

    app = web.Application()
    app.router.add_post("/up", quick)
    gw = await gateway(
        [
            {
                "name": "up",
                "path": "/up",
                "upstream": await upstream(app),
                "durable": True,
                "hold": "500ms",
            }
        ]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
    for byte in b"slow":
        await asyncio.sleep(0.25)  # 1 s in all, twice the hold
        writer.write(bytes([byte]))
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert answer.endswith(b"took slow")
