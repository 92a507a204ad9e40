"""proxy_plain against a real upstream on loopback, behind a minimal gateway app."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.config import RetryPolicy, Route
from gateway.proxy import create_upstream_session, proxy_plain
from gateway.retry import Outcome

BINARY = bytes(range(256)) * 64
LARGE = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)  # 5 MiB
GZIPPED = gzip.compress(b"hello, " * 500)

NO_RETRY = RetryPolicy(1, 0.01, 0.05, 2.0, frozenset({"5xx", "connect", "timeout", "429"}), False)
RETRY = replace(NO_RETRY, attempts=3)


@dataclass
class Seen:
    """What the upstream received, per request."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    flaky: int = 0
    flaky_bodies: list[bytes] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    seen = app[SEEN] = Seen()

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.requests.append(
            {
                "method": request.method,
                "target": request.raw_path,
                "headers": [(k.decode(), v.decode()) for k, v in request.raw_headers],
                "body": body,
                "peer": request.transport.get_extra_info("peername") if request.transport else None,
            }
        )
        return web.json_response({"n": len(seen.requests)})

    async def binary(request: web.Request) -> web.Response:
        response = web.Response(
            body=BINARY, content_type="application/octet-stream", headers={"X-Custom": "a"}
        )
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in () if request.method == "HEAD" else (b"one,", b"two,", b"three"):
            await response.write(part)
            await asyncio.sleep(0.01)
        return response

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=LARGE, content_type="application/octet-stream")

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-After": "delete"})

    async def reason(request: web.Request) -> web.Response:
        return web.Response(status=203, reason="Quite Alright", text="ok")

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=GZIPPED, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def leaky(request: web.Request) -> web.Response:
        return web.Response(
            text="x",
            headers={
                "Stepgate-Secret": "upstream-only",
                "Connection": "X-Internal",
                "X-Internal": "hop",
                "Keep-Alive": "timeout=5",
                "X-Public": "yes",
            },
        )

    async def flaky(request: web.Request) -> web.Response:
        seen.flaky_bodies.append(await request.read())
        seen.flaky += 1
        if seen.flaky < 3:
            return web.Response(status=503, text="busy")
        return web.Response(text=f"ok after {seen.flaky}")

    async def final(request: web.Request) -> web.Response:
        seen.flaky += 1
        return web.Response(status=500, headers={"Stepgate-No-Retry": "true"}, text="final")

    async def busy(request: web.Request) -> web.Response:
        seen.flaky += 1
        return web.Response(status=503, headers={"Retry-After": "120"}, text="later")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="late")

    async def truncated(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "1000"))
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        await response.write(b"x" * 100)
        await asyncio.sleep(0.1)  # the head and the first piece are with the client by now
        assert request.transport is not None
        request.transport.close()
        return response

    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/binary", binary)
    app.router.add_get("/empty", empty)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/large", large)
    app.router.add_route("*", "/no-content", no_content)
    app.router.add_get("/reason", reason)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/leaky", leaky)
    app.router.add_route("*", "/flaky", flaky)
    app.router.add_get("/busy", busy)
    app.router.add_get("/final", final)
    app.router.add_get("/slow", slow)
    app.router.add_get("/truncated", truncated)
    return app


def make_route(upstream: str, **overrides: Any) -> Route:
    route = Route(
        name="plain",
        path="/*",
        prefix=True,
        base="",
        methods=None,
        upstream=upstream,
        durable=False,
        timeout=5.0,
        hold=5.0,
        max_body=1 << 20,
        retry=NO_RETRY,
    )
    return replace(route, **overrides)


