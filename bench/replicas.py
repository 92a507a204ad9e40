#!/usr/bin/env python3
"""Several gateway replicas on one PostgreSQL, against SQLite and Restate, in one run (issue 11).

    python bench/replicas.py [--quick]     # ~4-5 min; --quick ~1 min

1. Durable 3 steps through the raw protocol (`POST /raw/3`, as "stepgate durable 3 steps
   [raw]" in bench/run.py): p50 at 1 connection and req/s at 32 connections, for
   - SQLite: one gateway on a SQLite file (the harness's configuration);
   - PostgreSQL, 1 replica: one gateway on a fresh database;
   - PostgreSQL, 3 replicas: three gateways A, B, C on another fresh database, each in front of
     its own upstream process; at 32 connections three wrk processes (11 + 11 + 10
     connections) load A, B and C at once; at 1 connection wrk loads A while B and C run;
   - Restate 1.7.12, with the harness's service (`restate 3 steps`), if it can run here.
   All of them run side by side; rounds go through them in turn (rotating the order), and the
   table gives the median of the rounds and its ratio to SQLite's (and Restate's) figures.
2. Take-over: N runs (1,000) accepted by replica A of a fresh three-replica cluster, each
   blocked in its second step (the first one acknowledged) in A's upstream; A is killed with
   SIGKILL; measured: the time from the kill until B and C have ended all N (the last
   `ended_at` in the store), and, from the upstreams' ledgers, that no step acknowledged to any
   upstream was executed again.

Every database is created for the run and dropped after it. Traffic stays on 127.0.0.1. The
table and verdicts are printed, and written to bench/results/replicas-latest.{md,json}.
See docs/performance.md, "Several replicas on PostgreSQL".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from harness import machine
from harness.load import LoadError, LoadResult, Request, check_once, expect_json, run_wrk, wrk_path
from harness.peers import (
    BENCH_DIR,
    Bench,
    PeerUnavailable,
    Stepgate,
    StepgateConfig,
    Upstream,
    check_stepgate,
    start_restate,
    start_stepgate,
    start_upstream,
    stepgate_command,
    stepgate_settings,
    stop_restate,
)
from harness.processes import Processes, free_port, raise_fd_limit, rss_bytes

PG_SERVER = os.environ.get("STEPGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
BODY = '{"bench": true}'
STEPS = 3
TOP = 32
PG1_TARGET = 0.7  # PostgreSQL with one replica: req/s at 32 >= 0.7 x SQLite's
TAKEOVER_SLACK = 10.0  # all of a killed replica's runs ended within lease + 10 s
_TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str = "") -> None:
    print(text, flush=True)


# --- CPU accounting -------------------------------------------------------------------------


def _proc_ticks(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return 0


def _tree(pids: Sequence[int]) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, stack = [], list(pids)
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(parents.get(pid, []))
    return found


def _postgres_pids() -> list[int]:
    """The PostgreSQL server's processes (not ours: it runs as a system service)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "postgres":
                    found.append(int(entry))
    return found


def _machine_busy() -> int:
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return user + nice + system + irq + softirq + steal


@dataclass(frozen=True, slots=True)
class Cpu:
    at: float
    busy: int  # the whole machine
    ours: int  # this script and everything it started
    target: int  # the processes under test (gateways, or Restate's two)
    pg: int  # the PostgreSQL server

    @classmethod
    def now(cls, target: Sequence[int]) -> Cpu:
        return cls(
            at=time.monotonic(),
            busy=_machine_busy(),
            ours=sum(_proc_ticks(p) for p in _tree([os.getpid()])),
            target=sum(_proc_ticks(p) for p in _tree(target)),
            pg=sum(_proc_ticks(p) for p in _postgres_pids()),
        )


# --- loads ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """One measured load, over one or several wrk processes run at once."""

    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float  # one wrk: its p50; several: their p50s weighted by requests
    p99_ms: float  # one wrk: its p99; several: the highest
    errors: int
    target_cpu_ms: float  # CPU of the processes under test per request
    pg_cpu_ms: float  # CPU of the PostgreSQL server per request
    others: float  # share of the machine used by anything else meanwhile
    parts: tuple[float, ...] = ()  # req/s of each wrk process


