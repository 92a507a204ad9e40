"""Memory of parked runs: park N runs in a durable sleep and read the gateway's RSS.

    python bench/parked.py [--runs 10000] [--sleep 3600]

The gateway runs as its own process in front of an upstream in this process whose handler
records one sleep step through the raw callback protocol and suspends. Every run is accepted
with `Prefer: respond-async`, in two batches; after each the gateway's RSS is read from
/proc. Parked runs live in the store, not in memory: only timers due
within the scheduler's horizon (60 s) are held, so a long sleep should cost next to nothing.
Everything talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def main(runs: int, sleep: float, concurrency: int, settle: float) -> None:
    callbacks = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

    async def handler(request: web.Request) -> web.Response:
        until = (datetime.now(UTC) + timedelta(seconds=sleep)).isoformat()
        async with callbacks.put(
            request.headers["Stepgate-Callback"] + "/steps/nap",
            json={"sleep": {"until": until}, "seq": 0},
            headers={"Authorization": "Bearer " + request.headers["Stepgate-Token"]},
        ) as resp:
            assert resp.status == 200, await resp.text()
        return web.Response(status=202, headers={"Stepgate-Suspend": "true"})

    app = web.Application()
    app.router.add_post("/nap", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up_port, public, internal = free_port(), free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()

    with tempfile.TemporaryDirectory(prefix="stepgate-parked-") as tmp:
        config = Path(tmp) / "stepgate.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{public}",
                    "internal_listen": f"127.0.0.1:{internal}",
                    "store": f"sqlite:///{tmp}/stepgate.db",
                    "log_level": "warning",
                    "routes": [
                        {
                            "name": "nap",
                            "path": "/nap",
                            "upstream": f"http://127.0.0.1:{up_port}",
                            "durable": True,
                        }
                    ],
                }
            )
        )
        gateway = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        )
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(200):
                    try:
                        async with client.get(f"http://127.0.0.1:{internal}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                before = rss_mb(gateway.pid)
                started = time.monotonic()
                gate = asyncio.Semaphore(concurrency)

                async def one() -> None:
                    async with (
                        gate,
                        client.post(
                            f"http://127.0.0.1:{public}/nap", headers={"Prefer": "respond-async"}
                        ) as resp,
                    ):
                        assert resp.status == 202, resp.status

                async def parked_now() -> int:
                    async with client.get(f"http://127.0.0.1:{internal}/metrics") as r:
                        for line in (await r.text()).splitlines():
                            if line.startswith('stepgate_runs{state="sleeping"}'):
                                return int(float(line.split()[-1]))
                    return 0

                # Two batches: the first shows what parking costs including the process's
                # high-water mark; the second shows whether parked runs keep costing memory.
                rss = [before]
                for batch in (1, 2):
                    await asyncio.gather(*(one() for _ in range(runs)))
                    deadline = time.monotonic() + 600
                    while await parked_now() < batch * runs and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(settle)
                    rss.append(rss_mb(gateway.pid))
                took = time.monotonic() - started
                parked = await parked_now()
        finally:
            gateway.terminate()
            gateway.wait(30)
    await callbacks.close()
    await runner.cleanup()
    print(
        f"parked runs: {parked:,} ({2 * runs:,} asked) in {took:.1f} s, each sleeping {sleep:.0f} s"
    )
    print(
        f"gateway RSS: {rss[0]:.1f} MB at start, {rss[1]:.1f} MB with {runs:,} parked, "
        f"{rss[2]:.1f} MB with {2 * runs:,} parked"
    )
    per_run = (rss[2] - rss[1]) * 1024 * 1024 / runs
    print(
        f"the second {runs:,} parked runs cost {rss[2] - rss[1]:+.1f} MB "
        f"({per_run:,.0f} bytes a run)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--sleep", type=float, default=3600.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.sleep, args.concurrency, args.settle))
