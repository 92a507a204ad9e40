"""Shared fixtures: a real gateway on loopback ports in front of a real upstream, a fresh SQLite
file per test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import parse_settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client" / "python"))


class Running:
    """A gateway started for a test, with its URLs and a client session."""

    def __init__(self, gateway: Gateway, session: aiohttp.ClientSession) -> None:
        self.gateway = gateway
        self.session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.public_port}"

    @property
    def internal(self) -> str:
        return f"http://127.0.0.1:{self.gateway.internal_port}"

    @property
    def store(self) -> Any:
        return self.gateway.store


def settings_for(db: Path, routes: list[dict[str, Any]], **extra: Any) -> Any:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "internal_listen": "127.0.0.1:0",
        "store": f"sqlite:///{db}",
        "routes": routes,
    }
    data.update(extra)
    return parse_settings(data, source="test")


GatewayFactory = Callable[..., Awaitable[Running]]
UpstreamFactory = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    """Start an aiohttp application on a loopback port; returns its base URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start a gateway with the given routes (and top-level settings) on loopback ports."""
    started: list[Running] = []

    async def start(routes: list[dict[str, Any]], **extra: Any) -> Running:
        db = extra.pop("db", tmp_path / "stepgate.db")
        gw = Gateway(settings_for(db, routes, **extra))
        await gw.start()
        running = Running(gw, aiohttp.ClientSession(auto_decompress=False))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.session.close()
        await running.gateway.stop()
