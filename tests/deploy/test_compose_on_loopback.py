"""deploy/compose run for real, without docker: the same processes on loopback.

PostgreSQL is the one at 127.0.0.1:5432 (user postgres, trust; a fresh database, dropped after),
each app is the compose file's entrypoint (the trip service), each gateway is `stepgate serve`
with deploy/compose/gateway-*.yaml where only addresses change (listeners to free loopback
ports, the upstream to its app's port, the store to the fresh database), and the balancer is
nginx with deploy/compose/nginx/default.conf where only the upstream servers and the listen
port change (without nginx on PATH, a small round-robin proxy takes its place).

Skips, saying why, when PostgreSQL cannot be reached or when the gateway has no PostgreSQL
store yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config import parse_settings
from tests.deploy.examples import (
    NGINX_SITE,
    ComposeGateway,
    apps_of,
    compose_gateways,
    environment,
    free_port,
    host_file,
    interpolate,
    lb_service,
    option,
)

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
STEPS = ("reserve-flight", "reserve-hotel", "charge-card", "send-confirmation")
TRIP = {"traveller": "ada@example.com", "flight": "LH 400", "hotel": "Adlon"}

pytestmark = pytest.mark.timeout(180)


# --- what must be there -----------------------------------------------------------------------


async def postgres_unreachable() -> str | None:
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed, so PostgreSQL cannot be asked"
    try:
        connection = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at 127.0.0.1:5432 (user postgres) is not reachable: {exc}"
    await connection.close()
    return None


def postgres_store_missing() -> str | None:
    """Why the gateway cannot serve a postgresql:// store yet, or None once it can."""
    from gateway import store
    from gateway.store.sqlite import SQLiteStore

    settings = parse_settings({
        "store": "postgresql://postgres@127.0.0.1:5432/postgres",
        "routes": [{"name": "r", "path": "/r", "upstream": "http://127.0.0.1:1"}],
    }, source="probe")  # fmt: skip
    try:
        made = store.open_store(settings)
    except Exception as exc:
        return f"the gateway makes no PostgreSQL store yet ({type(exc).__name__}: {exc})"
    if isinstance(made, SQLiteStore):
        return (
            "the gateway's PostgreSQL dialect has not landed: gateway.store.open_store "
            "still makes an SQLite store for a postgresql:// URL"
        )
    return None


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    reason = await postgres_unreachable() or postgres_store_missing()
    if reason:
        pytest.skip(reason)
    import asyncpg

    name = f"stepgate_deploy_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# --- processes --------------------------------------------------------------------------------


class Processes:
    """Child processes of the test, each logging to its own file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                       env={**os.environ, **(env or {})})  # fmt: skip
        self.started.append((name, process, log))
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {name} (exit {p.poll()}):\n{log.read_text(errors='replace')[-3000:]}"
                         for name, p, log in self.started)  # fmt: skip

    def stop(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for _, process, _ in self.started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_until_up(processes: Processes, process: subprocess.Popen[bytes], url: str | None,
                        port: int, what: str) -> None:  # fmt: skip
    """Until ``url`` answers 200 (if given) and ``port`` takes connections."""
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{what} exited\n{processes.logs()}"
            with contextlib.suppress(aiohttp.ClientError, OSError):
                if url is not None:
                    async with session.get(url) as response:
                        if response.status != 200:
                            raise OSError(response.status)
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not come up\n{processes.logs()}")


class Pair:
    """One app + gateway pair of the compose file, on loopback."""

    def __init__(self, gateway: ComposeGateway) -> None:
        self.gateway = gateway
        ((self.app_name, self.app),) = apps_of(gateway.name)
        self.app_port = free_port()
        self.public = free_port()
        self.internal = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public}"

    def app_argv(self) -> list[str]:
        """The compose entrypoint, with the host's Python, the mounted script's host path and
        a free port."""
        argv = list(self.app["entrypoint"])
        compose_port = option(argv, "--port")
        assert argv[0] == "python" and compose_port
        argv[0] = sys.executable
        script = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
        argv[script] = str(host_file(self.app, argv[script]))
        argv[argv.index("--port") + 1] = str(self.app_port)
        return argv

    def gateway_config(self, store: str) -> dict[str, Any]:
        """The gateway's compose config with loopback addresses; nothing else changes."""
        config = dict(self.gateway.data)
        compose_app = f"http://127.0.0.1:{option(self.app['entrypoint'], '--port')}"
        routes = []
        for route in config["routes"]:
            assert route["upstream"] == compose_app, route
            routes.append({**route, "upstream": f"http://127.0.0.1:{self.app_port}"})
        config.update({
            "listen": f"127.0.0.1:{self.public}",
            "internal_listen": f"127.0.0.1:{self.internal}",
            "internal_url": f"http://127.0.0.1:{self.internal}",
            "store": store,
            "routes": routes,
        })  # fmt: skip
        return config

    async def start(self, processes: Processes, store: str) -> None:
        app = processes.start(self.app_name, self.app_argv())
        await wait_until_up(processes, app, f"http://127.0.0.1:{self.app_port}/stats",
                            self.app_port, self.app_name)  # fmt: skip
        path = processes.folder / f"{self.gateway.name}.yaml"
        path.write_text(yaml.safe_dump(self.gateway_config(store)), encoding="utf-8")
        env = {k: interpolate(v) for k, v in environment(self.gateway.service).items()}
        command = list(self.gateway.service["command"])
        command[command.index("--config") + 1] = str(path)
        processes.start(self.gateway.name, [sys.executable, "-m", "gateway", "serve", *command],
                        env=env, cwd=processes.folder)  # fmt: skip

    async def stats(self, session: aiohttp.ClientSession) -> Counter[str]:
        async with session.get(f"http://127.0.0.1:{self.app_port}/stats") as response:
            assert response.status == 200
            return Counter(await response.json())


