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
            self.requests.append((request.method, request.raw_path,
                                  list(request.raw_headers), body))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
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


def statuses(answer: bytes) -> list[int]:
    """The status codes of every response in `answer` (pipelined answers, 100 Continue)."""
    found = []
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and line[8:9] == b" " and line[9:12].isdigit():
            found.append(int(line[9:12]))
    return found
