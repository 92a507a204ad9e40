"""The examples keep the database password out of the gateway's config and hand it over as
PGPASSWORD. This checks that the gateway's PostgreSQL store really sends it: the store, opened
with each example's config, logs in to a stand-in server that asks for a clear-text password
and records what it is told."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import urllib.parse
from dataclasses import dataclass, field

import pytest

from gateway.config import parse_settings
from tests.deploy.examples import (
    compose_gateways,
    environment,
    interpolate,
    k8s_gateway,
    secret_value,
)

SSL_REQUEST, GSS_REQUEST = 80877103, 80877104


@dataclass
class Login:
    user: str = ""
    database: str = ""
    password: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def stand_in_server() -> tuple[asyncio.Server, int, Login]:
    """Speaks just enough of PostgreSQL's protocol to be given a password, then refuses it."""
    login = Login()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length, code = struct.unpack("!ii", await reader.readexactly(8))
                if code in (SSL_REQUEST, GSS_REQUEST):
                    writer.write(b"N")  # no encryption: go on in plain text
                    continue
                break
            fields = (await reader.readexactly(length - 8)).split(b"\0")
            startup = dict(zip(fields[0::2], fields[1::2], strict=False))
            login.user = startup.get(b"user", b"").decode()
            login.database = startup.get(b"database", b"").decode()
            writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            await writer.drain()
            kind, length = struct.unpack("!ci", await reader.readexactly(5))
            assert kind == b"p"
            login.password = (await reader.readexactly(length - 4)).rstrip(b"\0").decode()
            error = b"SFATAL\0C28P01\0Mstand-in server: password noted, login refused\0\0"
            writer.write(b"E" + struct.pack("!i", len(error) + 4) + error)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            login.done.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], login


def k8s_case() -> tuple[object, str]:
    gateway = k8s_gateway()
    env = {e["name"]: e for e in gateway.container["env"]}
    ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    password = secret_value(ref["name"], ref["key"])
    return gateway.data, password


def compose_case(index: int) -> tuple[object, str]:
    gateway = compose_gateways()[index]
    return gateway.data, interpolate(environment(gateway.service)["PGPASSWORD"])


@pytest.mark.parametrize("case", ["kubernetes", "compose gateway-a", "compose gateway-b"])
async def test_the_store_logs_in_with_pgpassword(case: str, monkeypatch: pytest.MonkeyPatch,
                                                 ) -> None:  # fmt: skip
    from gateway.store import open_store
    from gateway.store.sqlite import SQLiteStore

    data, password = (
        k8s_case() if case == "kubernetes" else compose_case(0 if case.endswith("-a") else 1)
    )
    assert isinstance(data, dict)
    written = urllib.parse.urlsplit(data["store"])
    server, port, login = await stand_in_server()
    # Only where the database is changes: the example's user, database and lack of password stay.
    config = {**data, "store": written._replace(netloc=f"{written.username}@127.0.0.1:{port}")
              .geturl()}  # fmt: skip
    monkeypatch.setenv("PGPASSWORD", password)
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.setenv("PGSSLMODE", "disable")
    try:
        store = open_store(parse_settings(config, source=case, read_key=False))
        if isinstance(store, SQLiteStore):
            pytest.skip("the gateway has no PostgreSQL store yet")
        with pytest.raises(Exception, match="password noted"):
            await asyncio.wait_for(store.open(), 20)
        await asyncio.wait_for(login.done.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()
    assert login.user == written.username
    assert login.database == written.path.lstrip("/")
    assert login.password == password
