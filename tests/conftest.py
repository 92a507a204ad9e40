"""Shared fixtures: a real gateway on loopback ports in front of a real upstream, a fresh SQLite
file per test, or, for tests parametrised over the dialects, an emptied PostgreSQL database.

PostgreSQL: the server at $STEPGATE_TEST_PG (default postgresql://postgres@127.0.0.1:5432, as
on the CI machines); one fresh database per test session, dropped after. Without a reachable
server those tests skip and say why."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
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


PG_SERVER = os.environ.get("STEPGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
DIALECTS = ("sqlite", "postgres")
# Every table of the PostgreSQL schema that holds data (not the schema version).
_PG_TABLES = "runs, steps, attempts, events, replicas, meta, flow_buckets"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a PostgreSQL database created for this session, dropped after it."""
    name = f"stepgate_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:
        # In a thread of its own: the session's set-up and tear-down may run inside a loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin(sql)).result()

    try:
        run(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(
            f"PostgreSQL is not reachable at {PG_SERVER} ({exc}); "
            "set STEPGATE_TEST_PG to a server's URL to run these tests"
        )
    yield f"{PG_SERVER}/{name}"
    run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def empty_pg(url: str) -> str:
    """Empty the session database of an earlier test's runs and replicas."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        if await conn.fetchval("SELECT to_regclass('runs')") is not None:
            await conn.execute(f"TRUNCATE {_PG_TABLES} CASCADE")
    finally:
        await conn.close()
    return url


@pytest.fixture
async def pg_url(pg_database: str) -> str:
    """The session's PostgreSQL database, emptied for this test."""
    return await empty_pg(pg_database)


def settings_for(db: Path | str, routes: list[dict[str, Any]], **extra: Any) -> Any:
    store = db if isinstance(db, str) and db.startswith("postgresql://") else f"sqlite:///{db}"
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "internal_listen": "127.0.0.1:0",
        "store": store,
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
async def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[GatewayFactory]:
    """Start a gateway with the given routes (and top-level settings) on loopback ports. Its
    store is a fresh SQLite file, or, where a test module parametrises `gateway` indirectly
    with "postgres" (see DIALECTS), the emptied session database."""
    started: list[Running] = []
    default: Path | str = tmp_path / "stepgate.db"
    if getattr(request, "param", "sqlite") == "postgres":
        default = await empty_pg(request.getfixturevalue("pg_database"))

    async def start(routes: list[dict[str, Any]], **extra: Any) -> Running:
        db = extra.pop("db", default)
        gw = Gateway(settings_for(db, routes, **extra))
        await gw.start()
        running = Running(gw, aiohttp.ClientSession(auto_decompress=False))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.session.close()
        await running.gateway.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module with `BOTH_DIALECTS = True` runs each test that starts a gateway twice."""
    if getattr(metafunc.module, "BOTH_DIALECTS", False) and "gateway" in metafunc.fixturenames:
        metafunc.parametrize("gateway", DIALECTS, indirect=True)
