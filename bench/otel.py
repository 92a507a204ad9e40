"""What `otel` costs: durable runs of three steps each through a real gateway, with tracing off
and on, in one run, as ratios.

    python bench/otel.py [--requests 1000] [--concurrency 8] [--rounds 3]

The upstream records three steps through the callback API and answers; the gateway runs in
this process, its spans go over OTLP/HTTP to a receiver in another process, which decodes and
counts them (and is asked at the end that every run's five spans arrived). Rounds alternate
(off, on, off, on, ...) and the best round of each counts, so drift on a shared machine hits
both alike. Everything talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from gateway.config import parse_settings
from gateway.logging import configure as configure_logging

STEPS = ("reserve", "charge", "notify")

# The collector: OTLP/HTTP on a free port, which it prints; GET /count says how many spans came.
RECEIVER = """
import asyncio, sys
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

spans = 0

async def traces(request):
    global spans
    export = ExportTraceServiceRequest()
    export.ParseFromString(await request.read())
    spans += sum(len(s.spans) for r in export.resource_spans for s in r.scope_spans)
    return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                        content_type="application/x-protobuf")

async def count(request):
    return web.Response(text=str(spans))

async def main():
    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def stepping_upstream() -> tuple[web.AppRunner, str]:
    session: aiohttp.ClientSession | None = None

    async def handler(request: web.Request) -> web.Response:
        nonlocal session
        session = session or aiohttp.ClientSession()
        callback = request.headers["Stepgate-Callback"]
        auth = {"Authorization": f"Bearer {request.headers['Stepgate-Token']}"}
        for seq, name in enumerate(STEPS):
            body = {"output": {"done": name}, "seq": seq}
            async with session.put(f"{callback}/steps/{name}", json=body, headers=auth) as resp:
                assert resp.status == 201, await resp.text()
        return web.json_response({"ok": True})

    async def close(app: web.Application) -> None:
        if session is not None:
            await session.close()

    app = web.Application()
    app.router.add_post("/work", handler)
    app.on_cleanup.append(close)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def one_round(
    folder: Path, upstream: str, collector: str | None, *, requests: int, concurrency: int
) -> float:
    """Durable requests a second, `concurrency` clients at a time."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "internal_listen": "127.0.0.1:0",
        "store": f"sqlite:///{folder / ('otel-' + secrets.token_hex(4) + '.db')}",
        "routes": [{"name": "work", "path": "/work", "upstream": upstream, "durable": True}],
    }
    if collector is not None:
        data["otel"] = {"endpoint": collector}
    gateway = Gateway(parse_settings(data, source="bench"))
    await gateway.start()
    url = f"http://127.0.0.1:{gateway.public_port}/work"
    left = requests
    try:
        async with aiohttp.ClientSession() as session:

            async def client() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    async with session.post(url, data=b'{"order": 1}') as resp:
                        assert resp.status == 200, resp.status
                        await resp.read()

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return requests / (time.perf_counter() - started)
    finally:
        await gateway.stop()  # sends the spans still in the batch


async def measure(args: argparse.Namespace, collector: str) -> tuple[dict[bool, list[float]], int]:
    """Runs a second in each round, off and on; and the spans the receiver counted."""
    runner, upstream = await stepping_upstream()
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        with tempfile.TemporaryDirectory(prefix="stepgate-bench-otel-") as tmp:
            for _ in range(args.rounds):
                for traced in (False, True):
                    rate = await one_round(
                        Path(tmp),
                        upstream,
                        collector if traced else None,
                        requests=args.requests,
                        concurrency=args.concurrency,
                    )
                    rates[traced].append(rate)
                    print(f"otel {'on ' if traced else 'off'}: {rate:,.0f} runs/s", flush=True)
    finally:
        await runner.cleanup()
    async with aiohttp.ClientSession() as session, session.get(collector + "/count") as resp:
        return rates, int(await resp.text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning", "json")
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        collector = f"http://127.0.0.1:{receiver.stdout.readline().strip()}"
        rates, spans = asyncio.run(measure(args, collector))
    finally:
        receiver.terminate()
        receiver.wait(10)
    expected = args.rounds * args.requests * (2 + len(STEPS))
    off, on = rates[False], rates[True]
    print(
        "| durable runs of 3 steps, "
        f"{args.concurrency} clients | otel off | otel on | ratio (best) | ratio (median) |\n"
        "|---|---|---|---|---|\n"
        f"| runs/s | {max(off):,.0f} | {max(on):,.0f} | {max(on) / max(off):.2f}x | "
        f"{statistics.median(on) / statistics.median(off):.2f}x |\n"
        f"spans received: {spans:,} of {expected:,}"
    )


if __name__ == "__main__":
    main()
