"""Three real gateway processes (A, B, C) on one PostgreSQL database, each in front of its own
upstream: an aiohttp application in the test process whose handlers use the Python SDK.

The three upstreams share one `Ledger`, which counts how often each step's body executed and
records every invocation (which upstream, which run, which attempt), so a test can tell what a
client saw apart from what the handlers did."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stepgate.aiohttp
from aiohttp import web
from stepgate import step

from tests.conftest import UpstreamFactory
from tests.gateway.procs import GatewayProcess

LEASE = 2.0  # seconds: short, so that a take-over is quick
SLEEP = 2.0  # seconds that the `sleepy` handler sleeps for
TOKEN = "replicas-admin-token"
NAMES = ("A", "B", "C")


@dataclass
class Invocation:
    upstream: str  # which replica's upstream was invoked: "A", "B" or "C"
    run_id: str
    attempt: int
    kind: str
    key: str
    at: float = field(default_factory=time.monotonic)


class Ledger:
    """What the three upstreams did, and the gates their blocking handlers wait at."""

    def __init__(self) -> None:
        self.executed: Counter[tuple[str, str]] = Counter()  # (run id, step) -> executions
        self.invocations: list[Invocation] = []
        self.entered: dict[str, asyncio.Event] = {}  # key -> a gated step's body has started
        self.gates: dict[str, asyncio.Event] = {}  # key -> the gated step may return
        self.blocked: set[str] = set()  # run ids whose step `two` blocks on A's upstream
        self.forever = asyncio.Event()  # what A's step `two` waits for (set at tear-down)

    def event(self, table: dict[str, asyncio.Event], key: str) -> asyncio.Event:
        return table.setdefault(key, asyncio.Event())

    def release(self, key: str) -> None:
        self.event(self.gates, key).set()

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.forever.set()

    def of(self, run_id: str) -> list[Invocation]:
        return [inv for inv in self.invocations if inv.run_id == run_id]

    def steps_of(self, run_id: str) -> dict[str, int]:
        return {name: n for (run, name), n in self.executed.items() if run == run_id}

    def app(self, name: str) -> web.Application:
        """Replica `name`'s upstream: POST /jobs/{kind}/{key}."""
        handlers: dict[str, Callable[[str, str, web.Request], Awaitable[dict[str, Any]]]] = {
            "gated": self._gated,
            "parked": self._parked,
            "crash": self._crash,
            "sleepy": self._sleepy,
        }

        async def handle(request: web.Request) -> web.Response:
            kind, key = request.match_info["kind"], request.match_info["key"]
            run_id = request.headers["Stepgate-Run-Id"]
            self.invocations.append(
                Invocation(name, run_id, int(request.headers["Stepgate-Attempt"]), kind, key)
            )
            body = await handlers[kind](name, key, request)
            return web.json_response(body)

        app = web.Application(middlewares=[stepgate.aiohttp.middleware])
        app.router.add_post("/jobs/{kind}/{key}", handle)
        return app

    def _counted(self, run_id: str, step_name: str) -> None:
        self.executed[(run_id, step_name)] += 1

    async def _gated(self, name: str, key: str, request: web.Request) -> dict[str, Any]:
        """One step whose body blocks until the test releases `key`."""
        run_id = request.headers["Stepgate-Run-Id"]

        async def work() -> dict[str, str]:
            self._counted(run_id, "work")
            self.event(self.entered, key).set()
            await self.event(self.gates, key).wait()
            return {"key": key, "by": name}

        body = (await request.read()).decode()
        return {"work": await step.run("work", work), "body": body}

    async def _parked(self, name: str, key: str, request: web.Request) -> dict[str, Any]:
        """A step, a wait for the event `order.paid` with data.key == key, a step."""
        run_id = request.headers["Stepgate-Run-Id"]

        def counted(step_name: str) -> str:
            self._counted(run_id, step_name)
            return f"{step_name} by {name}"

        before = await step.run("before", counted, "before")
        paid = await step.wait_for_event(
            "paid", event="order.paid", match={"data.key": key}, timeout=30
        )
        after = await step.run("after", counted, "after")
        return {"before": before, "paid": paid["data"] if paid else None, "after": after}

    async def _crash(self, name: str, key: str, request: web.Request) -> dict[str, Any]:
        """Three steps; on A's upstream the second one never returns (A is killed meanwhile)."""
        run_id = request.headers["Stepgate-Run-Id"]

        def one() -> str:
            self._counted(run_id, "one")
            return name

        async def two() -> str:
            self._counted(run_id, "two")
            if name == "A":
                self.blocked.add(run_id)  # step `one` has been acknowledged (201) by now
                await self.forever.wait()
            return name

        def three() -> str:
            self._counted(run_id, "three")
            return name

        return {
            "one": await step.run("one", one),
            "two": await step.run("two", two),
            "three": await step.run("three", three),
        }

    async def _sleepy(self, name: str, key: str, request: web.Request) -> dict[str, Any]:
        """A step, a sleep of SLEEP seconds, a step."""
        run_id = request.headers["Stepgate-Run-Id"]

        def counted(step_name: str) -> str:
            self._counted(run_id, step_name)
            return name

        before = await step.run("before", counted, "before")
        await step.sleep("nap", SLEEP)
        after = await step.run("after", counted, "after")
        return {"before": before, "after": after}


class Cluster:
    def __init__(
        self, gateways: dict[str, GatewayProcess], ledger: Ledger, session: aiohttp.ClientSession
    ) -> None:
        self.gateways = gateways
        self.ledger = ledger
        self.session = session

    def __getitem__(self, name: str) -> GatewayProcess:
        return self.gateways[name]

    @staticmethod
    def replica_id(name: str) -> str:
        return f"replica-{name.lower()}"

    async def admin(self, name: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.session.request(
            method, self[name].internal + path, headers=headers, **kw
        ) as resp:
            return resp.status, await resp.json()


def route(upstream: str) -> dict[str, Any]:
    return {
        "name": "jobs",
        "path": "/jobs/*",
        "upstream": upstream,
        "durable": True,
        "hold": "10s",
        "timeout": "20s",
        "retry": {"attempts": 3, "initial": "50ms", "max": "200ms"},
    }


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str, upstream: UpstreamFactory) -> AsyncIterator[Cluster]:
    ledger = Ledger()
    gateways: dict[str, GatewayProcess] = {}
    for name in NAMES:
        home = tmp_path / name
        home.mkdir()
        gateways[name] = GatewayProcess(
            home,
            [route(await upstream(ledger.app(name)))],
            store=pg_url,
            lease=f"{LEASE:g}s",
            replica_id=Cluster.replica_id(name),
            admin_token=TOKEN,
            shutdown_grace="1s",
        )
    try:
        # At once: the three migrate the (empty) schema together the first time.
        await asyncio.gather(*(gw.start() for gw in gateways.values()))
        async with aiohttp.ClientSession() as session:
            yield Cluster(gateways, ledger, session)
    finally:
        ledger.release_all()
        # Off the loop: the upstreams the gateways drain into run on this loop.
        await asyncio.gather(*(asyncio.to_thread(gw.stop) for gw in gateways.values()))