def split(connections: int, ways: int) -> list[int]:
    """32 connections over 3 targets: [11, 11, 10]."""
    base, extra = divmod(connections, ways)
    return [base + (1 if i < extra else 0) for i in range(ways)]


def combine(results: Sequence[LoadResult]) -> tuple[int, float, float, float, int]:
    """(requests, req/s, p50, p99, errors) of wrk processes that ran at the same time."""
    requests = sum(r.requests for r in results)
    rps = sum(r.rps for r in results)
    if requests:
        p50 = sum(r.p50_ms * r.requests for r in results) / requests
    else:
        p50 = max(r.p50_ms for r in results)
    return requests, rps, p50, max(r.p99_ms for r in results), sum(r.errors for r in results)


def load(
    procs: Processes,
    urls: Sequence[str],
    body: str,
    *,
    connections: int,
    seconds: float,
    target_pids: Sequence[int],
    threads: int = 2,
) -> Load:
    """wrk at `connections` spread over `urls` (one wrk process each, all at once)."""
    counts = split(connections, len(urls)) if len(urls) > 1 else [connections]
    before = Cpu.now(target_pids)

    def one(url: str, c: int) -> LoadResult:
        return run_wrk(
            procs,
            Request(url, body=body),
            connections=c,
            threads=1 if (c == 1 or len(urls) > 1) else threads,
            seconds=seconds,
        )

    if len(urls) == 1:
        results = [one(urls[0], counts[0])]
    else:
        with ThreadPoolExecutor(len(urls)) as pool:
            results = list(pool.map(one, urls, counts))
    after = Cpu.now(target_pids)
    requests, rps, p50, p99, errors = combine(results)
    elapsed = after.at - before.at
    capacity = elapsed * _TICKS * (os.cpu_count() or 1)
    pg = after.pg - before.pg
    other = (after.busy - before.busy) - (after.ours - before.ours) - pg
    per_request = 1000 / _TICKS / requests if requests else 0.0
    return Load(
        connections=connections,
        seconds=round(max(r.seconds for r in results), 3),
        requests=requests,
        rps=round(rps, 1),
        p50_ms=round(p50, 3),
        p99_ms=round(p99, 3),
        errors=errors,
        target_cpu_ms=round((after.target - before.target) * per_request, 3),
        pg_cpu_ms=round(pg * per_request, 3),
        others=round(max(0.0, min(1.0, other / capacity)), 4) if capacity > 0 else 0.0,
        parts=tuple(r.rps for r in results) if len(results) > 1 else (),
    )


@dataclass(slots=True)
class Target:
    """One configuration under load."""

    key: str
    label: str
    url_at_1: str
    urls_at_top: list[str]
    body: str
    pids: list[int]
    check: Callable[[int, bytes], str | None]
    rounds: list[dict[int, Load]] = field(default_factory=list)
    skipped: str = ""

    def median(self, connections: int, what: str) -> float | None:
        values = [getattr(r[connections], what) for r in self.rounds if connections in r]
        return statistics.median(values) if values else None


# --- PostgreSQL databases -------------------------------------------------------------------


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Databases:
    """Fresh databases on the PostgreSQL server, each dropped at the end of the run."""

    def __init__(self) -> None:
        self.prefix = f"stepgate_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.names: list[str] = []

    def create(self, suffix: str) -> str:
        name = f"{self.prefix}_{suffix}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return f"{PG_SERVER}/{name}"

    def drop_all(self) -> None:
        for name in reversed(self.names):
            with contextlib.suppress(Exception):
                asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.names.clear()


def pg_settings() -> dict[str, str]:
    async def show() -> dict[str, str]:
        import asyncpg

        conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
        try:
            out = {"version": str(await conn.fetchval("SHOW server_version"))}
            for name in ("fsync", "synchronous_commit", "wal_sync_method", "max_connections"):
                out[name] = str(await conn.fetchval(f"SHOW {name}"))
            return out
        finally:
            await conn.close()

    return asyncio.run(show())


