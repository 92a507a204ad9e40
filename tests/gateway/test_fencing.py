"""Attempt fencing, through the raw protocol: once the gateway has given up on an attempt (it
timed out, the gateway crashed and came back, the run was cancelled), that attempt's callbacks
are refused with 409 "superseded" and change nothing, so a recorded step never runs again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps
from tests.gateway.test_crash import procs, wait_for_status  # noqa: F401 - a fixture

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

SUPERSEDED = "https://stepgate.dev/problems/superseded"


class Fenced(Exception):
    """The gateway answered a callback with 409 superseded: the handler stops."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(answer.get("detail"))
        self.answer = answer


class Handler:
    """Three steps; step `slow` takes `slow_for` seconds in the first attempt only. Counts how
    often each step's function ran, and what each attempt's callbacks were answered."""

    def __init__(self, slow_for: float) -> None:
        self.slow_for = slow_for
        self.executed: Counter[str] = Counter()
        self.in_slow = asyncio.Event()
        self.fenced: list[dict[str, Any]] = []
        self.finished_attempts: list[int] = []
        self._tasks: set[asyncio.Future[web.Response]] = set()

    async def handle(self, request: web.Request) -> web.Response:
        # Like a threaded server (Flask, Express), the handler goes on after the gateway has
        # hung up on it; aiohttp would cancel it, so it runs in a task of its own.
        work = asyncio.ensure_future(self._work(request))
        self._tasks.add(work)
        return await asyncio.shield(work)

    async def _work(self, request: web.Request) -> web.Response:
        steps = RawSteps(request)
        attempt = steps.attempt

        async def step(name: str, seconds: float = 0.0) -> str:
            self.executed[name] += 1
            if seconds:
                self.in_slow.set()
                await asyncio.sleep(seconds)
            return f"{name}@{attempt}"

        async def run(name: str, seconds: float = 0.0) -> Any:
            recorded = (await steps.steps()).get(name)
            if recorded is not None and recorded["status"] == "completed":
                steps._seq += 1
                return recorded["output"]
            output = await step(name, seconds)
            status, answer = await steps.put(name, {"output": output})
            if status == 409 and answer.get("type") == SUPERSEDED:
                raise Fenced(answer)
            assert status in (200, 201), answer
            return answer["output"]

        try:
            a = await run("first")
            b = await run("slow", self.slow_for if attempt == 1 else 0.0)
            c = await run("third")
        except Fenced as exc:
            self.fenced.append(exc.answer)
            return web.Response(status=409)
        self.finished_attempts.append(attempt)
        return web.json_response({"first": a, "slow": b, "third": c})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/work", self.handle)
        return app


