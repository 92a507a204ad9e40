"""Helpers for the hostile-input tests: raw sockets against a real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.conftest import UpstreamFactory


class Recorder:
    """An upstream that answers 200 `ok` to everything and keeps what it was asked."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = []

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            body = await request.read()
            self.requests.append(
                (request.method, request.raw_path, list(request.raw_headers), body)
            )
            return web.Response(text="ok")

        async def anonymous(request: web.Request, response: web.StreamResponse) -> None:
            response.headers.popall("Server", None)  # any Server field seen is the gateway's

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        app.on_response_prepare.append(anonymous)
        return app

    @property
    def targets(self) -> list[str]:
        return [target for _, target, _, _ in self.requests]


@pytest.fixture
async def recorder(upstream: UpstreamFactory) -> AsyncIterator[tuple[Recorder, str]]:
    seen = Recorder()
    yield seen, await upstream(seen.app())


async def send(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, then read until the gateway closes the connection (or `timeout`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def responses(answer: bytes) -> list[tuple[int, bytes, bytes]]:
    """Split what came back on one connection into (status, head, body) answers, by their
    framing: 1xx and 204/304 have no body, then Content-Length, chunked, or the rest."""
    found: list[tuple[int, bytes, bytes]] = []
    rest = answer
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.") or not head[9:12].isdigit():
            raise AssertionError(f"not an HTTP/1 answer: {head[:80]!r}")
        status = int(head[9:12])
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        if status < 200 or status in (204, 304):
            body = b""
        elif b"content-length" in fields:
            length = int(fields[b"content-length"])
            body, rest = rest[:length], rest[length:]
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    rest = rest.partition(b"\r\n")[2]
                    break
                body, rest = body + rest[:size], rest[size + 2 :]
        else:
            body, rest = rest, b""
        found.append((status, head, body))
    return found


def statuses(answer: bytes) -> list[int]:
    """The status of every answer on the connection, in order (100 Continue included)."""
    return [status for status, _, _ in responses(answer)]