# --- gateways -------------------------------------------------------------------------------


def hold_route(upstream_url: str) -> dict[str, Any]:
    """The take-over route: /hold/{n} (bench/upstream.py), an attempt long enough to block.
    A client is held 1 s, then answered 202 while the invocation goes on: unlike
    `Prefer: respond-async` runs (at most 256 invoked at once per gateway), every run is
    invoked at once."""
    return {
        "name": "hold",
        "path": "/hold/*",
        "methods": ["POST"],
        "upstream": upstream_url,
        "durable": True,
        "timeout": "10m",
        "hold": "1s",
    }


def gateway_settings(
    upstream_url: str,
    *,
    store: str | None,
    store_path: Path,
    replica_id: str | None,
    lease: float,
) -> tuple[dict[str, Any], int, int]:
    """The harness's gateway config (bench/harness/peers.py), on SQLite or PostgreSQL."""
    public, internal = free_port(), free_port()
    settings = stepgate_settings(
        public_port=public,
        internal_port=internal,
        store_path=store_path,
        upstream_url=upstream_url,
        durability="full",
        extra={},
    )
    settings["routes"].append(hold_route(upstream_url))
    if store is not None:
        settings["store"] = store
        settings["lease"] = f"{lease:g}s"
        settings["replica_id"] = replica_id
    return settings, public, internal


def write_config(
    bench: Bench,
    name: str,
    upstream: Upstream,
    *,
    store: str | None,
    replica_id: str | None = None,
    lease: float = 10.0,
) -> StepgateConfig:
    home = bench.work_dir / f"stepgate-{name}"
    home.mkdir(parents=True, exist_ok=True)
    db = home / "stepgate.db"
    settings, public, internal = gateway_settings(
        upstream.url, store=store, store_path=db, replica_id=replica_id, lease=lease
    )
    path = home / "stepgate.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return StepgateConfig(
        path=path,
        public_url=f"http://127.0.0.1:{public}",
        internal_url=f"http://127.0.0.1:{internal}",
        store_path=db,
    )


def start_all(
    bench: Bench, command: list[str], configs: dict[str, StepgateConfig]
) -> dict[str, Stepgate]:
    """Start the gateways one after the other, from this thread: a child started from a
    worker thread would get its PR_SET_PDEATHSIG signal when that thread ends."""
    return {
        name: start_stepgate(bench, command, config, name=name) for name, config in configs.items()
    }


# --- part 1: side by side -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool
    rounds: int
    duration: float
    warmup: float
    runs: int
    lease: float
    restate: bool
    work_dir: Path
    keep_work: bool
    results_dir: Path