# --- the balancer -----------------------------------------------------------------------------


def nginx_config(folder: Path, port: int, pairs: list[Pair]) -> Path:
    """deploy/compose's nginx site with loopback addresses, inside a main config like the
    nginx image's (which includes conf.d/default.conf in its http block)."""
    _, lb = lb_service()
    site = host_file(lb, NGINX_SITE).read_text(encoding="utf-8")
    for pair in pairs:
        compose_server = f"{pair.gateway.name}:{pair.gateway.settings.listen.port}"
        site, count = re.subn(rf"(\bserver\s+){re.escape(compose_server)}\b",
                              rf"\g<1>127.0.0.1:{pair.public}", site)  # fmt: skip
        assert count == 1, f"nginx lists {compose_server} {count} times"
    site, count = re.subn(r"(\blisten\s+)[0-9.:]*?([0-9]+)\s*;", rf"\g<1>127.0.0.1:{port};", site)
    assert count == 1
    (folder / "site.conf").write_text(site, encoding="utf-8")
    user = "user root;" if os.geteuid() == 0 else ""
    main = f"""
        {user}
        daemon off;
        worker_processes 1;
        pid {folder}/nginx.pid;
        error_log {folder}/error.log notice;
        events {{ worker_connections 256; }}
        http {{
            access_log {folder}/access.log;
            client_body_temp_path {folder}/client_body;
            proxy_temp_path {folder}/proxy;
            fastcgi_temp_path {folder}/fastcgi;
            uwsgi_temp_path {folder}/uwsgi;
            scgi_temp_path {folder}/scgi;
            include {folder}/site.conf;
        }}
    """
    path = folder / "nginx.conf"
    path.write_text(main, encoding="utf-8")
    return path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class RoundRobin:
    """Without nginx: each connection goes to the next gateway (the test's client opens one
    connection per request, so that is per request, like nginx)."""

    def __init__(self, ports: list[int]) -> None:
        self._next = itertools.cycle(ports)
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(self._next))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for stream in (up_writer, writer):
            stream.close()
            with contextlib.suppress(ConnectionError, OSError):
                await stream.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@contextlib.contextmanager
def logs_on_failure(processes: Processes) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(processes.logs())  # shown by pytest with the failure
        raise


# --- the test ---------------------------------------------------------------------------------


async def test_compose_setup_on_loopback(database: str, tmp_path: Path) -> None:
    import asyncpg

    processes = Processes(tmp_path)
    pairs = [Pair(gateway) for gateway in compose_gateways()]
    assert len(pairs) == 2
    lb_port = free_port()
    fallback: RoundRobin | None = None
    nginx = shutil.which("nginx")
    # One connection per request, so that both balancers choose a gateway per request.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        with logs_on_failure(processes):
            for pair in pairs:
                await pair.start(processes, database)
            for pair in pairs:  # both started at once: they migrate the schema together
                process = next(p for n, p, _ in processes.started if n == pair.gateway.name)
                await wait_until_up(processes, process, f"http://127.0.0.1:{pair.internal}/readyz",
                                    pair.public, pair.gateway.name)  # fmt: skip
            if nginx:
                config = nginx_config(tmp_path, lb_port, pairs)
                lb = processes.start(
                    "nginx",
                    [
                        nginx,
                        "-p",
                        str(tmp_path),
                        "-e",
                        str(tmp_path / "error.log"),
                        "-c",
                        str(config),
                    ],
                )
                await wait_until_up(processes, lb, None, lb_port, "nginx")
            else:
                fallback = RoundRobin([pair.public for pair in pairs])
                await fallback.start(lb_port)
            lb_url = f"http://127.0.0.1:{lb_port}"

            # The gateways keep their runs in the fresh database.
            connection = await asyncpg.connect(database, timeout=5)
            try:
                tables = await connection.fetchval(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
                )
            finally:
                await connection.close()
            assert tables > 0, "the gateways created no tables in PostgreSQL"

            await check_durable_posts(session, lb_url, pairs)
            await check_async_run(session, lb_url, pairs)
            await check_held_run(session, lb_url, pairs)
    finally:
        await session.close()
        if fallback is not None:
            await fallback.close()
        processes.stop()


