"""Crash loop: SIGKILL a real gateway again and again under concurrent clients, then check.

    python bench/crashloop.py [--kills 50] [--clients 8] [--out docs/reliability.md]

The gateway runs as its own process (`python -m gateway serve`) on a fresh SQLite file, in front
of an upstream in this process whose handler runs three steps through the raw callback protocol
(each takes 10 to 80 ms, one in five 1 to 2 s: longer than a restart) and keeps running when the
gateway hangs up on it, the way a threaded server does. Clients start runs with `Prefer:
respond-async` and an `Idempotency-Key`; a client whose request was cut by a kill sends it again
with the same key. A killer SIGKILLs the gateway at random moments and starts it again 0.05 to
0.3 s later, so attempts overlap with the handlers of the attempts they replace.

At the end, with the gateway stopped, it checks:
- every accepted run has ended (completed);
- no step ran again after its write had been acknowledged;
- one run per Idempotency-Key, and every client got the same run id for its key;
- `PRAGMA integrity_check` is ok.

`tests/gateway/test_crash_loop.py` runs it with 10 kills as part of the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml
from aiohttp import web

STEPS = ("reserve", "charge", "notify")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Report:
    kills: int
    clients: int
    accepted: int = 0  # distinct keys the gateway answered 202 for
    resent: int = 0  # requests sent again with the same key after a kill
    runs_in_store: int = 0
    completed: int = 0
    step_executions: int = 0
    attempts: Counter[int] = field(default_factory=Counter)  # runs by attempts used
    fenced_writes: int = 0  # step writes refused as superseded
    repeated_after_ack: list[str] = field(default_factory=list)
    key_mismatches: list[str] = field(default_factory=list)
    unended: list[str] = field(default_factory=list)
    integrity: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.repeated_after_ack
            and not self.key_mismatches
            and not self.unended
            and self.integrity == "ok"
            and self.runs_in_store == self.accepted
            and self.completed == self.accepted
        )

    def problems(self) -> list[str]:
        found = []
        if self.repeated_after_ack:
            found.append(
                f"steps run again after their write was acknowledged: {self.repeated_after_ack[:5]}"
            )
        if self.key_mismatches:
            found.append(f"keys answered with two run ids: {self.key_mismatches[:5]}")
        if self.unended:
            found.append(f"runs that never ended: {self.unended[:5]}")
        if self.integrity != "ok":
            found.append(f"integrity_check: {self.integrity}")
        if self.runs_in_store != self.accepted:
            found.append(f"{self.runs_in_store} runs stored for {self.accepted} keys")
        if self.completed != self.accepted:
            found.append(f"{self.completed} of {self.accepted} runs completed")
        return found


class Upstream:
    """Three steps per run; counts every execution and every acknowledged write."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.acked: set[tuple[str, str]] = set()
        self.rng = random.Random(7)
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[web.Response]] = set()

    async def handle(self, request: web.Request) -> web.Response:
        # The handler outlives a gateway that hangs up on it, like a threaded server's would.
        task = asyncio.ensure_future(self._work(request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return await asyncio.shield(task)

    async def _work(self, request: web.Request) -> web.Response:
        assert self.session is not None
        run_id = request.headers["Stepgate-Run-Id"]
        callback = request.headers["Stepgate-Callback"]
        auth = {"Authorization": f"Bearer {request.headers['Stepgate-Token']}"}
        recorded: dict[str, Any] = {}
        try:
            if request.headers.get("Stepgate-Steps", "0") != "0":
                async with self.session.get(f"{callback}/steps", headers=auth) as resp:
                    if resp.status != 200:
                        return web.Response(status=resp.status)
                    recorded = {s["id"]: s for s in (await resp.json())["steps"]}
            outputs = []
            for seq, name in enumerate(STEPS):
                done = recorded.get(name)
                if done is not None and done["status"] == "completed":
                    outputs.append(done["output"])
                    continue
                if (run_id, name) in self.acked:
                    self.report.repeated_after_ack.append(f"{run_id}/{name}")
                self.report.step_executions += 1
                # Now and then a step outlasts a gateway restart, so the attempt that replaces
                # this one starts while this one is still going.
                slow = self.rng.random() < 0.2
                await asyncio.sleep(
                    self.rng.uniform(1.0, 2.0) if slow else self.rng.uniform(0.01, 0.08)
                )
                async with self.session.put(
                    f"{callback}/steps/{quote(name, safe='')}",
                    headers=auth,
                    json={"output": f"{name}-done", "seq": seq},
                ) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status == 409:
                        self.report.fenced_writes += 1
                        return web.Response(status=409)
                    if resp.status not in (200, 201):
                        return web.Response(status=503)
                    self.acked.add((run_id, name))
                    outputs.append(answer["output"])
            return web.json_response({"steps": outputs})
        except (aiohttp.ClientError, OSError):
            return web.Response(status=503)  # the gateway died under us


class Gateway:
    def __init__(self, tmp: Path, upstream: str) -> None:
        self.public = free_port()
        self.internal = free_port()
        self.db = tmp / "stepgate.db"
        self.config = tmp / "stepgate.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{self.public}",
                    "internal_listen": f"127.0.0.1:{self.internal}",
                    "store": f"sqlite:///{self.db}",
                    "log_level": "warning",
                    "routes": [
                        {
                            "name": "work",
                            "path": "/work",
                            "upstream": upstream,
                            "durable": True,
                            "timeout": "5s",
                            "hold": "1s",
                            "retry": {"attempts": 100, "initial": "20ms", "max": "200ms"},
                        }
                    ],
                }
            )
        )
        self.log = tmp / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.internal}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the wait is async
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gateway exited:\n" + self.log.read_text()[-3000:])
            try:
                async with session.get(self.admin + "/readyz") as resp:
                    if resp.status == 200:
                        with socket.create_connection(("127.0.0.1", self.public), 1):
                            return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.02)
        raise RuntimeError("gateway did not start:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _client(
    gw: Gateway,
    session: aiohttp.ClientSession,
    report: Report,
    keys: dict[str, set[str]],
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        key = secrets.token_urlsafe(12)
        while True:
            try:
                async with session.post(
                    gw.url + "/work",
                    data=b'{"order": 1}',
                    headers={"Idempotency-Key": key, "Prefer": "respond-async"},
                    allow_redirects=False,
                ) as resp:
                    if resp.status in (200, 202):
                        keys.setdefault(key, set()).add(resp.headers["Stepgate-Run-Id"])
                        break
            except (aiohttp.ClientError, OSError):
                pass
            report.resent += 1
            await asyncio.sleep(0.05)  # the gateway is down: try the same key again
        await asyncio.sleep(0.02)


async def run_crash_loop(tmp: Path, *, kills: int = 10, clients: int = 8, seed: int = 1) -> Report:
    report = Report(kills=kills, clients=clients)
    started = time.monotonic()
    upstream = Upstream(report)
    app = web.Application()
    app.router.add_post("/work", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rng = random.Random(seed)
    keys: dict[str, set[str]] = {}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        upstream.session = session
        gw = Gateway(tmp, f"http://127.0.0.1:{port}")
        await gw.start(session)
        stop = asyncio.Event()
        workers = [
            asyncio.ensure_future(_client(gw, session, report, keys, stop)) for _ in range(clients)
        ]
        try:
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                gw.kill()
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                await gw.start(session)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 30)
            await _wait_all_ended(gw, session, report, deadline=time.monotonic() + 60)
        finally:
            stop.set()
            for worker in workers:
                worker.cancel()
            gw.stop()
        await asyncio.gather(*upstream.tasks, return_exceptions=True)
    await runner.cleanup()
    report.accepted = len(keys)
    report.key_mismatches = [key for key, ids in keys.items() if len(ids) != 1]
    with sqlite3.connect(gw.db) as conn:
        report.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        report.runs_in_store = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        report.completed = conn.execute(
            "SELECT count(*) FROM runs WHERE status = 'completed'"
        ).fetchone()[0]
        report.unended = [r for (r,) in conn.execute("SELECT id FROM runs WHERE ended_at IS NULL")]
        report.attempts = Counter(n for (n,) in conn.execute("SELECT attempt FROM runs"))
        distinct = conn.execute("SELECT count(DISTINCT idem_key) FROM runs").fetchone()[0]
        if distinct != report.runs_in_store:
            report.key_mismatches.append(f"{report.runs_in_store} runs, {distinct} keys")
    report.seconds = time.monotonic() - started
    return report


async def _wait_all_ended(
    gw: Gateway, session: aiohttp.ClientSession, report: Report, deadline: float
) -> None:
    while time.monotonic() < deadline:
        pending = 0
        for status in ("running", "retrying", "sleeping", "waiting"):
            async with session.get(f"{gw.admin}/v1/runs?status={status}&limit=1") as resp:
                pending += len((await resp.json())["runs"])
        if not pending:
            return
        await asyncio.sleep(0.2)


def markdown(reports: list[Report]) -> str:
    lines = [
        "| kills | clients | runs | resent after a kill | attempts per run (runs) | "
        "fenced writes | repeated after ack | one run per key | integrity | all ended | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        spread = ", ".join(f"{n}: {c}" for n, c in sorted(r.attempts.items()))
        lines.append(
            f"| {r.kills} | {r.clients} | {r.accepted} | {r.resent} | {spread} | "
            f"{r.fenced_writes} | {len(r.repeated_after_ack)} | "
            f"{'yes' if not r.key_mismatches else 'NO'} | {r.integrity} | "
            f"{'yes' if not r.unended and r.completed == r.accepted else 'NO'} | "
            f"{r.seconds:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    reports = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            report = asyncio.run(
                run_crash_loop(Path(tmp), kills=args.kills, clients=args.clients, seed=n + 1)
            )
        reports.append(report)
        print(
            f"round {n + 1}: {'ok' if report.ok else 'FAILED: ' + '; '.join(report.problems())}",
            file=sys.stderr,
        )
    print(markdown(reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