async def test_a_timed_out_attempt_is_fenced_and_runs_no_further_step(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    handler = Handler(slow_for=1.5)
    gw = await gateway(
        [
            {
                "name": "work",
                "path": "/work",
                "upstream": await upstream(handler.app()),
                "durable": True,
                "timeout": "1s",
                "hold": "10s",
                "retry": {"attempts": 3, "initial": "10ms", "max": "10ms"},
            }
        ]
    )
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
        body = await resp.json()
        run_id = resp.headers["Stepgate-Run-Id"]
    assert body == {"first": "first@1", "slow": "slow@2", "third": "third@2"}
    for _ in range(100):  # attempt 1's handler wakes from its slow step after the answer
        if handler.fenced:
            break
        await asyncio.sleep(0.05)
    # Attempt 1 finished its slow step after the gateway had given up on it: its write was
    # refused, and it never got to run `third`, which attempt 2 had recorded meanwhile.
    assert handler.executed == {"first": 1, "slow": 2, "third": 1}
    assert handler.finished_attempts == [2]
    [answer] = handler.fenced
    assert answer["status"] == 409 and answer["title"] == "Attempt superseded"
    assert answer["attempt"] == 1 and answer["current_attempt"] == 2
    assert answer["run_status"] == "completed" and answer["run_id"] == run_id
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    assert {s["id"]: s["attempts"] for s in run["steps"]} == {"first": 1, "slow": 1, "third": 1}
    assert {s["id"]: s["output"] for s in run["steps"]}["slow"] == "slow@2"
    assert [a["outcome"] for a in run["attempts"]] == ["timeout", "response"]


async def test_a_cancelled_runs_attempt_is_fenced(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    handler = Handler(slow_for=1.0)
    gw = await gateway(
        [
            {
                "name": "work",
                "path": "/work",
                "upstream": await upstream(handler.app()),
                "durable": True,
            }
        ]
    )
    async with gw.session.post(
        gw.url + "/work", headers={"Prefer": "respond-async"}, allow_redirects=False
    ) as resp:
        assert resp.status == 202
        run_id = resp.headers["Stepgate-Run-Id"]
    await asyncio.wait_for(handler.in_slow.wait(), 5)
    async with gw.session.post(f"{gw.internal}/v1/runs/{run_id}/cancel") as resp:
        assert resp.status == 200
    for _ in range(100):
        if handler.fenced:
            break
        await asyncio.sleep(0.05)
    [answer] = handler.fenced
    assert answer["type"] == SUPERSEDED and answer["run_status"] == "cancelled"
    assert handler.executed == {"first": 1, "slow": 1}
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    assert run["status"] == "cancelled"
    assert [s["id"] for s in run["steps"]] == ["first"]


async def test_tokens_are_per_attempt(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    seen: list[tuple[str, str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(
            (
                request.headers["Stepgate-Attempt"],
                request.headers["Stepgate-Token"],
                request.headers["Stepgate-Callback"],
            )
        )
        if len(seen) == 1:
            return web.Response(status=503)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway(
        [
            {
                "name": "work",
                "path": "/work",
                "upstream": await upstream(app),
                "durable": True,
                "retry": {"attempts": 2, "initial": "10ms"},
            }
        ]
    )
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
    (n1, token1, callback), (n2, token2, _) = seen
    assert (n1, n2) == ("1", "2") and token1 != token2
    url = f"{callback}/steps/x"
    forged = token2.replace("2.", "3.", 1)
    for token, status in ((token1, 409), (forged, 401), ("nonsense", 401), (token2, 409)):
        async with gw.session.put(
            url, json={"output": 1}, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == status, (token, await resp.text())
    async with gw.session.get(
        f"{callback}/steps", headers={"Authorization": f"Bearer {token1}"}
    ) as resp:
        assert resp.status == 409
        assert (await resp.json())["type"] == SUPERSEDED


async def test_fast_restart_fences_the_attempt_the_crash_left_running(
    tmp_path: Path,
    upstream: UpstreamFactory,
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    handler = Handler(slow_for=2.0)
    route = {
        "name": "work",
        "path": "/work",
        "upstream": await upstream(handler.app()),
        "durable": True,
        "retry": {"attempts": 3, "initial": "10ms"},
    }
    gw = GatewayProcess(tmp_path, [route])
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as client:
        async with client.post(
            gw.url + "/work", headers={"Prefer": "respond-async"}, allow_redirects=False
        ) as resp:
            run_id = resp.headers["Stepgate-Run-Id"]
        await asyncio.wait_for(handler.in_slow.wait(), 10)
        gw.kill()
        await asyncio.sleep(0.2)
        await gw.start()  # attempt 2 starts while attempt 1's handler is still in `slow`
        run = await wait_for_status(gw.internal, run_id, "completed")
    for _ in range(100):
        if handler.fenced:
            break
        await asyncio.sleep(0.05)
    assert handler.executed == {"first": 1, "slow": 2, "third": 1}
    assert handler.finished_attempts == [2]
    assert [a["type"] for a in handler.fenced] == [SUPERSEDED]
    assert {s["id"]: s["output"] for s in run["steps"]} == {
        "first": "first@1",
        "slow": "slow@2",
        "third": "third@2",
    }
    assert [a["outcome"] for a in run["attempts"]] == ["interrupted", "response"]


async def test_a_second_gateway_on_the_same_file_exits_2_and_leaves_the_first_alone(
    tmp_path: Path,
    upstream: UpstreamFactory,
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    handler = Handler(slow_for=1.0)
    route = {
        "name": "work",
        "path": "/work",
        "upstream": await upstream(handler.app()),
        "durable": True,
    }
    first = GatewayProcess(tmp_path, [route])
    procs.append(first)
    await first.start()
    async with aiohttp.ClientSession() as client:
        request = asyncio.ensure_future(client.post(first.url + "/work"))
        await asyncio.wait_for(handler.in_slow.wait(), 10)
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = GatewayProcess(second_dir, [route])
        config = second.config.read_text().replace(
            str(second_dir / "stepgate.db"), str(tmp_path / "stepgate.db")
        )
        second.config.write_text(config)
        done = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: subprocess.run(
                [sys.executable, "-m", "gateway", "serve", "--config", str(second.config)],
                capture_output=True,
                timeout=30,
            ),
        )
        assert done.returncode == 2, done.stderr
        assert str(tmp_path / "stepgate.db").encode() in done.stderr
        assert b"another gateway" in done.stderr and b"Traceback" not in done.stderr
        resp = await request
        assert resp.status == 200
        run_id = resp.headers["Stepgate-Run-Id"]
        resp.release()
        async with client.get(f"{first.internal}/v1/runs/{run_id}") as resp:
            run = await resp.json()
    assert run["status"] == "completed"
    assert [a["outcome"] for a in run["attempts"]] == ["response"]  # never marked crashed
    assert handler.executed == {"first": 1, "slow": 1, "third": 1}


async def test_a_superseded_attempts_writes_change_nothing_while_the_run_goes_on(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    tokens: list[tuple[str, str]] = []
    second_started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        tokens.append((request.headers["Stepgate-Callback"], request.headers["Stepgate-Token"]))
        if len(tokens) == 1:
            return web.Response(status=503)
        second_started.set()
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway(
        [
            {
                "name": "work",
                "path": "/work",
                "upstream": await upstream(app),
                "durable": True,
                "retry": {"attempts": 2, "initial": "10ms"},
            }
        ]
    )
    request = asyncio.ensure_future(gw.session.post(gw.url + "/work"))
    await asyncio.wait_for(second_started.wait(), 5)
    callback, old = tokens[0]
    run_id = callback.rsplit("/", 1)[1]
    for body in (
        {"output": "late"},
        {"wait": {"event": "e"}},
        {"sleep": {"until": (datetime.now(UTC) + timedelta(days=30)).isoformat()}},
        {"error": {"message": "late", "retriable": False}},
    ):
        async with gw.session.put(
            f"{callback}/steps/{quote('s', safe='')}",
            json=body,
            headers={"Authorization": f"Bearer {old}"},
        ) as resp:
            assert resp.status == 409, await resp.text()
            answer = await resp.json()
            assert answer["type"] == SUPERSEDED and answer["run_status"] == "running"
    assert await gw.store.steps(run_id) == []
    run = await gw.store.get_run(run_id)
    assert run.status == "running" and run.attempt == 2 and not run.no_retry
    release.set()
    resp = await request
    assert resp.status == 200 and await resp.text() == "done"
    resp.release()
