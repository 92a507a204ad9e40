"""The small aiohttp upstream every benchmark scenario talks to.

One plain aiohttp app so that "upstream directly", nginx and Stepgate all hit the
same server:

    GET|POST /plain       small JSON, the pass-through reference
    POST     /steps/{n}   durable handler: n `step.run` calls through the Stepgate SDK
    POST     /raw/{n}     the same handler speaking the step protocol itself (PUT per step)
                          over aiohttp's client
    POST     /min/{n}     /raw/{n} over a minimal keep-alive HTTP/1.1 client (MinClient)
    POST     /gate        held while the gate is closed (growth scenario: unfinished runs)
    POST     /hold/{n}    /raw/{n} with a ledger; while held, step s1 blocks (take-over scenario)

and a control surface for the harness under /_bench/ (health, gate, stats).

Run: python bench/upstream.py --port 9000 [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from aiohttp import web

PLAIN_BODY = json.dumps({"ok": True, "service": "bench-upstream"}).encode()
JSON = "application/json"


@dataclass(slots=True)
class GateState:
    """The /gate endpoint holds requests while closed and counts runs once open."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0  # requests waiting right now
    runs_since_open: set[str] = field(default_factory=set)
    first_since_open: float | None = None  # time.time() of the first open-gate request
    last_since_open: float | None = None


@dataclass(slots=True)
class HoldLedger:
    """/hold/{n}: every invocation, every step execution and every acknowledged step write,
    with their times (time.time(), comparable across the upstreams of one machine)."""

    holding: bool = False  # while on, step s1 blocks after s0 was acknowledged
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set: blocked ones go on
    blocked: int = 0  # handlers blocked in s1 right now
    invoked: dict[str, list[float]] = field(default_factory=dict)  # run id -> invocation times
    executed: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # run -> step ->
    acked: dict[str, dict[str, float]] = field(default_factory=dict)  # run -> step -> ack time


GATE = web.AppKey("gate", GateState)
HOLD = web.AppKey("hold", HoldLedger)
CALLBACK_SESSION = web.AppKey("callback_session", aiohttp.ClientSession)


def problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


async def bump(i: int) -> int:
    """The trivially cheap step: what we measure is the checkpoint, not the work."""
    return i + 1


def steps_of(request: web.Request) -> int:
    try:
        n = int(request.match_info["n"])
    except ValueError as exc:
        raise web.HTTPBadRequest(text="n must be an integer") from exc
    if not 0 <= n <= 1000:
        raise web.HTTPBadRequest(text="n must be within 0..1000")
    return n


async def plain(request: web.Request) -> web.Response:
    if request.can_read_body:
        await request.read()
    return web.Response(body=PLAIN_BODY, content_type=JSON)


# --- /raw/{n} and /min/{n}: the step protocol spoken by hand --------------------------

# One callback round trip: (method, url, token, JSON body or None) -> (status, body).
Call = Callable[[str, str, str, bytes | None], Awaitable[tuple[int, bytes]]]


