"""Flow control's costs (issue 12), side by side in one run against one gateway:

1. the added latency of a request that finds a free slot: the same durable route with and
   without `concurrency` (a limit never reached), requests sent one at a time, alternating, so
   both see the same machine; p50 and p90 of each and their difference;
2. queued throughput: `concurrency: 8` in front of an upstream that takes `--work` per call,
   driven by `--clients` clients for `--seconds`: the most calls the upstream held at once, and
   how busy its 8 slots were (the time-integral of calls in flight over 8 x the time).

    python bench/flow.py [--requests 2000] [--clients 32] [--seconds 10] [--work 0.05]
                         [--durability full|relaxed]

The gateway runs as its own process (SQLite store, `durability: full` unless told), the
upstream and the clients in this one. Everything talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Slow:
    """The upstream of the queued scenario: how many calls it holds, integrated over time."""

    def __init__(self, work: float) -> None:
        self.work = work
        self.inflight = 0
        self.most = 0
        self.area = 0.0  # calls in flight x seconds
        self.first: float | None = None
        self.last = 0.0
        self._since = 0.0

    def _move(self, by: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        else:
            self.area += self.inflight * (now - self._since)
        self._since = now
        self.inflight += by
        self.most = max(self.most, self.inflight)
        self.last = now

    async def handle(self, request: web.Request) -> web.Response:
        self._move(+1)
        try:
            await asyncio.sleep(self.work)
        finally:
            self._move(-1)
        return web.Response(text="slow")


async def fast(request: web.Request) -> web.Response:
    return web.Response(text="fast")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(session: aiohttp.ClientSession, base: str, requests: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"plain": [], "slots": []}
    for _ in range(50):  # warm both paths up
        for path in times:
            async with session.post(f"{base}/{path}") as resp:
                await resp.read()
    for _ in range(requests):
        for path, seen in times.items():
            started = time.perf_counter()
            async with session.post(f"{base}/{path}") as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            seen.append((time.perf_counter() - started) * 1000)
    result: dict[str, Any] = {}
    for path, seen in times.items():
        result[path] = {"p50_ms": percentile(seen, 0.5), "p90_ms": percentile(seen, 0.9)}
    result["added_p50_ms"] = result["slots"]["p50_ms"] - result["plain"]["p50_ms"]
    result["ratio_p50"] = result["slots"]["p50_ms"] / result["plain"]["p50_ms"]
    result["median_of_differences_ms"] = statistics.median(
        b - a for a, b in zip(times["plain"], times["slots"], strict=True)
    )
    return result


async def queued(
    session: aiohttp.ClientSession, base: str, slow: Slow, clients: int, seconds: float
) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    done = 0
    statuses: dict[int, int] = {}

    async def client() -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with session.post(f"{base}/queued") as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            done += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    assert slow.first is not None
    span = slow.last - slow.first
    return {
        "runs": done,
        "statuses": statuses,
        "upstream_most_in_flight": slow.most,
        "slots_busy": slow.area / (8 * span) if span else 0.0,
        "runs_per_second": done / span if span else 0.0,
    }


async def main(args: argparse.Namespace) -> None:
    slow = Slow(args.work)
    app = web.Application()
    app.router.add_post("/plain", fast)
    app.router.add_post("/slots", fast)
    app.router.add_post("/queued", slow.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up_port, public, internal = free_port(), free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    upstream = f"http://127.0.0.1:{up_port}"

    def route(name: str, **flow: Any) -> dict[str, Any]:
        return {"name": name, "path": f"/{name}", "upstream": upstream, "durable": True, **flow}

    with tempfile.TemporaryDirectory(prefix="stepgate-flow-") as tmp:
        config = Path(tmp) / "stepgate.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{public}",
                    "internal_listen": f"127.0.0.1:{internal}",
                    "store": f"sqlite:///{tmp}/stepgate.db",
                    "log_level": "warning",
                    "durability": args.durability,
                    "routes": [
                        route("plain"),
                        route("slots", concurrency=1_000_000),
                        route("queued", concurrency=8, hold="60s"),
                    ],
                }
            )
        )
        gateway = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{public}"
        try:
            connector = aiohttp.TCPConnector(limit=args.clients + 4)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(200):
                    try:
                        async with session.get(f"http://127.0.0.1:{internal}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                report = {
                    "free_slot": await latency(session, base, args.requests),
                    "queued": await queued(session, base, slow, args.clients, args.seconds),
                    "work_s": args.work,
                    "durability": args.durability,
                    "clients": args.clients,
                }
        finally:
            gateway.terminate()
            gateway.wait(15)
            await runner.cleanup()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--work", type=float, default=0.05)
    parser.add_argument("--durability", choices=("full", "relaxed"), default="full")
    asyncio.run(main(parser.parse_args()))