def measure_rounds(bench: Bench, targets: list[Target], opts: Options) -> None:
    live = [t for t in targets if not t.skipped]
    for t in live:
        problem = check_once(Request(t.url_at_1, body=t.body), expect=t.check, attempts_for=5.0)
        if problem:
            t.skipped = f"the check request failed: {problem}"
            say(f"SKIP  {t.label}: {t.skipped}")
    live = [t for t in live if not t.skipped]
    for n in range(opts.rounds):
        say(f"== round {n + 1}/{opts.rounds}")
        shift = n % len(live) if live else 0
        for t in live[shift:] + live[:shift]:
            try:
                if opts.warmup > 0:
                    load(
                        bench.procs,
                        t.urls_at_top,
                        t.body,
                        connections=TOP,
                        seconds=opts.warmup,
                        target_pids=t.pids,
                    )
                figures = {
                    1: load(
                        bench.procs,
                        [t.url_at_1],
                        t.body,
                        connections=1,
                        seconds=opts.duration,
                        target_pids=t.pids,
                    ),
                    TOP: load(
                        bench.procs,
                        t.urls_at_top,
                        t.body,
                        connections=TOP,
                        seconds=opts.duration,
                        target_pids=t.pids,
                    ),
                }
            except LoadError as exc:
                say(f"  {t.label}: wrk failed: {exc}")
                continue
            t.rounds.append(figures)
            one, top = figures[1], figures[TOP]
            noise = max(one.others, top.others)
            say(
                f"  {t.label:<26} p50@1 {one.p50_ms:6.3f} ms   @{TOP} {top.rps:7,.0f} req/s "
                f"p99 {top.p99_ms:7.2f} ms  cpu/req {top.target_cpu_ms:.2f}+pg "
                f"{top.pg_cpu_ms:.2f} ms"
                + (f"  errors {one.errors + top.errors}" if one.errors + top.errors else "")
                + (f"  (others {noise:.0%})" if noise >= 0.05 else "")
            )


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(targets: list[Target]) -> str:
    by = {t.key: t for t in targets}
    base = by.get("sqlite")
    restate = by.get("restate")
    lines = [
        f"| configuration | p50 ms @1 | x SQLite | req/s @{TOP} | x SQLite | x Restate | "
        f"p99 ms @{TOP} | gateway CPU ms/req | PostgreSQL CPU ms/req | rounds (req/s @{TOP}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        if t.skipped or not t.rounds:
            continue
        p50 = t.median(1, "p50_ms")
        rps = t.median(TOP, "rps")
        ref_p50 = base.median(1, "p50_ms") if base else None
        ref_rps = base.median(TOP, "rps") if base else None
        vs_restate = (
            ratio(rps, restate.median(TOP, "rps"))
            if restate and restate.rounds and t.key != "restate"
            else None
        )
        per_round = ", ".join(f"{r[TOP].rps:,.0f}" for r in t.rounds)
        is_restate = t.key == "restate"
        lines.append(
            f"| {t.label} | {fmt(p50, '.3f')} | {fmt(ratio(p50, ref_p50), '.2f')} | "
            f"{fmt(rps, ',.0f')} | {fmt(ratio(rps, ref_rps), '.2f')} | "
            f"{fmt(vs_restate, '.2f')} | {fmt(t.median(TOP, 'p99_ms'), '.2f')} | "
            f"{'-' if is_restate else fmt(t.median(TOP, 'target_cpu_ms'), '.2f')} | "
            f"{'-' if is_restate else fmt(t.median(TOP, 'pg_cpu_ms'), '.2f')} | {per_round} |"
        )
    return "\n".join(lines)


def pg1_verdict(targets: list[Target]) -> tuple[str, str]:
    by = {t.key: t for t in targets}
    base, pg1 = by.get("sqlite"), by.get("pg1")
    if not (base and pg1 and base.rounds and pg1.rounds):
        return "SKIP", "not measured"
    errors = sum(r[TOP].errors for r in pg1.rounds)
    value = ratio(pg1.median(TOP, "rps"), base.median(TOP, "rps"))
    # The same round's two figures were measured minutes apart at most: their ratio too.
    pairs = [p[TOP].rps / s[TOP].rps for s, p in zip(base.rounds, pg1.rounds, strict=False)]
    spread = ", ".join(f"{x:.2f}" for x in pairs)
    status = "PASS" if value is not None and value >= PG1_TARGET and not errors else "FAIL"
    return status, (
        f"{value:.2f} x ({pg1.median(TOP, 'rps'):,.0f} vs {base.median(TOP, 'rps'):,.0f} req/s;"
        f" per round {spread}){f', {errors} errors' if errors else ''}"
    )


# --- part 2: take-over ----------------------------------------------------------------------


def analyse_ledgers(ledgers: dict[str, dict[str, Any]], run_ids: Sequence[str]) -> dict[str, Any]:
    """What the upstreams did with the runs: executions per step, who invoked, and every step
    executed again after a write of it had been acknowledged (there must be none)."""
    executed: Counter[str] = Counter()
    invocations: Counter[str] = Counter()
    resumed_by: Counter[str] = Counter()
    first_resumed: float | None = None
    repeated: list[str] = []
    missing: list[str] = []
    for run_id in run_ids:
        acks: dict[str, float] = {}
        runs: dict[str, list[float]] = {}
        for name, ledger in ledgers.items():
            for step_id, at in ledger["acked"].get(run_id, {}).items():
                acks[step_id] = min(at, acks.get(step_id, at))
            for step_id, times in ledger["executed"].get(run_id, {}).items():
                runs.setdefault(step_id, []).extend(times)
            invoked = ledger["invoked"].get(run_id, [])
            invocations[name] += len(invoked)
            if name != "A" and invoked:
                resumed_by[name] += 1
                earliest = min(invoked)
                if first_resumed is None or earliest < first_resumed:
                    first_resumed = earliest
        for step_id, times in runs.items():
            executed[step_id] += len(times)
            acked_at = acks.get(step_id)
            if acked_at is not None and any(t > acked_at for t in times):
                repeated.append(f"{run_id}/{step_id}")
        if not acks:
            missing.append(run_id)
    return {
        "executions_by_step": dict(sorted(executed.items())),
        "invocations_by_upstream": dict(sorted(invocations.items())),
        "resumed_by": dict(sorted(resumed_by.items())),
        "first_resumed_at": first_resumed,
        "repeated_after_ack": repeated,
        "never_acked": missing,
    }


def get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10):
        pass


