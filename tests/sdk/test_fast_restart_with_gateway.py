"""A fast restart while a handler is mid-step, through every SDK adapter and a real gateway
process.

The handler runs three steps; the second takes 2 s in attempt 1 only. While attempt 1 is inside
it, the gateway is SIGKILLed and started again 0.2 s later on the same ports and file. The new
gateway marks attempt 1 interrupted and starts attempt 2 at once, while attempt 1's handler is
still alive (the upstream servers here, like production ones, do not cancel a handler whose
client hung up). Attempt 2 replays the first step, runs the second and the third, and answers.
When attempt 1's second step returns, the gateway refuses to record it (409 superseded), so that
handler stops on the SDK's signal (stepgate.Superseded, JS SupersededError) and never runs the
third step. Every recorded output past the first step is attempt 2's.

On a loaded machine the restart can take longer than the 2 s, so the slow step also waits until
attempt 2 has started: these tests are about a handler that outlives the crash, not one that
calls back while no gateway listens.

The same through aiohttp, ASGI (served by the aiohttp bridge of test_fencing_with_gateway),
WSGI with stepgate.sync on a threaded wsgiref server, and the JS client's wrapNodeHandler in a
node process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import aiohttp
import pytest
import stepgate.aiohttp
import stepgate.asgi
import stepgate.wsgi
from aiohttp import web
from stepgate import Superseded, step
from stepgate.sync import step as sync_step

from tests.gateway.procs import GatewayProcess
from tests.gateway.test_crash import procs, wait_for_status  # noqa: F401 - a fixture
from tests.sdk.test_fencing_with_gateway import _asgi_bridge, _QuietHandler, _ThreadingWSGIServer
from tests.test_js_client import JS, node_major

SLOW = 2.0  # the second step, in attempt 1 only
PATIENCE = 15.0  # how long attempt 1's slow step waits at most for attempt 2 to start
STEPS = ("first", "second", "third")
ROUTE = {
    "name": "book",
    "path": "/book",
    "durable": True,
    "hold": "10s",
    "retry": {"attempts": 3, "initial": "10ms", "max": "10ms"},
}

State = Callable[[], Awaitable[dict[str, Any]]]


class Trip:
    """Three counted steps, and how each attempt's handler ended: "answered", "superseded", or
    "caught <error>" if an ordinary `except Exception` saw something."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()
        self.in_slow_step = False
        self.ended: dict[int, str] = {}
        self.attempt_1_alive_when_2_started: bool | None = None
        self.attempt_2_started = threading.Event()
        self._lock = threading.Lock()

    def _begin(self, attempt: int) -> None:
        if attempt == 2:
            self.attempt_1_alive_when_2_started = 1 not in self.ended
            self.attempt_2_started.set()

    def _count(self, name: str, attempt: int) -> bool:
        """Count a run of step `name`; True if this one is the slow one."""
        with self._lock:
            self.ran[name] += 1
            slow = name == "second" and attempt == 1
            if slow:
                self.in_slow_step = True
            return slow

    async def _work_async(self, name: str, attempt: int) -> str:
        if self._count(name, attempt):
            await asyncio.sleep(SLOW)
            await asyncio.to_thread(self.attempt_2_started.wait, PATIENCE)
        return f"{name} by attempt {attempt}"

    def _work_sync(self, name: str, attempt: int) -> str:
        if self._count(name, attempt):
            time.sleep(SLOW)
            self.attempt_2_started.wait(PATIENCE)
        return f"{name} by attempt {attempt}"

    async def book(self, attempt: int) -> dict[str, str]:
        self._begin(attempt)
        outputs: dict[str, str] = {}
        try:
            for name in STEPS:
                outputs[name] = await step.run(name, self._work_async, name, attempt)
            self.ended[attempt] = "answered"
        except Exception as exc:
            self.ended[attempt] = f"caught {exc!r}"
        except Superseded:
            self.ended[attempt] = "superseded"
            raise
        return outputs

    def book_sync(self, attempt: int) -> dict[str, str]:
        self._begin(attempt)
        outputs: dict[str, str] = {}
        try:
            for name in STEPS:
                outputs[name] = sync_step.run(name, self._work_sync, name, attempt)
            self.ended[attempt] = "answered"
        except Exception as exc:
            self.ended[attempt] = f"caught {exc!r}"
        except Superseded:
            self.ended[attempt] = "superseded"
            raise
        return outputs

    async def state(self) -> dict[str, Any]:
        return {
            "ran": dict(self.ran),
            "in_slow_step": self.in_slow_step,
            "ended": {str(n): how for n, how in self.ended.items()},
            "attempt_1_alive_when_2_started": self.attempt_1_alive_when_2_started,
        }