async def total_stats(session: aiohttp.ClientSession, pairs: list[Pair]) -> list[Counter[str]]:
    return [await pair.stats(session) for pair in pairs]


def delta(after: list[Counter[str]], before: list[Counter[str]]) -> list[Counter[str]]:
    return [
        Counter({step: a[step] - b[step] for step in STEPS})
        for a, b in zip(after, before, strict=True)
    ]


def check_trip(body: dict[str, Any], direct: dict[str, Any]) -> None:
    """A booking as the app answers one: the same fields, the values the request asked for,
    and references that hang together."""
    assert body.keys() == direct.keys()
    assert body["traveller"] == TRIP["traveller"]
    assert body["flight"]["flight"] == TRIP["flight"] and body["hotel"]["hotel"] == TRIP["hotel"]
    assert body["charge"]["amount_cents"] == direct["charge"]["amount_cents"]
    assert body["confirmation"]["text"] == (
        f"Flight {body['flight']['reference']}, hotel {body['hotel']['reference']},"
        f" charge {body['charge']['reference']}"
    )


async def check_durable_posts(session: aiohttp.ClientSession, lb: str, pairs: list[Pair]) -> None:
    """Durable POSTs through the balancer answer as the app does, each step runs once, and
    both pairs take their share."""
    async with session.post(f"http://127.0.0.1:{pairs[0].app_port}/trips", json=TRIP) as direct:
        assert direct.status == 200
        direct_type = direct.headers["Content-Type"]
        direct_body = await direct.json()
    before = await total_stats(session, pairs)
    runs = set()
    for _ in range(4):
        async with session.post(f"{lb}/trips", json=TRIP) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"] == direct_type
            assert response.headers.get("Stepgate-Run-Id")
            runs.add(response.headers["Stepgate-Run-Id"])
            check_trip(await response.json(), direct_body)
    assert len(runs) == 4
    done = delta(await total_stats(session, pairs), before)
    assert sum(done, Counter()) == Counter(dict.fromkeys(STEPS, 4)), done
    assert all(d["charge-card"] >= 1 for d in done), f"the balancer skipped a pair: {done}"


async def poll(session: aiohttp.ClientSession, base: str, location: str) -> tuple[int, str, str]:
    async with session.get(f"{base}{location}&wait=20") as response:
        return response.status, response.headers.get("Stepgate-Run-Id", ""), await response.text()


async def check_async_run(session: aiohttp.ClientSession, lb: str, pairs: list[Pair]) -> None:
    """`Prefer: respond-async` through the balancer; the poll URL, asked of each gateway and of
    the balancer while the run is still going, yields the same final answer everywhere."""
    async with session.post(f"{lb}/trips?latency=1", json=TRIP,
                            headers={"Prefer": "respond-async"}) as response:  # fmt: skip
        assert response.status == 202, await response.text()
        assert response.headers["Preference-Applied"] == "respond-async"
        location = response.headers["Location"]
        run_id = (await response.json())["run_id"]
    assert location.startswith(f"/_stepgate/runs/{run_id}?token=")
    started = time.monotonic()
    answers = await asyncio.gather(
        *(poll(session, base, location) for base in [lb, *(pair.url for pair in pairs)])
    )
    assert time.monotonic() - started < 15
    statuses = {status for status, _, _ in answers}
    assert statuses == {200}, answers
    assert {run for _, run, _ in answers} == {run_id}
    bodies = {body for _, _, body in answers}
    assert len(bodies) == 1, f"the gateways answered the poll differently: {bodies}"


async def check_held_run(session: aiohttp.ClientSession, lb: str, pairs: list[Pair]) -> None:
    """A run that must retry, with no hold: 303 to the poll URL, which either gateway answers
    with the one final booking; the completed steps ran once, only the failed one again.

    The retry may run on either pair (the replica whose timer fires invokes its own app), and
    the example's ?fail=STEP fails once per run *per app process*: charge-card runs twice, or
    three times when the retry lands on the other app, which fails it once more."""
    before = await total_stats(session, pairs)
    async with session.post(
        f"{lb}/trips?fail=charge-card",
        json=TRIP,
        headers={"Prefer": "wait=0"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303, await response.text()
        location = response.headers["Location"]
    answers = [await poll(session, base, location) for base in [*(p.url for p in pairs), lb]]
    assert {status for status, _, _ in answers} == {200}, answers
    assert len({body for _, _, body in answers}) == 1
    done = sum(delta(await total_stats(session, pairs), before), Counter())
    ran_once = {"reserve-flight": 1, "reserve-hotel": 1, "send-confirmation": 1}
    assert {step: done[step] for step in ran_once} == ran_once, done
    assert 2 <= done["charge-card"] <= 1 + len(pairs), done