async def block_runs(
    url: str, upstream: str, n: int, kill: Callable[[], None], timeout: float
) -> tuple[list[str], float, float, float]:
    """Send n requests to replica A at once and keep them open (the first invocation of a run
    is always awaited, whatever the route's hold) until A's upstream holds all n blocked in
    step s1; then `kill` A. Returns the run ids (as A's upstream saw them), the seconds until
    all were blocked, and the wall and monotonic times of the kill."""
    import aiohttp

    started = time.monotonic()
    headers = {"Content-Type": "application/json"}
    no_limit = aiohttp.ClientTimeout(total=None)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=no_limit) as clients,
        aiohttp.ClientSession() as ctl,
    ):

        async def one() -> int:
            async with clients.post(url, data=BODY, headers=headers) as resp:
                await resp.read()
                return resp.status

        async def blocked() -> int:
            async with ctl.get(f"{upstream}/_bench/hold") as resp:
                return int((await resp.json())["blocked"])

        sent = [asyncio.ensure_future(one()) for _ in range(n)]
        try:
            while (count := await blocked()) < n:
                done = [t for t in sent if t.done()]
                if done:
                    outcome = done[0].exception() or f"HTTP {done[0].result()}"
                    raise RuntimeError(
                        f"{len(done)} of {n} requests ended before the kill, "
                        f"the first with {outcome!r}"
                    )
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"only {count} of {n} runs blocked in step s1 on A")
                await asyncio.sleep(0.1)
            all_blocked = time.monotonic() - started
            killed_wall, killed = time.time(), time.monotonic()
            kill()
            # Every client loses its connection with A.
            await asyncio.wait(sent, timeout=10)
        finally:
            for task in sent:
                task.cancel()
            await asyncio.gather(*sent, return_exceptions=True)
        async with ctl.get(f"{upstream}/_bench/hold?full=1") as resp:
            ids = sorted((await resp.json())["invoked"])
    return ids, all_blocked, killed_wall, killed


