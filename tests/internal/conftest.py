"""Fixtures for the internal listener's hostile-input tests: a real gateway with one run whose
first attempt the upstream holds open for the whole test, so every step write is the current
attempt's and is judged on its body alone."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory

ADMIN_TOKEN = "admin-secret"


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def step_path(step_id: str) -> str:
    """A step id percent-encoded like encodeURIComponent; a lone surrogate as its CESU bytes."""
    return quote(step_id.encode("utf-8", "surrogatepass"), safe="")


class HeldRun:
    """A running run, its attempt held by the upstream; the calls a handler and an operator
    make on the internal listener, over aiohttp (async) or http.client (for hypothesis, which
    runs in a thread while the gateway keeps the event loop)."""

    def __init__(self, gw: Running, run_id: str, callback: str, token: str) -> None:
        self.gw = gw
        self.run_id = run_id
        self.callback = callback
        self.token = token
        self.cb_path = f"/v1/runs/{run_id}"
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self.auth = {"Authorization": f"Bearer {token}"}

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        data = io.BytesIO(body) if body is not None and len(body) > 1 << 20 else body
        async with self.gw.session.request(
            method, self.gw.internal + path, data=data, headers=headers
        ) as resp:
            return Answer(resp.status, resp.content_type, await resp.read())

    async def put(self, step_id: str, body: bytes | object) -> Answer:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.request(
            "PUT", f"{self.cb_path}/steps/{step_path(step_id)}", raw, self.auth
        )

    async def event(self, body: bytes | object) -> Answer:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.request("POST", "/v1/events", raw, self.admin)

    async def show(self) -> Answer:
        return await self.request("GET", self.cb_path, headers=self.admin)

    async def steps(self) -> Answer:
        return await self.request("GET", f"{self.cb_path}/steps", headers=self.auth)

    async def assert_readable(self) -> None:
        """The run's admin page and its step list still answer, as JSON."""
        for answer in (await self.show(), await self.steps()):
            assert answer.status == 200, answer
            answer.json()

    def sync(self) -> SyncClient:
        return SyncClient(self)


class SyncClient:
    """The same calls over one keep-alive http.client connection."""

    def __init__(self, run: HeldRun) -> None:
        self.run = run
        self.conn = http.client.HTTPConnection(
            "127.0.0.1", run.gw.gateway.internal_port, timeout=30
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.conn.close()
        return Answer(resp.status, resp.headers.get_content_type(), data)

    def put(self, step_id: str, raw: bytes) -> Answer:
        return self.request(
            "PUT", f"{self.run.cb_path}/steps/{step_path(step_id)}", raw, self.run.auth
        )

    def event(self, raw: bytes) -> Answer:
        return self.request("POST", "/v1/events", raw, self.run.admin)

    def assert_readable(self) -> None:
        for answer in (
            self.request("GET", self.run.cb_path, headers=self.run.admin),
            self.request("GET", f"{self.run.cb_path}/steps", headers=self.run.auth),
        ):
            assert answer.status == 200, answer
            answer.json()

    def close(self) -> None:
        self.conn.close()


def assert_refused(answer: Answer, status: int = 400) -> None:
    assert answer.status == status, answer
    assert answer.content_type == "application/problem+json", answer
    assert answer.json()["status"] == status


@pytest.fixture
async def held(gateway: GatewayFactory, upstream: UpstreamFactory) -> AsyncIterator[HeldRun]:
    release = asyncio.Event()
    arrived: asyncio.Queue[web.Request] = asyncio.Queue()

    async def hold(request: web.Request) -> web.Response:
        await arrived.put(request)
        await release.wait()
        return web.Response(text="released")

    app = web.Application()
    app.router.add_post("/held", hold)
    gw = await gateway(
        [
            {
                "name": "held",
                "path": "/held",
                "upstream": await upstream(app),
                "durable": True,
                "timeout": "10m",
            }
        ],
        admin_token=ADMIN_TOKEN,
        durability="relaxed",
    )
    async with gw.session.post(gw.url + "/held", headers={"Prefer": "respond-async"}) as resp:
        assert resp.status == 202
    request = await asyncio.wait_for(arrived.get(), 10)
    yield HeldRun(
        gw,
        request.headers["Stepgate-Run-Id"],
        request.headers["Stepgate-Callback"],
        request.headers["Stepgate-Token"],
    )
    release.set()