async def _until(
    state: State, ready: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        now = await state()
        if ready(now):
            return now
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.02)


async def _restart_mid_step(
    tmp_path: Path,
    upstream: str,
    state: State,
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    gw = GatewayProcess(tmp_path, [{**ROUTE, "upstream": upstream}])
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as client:
        async with client.post(
            gw.url + "/book", json={}, allow_redirects=False, headers={"Prefer": "respond-async"}
        ) as resp:
            assert resp.status == 202, await resp.text()
            run_id = resp.headers["Stepgate-Run-Id"]
            location = resp.headers["Location"]
        await _until(state, lambda s: s["in_slow_step"], 10)
        killed = time.monotonic()
        gw.kill()
        await asyncio.sleep(0.2)
        await gw.start()  # attempt 2 starts while attempt 1's handler is still in "second"
        restarted = time.monotonic() - killed
        run = await wait_for_status(gw.internal, run_id, "completed")
        async with client.get(gw.url + location) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
    # Attempt 1's handler wakes from its slow step after attempt 2 began; it must stop there.
    final = await _until(state, lambda s: "1" in s["ended"], SLOW + PATIENCE)
    assert final["attempt_1_alive_when_2_started"] is True, (restarted, final)
    assert final["ended"] == {"1": "superseded", "2": "answered"}, gw.log.read_text()[-3000:]
    assert final["ran"] == {"first": 1, "second": 2, "third": 1}
    assert [a["outcome"] for a in run["attempts"]] == ["interrupted", "response"]
    assert {s["id"]: s["output"] for s in run["steps"]} == {
        "first": "first by attempt 1",
        "second": "second by attempt 2",
        "third": "third by attempt 2",
    }
    assert [s["attempts"] for s in run["steps"]] == [1, 1, 1]
    assert answer == {
        "first": "first by attempt 1",
        "second": "second by attempt 2",
        "third": "third by attempt 2",
    }


def _attempt(headers: Any) -> int:
    return int(headers.get("Stepgate-Attempt", "0"))


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """As web.run_app serves: a handler whose client went away is not cancelled."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_aiohttp_fast_restart_mid_step(
    tmp_path: Path,
    upstream: Callable[[web.Application], Awaitable[str]],
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    trip = Trip()

    async def book(request: web.Request) -> web.Response:
        return web.json_response(await trip.book(_attempt(request.headers)))

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post("/book", book)
    await _restart_mid_step(tmp_path, await upstream(app), trip.state, procs)


async def test_asgi_fast_restart_mid_step(
    tmp_path: Path,
    upstream: Callable[[web.Application], Awaitable[str]],
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    trip = Trip()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = json.dumps(await trip.book(int(headers.get("stepgate-attempt", "0")))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    url = await upstream(_asgi_bridge(stepgate.asgi.StepgateMiddleware(app)))
    await _restart_mid_step(tmp_path, url, trip.state, procs)


@pytest.fixture
def wsgi_upstream() -> Iterable[Callable[[Any], str]]:
    servers: list[tuple[WSGIServer, threading.Thread]] = []

    def start(app: Any) -> str:
        server = make_server(
            "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), daemon=True, name="wsgi-upstream"
        )
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_wsgi_sync_fast_restart_mid_step(
    tmp_path: Path,
    wsgi_upstream: Callable[[Any], str],
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    trip = Trip()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = json.dumps(trip.book_sync(int(environ.get("HTTP_STEPGATE_ATTEMPT", "0"))))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    url = wsgi_upstream(stepgate.wsgi.StepgateMiddleware(app))
    await _restart_mid_step(tmp_path, url, trip.state, procs)


# --- the JS client, in a node process -------------------------------------------------------

# The app serves the handler on one port and what it went through on another (GET /), and
# prints both ports as one JSON line. node:http, like Express, lets a handler run on after the
# gateway hung up on it.
NODE_APP = """
import { createServer } from 'node:http';
import { isSuperseded, step, wrapNodeHandler } from %(client)s;

const ran = { first: 0, second: 0, third: 0 };
const ended = {};
const state = { ran, in_slow_step: false, ended, attempt_1_alive_when_2_started: null };
let attempt2Started;
const attempt2 = new Promise((resolve) => { attempt2Started = resolve; });

const app = createServer(wrapNodeHandler(async (req, res) => {
  const attempt = Number(req.headers['stepgate-attempt']);
  if (attempt === 2) {
    state.attempt_1_alive_when_2_started = !('1' in ended);
    attempt2Started();
  }
  const outputs = {};
  try {
    for (const name of ['first', 'second', 'third']) {
      outputs[name] = await step.run(name, async () => {
        ran[name] += 1;
        if (name === 'second' && attempt === 1) {
          state.in_slow_step = true;
          await new Promise((resolve) => setTimeout(resolve, %(slow_ms)d));
          const patience = new Promise((resolve) => setTimeout(resolve, %(patience_ms)d));
          await Promise.race([attempt2, patience]);
        }
        return `${name} by attempt ${attempt}`;
      });
    }
    ended[attempt] = 'answered';
  } catch (err) {
    if (err instanceof Error) {   // an ordinary error filter must not see the signal
      ended[attempt] = `caught ${err.name}: ${err.message}`;
    } else {
      ended[attempt] = isSuperseded(err) ? 'superseded' : 'other signal';
      throw err;
    }
  }
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify(outputs));
}, { onError: () => {} }));

