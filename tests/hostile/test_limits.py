"""Listener limits (config `limits`, gateway/limits.py): time-outs, a connection cap, a bound on
header bytes, and the open-file limit. Each against a real gateway over raw sockets."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time

import pytest
from aiohttp import web

from gateway.config import ConfigError, Limits, parse_settings
from gateway.limits import raise_open_file_limit
from tests.conftest import GatewayFactory, UpstreamFactory
from tests.hostile.conftest import Recorder, send, statuses

# --- config --------------------------------------------------------------------------------


def settings(limits: object) -> object:
    return parse_settings({"routes": [], "limits": limits}, source="stepgate.yaml")


def test_limits_have_defaults_and_take_units() -> None:
    assert parse_settings({"routes": []}, source="x").limits == Limits(
        header_timeout=10.0,
        body_timeout=60.0,
        idle_timeout=75.0,
        max_connections=10_000,
        max_header_size=65536,
        send_timeout=60.0,
    )
    limits = settings(
        {
            "header_timeout": "2s",
            "body_timeout": "500ms",
            "idle_timeout": "1m",
            "max_connections": 50,
            "max_header_size": "16KiB",
            "send_timeout": "5s",
        }
    )
    assert limits.limits == Limits(2.0, 0.5, 60.0, 50, 16384, 5.0)


@pytest.mark.parametrize(
    ("limits", "key", "message"),
    [
        ({"header_timeout": "0s"}, "limits.header_timeout", "must be longer than 0s"),
        ({"body_timeout": 10}, "limits.body_timeout", "needs a unit"),
        ({"send_timeout": "0s"}, "limits.send_timeout", "must be longer than 0s"),
        ({"max_connections": 0}, "limits.max_connections", "at least 1"),
        ({"max_connections": "many"}, "limits.max_connections", "whole number"),
        ({"max_header_size": "100B"}, "limits.max_header_size", "at least 1024 bytes"),
        ({"max_header_size": "64KB"}, "limits.max_header_size", 'did you mean "KiB"'),
        ({"header_timout": "1s"}, "limits.header_timout", 'did you mean "header_timeout"'),
        ("10s", "limits", "expected a mapping"),
    ],
)
def test_bad_limits_name_their_key(limits: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings(limits)
    assert error.value.key == key
    assert message in error.value.message


# --- time -----------------------------------------------------------------------------------


async def test_slow_heads_are_cut_at_the_header_timeout(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    """100 clients sending their heads a byte at a time (slowloris): every connection gets its
    408 and is closed at the header time-out, and the upstream never hears of them."""
    seen, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"header_timeout": "1s"}
    )
    head = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 100

    async def slowloris() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
        started = time.monotonic()
        answer = b""
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    answer += await asyncio.wait_for(reader.read(65536), 0.1)
                except TimeoutError:
                    continue
                if answer:
                    break
            answer += await asyncio.wait_for(reader.read(-1), 5)
        except ConnectionError:
            pass
        finally:
            writer.close()
        return time.monotonic() - started, answer

    results = await asyncio.gather(*(slowloris() for _ in range(100)))
    for elapsed, answer in results:
        assert elapsed < 2.5
        assert statuses(answer) == [408]
        assert b"application/problem+json" in answer
    assert seen.requests == []


async def test_a_connection_that_says_nothing_is_closed_at_the_header_timeout(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    _, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"header_timeout": "500ms"}
    )
    started = time.monotonic()
    answer = await send(gw.gateway.public_port, b"")
    assert answer == b""
    assert time.monotonic() - started < 2.0


async def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    _, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}],
        limits={"idle_timeout": "1s", "header_timeout": "30s"},
    )
    started = time.monotonic()
    answer = await send(gw.gateway.public_port, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert statuses(answer) == [200]
    assert 0.9 < time.monotonic() - started < 3.0


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_a_stalled_request_body_gets_a_408_within_the_body_timeout(
    gateway: GatewayFactory, recorder: tuple[Recorder, str], durable: bool
) -> None:
    seen, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base, "durable": durable}],
        limits={"body_timeout": "1s"},
    )
    started = time.monotonic()
    answer = await send(
        gw.gateway.public_port,
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly this",
    )
    assert statuses(answer) == [408]
    assert b"application/problem+json" in answer
    assert time.monotonic() - started < 3.0
    assert seen.requests == []  # plain: the upstream's half-sent request was abandoned
    assert sum((await gw.store.count_by_status()).values()) == 0


async def test_a_slow_body_that_keeps_moving_is_not_cut(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    seen, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"body_timeout": "1s"}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nConnection: close\r\n\r\n")
    for byte in b"abcdef":  # 3 s in all, 0.5 s between bytes
        await asyncio.sleep(0.5)
        writer.write(bytes([byte]))
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert statuses(answer) == [200]
    assert [body for *_, body in seen.requests] == [b"abcdef"]


class Stream:
    """An upstream that answers /big with `size` bytes in 64 KiB pieces, and notes when the
    gateway stopped taking them (the client's connection was given up)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.cut = asyncio.Event()

    def app(self) -> web.Application:
        async def big(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": str(self.size)})
            await response.prepare(request)
            piece = b"x" * 65536
            try:
                while self.sent < self.size:
                    await response.write(piece)
                    self.sent += len(piece)
            except (ConnectionError, asyncio.CancelledError):
                self.cut.set()
                raise
            return response

        app = web.Application()
        app.router.add_get("/big", big)
        return app


async def small_window(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a small receive buffer, so the gateway's writes back up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """nginx's send_timeout: a client that takes nothing of an answer for that long no longer
    holds its connection, nor the upstream's."""
    service = Stream(256 << 20)
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": await upstream(service.app())}],
        limits={"send_timeout": "1s"},
    )
    reader, writer = await small_window(gw.gateway.public_port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    await reader.read(100)  # the answer has begun; then the client reads no more
    started = time.monotonic()
    await asyncio.wait_for(service.cut.wait(), 10)
    assert time.monotonic() - started < 5.0
    assert service.sent < service.size
    with pytest.raises((ConnectionError, AssertionError)):  # closed: what was sent, then the end
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
            assert chunk
    writer.close()


async def test_a_slow_reader_that_keeps_taking_bytes_is_not_dropped(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    service = Stream(2 << 20)
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": await upstream(service.app())}],
        limits={"send_timeout": "1s"},
    )
    reader, writer = await small_window(gw.gateway.public_port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    received = 0
    started = time.monotonic()
    while chunk := await asyncio.wait_for(reader.read(16384), 5):
        received += len(chunk)
        if time.monotonic() - started < 3.0:
            await asyncio.sleep(0.3)  # a few KiB a second: slow, but never 1 s without a byte
    writer.close()
    assert received > service.size  # the whole body, and its head
    assert not service.cut.is_set()


async def test_a_stalled_body_on_the_internal_listener_is_a_408(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    _, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"body_timeout": "1s"}
    )
    answer = await send(
        gw.gateway.internal_port,
        b"POST /v1/events HTTP/1.1\r\nHost: h\r\nContent-Type: application/json"
        b'\r\nContent-Length: 100\r\n\r\n{"name":',
    )
    assert statuses(answer) == [408]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["status"] == 408


# --- connections ----------------------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_at_once(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    _, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}],
        limits={"max_connections": 5, "header_timeout": "30s"},
    )
    port = gw.gateway.public_port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    assert await send(port, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n") == b""
    assert time.monotonic() - started < 1.0
    # The internal listener has its own count.
    assert statuses(
        await send(
            gw.gateway.internal_port,
            b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
    ) == [200]
    _, writer = held.pop()
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)
    answer = await send(port, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert statuses(answer) == [200]
    for _, writer in held:
        writer.close()


# --- header bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # The case: 120 fields of 8,000 bytes, about 1 MB, was forwarded and stored.
        (b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(120)), 431),
        (b"X-Big: " + b"a" * 70_000 + b"\r\n", 431),
        (b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70)), 431),
        (b"".join(b"X-%d: 1\r\n" % i for i in range(200)), 431),
    ],
    ids=["1MB-in-fields", "one-huge-field", "many-fields-over-64KiB", "200-fields"],
)
@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_oversized_request_heads_are_431(
    gateway: GatewayFactory,
    recorder: tuple[Recorder, str],
    head: bytes,
    status: int,
    durable: bool,
) -> None:
    seen, base = recorder
    gw = await gateway([{"name": "all", "path": "/*", "upstream": base, "durable": durable}])
    answer = await send(
        gw.gateway.public_port,
        b"GET /x HTTP/1.1\r\nHost: h\r\n" + head + b"Connection: close\r\n\r\n",
    )
    assert statuses(answer) == [status]
    assert b"application/problem+json" in answer
    assert seen.requests == []
    assert sum((await gw.store.count_by_status()).values()) == 0


