"""What `store_key` costs: the same work with and without a key, in one run, as ratios.

    python bench/store_key.py [--runs 2000] [--requests 1000]

1. The store alone: a run is created (request headers with an Authorization, a body), its answer
   is recorded, and it is read back, as the gateway does for every durable request; for a small
   and a large body, with `durability: relaxed` (so the cipher's CPU shows, not the fsync) and
   `full` (what a deployment pays).
2. End to end: sequential durable POSTs through a real gateway to a loopback upstream.

Rounds alternate (plain, sealed, plain, sealed) and the best round of each counts, so drift on
a shared machine hits both alike. Everything talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from gateway.config import parse_settings
from gateway.lifecycle import AfterAttempt, Decision
from gateway.logging import configure as configure_logging
from gateway.model import Attempt, Outcome, Run, RunStatus
from gateway.store import SQLiteStore
from gateway.store.sealing import Sealer

KEY = secrets.token_bytes(32)
HEADERS = [
    ("Host", "api.example"),
    ("Authorization", "Bearer " + "t" * 40),
    ("Cookie", "session=" + "c" * 60),
    ("Content-Type", "application/json"),
    ("X-Forwarded-For", "127.0.0.1"),
    ("Via", "1.1 stepgate"),
]
ROUNDS = 5


def outcome(now: float) -> Outcome:
    return Outcome(1, now, now, None, None)


def ended(run: Run, body: bytes) -> AfterAttempt:
    """The run as the gateway records it after a 200 (the rule's decision, made here)."""
    done = run.but(
        status=RunStatus.COMPLETED,
        resp_status=200,
        resp_reason="OK",
        resp_headers=[("Content-Type", "application/json")],
        resp_body=body,
        ended_at=run.created_at,
    )
    return AfterAttempt(
        done,
        Attempt(1, run.created_at, run.created_at, "response", 200, None),
        Decision("end", RunStatus.COMPLETED),
    )


def seal_round(*, runs: int, body: bytes) -> float:
    """Seconds per run that sealing adds on its own: a run's seven values sealed when it is
    written and opened when it is read (what the store does on top of its plain work)."""
    sealer = Sealer(KEY)
    values = [
        ("target", b"/work?order=1"),
        ("headers", json.dumps(HEADERS).encode()),
        ("body", body),
        ("request_hash", b"0" * 64),
        ("resp_headers", b'[["Content-Type","application/json"]]'),
        ("resp_body", body),
    ]
    started = time.perf_counter()
    for index in range(runs):
        run_id = f"run-{index}"
        for column, value in values:
            sealer.open(run_id, column, sealer.seal(run_id, column, value))
    return (time.perf_counter() - started) / runs


async def store_round(
    folder: Path, *, key: bytes | None, durability: str, runs: int, body: bytes
) -> float:
    """Seconds per run: create, record the answer, read back."""
    path = folder / f"store-{secrets.token_hex(4)}.db"
    store = SQLiteStore(str(path), durability=durability, key=key)
    await store.open()
    try:
        started = time.perf_counter()
        for _ in range(runs):
            now = time.time()
            run = Run(
                id=secrets.token_urlsafe(16),
                route="work",
                status=RunStatus.RUNNING,
                attempt=1,
                token="t",
                poll_token="p",
                method="POST",
                target="/work?order=1",
                headers=HEADERS,
                body=body,
                created_at=now,
                updated_at=now,
            )
            await store.create_run(run)
            await store.finish_attempt(run.id, outcome(now), lambda stored, _: ended(stored, body))
            fetched = await store.get_run(run.id)
            assert fetched is not None and fetched.body == body
        return (time.perf_counter() - started) / runs
    finally:
        await store.close()
        await asyncio.to_thread(remove, folder, path.name)


def remove(folder: Path, name: str) -> None:
    for path in folder.glob(name + "*"):
        path.unlink()


async def e2e_round(folder: Path, base: str, *, key: bool, requests: int) -> float:
    """Seconds per durable request, one at a time."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "internal_listen": "127.0.0.1:0",
        "store": f"sqlite:///{folder / ('e2e-' + secrets.token_hex(4) + '.db')}",
        "routes": [{"name": "work", "path": "/work", "upstream": base, "durable": True}],
    }
    if key:
        data["store_key"] = "env:STEPGATE_BENCH_STORE_KEY"
    gateway = Gateway(parse_settings(data, source="bench"))
    await gateway.start()
    url = f"http://127.0.0.1:{gateway.public_port}/work"
    body = b'{"order": 1, "items": [' + b'"x",' * 200 + b'"y"]}'
    try:
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            for _ in range(requests):
                async with session.post(
                    url, data=body, headers={"Authorization": "Bearer " + "t" * 40}
                ) as r:
                    assert r.status == 200, r.status
                    await r.read()
            return (time.perf_counter() - started) / requests
    finally:
        await gateway.stop()


def ratio_line(name: str, plain: list[float], sealed: list[float]) -> str:
    best_plain, best_sealed = min(plain), min(sealed)
    return (
        f"| {name} | {best_plain * 1e6:,.0f} µs | {best_sealed * 1e6:,.0f} µs | "
        f"{best_sealed / best_plain:.2f}x | "
        f"{statistics.median(sealed) / statistics.median(plain):.2f}x |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    configure_logging("warning", "json")
    os.environ["STEPGATE_BENCH_STORE_KEY"] = base64.b64encode(KEY).decode()
    lines = [
        "| work | without key | with key | ratio (best) | ratio (median) |",
        "|---|---|---|---|---|",
    ]
    for label, body in (("1 KiB", b"b" * 1024), ("1 MiB", b"b" * (1 << 20))):
        runs = args.runs if len(body) < 65536 else max(1, args.runs // 20)
        cost = min(seal_round(runs=runs, body=body) for _ in range(ROUNDS))
        lines.append(
            f"| sealing alone, {label} body and answer | - | +{cost * 1e6:,.0f} µs | - | - |"
        )
        print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="stepgate-bench-key-") as tmp:
        folder = Path(tmp)
        for durability in ("relaxed", "full"):
            for label, body, runs in (
                ("1 KiB", b"b" * 1024, args.runs),
                ("1 MiB", b"b" * (1 << 20), max(1, args.runs // 20)),
            ):
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(ROUNDS):
                    for sealed in (False, True):
                        times[sealed].append(
                            await store_round(
                                folder,
                                key=KEY if sealed else None,
                                durability=durability,
                                runs=runs,
                                body=body,
                            )
                        )
                lines.append(
                    ratio_line(
                        f"store, {label} body and answer, {durability}", times[False], times[True]
                    )
                )
                print(lines[-1], flush=True)

        async def answer(request: web.Request) -> web.Response:
            return web.json_response({"ok": True, "echo": len(await request.read())})

        app = web.Application()
        app.router.add_post("/work", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            times = {False: [], True: []}
            for _ in range(ROUNDS):
                for sealed in (False, True):
                    times[sealed].append(
                        await e2e_round(
                            folder, f"http://127.0.0.1:{port}", key=sealed, requests=args.requests
                        )
                    )
            lines.append(
                ratio_line("end to end, durable POST (1 KiB), full", times[False], times[True])
            )
        finally:
            await runner.cleanup()
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
