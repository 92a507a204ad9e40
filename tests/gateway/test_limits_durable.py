"""What a durable route keeps: at most `max_response` of an upstream's answer, and request heads
no larger than the listener lets in (DESIGN.md, issue 10).

An answer over `max_response` is a failed attempt (`too_large`): the gateway stops reading it at
the bound (or at once, when its Content-Length says so), records nothing of it, and answers a
502 problem; it is retried as a 502 would be (only when `retry.on` has 5xx or 502).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.config import ConfigError, RetryPolicy, parse_settings
from gateway.retry import is_retriable
from tests.conftest import GatewayFactory, UpstreamFactory

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

MiB = 1024 * 1024
CHUNK = b"x" * 65536


def durable(base: str, **extra: Any) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "retry": {"attempts": 1},
    }
    route.update(extra)
    return route


class Streamer:
    """An upstream that streams `size` bytes (chunked) and counts what it managed to send."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls = 0
        self.sent: list[int] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            response = web.StreamResponse()
            await response.prepare(request)
            sent = 0
            try:
                while sent < self.size:
                    piece = CHUNK[: self.size - sent]
                    await response.write(piece)
                    sent += len(piece)
                await response.write_eof()
            except (ConnectionError, OSError):
                pass  # the gateway hung up: that is the point
            finally:
                self.sent.append(sent)
            return response

        app = web.Application()
        app.router.add_route("*", "/work", handle)
        return app


def db_bytes(tmp_path: Path) -> int:
    return sum(path.stat().st_size for path in tmp_path.glob("stepgate.db*"))


async def post(gw: Any, path: str = "/work", **kwargs: Any) -> tuple[int, dict[str, Any], str]:
    async with gw.session.post(gw.url + path, **kwargs) as resp:
        body = await resp.json(content_type=None) if resp.status == 502 else {}
        return resp.status, body, resp.headers.get("Stepgate-Run-Id", "")


# --- max_response: config ----------------------------------------------------------------


def test_max_response_defaults_to_10mib_and_takes_a_size() -> None:
    base = "http://127.0.0.1:9"
    settings = parse_settings(
        {"routes": [durable(base), durable(base, name="small", path="/s", max_response="64KiB")]},
        source="test",
    )
    assert [route.max_response for route in settings.routes] == [10 * MiB, 64 * 1024]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10MB", 'unknown size unit "MB"'),
        (-1, "must not be negative"),
        ("2GiB", "at most 512MiB"),
    ],
)
def test_a_bad_max_response_names_its_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {"routes": [durable("http://127.0.0.1:9", max_response=value)]}, source="gw.yaml"
        )
    assert caught.value.key == "routes[0].max_response"
    assert message in str(caught.value)


@pytest.mark.parametrize("value", ["2GiB", 600 * MiB, "9" * 40])
def test_max_body_is_bounded_like_max_response(value: object) -> None:
    """A durable body is stored whole for replay, so the same 512MiB ceiling applies."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {"routes": [durable("http://127.0.0.1:9", max_body=value)]}, source="gw.yaml"
        )
    assert caught.value.key == "routes[0].max_body"
    assert "at most 512MiB" in str(caught.value) or "too large" in str(caught.value)


# --- max_response: the bound holds ---------------------------------------------------------


async def test_a_streamed_answer_over_the_default_is_cut_and_a_502(
    gateway: GatewayFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    """The issue's case, smaller: 200 MiB once took 651 MiB of RSS and 403 MiB of database."""
    streamer = Streamer(200 * MiB)
    gw = await gateway([durable(await upstream(streamer.app()))])
    status, problem, run_id = await post(gw)
    why = f"the upstream's answer is larger than max_response ({10 * MiB} bytes)"
    assert status == 502
    # One attempt allowed: the policy's verdict, then the cause.
    assert problem["detail"] == f"attempts exhausted: {why}"
    run = await gw.store.get_run(run_id)
    assert run.status == "failed" and run.resp_status is None and run.resp_body is None
    assert run.error == problem["detail"]
    [attempt] = await gw.store.attempts(run_id)
    assert attempt.outcome == "too_large" and attempt.error == why
    # Reading stopped near the bound: what the upstream got out is the bound plus what the
    # sockets' buffers took in, far from the 200 MiB it meant to send.
    assert streamer.sent[0] < 60 * MiB
    assert db_bytes(tmp_path) < 2 * MiB


async def test_a_declared_content_length_over_the_bound_fails_before_the_body(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    """1,100 MiB once gave a bare 500 and lost the run; the head alone is enough to refuse."""
    declared = 1100 * MiB
    heads: list[bytes] = []
    hang = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared + CHUNK)
        await writer.drain()
        await hang.wait()  # never sends the rest: the gateway must not wait for it
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await gateway([durable(f"http://127.0.0.1:{port}", timeout="20s")])
        started = time.monotonic()
        status, problem, run_id = await post(gw)
        assert time.monotonic() - started < 5
    finally:
        hang.set()
        server.close()
        await server.wait_closed()
    assert status == 502
    assert "larger than max_response" in problem["detail"]
    [attempt] = await gw.store.attempts(run_id)
    assert attempt.outcome == "too_large"
    assert (await gw.store.get_run(run_id)).status == "failed"
    assert len(heads) == 1
    assert db_bytes(tmp_path) < 2 * MiB