Hook = Callable[[Outcome, str | None], None]
Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def origin(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(upstream_app())


@pytest.fixture
def base(origin: TestServer) -> str:
    return str(origin.make_url("")).rstrip("/")


@pytest.fixture
def seen(origin: TestServer) -> Seen:
    return origin.app[SEEN]


@pytest.fixture
def start_gateway(aiohttp_server: AiohttpServer) -> Start:
    """A tiny app that sends every request to proxy_plain with the given route."""

    async def start(route: Route, hook: Hook | None = None) -> str:
        async def session_ctx(app: web.Application) -> AsyncIterator[None]:
            app[SESSION] = create_upstream_session()
            yield
            await app[SESSION].close()

        async def handle(request: web.Request) -> web.StreamResponse:
            return await proxy_plain(request, route, request.app[SESSION], on_attempt=hook)

        app = web.Application()
        app.cleanup_ctx.append(session_ctx)
        app.router.add_route("*", "/{tail:.*}", handle)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str | None
    headers: list[tuple[str, str]]
    body: bytes


async def fetch(
    client: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
) -> Answer:
    async with client.request(method, url, **kwargs) as response:
        body = await response.read()
        # Date is the only field that may differ between two answers a moment apart. Order
        # matters among fields of one name only (RFC 9110 §5.3); a stable sort keeps that.
        headers = sorted(
            ((k, v) for k, v in response.headers.items() if k.lower() != "date"),
            key=lambda item: item[0].lower(),
        )
        return Answer(response.status, response.reason, headers, body)


def problem_body(answer: Answer) -> dict[str, Any]:
    assert ("Content-Type", "application/problem+json") in answer.headers
    data = json.loads(answer.body)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    "path", ["/binary", "/empty", "/chunked", "/large", "/no-content", "/reason", "/gzip"]
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_answers_are_identical_to_the_upstreams(
    start_gateway: Start, base: str, client: aiohttp.ClientSession, path: str, method: str
) -> None:
    gateway = await start_gateway(make_route(base))
    headers = {"Accept-Encoding": "gzip"}
    direct = await fetch(client, method, base + path, headers=headers)
    proxied = await fetch(client, method, gateway + path, headers=headers)
    assert proxied == direct
    if method == "GET" and path == "/large":
        assert proxied.body == LARGE
    if method == "GET" and path == "/gzip":
        assert proxied.body == GZIPPED  # relayed compressed, byte for byte
    if path == "/chunked" and method == "GET":
        assert ("Transfer-Encoding", "chunked") in proxied.headers
        assert proxied.body == b"one,two,three"
    if method == "HEAD":
        assert proxied.body == b""


async def test_upstream_sees_a_clean_forwarded_request(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base))
    target = "/echo/a%2Fb/../c?q=%20x&q=y+z"
    answer = await fetch(
        client,
        "POST",
        URL(gateway + target, encoded=True),
        data=b"payload",
        headers={
            "Stepgate-Token": "forged",
            "Stepgate-Callback": "http://evil/",
            "Connection": "X-Secret",
            "X-Secret": "hop",
            "X-Forwarded-For": "203.0.113.7",
            "X-Keep": "1",
        },
    )
    assert answer.status == 200
    [request] = seen.requests
    assert request["method"] == "POST"
    assert request["target"] == target
    assert request["body"] == b"payload"
    headers = request["headers"]
    names = [name.lower() for name, _ in headers]
    assert not [n for n in names if n.startswith("stepgate-")]
    assert "x-secret" not in names
    received = dict(headers)
    assert received["X-Keep"] == "1"
    assert received["Host"] == URL(gateway).raw_authority
    assert received["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert received["X-Forwarded-Proto"] == "http"
    assert received["X-Forwarded-Host"] == URL(gateway).raw_authority
    assert received["Via"] == "1.1 stepgate"
    assert received["traceparent"].startswith("00-")


async def test_no_invented_request_headers(start_gateway: Start, base: str, seen: Seen) -> None:
    """aiohttp's client adds User-Agent, Accept... by default; the upstream must not see them."""
    gateway = URL(await start_gateway(make_route(base)))
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: h.example\r\nContent-Length: 3\r\n\r\nabc")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 200 ")
    [request] = seen.requests
    assert request["body"] == b"abc"
    assert sorted(name for name, _ in request["headers"]) == sorted(
        [
            "Host",
            "Content-Length",
            "X-Forwarded-For",
            "X-Forwarded-Proto",
            "X-Forwarded-Host",
            "Via",
            "traceparent",
        ]
    )