def aiohttp_call(session: aiohttp.ClientSession) -> Call:
    """Callbacks through aiohttp's client (one keep-alive session): /raw and /hold."""

    async def call(method: str, url: str, token: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = JSON
        async with session.request(method, url, data=body, headers=headers) as resp:
            return resp.status, await resp.read()

    return call


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class MinClient:
    """The least HTTP/1.1 client that speaks to the gateway's callback listener: one prebuilt
    write per request, the status line and headers read up to the blank line, a body of
    Content-Length bytes (the listener answers every callback with one, never chunked), and
    idle keep-alive connections kept by host:port. One per event loop (per upstream app)."""

    def __init__(self) -> None:
        self.idle: dict[str, list[Connection]] = {}

    async def __call__(
        self, method: str, url: str, token: str, body: bytes | None
    ) -> tuple[int, bytes]:
        netloc, _, path = url.removeprefix("http://").partition("/")
        data = (
            f"{method} /{path} HTTP/1.1\r\nHost: {netloc}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {JSON}\r\nContent-Length: {len(body or b'')}\r\n\r\n"
        ).encode() + (body or b"")
        idle = self.idle.setdefault(netloc, [])
        while idle:  # a kept-alive connection the gateway closed meanwhile fails: next one
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                return await self.exchange(netloc, idle.pop(), data)
        host, _, port = netloc.rpartition(":")
        return await self.exchange(netloc, await asyncio.open_connection(host, int(port)), data)

    async def exchange(self, netloc: str, conn: Connection, data: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(data)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            length, keep = 0, True
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    keep = value.strip() != b"close"
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep:
            self.idle[netloc].append(conn)
        else:
            writer.close()
        return int(head[9:12]), body

    def close(self) -> None:
        for conns in self.idle.values():
            for _, writer in conns:
                writer.close()
        self.idle.clear()


MIN_CLIENT = web.AppKey("min_client", MinClient)


async def recorded_outputs(
    request: web.Request, call: Call, callback: str, token: str
) -> dict[str, Any] | web.Response:
    """The outputs of the run's completed steps (none asked for on a first attempt), or the
    problem to answer when the gateway would not list them."""
    if int(request.headers.get("Stepgate-Steps", "0")) == 0:
        return {}
    status, body = await call("GET", f"{callback}/steps", token, None)
    if status != 200:
        return problem(502, "Step list failed", f"GET steps answered {status}")
    listing = json.loads(body)
    return {s["id"]: s["output"] for s in listing["steps"] if s["status"] == "completed"}


async def protocol_steps(request: web.Request, call: Call) -> web.Response:
    """n steps by the raw protocol: the list of recorded ones when Stepgate-Steps > 0, then
    one PUT {"output", "seq"} per step not yet recorded."""
    n = steps_of(request)
    await request.read()
    callback = request.headers.get("Stepgate-Callback")
    token = request.headers.get("Stepgate-Token")
    if not (callback and token):
        # Called directly, not through the gateway: steps simply run.
        total = 0
        for i in range(n):
            total += await bump(i)
        return web.json_response({"steps": n, "total": total})

    recorded = await recorded_outputs(request, call, callback, token)
    if isinstance(recorded, web.Response):
        return recorded

    total = 0
    for i in range(n):
        step_id = f"s{i}"
        if step_id in recorded:
            total += int(recorded[step_id])
            continue
        output = await bump(i)
        body = json.dumps({"output": output, "seq": i}).encode()
        status, answer = await call("PUT", f"{callback}/steps/{step_id}", token, body)
        if status not in (200, 201):
            return problem(502, "Checkpoint failed", f"PUT {step_id} answered {status}")
        total += int(json.loads(answer)["output"])
    return web.json_response({"steps": n, "total": total})


async def raw_steps(request: web.Request) -> web.Response:
    return await protocol_steps(request, aiohttp_call(request.app[CALLBACK_SESSION]))


async def min_steps(request: web.Request) -> web.Response:
    return await protocol_steps(request, request.app[MIN_CLIENT])


async def hold_steps(request: web.Request) -> web.Response:
    """The raw step protocol as /raw/{n}, recorded in the ledger; only through the gateway."""
    n = steps_of(request)
    await request.read()
    ledger = request.app[HOLD]
    run_id = request.headers.get("Stepgate-Run-Id", "")
    callback = request.headers.get("Stepgate-Callback")
    token = request.headers.get("Stepgate-Token")
    if not (callback and token and run_id):
        return problem(400, "Not through a gateway", "/hold needs the Stepgate-* headers")
    ledger.invoked.setdefault(run_id, []).append(time.time())
    call = aiohttp_call(request.app[CALLBACK_SESSION])
    recorded = await recorded_outputs(request, call, callback, token)
    if isinstance(recorded, web.Response):
        return recorded
    total = 0
    for i in range(n):
        step_id = f"s{i}"
        if step_id in recorded:
            total += int(recorded[step_id])
            continue
        ledger.executed.setdefault(run_id, {}).setdefault(step_id, []).append(time.time())
        output = await bump(i)
        if i == 1 and ledger.holding:
            # Mid-step: s0 is acknowledged, s1 has started and does not return.
            ledger.blocked += 1
            try:
                await ledger.released.wait()
            finally:
                ledger.blocked -= 1
            return problem(503, "Released", "the hold was released before the step ended")
        body = json.dumps({"output": output, "seq": i}).encode()
        status, answer = await call("PUT", f"{callback}/steps/{step_id}", token, body)
        if status not in (200, 201):
            return problem(502, "Checkpoint failed", f"PUT {step_id} answered {status}")
        ledger.acked.setdefault(run_id, {}).setdefault(step_id, time.time())
        total += int(json.loads(answer)["output"])
    return web.json_response({"steps": n, "total": total})


async def callback_session_ctx(app: web.Application) -> AsyncIterator[None]:
    # One keep-alive pool for all callbacks; limit 0 so 32 connections never queue.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[CALLBACK_SESSION] = session
        app[MIN_CLIENT] = MinClient()
        yield
        app[MIN_CLIENT].close()


# --- /steps/{n}: the same handler through the SDK -----------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sdk_app() -> web.Application:
    """A sub-app so that only /steps/* goes through the SDK middleware.

    The SDK is imported at run time: the harness must start (and skip these
    scenarios with a clear reason) on a tree where the SDK is not written yet.
    """
    try:
        stepgate = importlib.import_module("stepgate")
        adapter = importlib.import_module("stepgate.aiohttp")
        step = stepgate.step
        middleware = cast(Any, adapter.middleware)
    except (ImportError, AttributeError) as exc:
        reason = f"stepgate SDK not importable: {exc!r}"
        print(f"bench-upstream: {reason}; /steps/* answers 503", file=sys.stderr)

        async def unavailable(request: web.Request) -> web.Response:
            return problem(503, "Stepgate SDK unavailable", reason)

        sub = web.Application()
        sub.router.add_route("*", "/{n}", unavailable)
        return sub

    async def sdk_steps(request: web.Request) -> web.Response:
        n = steps_of(request)
        await request.read()
        total = 0
        for i in range(n):
            total += int(await step.run(f"s{i}", bump, i))
        return web.json_response({"steps": n, "total": total})

    sub = web.Application(middlewares=[middleware])
    sub.router.add_post("/{n}", sdk_steps)
    return sub


# --- /gate and the control surface --------------------------------------------------


async def gate(request: web.Request) -> web.Response:
    state = request.app[GATE]
    await request.read()
    if state.opened.is_set():
        now = time.time()
        state.runs_since_open.add(request.headers.get("Stepgate-Run-Id", f"direct-{now}"))
        state.first_since_open = state.first_since_open or now
        state.last_since_open = now
    else:
        state.held += 1
        try:
            await state.opened.wait()
        finally:
            state.held -= 1
    return web.Response(body=PLAIN_BODY, content_type=JSON)


async def control_gate(request: web.Request) -> web.Response:
    state = request.app[GATE]
    if request.query.get("open") == "1":
        state.runs_since_open.clear()
        state.first_since_open = state.last_since_open = None
        state.opened.set()
    else:
        state.opened.clear()
    return web.json_response({"open": state.opened.is_set()})


async def stats(request: web.Request) -> web.Response:
    state = request.app[GATE]
    return web.json_response(
        {
            "gate_open": state.opened.is_set(),
            "gate_held": state.held,
            "gate_runs_since_open": len(state.runs_since_open),
            "gate_first_since_open": state.first_since_open,
            "gate_last_since_open": state.last_since_open,
        }
    )


async def control_hold(request: web.Request) -> web.Response:
    """POST ?on=1: s1 of /hold blocks from now on; ?on=0: it does not, and blocked ones end."""
    ledger = request.app[HOLD]
    ledger.holding = request.query.get("on") == "1"
    if ledger.holding:
        ledger.released.clear()
    else:
        ledger.released.set()
    return web.json_response({"holding": ledger.holding})


async def hold_stats(request: web.Request) -> web.Response:
    ledger = request.app[HOLD]
    if request.query.get("full") != "1":
        return web.json_response(
            {"holding": ledger.holding, "blocked": ledger.blocked, "invoked": len(ledger.invoked)}
        )
    return web.json_response(
        {
            "holding": ledger.holding,
            "blocked": ledger.blocked,
            "invoked": ledger.invoked,
            "executed": ledger.executed,
            "acked": ledger.acked,
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def gate_ctx(app: web.Application) -> AsyncIterator[None]:
    # The Event must be created inside the running loop.
    app[GATE] = GateState()
    app[GATE].opened.set()
    app[HOLD] = HoldLedger()
    yield
    app[GATE].opened.set()  # release held requests so shutdown is quick
    app[HOLD].released.set()


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(gate_ctx)
    app.cleanup_ctx.append(callback_session_ctx)
    app.router.add_get("/plain", plain)
    app.router.add_post("/plain", plain)
    app.router.add_post("/raw/{n}", raw_steps)
    app.router.add_post("/min/{n}", min_steps)
    app.router.add_post("/gate", gate)
    app.router.add_post("/hold/{n}", hold_steps)
    app.router.add_post("/_bench/hold", control_hold)
    app.router.add_get("/_bench/hold", hold_stats)
    app.router.add_get("/_bench/health", health)
    app.router.add_post("/_bench/gate", control_gate)
    app.router.add_get("/_bench/stats", stats)
    app.add_subapp("/steps", sdk_app())
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    # A deep backlog: the growth scenario opens thousands of connections at once.
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench-upstream: listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    args = parser.parse_args(argv)
    coro = serve(args.host, args.port)
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.run(coro)
            return 0
    asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