@pytest.mark.parametrize("size", [64 * 1024, 64 * 1024 + 1])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_the_bound_is_exact(
    gateway: GatewayFactory, upstream: UpstreamFactory, size: int, chunked: bool
) -> None:
    body = b"y" * size

    async def handle(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(body[:1000])
        await response.write(body[1000:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/work", handle)
    gw = await gateway([durable(await upstream(app), max_response="64KiB")])
    async with gw.session.post(gw.url + "/work") as resp:
        if size <= 64 * 1024:
            assert resp.status == 200
            assert await resp.read() == body
        else:
            assert resp.status == 502
            assert (await resp.json(content_type=None))["detail"].endswith(
                "the upstream's answer is larger than max_response (65536 bytes)"
            )


async def test_a_head_answer_may_declare_more_than_the_bound(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """A HEAD answer's Content-Length is the size of a body it does not carry."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(headers={"Content-Length": str(50 * MiB)})

    app = web.Application()
    app.router.add_route("HEAD", "/work", handle)
    gw = await gateway([durable(await upstream(app), max_response="1KiB")])
    async with gw.session.head(gw.url + "/work") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(50 * MiB)


@pytest.mark.parametrize(
    ("on", "calls"), [(["5xx"], 3), (["502"], 3), (["connect", "timeout", "429"], 1)]
)
async def test_too_large_is_retried_as_a_502_would_be(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    on: list[str],
    calls: int,
) -> None:
    streamer = Streamer(4 * MiB)
    gw = await gateway(
        [
            durable(
                await upstream(streamer.app()),
                max_response="1MiB",
                retry={"attempts": 3, "initial": "10ms", "max": "20ms", "on": on},
            )
        ]
    )
    status, problem, run_id = await post(gw)
    assert status == 502
    assert problem["detail"].endswith("larger than max_response (1048576 bytes)")
    assert streamer.calls == calls
    attempts = await gw.store.attempts(run_id)
    assert [a.outcome for a in attempts] == ["too_large"] * calls
    assert all("larger than max_response (1048576 bytes)" in (a.error or "") for a in attempts)
    run = await gw.store.get_run(run_id)
    assert run.status == "failed" and run.failures == calls
    assert db_bytes(tmp_path) < 2 * MiB


@pytest.mark.parametrize(
    ("on", "verdict"),
    [({"5xx"}, "5xx"), ({"502"}, "502"), ({"500", "5xx"}, "5xx"), ({"4xx", "connect"}, None)],
)
def test_the_policy_judges_too_large_as_a_502(on: set[str], verdict: str | None) -> None:
    policy = RetryPolicy(3, 0.1, 1.0, 2.0, frozenset(on), False)
    assert is_retriable(policy, None, "too_large") == verdict


async def test_a_retry_after_a_too_large_answer_can_succeed(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    calls = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(body=b"z" * (2 * MiB if calls == 1 else 10))

    app = web.Application()
    app.router.add_post("/work", handle)
    gw = await gateway(
        [
            durable(
                await upstream(app),
                max_response="1MiB",
                retry={"attempts": 2, "initial": "10ms", "max": "20ms"},
            )
        ]
    )
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
        assert await resp.read() == b"z" * 10
        run_id = resp.headers["Stepgate-Run-Id"]
    assert [a.outcome for a in await gw.store.attempts(run_id)] == ["too_large", "response"]


# --- request heads: bounded by the listener ------------------------------------------------


@pytest.fixture
async def echo(upstream: UpstreamFactory) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(handler_args={"max_field_size": 128 * 1024})
    app.router.add_route("*", "/work", handle)
    yield await upstream(app)


async def test_stored_request_headers_stay_within_the_listeners_head_bound(
    gateway: GatewayFactory, echo: str
) -> None:
    """The public listener refuses heads over `limits.max_header_size` (431, tested in
    tests/hostile/test_limits.py); what it lets in is all that is stored, plus the few
    forwarding fields the gateway adds."""
    gw = await gateway([durable(echo)], limits={"max_header_size": "16KiB"})
    filler = {"X-Forwarded-For": "10.0.0.1, " * 700, "X-Fill": "a" * 8000}
    async with gw.session.post(gw.url + "/work", headers=filler) as resp:
        assert resp.status == 200
        run = await gw.store.get_run(resp.headers["Stepgate-Run-Id"])
    stored = sum(len(name) + len(value) + 4 for name, value in run.headers)
    assert 15_000 < stored <= 16 * 1024 + 512
    async with gw.session.post(gw.url + "/work", headers={**filler, "X-More": "b" * 2000}) as resp:
        assert resp.status == 431
        assert "Stepgate-Run-Id" not in resp.headers
    assert sum((await gw.store.count_by_status()).values()) == 1