async def test_a_head_sent_slowly_past_the_size_limit_is_refused_before_it_ends(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    """The bound holds while the head is still arriving: the gateway does not buffer on."""
    seen, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"max_header_size": "4KiB"}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.public_port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n")
    for index in range(10):
        writer.write(b"X-%d: %s\r\n" % (index, b"a" * 1000))
        await writer.drain()
        await asyncio.sleep(0.05)
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert statuses(answer) == [431]
    assert seen.requests == []


async def test_a_target_over_the_size_limit_is_414(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    seen, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"max_header_size": "4KiB"}
    )
    answer = await send(
        gw.gateway.public_port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert statuses(answer) == [414]
    assert seen.requests == []


async def test_a_head_just_under_the_limit_passes(
    gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    seen, base = recorder
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"max_header_size": "4KiB"}
    )
    head = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
    filler = 4096 - len(head) - len(b"X-Fill: \r\n\r\n")
    answer = await send(gw.gateway.public_port, head + b"X-Fill: " + b"a" * filler + b"\r\n\r\n")
    assert statuses(answer) == [200]
    assert len(seen.requests) == 1


# --- open files -----------------------------------------------------------------------------


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        before, after = raise_open_file_limit()
        assert before == min(256, hard)
        assert after == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_body_held_back_by_a_slow_upstream_is_not_the_clients_fault(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """The body time-out measures the client's silence, not the time the gateway itself holds
    the client back because the upstream takes the body slowly."""
    from aiohttp import web

    received: list[int] = []

    async def slow_reader(request: web.Request) -> web.Response:
        size = 0
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size >= 512 * 1024 and not received:
                received.append(size)
                await asyncio.sleep(2.5)  # longer than the body time-out, once
        received.append(size)
        return web.Response(text=str(size))

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/upload", slow_reader)
    base = await upstream(app)
    gw = await gateway(
        [{"name": "all", "path": "/*", "upstream": base}], limits={"body_timeout": "1s"}
    )
    body = b"x" * (8 * 1024 * 1024)
    answer = await send(
        gw.gateway.public_port,
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body,
    )
    assert statuses(answer) == [200]
    assert received[-1] == len(body)