const probe = createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify(state));
});

const listen = (server) => new Promise((resolve) => {
  server.listen(0, '127.0.0.1', () => resolve(server.address().port));
});
const ports = { app: await listen(app), probe: await listen(probe) };
process.stdout.write(JSON.stringify(ports) + '\\n');
"""


NodeUpstream = Callable[[], Awaitable[tuple[str, State]]]


@pytest.fixture
async def node_upstream(tmp_path: Path) -> AsyncIterator[NodeUpstream]:
    major = node_major()
    if major is None or major < 18:
        pytest.skip("Node.js >= 18 is needed for the JavaScript client")
    node = shutil.which("node")
    assert node is not None
    children: list[subprocess.Popen[bytes]] = []
    session = aiohttp.ClientSession()

    async def start() -> tuple[str, State]:
        script = tmp_path / "fast_restart_app.mjs"
        client = (JS / "src" / "index.js").as_uri()
        script.write_text(
            NODE_APP
            % {"client": json.dumps(client), "slow_ms": SLOW * 1000, "patience_ms": PATIENCE * 1000}
        )
        errors = (tmp_path / "node.err").open("wb")
        child = subprocess.Popen([node, str(script)], stdout=subprocess.PIPE, stderr=errors)
        errors.close()
        children.append(child)
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 15)
        assert line, (tmp_path / "node.err").read_text()
        ports = json.loads(line)

        async def state() -> dict[str, Any]:
            assert child.poll() is None, (tmp_path / "node.err").read_text()
            async with session.get(f"http://127.0.0.1:{ports['probe']}/") as resp:
                return dict(await resp.json())

        return f"http://127.0.0.1:{ports['app']}", state

    yield start
    await session.close()
    for child in children:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


async def test_js_fast_restart_mid_step(
    tmp_path: Path,
    node_upstream: NodeUpstream,
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    url, state = await node_upstream()
    await _restart_mid_step(tmp_path, url, state, procs)