async def test_bodies_stream_both_ways(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base))

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield BINARY

    # Unknown length: the upstream gets it chunked, not buffered into a Content-Length.
    answer = await fetch(client, "PUT", gateway + "/echo", data=parts())
    assert answer.status == 200
    request = seen.requests[-1]
    assert request["body"] == BINARY * 40
    assert ("Transfer-Encoding", "chunked") in request["headers"]
    assert "Content-Length" not in dict(request["headers"])

    # Known length, larger than max_body: streamed as is with its Content-Length.
    answer = await fetch(client, "POST", gateway + "/echo", data=io.BytesIO(LARGE))
    assert answer.status == 200
    assert seen.requests[-1]["body"] == LARGE
    assert dict(seen.requests[-1]["headers"])["Content-Length"] == str(len(LARGE))


async def test_expect_continue_does_not_stall(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base, timeout=2.0))
    answer = await fetch(client, "POST", gateway + "/echo", data=b"abc", expect100=True)
    assert answer.status == 200
    assert seen.requests[-1]["body"] == b"abc"
    assert "Expect" not in dict(seen.requests[-1]["headers"])


async def test_upstream_hop_by_hop_and_stepgate_headers_do_not_reach_the_client(
    start_gateway: Start, base: str, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base))
    answer = await fetch(client, "GET", gateway + "/leaky")
    names = {name.lower() for name, _ in answer.headers}
    assert "x-public" in names
    assert not names & {"stepgate-secret", "x-internal", "keep-alive"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connect_error_is_502_problem(
    start_gateway: Start, client: aiohttp.ClientSession
) -> None:
    attempts: list[tuple[Outcome, str | None]] = []
    route = make_route(f"http://127.0.0.1:{closed_port()}", retry=RETRY)
    gateway = await start_gateway(route, lambda o, r: attempts.append((o, r)))
    answer = await fetch(client, "GET", gateway + "/x")
    assert answer.status == 502
    body = problem_body(answer)
    assert body["status"] == 502 and body["title"] == "Bad Gateway"
    # GET is idempotent and "connect" is retriable: all three attempts were made.
    assert attempts == [
        (Outcome(None, "connect"), "connect"),
        (Outcome(None, "connect"), "connect"),
        (Outcome(None, "connect"), None),
    ]


async def test_timeout_is_504_problem(
    start_gateway: Start, base: str, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base, timeout=0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await fetch(client, "GET", gateway + "/slow")
    assert loop.time() - started < 0.9
    assert answer.status == 504
    assert problem_body(answer)["title"] == "Gateway Timeout"


async def test_idempotent_get_is_retried_until_it_succeeds(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    attempts: list[tuple[Outcome, str | None]] = []
    gateway = await start_gateway(
        make_route(base, retry=RETRY), lambda o, r: attempts.append((o, r))
    )
    answer = await fetch(client, "GET", gateway + "/flaky")
    assert (answer.status, answer.body) == (200, b"ok after 3")
    assert seen.flaky == 3
    assert attempts == [(Outcome(503), "5xx"), (Outcome(503), "5xx"), (Outcome(200), None)]


async def test_buffered_body_is_resent_on_retry(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base, retry=RETRY))
    answer = await fetch(client, "PUT", gateway + "/flaky", data=b"same body")
    assert answer.status == 200
    assert seen.flaky_bodies == [b"same body"] * 3


async def test_large_buffered_body_is_resent_whole(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    body = LARGE[: 3 * 1024 * 1024]
    gateway = await start_gateway(make_route(base, retry=RETRY, max_body=4 * 1024 * 1024))
    answer = await fetch(client, "PUT", gateway + "/flaky", data=io.BytesIO(body))
    assert answer.status == 200
    assert seen.flaky_bodies == [body] * 3


async def test_post_is_not_retried_by_default(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base, retry=RETRY))
    answer = await fetch(client, "POST", gateway + "/flaky", data=b"x")
    assert (answer.status, answer.body) == (503, b"busy")
    assert seen.flaky == 1


async def test_post_is_retried_when_non_idempotent_is_allowed(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    route = make_route(base, retry=replace(RETRY, non_idempotent=True))
    gateway = await start_gateway(route)
    answer = await fetch(client, "POST", gateway + "/flaky", data=b"x")
    assert answer.status == 200
    assert seen.flaky == 3


async def test_body_over_max_body_gets_a_single_streamed_attempt(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    route = make_route(base, retry=replace(RETRY, non_idempotent=True), max_body=10)
    gateway = await start_gateway(route)
    answer = await fetch(client, "POST", gateway + "/flaky", data=b"x" * 11)
    assert answer.status == 503
    assert seen.flaky == 1


async def test_spent_attempts_pass_the_last_answer_through(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    route = make_route(base, retry=replace(RETRY, attempts=2))
    gateway = await start_gateway(route)
    answer = await fetch(client, "GET", gateway + "/flaky")
    assert (answer.status, answer.body) == (503, b"busy")
    assert seen.flaky == 2


async def test_long_retry_after_is_passed_to_the_client(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base, retry=RETRY))
    answer = await fetch(client, "GET", gateway + "/busy")
    assert answer.status == 503
    assert ("Retry-After", "120") in answer.headers
    assert seen.flaky == 1


@pytest.mark.parametrize("size", [1000, 1000000])
async def test_upstream_failing_mid_body_cuts_the_client_off(
    start_gateway: Start, base: str, client: aiohttp.ClientSession, size: int
) -> None:
    gateway = await start_gateway(make_route(base))
    # The head is out when the upstream breaks off, small answer or large.
    async with client.get(gateway + f"/truncated?size={size}") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_stepgate_no_retry_is_honoured_and_not_relayed(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base, retry=RETRY))
    answer = await fetch(client, "GET", gateway + "/final")
    assert (answer.status, answer.body) == (500, b"final")
    assert "stepgate-no-retry" not in {name.lower() for name, _ in answer.headers}
    assert seen.flaky == 1


async def test_upstream_connections_are_reused(
    start_gateway: Start, base: str, seen: Seen, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(make_route(base))
    for _ in range(3):
        assert (await fetch(client, "GET", gateway + "/echo")).status == 200
        assert (await fetch(client, "GET", gateway + "/chunked")).status == 200
    assert len({request["peer"] for request in seen.requests}) == 1


# --- the answer as the service sent it --------------------------------------------------------


@dataclass
class Canned:
    """A raw upstream: answers every request with `parts`, written with `pause` s between."""

    parts: list[bytes]
    pause: float = 0.0
    close: bool = False
    requests: list[bytes] = field(default_factory=list)


async def start_canned(canned: Canned) -> tuple[str, asyncio.Server]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                canned.requests.append(await reader.readuntil(b"\r\n\r\n"))
                for index, part in enumerate(canned.parts):
                    if index and canned.pause:
                        await asyncio.sleep(canned.pause)
                    writer.write(part)
                    await writer.drain()
                if canned.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server


@pytest.fixture
async def canned_upstream() -> AsyncIterator[Callable[[Canned], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(canned: Canned) -> str:
        url, server = await start_canned(canned)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def raw_exchange(url: str, request: bytes, *, until: bytes | None = None) -> bytes:
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    writer.write(request)
    await writer.drain()
    try:
        if until is not None:
            return await asyncio.wait_for(reader.readuntil(until), 10)
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def head_of(answer: bytes) -> list[bytes]:
    return answer.partition(b"\r\n\r\n")[0].split(b"\r\n")


@pytest.mark.parametrize(
    "parts",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n" + b"a" * 1024, b"b" * 1024],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n", b"a" * 2048],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"4\r\nabcd\r\n0\r\n\r\n"],
    ],
    ids=["first-piece-then-rest", "head-then-body", "chunked"],
)
async def test_the_head_leaves_when_it_arrives_not_with_the_whole_body(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
    client: aiohttp.ClientSession,
    parts: list[bytes],
) -> None:
    """Service alone: the head at once, the rest later. Behind the gateway: the same."""
    base = await canned_upstream(Canned(parts, pause=1.0))
    gateway = await start_gateway(make_route(base))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(gateway + "/slow-body") as response:
        head_at = loop.time() - started
        body = await response.read()
    assert response.status == 200
    assert head_at < 0.5
    assert len(body) in (2048, 4)


async def test_no_content_type_or_server_is_invented(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
) -> None:
    base = await canned_upstream(Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]))
    gateway = await start_gateway(make_route(base))
    answer = await raw_exchange(gateway, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    names = {line.partition(b":")[0].lower() for line in head_of(answer)[1:]}
    assert answer.endswith(b"\r\n\r\nok")
    assert b"content-type" not in names and b"server" not in names


async def test_the_upstreams_server_header_passes_as_it_is(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
) -> None:
    base = await canned_upstream(
        Canned([b"HTTP/1.1 200 OK\r\nServer: shop/1.0\r\nContent-Length: 2\r\n\r\nok"])
    )
    gateway = await start_gateway(make_route(base))
    answer = await raw_exchange(gateway, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert [line for line in head_of(answer) if line.lower().startswith(b"server:")] == [
        b"Server: shop/1.0"
    ]


async def test_header_names_and_value_bytes_pass_as_they_are(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
) -> None:
    """Field names keep their case (as nginx keeps them) and a value that is not UTF-8 (a
    latin-1 file name, say) keeps its bytes."""
    fields = [
        b'etag: "v1"',
        b"x-lower: 1",
        b"Content-Type: text/plain",
        b'Content-Disposition: attachment; filename="caf\xe9.txt"',
        b"X-Raw: \xff\xfe",
    ]
    base = await canned_upstream(
        Canned([b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(fields) + b"\r\nContent-Length: 2\r\n\r\nok"])
    )
    gateway = await start_gateway(make_route(base))
    answer = await raw_exchange(gateway, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    head = head_of(answer)
    for line in fields:
        assert line in head


async def test_an_upstream_header_that_cannot_be_relayed_is_a_502(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    base = await canned_upstream(
        Canned([b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok"])
    )
    gateway = await start_gateway(make_route(base))
    answer = await fetch(client, "GET", gateway + "/x")
    assert answer.status == 502
    assert problem_body(answer)["status"] == 502


# --- the time-out rule (module docstring of gateway/proxy.py) ---------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc",
    ],
    ids=["chunked", "small", "large", "until-close"],
)
async def test_a_body_that_stops_moving_is_cut_after_the_route_timeout(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
    client: aiohttp.ClientSession,
    head: bytes,
) -> None:
    base = await canned_upstream(Canned([head, b""], pause=30.0))
    gateway = await start_gateway(make_route(base, timeout=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(gateway + "/stalls") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert 0.4 < loop.time() - started < 2.0


async def test_a_body_that_keeps_moving_is_never_cut(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    drip = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    drip += [b"1\r\nx\r\n"] * 12 + [b"0\r\n\r\n"]
    base = await canned_upstream(Canned(drip, pause=0.25))
    gateway = await start_gateway(make_route(base, timeout=0.5))
    async with client.get(gateway + "/drip") as response:
        assert await response.read() == b"x" * 12  # 3 s in all, 6 route time-outs


async def test_each_attempt_gets_the_route_timeout_for_its_head(
    start_gateway: Start,
    canned_upstream: Callable[[Canned], Awaitable[str]],
    client: aiohttp.ClientSession,
) -> None:
    """A head that never comes: with retry.attempts: 3 the client waits for three time-outs
    (and the back-off between them), not one."""
    canned = Canned([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], pause=30.0)
    base = await canned_upstream(canned)
    gateway = await start_gateway(make_route(base, timeout=0.3, retry=RETRY))
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await fetch(client, "GET", gateway + "/never")
    assert answer.status == 504
    assert len(canned.requests) == 3
    assert 0.9 < loop.time() - started < 1.5