async def watch_store(url: str, n: int, deadline: float) -> dict[str, Any]:
    """Poll the store every 50 ms until n runs of /hold have ended, or until `deadline`."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE ended_at IS NOT NULL) AS ended, "
                "count(*) FILTER (WHERE status = 'completed') AS completed, "
                "max(ended_at) AS last_end, min(ended_at) AS first_end FROM runs "
                "WHERE route = 'hold'"
            )
            if row["ended"] >= n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        attempts = await conn.fetch(
            "SELECT outcome, coalesce(error, '') AS error, count(*) AS n FROM attempts "
            "GROUP BY 1, 2 ORDER BY 3 DESC"
        )
        by_attempt = await conn.fetch(
            "SELECT attempt, count(*) AS n FROM runs WHERE route = 'hold' GROUP BY 1 ORDER BY 1"
        )
        return {
            "ended": row["ended"],
            "completed": row["completed"],
            "first_end": row["first_end"],
            "last_end": row["last_end"],
            "attempts": [dict(r) for r in attempts],
            "runs_by_attempt": {r["attempt"]: r["n"] for r in by_attempt},
        }
    finally:
        await conn.close()


def take_over(
    bench: Bench, command: list[str], upstreams: dict[str, Upstream], pg_url: str, opts: Options
) -> dict[str, Any]:
    names = ("A", "B", "C")
    configs = {
        name: write_config(
            bench,
            f"takeover-{name.lower()}",
            upstreams[name],
            store=pg_url,
            replica_id=f"takeover-{name.lower()}",
            lease=opts.lease,
        )
        for name in names
    }
    gateways = start_all(bench, command, configs)
    try:
        for name in names:
            post(f"{upstreams[name].url}/_bench/hold?on={1 if name == 'A' else 0}")
        ids, accept_s, killed_wall, killed = asyncio.run(
            block_runs(
                f"{configs['A'].public_url}/hold/{STEPS}",
                upstreams["A"].url,
                opts.runs,
                lambda: bench.procs.kill(gateways["A"].child),
                timeout=60 + opts.runs / 50,
            )
        )
        say(
            f"  {len(ids):,} runs blocked in step s1 on A's upstream after {accept_s:.1f} s; "
            "A was killed with SIGKILL"
        )
        limit = opts.lease + TAKEOVER_SLACK
        store = asyncio.run(watch_store(pg_url, len(ids), killed + limit + 60))
        waited = time.monotonic() - killed
        ledgers = {name: get_json(f"{up.url}/_bench/hold?full=1") for name, up in upstreams.items()}
        post(f"{upstreams['A'].url}/_bench/hold?on=0")  # let A's orphaned handlers go
    finally:
        for gw in gateways.values():
            bench.procs.stop(gw.child)
    checked = analyse_ledgers(ledgers, ids)
    last = store["last_end"] - killed_wall if store["last_end"] is not None else None
    first_end = store["first_end"] - killed_wall if store["first_end"] is not None else None
    first = checked["first_resumed_at"]
    result = {
        "runs": len(ids),
        "lease_s": opts.lease,
        "all_blocked_s": round(accept_s, 2),
        "ended": store["ended"],
        "completed": store["completed"],
        "first_resumed_s": round(first - killed_wall, 2) if first else None,
        "first_ended_s": round(first_end, 2) if first_end is not None else None,
        "all_ended_s": round(last, 2) if last is not None and store["ended"] >= len(ids) else None,
        "waited_s": round(waited, 2),
        "runs_by_attempt": store["runs_by_attempt"],
        "attempt_outcomes": store["attempts"],
        **{k: v for k, v in checked.items() if k != "first_resumed_at"},
    }
    result["repeated_after_ack_count"] = len(result["repeated_after_ack"])
    result["repeated_after_ack"] = result["repeated_after_ack"][:20]
    result["never_acked"] = result["never_acked"][:20]
    return result


def takeover_verdicts(t: dict[str, Any]) -> list[tuple[str, str, str]]:
    limit = t["lease_s"] + TAKEOVER_SLACK
    n = t["runs"]
    out = []
    if t["all_ended_s"] is None:
        out.append(
            (
                "FAIL",
                f"{n:,} runs of a killed replica ended <= lease + 10 s ({limit:g} s)",
                f"only {t['ended']:,} ended in {t['waited_s']:.0f} s",
            )
        )
    else:
        status = "PASS" if t["all_ended_s"] <= limit and t["completed"] == n else "FAIL"
        out.append(
            (
                status,
                f"{n:,} runs of a killed replica ended <= lease + 10 s ({limit:g} s)",
                f"{t['all_ended_s']:.1f} s after the kill ({t['completed']:,} completed; "
                f"first re-invoked at {t['first_resumed_s']} s; "
                f"resumed by {t['resumed_by']})",
            )
        )
    repeated = t["repeated_after_ack_count"]
    out.append(
        (
            "PASS" if repeated == 0 else "FAIL",
            "no acknowledged step executed again",
            f"{repeated} repeated; executions by step {t['executions_by_step']}",
        )
    )
    return out


# --- the run --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/replicas.py", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round of 3 s loads, 100 runs taken over with a 2 s lease",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measured load (default 8, quick 3)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of load before each configuration's loads (default 2, quick 1)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="in-flight runs of the killed replica (default 1000, quick 100)",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=None,
        help="lease of the take-over cluster in seconds (default 10, quick 2)",
    )
    p.add_argument("--no-restate", action="store_true", help="leave Restate out")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--keep-work", action="store_true", help="keep configs and logs")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    a = p.parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if a.quick else full)

    return Options(
        quick=a.quick,
        rounds=pick(a.rounds, 3, 1),
        duration=pick(a.duration, 8.0, 3.0),
        warmup=pick(a.warmup, 2.0, 1.0),
        runs=pick(a.runs, 1000, 100),
        lease=pick(a.lease, 10.0, 2.0),
        restate=not a.no_restate,
        work_dir=a.work_dir or BENCH_DIR / ".work" / f"replicas-{stamp}",
        keep_work=a.keep_work,
        results_dir=a.results_dir,
    )


def run(opts: Options, procs: Processes, dbs: Databases, argv: Sequence[str]) -> int:
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    if wrk_path() is None:
        say("wrk not found: run bench/setup.sh (or `apt-get install wrk`); nothing to measure.")
        return 2
    raise_fd_limit()
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench.create(procs, opts.work_dir)
    info = machine.describe(opts.work_dir)
    try:
        pg = pg_settings()
        solo_url, trio_url = dbs.create("solo"), dbs.create("trio")
    except Exception as exc:
        say(f"PostgreSQL is not reachable at {PG_SERVER} ({exc}); set STEPGATE_BENCH_PG.")
        return 2
    say(f"Stepgate replicas benchmark, {started:%Y-%m-%d %H:%M} UTC")
    say(f"machine: {machine.one_line(info)}")
    say(
        f"PostgreSQL {pg['version']} at {PG_SERVER}: fsync {pg['fsync']}, synchronous_commit "
        f"{pg['synchronous_commit']}, wal_sync_method {pg['wal_sync_method']}"
    )
    load1 = info["load_average"][0]
    if load1 > 0.25 * (info["cpus"] or 1):
        say(f"WARNING: the machine is busy (load average {load1:.2f}); figures will be noisy")

    command = stepgate_command(None)
    upstreams = {name: start_upstream(bench) for name in ("A", "B", "C")}
    configs = {
        "sqlite": write_config(bench, "sqlite", upstreams["A"], store=None),
        "pg1": write_config(bench, "pg1", upstreams["A"], store=solo_url, replica_id="solo"),
        **{
            f"pg3-{n.lower()}": write_config(
                bench,
                f"pg3-{n.lower()}",
                upstreams[n],
                store=trio_url,
                replica_id=f"trio-{n.lower()}",
            )
            for n in ("A", "B", "C")
        },
    }
    try:
        check_stepgate(bench, command, configs["sqlite"])
        gateways = start_all(bench, command, configs)
    except PeerUnavailable as exc:
        say(f"stepgate cannot run: {exc}")
        return 2
    path = f"/raw/{STEPS}"
    check = expect_json(steps=STEPS)
    trio = [configs[f"pg3-{n}"].public_url + path for n in "abc"]
    targets = [
        Target(
            "sqlite",
            "SQLite, 1 gateway",
            configs["sqlite"].public_url + path,
            [configs["sqlite"].public_url + path],
            BODY,
            [gateways["sqlite"].child.pid],
            check,
        ),
        Target(
            "pg1",
            "PostgreSQL, 1 replica",
            configs["pg1"].public_url + path,
            [configs["pg1"].public_url + path],
            BODY,
            [gateways["pg1"].child.pid],
            check,
        ),
        Target(
            "pg3",
            "PostgreSQL, 3 replicas",
            trio[0],
            trio,
            BODY,
            [gateways[f"pg3-{n}"].child.pid for n in "abc"],
            check,
        ),
    ]
    restate = None
    if opts.restate:
        try:
            restate = start_restate(bench)
            url = restate.ingress_url + "/bench/steps"
            targets.append(
                Target(
                    "restate",
                    "Restate 1.7.12",
                    url,
                    [url],
                    str(STEPS),
                    [restate.server.pid, restate.service.pid],
                    check,
                )
            )
            say(f"Restate: {restate.version}")
        except PeerUnavailable as exc:
            say(f"SKIP  Restate: {exc}")
    say(
        f"{opts.rounds} round(s) of {opts.duration:g} s loads after {opts.warmup:g} s warm-up, "
        f"durable {STEPS} steps [raw]; then {opts.runs:,} runs taken over (lease "
        f"{opts.lease:g} s)"
    )

    measure_rounds(bench, targets, opts)
    rss = {name: rss_bytes(gw.child.pid) for name, gw in gateways.items()}
    if restate is not None:
        stop_restate(bench, restate)
    for gw in gateways.values():
        procs.stop(gw.child)

    say(f"== take-over: {opts.runs:,} runs in flight on replica A, SIGKILL, B and C finish them")
    try:
        takeover = take_over(bench, command, upstreams, dbs.create("takeover"), opts)
    except (RuntimeError, PeerUnavailable, OSError) as exc:
        say(f"  take-over failed: {exc!r}")
        takeover = {"error": repr(exc)}

    table = render_table(targets)
    status, note = pg1_verdict(targets)
    verdicts = [
        (status, f"PostgreSQL 1 replica throughput >= {PG1_TARGET} x SQLite's ({TOP} conns)", note)
    ]
    if "error" in takeover:
        verdicts.append(("FAIL", "take-over", takeover["error"]))
    else:
        verdicts += takeover_verdicts(takeover)
    lines = [f"{s:<5} {what}: {note}" for s, what, note in verdicts]
    skipped = [f"SKIP  {t.label}: {t.skipped}" for t in targets if t.skipped]
    elapsed = time.monotonic() - t0
    noisy = max((r[c].others for t in targets for r in t.rounds for c in r), default=0.0)
    head = (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine.one_line(info)}; PostgreSQL "
        f"{pg['version']} (fsync {pg['fsync']}, synchronous_commit {pg['synchronous_commit']}); "
        f"load average {load1:.2f} at start; others used up to {noisy:.0%} of the machine "
        f"during a load; git {info['git_commit']}; `python bench/replicas.py"
        f"{' ' + ' '.join(argv) if argv else ''}` ({elapsed / 60:.1f} min)."
    )
    markdown = "\n".join([head, "", table, "", *skipped, "```", *lines, "```", ""])
    say("")
    say(markdown)
    doc = {
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "machine": info,
        "postgresql": pg,
        "targets": [
            {
                "key": t.key,
                "label": t.label,
                "skipped": t.skipped,
                "rounds": [{str(c): asdict(load) for c, load in r.items()} for r in t.rounds],
            }
            for t in targets
        ],
        "rss_bytes": rss,
        "takeover": takeover,
        "verdicts": [{"status": s, "target": w, "note": n} for s, w, n in verdicts],
    }
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(doc, indent=2, default=str)
    (opts.results_dir / f"replicas-{stamp}.json").write_text(text)
    (opts.results_dir / "replicas-latest.json").write_text(text)
    (opts.results_dir / "replicas-latest.md").write_text(markdown)
    say(f"results: {opts.results_dir / f'replicas-{stamp}.json'}; {elapsed / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    opts = parse_args(args)
    procs = Processes()
    dbs = Databases()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        procs.hurry = True
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return run(opts, procs, dbs, args)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every child process")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        dbs.drop_all()
        if not opts.keep_work:
            shutil.rmtree(opts.work_dir, ignore_errors=True)
        else:
            say(f"scratch space kept: {opts.work_dir}")


if __name__ == "__main__":
    sys.exit(main())
