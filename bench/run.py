#!/usr/bin/env python3
"""Stepgate benchmark: every scenario of issues #6 and #15 in one go, on this machine.

    bench/setup.sh            # once: wrk, nginx, Restate, restate-sdk, hypercorn
    python bench/run.py       # ~13 min; --quick for a 3 min smoke run; --soak adds 10 min

Prints one table (req/s, p50, p99, RSS of the process in the middle), the growth
figures and one PASS/FAIL/SKIP line per target; writes bench/results/<stamp>.json,
latest.json and latest.md. All traffic stays on 127.0.0.1. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from harness import machine
from harness.growth import GrowthOptions, run_growth
from harness.load import LoadError, Request, check_once, expect_json, run_wrk, wrk_path
from harness.peers import (
    BENCH_DIR,
    Bench,
    PeerUnavailable,
    Upstream,
    check_stepgate,
    start_bare_proxy,
    start_nginx,
    start_restate,
    start_stepgate,
    start_upstream,
    stepgate_command,
    stop_restate,
    write_stepgate_config,
)
from harness.pg import Database, PostgresUnavailable, database_name, server_pids
from harness.processes import Processes, raise_fd_limit, rss_bytes
from harness.report import (
    NOISE_THRESHOLD,
    PG_KEY,
    Scenario,
    evaluate,
    info_lines,
    render_growth,
    render_noise,
    render_skips,
    render_table,
)
from harness.soak import run_soak

GROUPS = ("upstream", "nginx", "bare", "stepgate", "postgres", "restate", "growth", "soak")
DEFAULT_GROUPS = ("upstream", "nginx", "bare", "stepgate", "postgres", "restate", "growth")
STEP_COUNTS = (0, 3, 10)
# How each durable handler of bench/upstream.py is reached: the SDK, the raw protocol over
# aiohttp's client, the raw protocol over the bench's minimal client.
HANDLER_PATHS = {"sdk": "steps", "raw": "raw", "min": "min"}
BODY = '{"bench": true}'


@dataclass(frozen=True, slots=True)
class Options:
    groups: tuple[str, ...]
    duration: float
    warmup: float
    connections: tuple[int, ...]
    threads: int
    durability: str
    gateway_extra: dict[str, Any]
    stepgate_cmd: str | None
    nginx_workers: str
    growth: GrowthOptions
    soak_minutes: float
    work_dir: Path
    stamp: str
    keep_work: bool
    results_dir: Path
    strict: bool
    uvloop: bool
    quick: bool
    install: bool
    argv: tuple[str, ...]


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


def _gateway_set(items: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--gateway-set wants KEY=VALUE, got {item!r}")
        extra[key] = yaml.safe_load(value)
    return extra


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run (~3 min): short loads, small growth sizes"
    )
    p.add_argument("--soak", action="store_true", help="add the soak (see --soak-minutes)")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument(
        "--only", default=None, help=f"comma list of groups to run, from {','.join(GROUPS)}"
    )
    p.add_argument("--skip", default="", help="comma list of groups not to run")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measured load (default 10, quick 3)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of unmeasured load before each scenario (default 2, quick 1)",
    )
    p.add_argument("--connections", default="1,32", help="connection counts to measure")
    p.add_argument("--threads", type=int, default=2, help="wrk threads at >1 connection")
    p.add_argument("--durability", choices=("full", "relaxed"), default="full")
    p.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra top-level key for the gateway config (YAML value), repeatable",
    )
    p.add_argument(
        "--stepgate-cmd",
        default=None,
        help="how to run the CLI (default: the `stepgate` script, else gateway.cli)",
    )
    p.add_argument("--nginx-workers", default="1", help="worker_processes for nginx")
    p.add_argument(
        "--growth-sizes",
        default=None,
        help="finished runs to measure at (default 10000,100000; quick 1000,5000)",
    )
    p.add_argument(
        "--unfinished",
        type=int,
        default=None,
        help="unfinished runs to resume (default 100000; quick 1000)",
    )
    p.add_argument("--fill-concurrency", type=int, default=32, help="in flight, finished runs")
    p.add_argument(
        "--unfinished-concurrency",
        type=int,
        default=128,
        help="in flight while the unfinished runs are accepted",
    )
    p.add_argument(
        "--fill-time-limit", type=float, default=300.0, help="seconds allowed for each store fill"
    )
    p.add_argument(
        "--resume-timeout",
        type=float,
        default=300.0,
        help="seconds after the restart's readiness to wait for every unfinished run",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch space (stores, logs); default bench/.work/<stamp>",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the scratch space")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--no-uvloop", action="store_true", help="stdlib loop for the upstream")
    p.add_argument("--install", action="store_true", help="run bench/setup.sh first")
    a = p.parse_args(argv)

    groups = tuple(g.strip() for g in a.only.split(",")) if a.only else DEFAULT_GROUPS
    if a.soak and "soak" not in groups:
        groups += ("soak",)
    skip = {g.strip() for g in a.skip.split(",") if g.strip()}
    unknown = (set(groups) | skip) - set(GROUPS)
    if unknown:
        p.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    groups = tuple(g for g in GROUPS if g in groups and g not in skip)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sizes = (
        _csv_ints(a.growth_sizes)
        if a.growth_sizes
        else ((1_000, 5_000) if a.quick else (10_000, 100_000))
    )
    duration = a.duration if a.duration is not None else (3.0 if a.quick else 10.0)
    growth = GrowthOptions(
        sizes=tuple(sorted(sizes)),
        unfinished=a.unfinished if a.unfinished is not None else (1_000 if a.quick else 100_000),
        poll_seconds=min(duration, 5.0),
        fill_concurrency=a.fill_concurrency,
        unfinished_concurrency=a.unfinished_concurrency,
        fill_time_limit=a.fill_time_limit,
        resume_timeout=a.resume_timeout,
        threads=a.threads,
        durability=a.durability,
        extra=_gateway_set(a.gateway_set),
    )
    return Options(
        groups=groups,
        duration=duration,
        warmup=a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0),
        connections=_csv_ints(a.connections),
        threads=a.threads,
        durability=a.durability,
        gateway_extra=growth.extra,
        stepgate_cmd=a.stepgate_cmd,
        nginx_workers=a.nginx_workers,
        growth=growth,
        soak_minutes=a.soak_minutes,
        work_dir=a.work_dir or BENCH_DIR / ".work" / stamp,
        stamp=stamp,
        keep_work=a.keep_work,
        results_dir=a.results_dir,
        strict=a.strict,
        uvloop=not a.no_uvloop,
        quick=a.quick,
        install=a.install,
        argv=tuple(argv),
    )


def say(text: str) -> None:
    print(text, flush=True)


class Runner:
    def __init__(self, opts: Options, bench: Bench, upstream: Upstream) -> None:
        self.opts = opts
        self.bench = bench
        self.upstream = upstream
        self.scenarios: dict[str, Scenario] = {}

    def skip(self, key: str, label: str, reason: str) -> None:
        self.scenarios[key] = Scenario(key=key, label=label, skipped=reason)
        say(f"SKIP  {label}: {reason}")

    def measure(
        self,
        key: str,
        label: str,
        request: Request,
        expect: Callable[[int, bytes], str | None],
        rss_pid: int | None,
        also_ours: Callable[[], Sequence[int]] | None = None,
    ) -> Scenario:
        """Check one request, warm up, then measure at each connection count (`also_ours`:
        see run_wrk)."""
        problem = check_once(request, expect=expect, attempts_for=5.0)
        if problem:
            self.skip(key, label, f"the check request failed: {problem}")
            return self.scenarios[key]
        scenario = Scenario(key=key, label=label)
        top = max(self.opts.connections)
        try:
            if self.opts.warmup > 0:
                run_wrk(
                    self.bench.procs,
                    request,
                    connections=top,
                    threads=self.opts.threads,
                    seconds=self.opts.warmup,
                )
            for c in self.opts.connections:
                r = run_wrk(
                    self.bench.procs,
                    request,
                    connections=c,
                    threads=1 if c == 1 else self.opts.threads,
                    seconds=self.opts.duration,
                    also_ours=also_ours,
                )
                scenario.loads[c] = r
                errors = f", {r.errors:,} errors" if r.errors else ""
                if r.foreign_cpu >= NOISE_THRESHOLD:
                    errors += f"  (others used {r.foreign_cpu:.0%} of the CPU)"
                say(
                    f"  {label:<28} @{c:<3} {r.rps:>10,.0f} req/s  p50 {r.p50_ms:7.3f} ms  "
                    f"p99 {r.p99_ms:7.3f} ms{errors}"
                )
        except LoadError as exc:
            self.skip(key, label, f"wrk failed: {exc}")
            return self.scenarios[key]
        if rss_pid is not None:
            scenario.rss_bytes = rss_bytes(rss_pid)
        self.scenarios[key] = scenario
        return scenario

    # --- groups ----------------------------------------------------------------------

    def run_upstream(self) -> None:
        say("== 1. upstream directly")
        self.measure(
            "upstream",
            "upstream direct",
            Request(self.upstream.url + "/plain", body=BODY),
            expect_json(ok=True),
            None,
        )

    def run_nginx(self) -> None:
        say("== 2. nginx proxy_pass, upstream keep-alive")
        try:
            nginx = start_nginx(self.bench, self.upstream, workers=self.opts.nginx_workers)
        except PeerUnavailable as exc:
            self.skip("nginx", "nginx proxy_pass", str(exc))
            return
        try:
            self.measure(
                "nginx",
                "nginx proxy_pass",
                Request(nginx.url + "/plain", body=BODY),
                expect_json(ok=True),
                nginx.child.pid,
            )
        finally:
            self.bench.procs.stop(nginx.child)

    def run_bare(self) -> None:
        say("== 2b. a bare aiohttp reverse proxy (the framework's ceiling)")
        try:
            bare = start_bare_proxy(self.bench, self.upstream, uvloop=self.opts.uvloop)
        except PeerUnavailable as exc:
            self.skip("bare", "bare aiohttp proxy", str(exc))
            return
        try:
            self.measure(
                "bare",
                "bare aiohttp proxy",
                Request(bare.url + "/plain", body=BODY),
                expect_json(ok=True),
                bare.child.pid,
            )
        finally:
            self.bench.procs.stop(bare.child)

    def stepgate_labels(self) -> list[tuple[str, str]]:
        labels = [("stepgate-plain", "stepgate plain route")]
        for via in HANDLER_PATHS:
            labels += [
                (f"stepgate-{via}-{n}", f"stepgate durable {n} steps [{via}]") for n in STEP_COUNTS
            ]
        return labels

    def stepgate_ready(self) -> tuple[list[str] | None, str]:
        command = stepgate_command(self.opts.stepgate_cmd)
        config = write_stepgate_config(
            self.bench,
            "check",
            self.upstream,
            durability=self.opts.durability,
            extra=self.opts.gateway_extra,
        )
        try:
            check_stepgate(self.bench, command, config)
        except PeerUnavailable as exc:
            return None, str(exc)
        return command, ""

    def run_stepgate(self, command: list[str]) -> None:
        say(f"== 3-4. Stepgate, durability {self.opts.durability}")
        config = write_stepgate_config(
            self.bench,
            "main",
            self.upstream,
            durability=self.opts.durability,
            extra=self.opts.gateway_extra,
        )
        try:
            gateway = start_stepgate(self.bench, command, config, name="main")
        except PeerUnavailable as exc:
            for key, label in self.stepgate_labels():
                self.skip(key, label, str(exc))
            return
        pid = gateway.child.pid
        try:
            self.measure(
                "stepgate-plain",
                "stepgate plain route",
                Request(config.public_url + "/plain", body=BODY),
                expect_json(ok=True),
                pid,
            )
            for via, path in HANDLER_PATHS.items():
                for n in STEP_COUNTS:
                    self.measure(
                        f"stepgate-{via}-{n}",
                        f"stepgate durable {n} steps [{via}]",
                        Request(f"{config.public_url}/{path}/{n}", body=BODY),
                        expect_json(steps=n),
                        pid,
                    )
        finally:
            self.bench.procs.stop(gateway.child)

    def run_postgres(self, command: list[str]) -> None:
        """A second gateway, on a fresh PostgreSQL database: the SDK handler's durable runs."""
        say("== 4b. Stepgate on PostgreSQL, durability " + self.opts.durability)
        database = Database(database_name(self.opts.stamp, os.getpid()))
        try:
            store = database.create()
        except PostgresUnavailable as exc:
            self.skip("stepgate-pg", "stepgate-pg scenarios", str(exc))
            return
        say(f"  PostgreSQL {database.server.get('version', '?')}, database {database.name}")
        try:
            config = write_stepgate_config(
                self.bench,
                "pg",
                self.upstream,
                durability=self.opts.durability,
                extra=self.opts.gateway_extra,
                store=store,
            )
            try:
                gateway = start_stepgate(self.bench, command, config, name="pg")
            except PeerUnavailable as exc:
                self.skip("stepgate-pg", "stepgate-pg scenarios", str(exc))
                return
            try:
                for n in STEP_COUNTS:
                    self.measure(
                        f"{PG_KEY}-{n}",
                        f"stepgate-pg durable {n} steps [sdk]",
                        Request(f"{config.public_url}/steps/{n}", body=BODY),
                        expect_json(steps=n),
                        gateway.child.pid,
                        also_ours=lambda: server_pids(database.name),
                    )
            finally:
                self.bench.procs.stop(gateway.child)
        finally:
            database.drop()

    def run_restate(self) -> None:
        say("== 5. Restate (restate-server + restate-sdk on hypercorn)")
        labels = [(f"restate-{n}", f"restate {n} steps") for n in STEP_COUNTS]
        try:
            restate = start_restate(self.bench)
        except PeerUnavailable as exc:
            for key, label in labels:
                self.skip(key, label, str(exc))
            return
        say(f"  {restate.version}")
        try:
            for (key, label), n in zip(labels, STEP_COUNTS, strict=True):
                self.measure(
                    key,
                    label,
                    Request(restate.ingress_url + "/bench/steps", body=str(n)),
                    expect_json(steps=n),
                    restate.server.pid,
                )
        finally:
            stop_restate(self.bench, restate)


def write_results(opts: Options, doc: dict[str, Any], markdown: str) -> Path:
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["started_at"].replace(":", "").replace("-", "")[:15]
    path = opts.results_dir / f"{stamp}.json"
    text = json.dumps(doc, indent=2, default=str)
    path.write_text(text)
    (opts.results_dir / "latest.json").write_text(text)
    (opts.results_dir / "latest.md").write_text(markdown)
    return path


def run(opts: Options, procs: Processes) -> int:
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    if wrk_path() is None:
        say("wrk not found: run bench/setup.sh (or `apt-get install wrk`); nothing to measure.")
        return 2
    raise_fd_limit()
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench.create(procs, opts.work_dir)
    info = machine.describe(opts.work_dir)
    say(f"Stepgate benchmark, {started:%Y-%m-%d %H:%M} UTC")
    say(f"machine: {machine.one_line(info)}")
    load1 = info["load_average"][0]
    if load1 > 0.25 * (info["cpus"] or 1):
        say(f"WARNING: the machine is busy (load average {load1:.2f}); figures will be noisy")
    say(
        f"groups: {', '.join(opts.groups)}; {opts.duration:g} s per load after "
        f"{opts.warmup:g} s warm-up, connections {list(opts.connections)}"
    )

    upstream = start_upstream(bench, uvloop=opts.uvloop)
    runner = Runner(opts, bench, upstream)
    growth: dict[str, Any] | None = None
    soak: dict[str, Any] | None = None

    if "upstream" in opts.groups:
        runner.run_upstream()
    if "nginx" in opts.groups:
        runner.run_nginx()
    if "bare" in opts.groups:
        runner.run_bare()
    needs_gateway = {"stepgate", "postgres", "growth", "soak"} & set(opts.groups)
    command: list[str] | None = None
    why = ""
    if needs_gateway:
        command, why = runner.stepgate_ready()
        if command is None:
            say(f"SKIP  Stepgate scenarios ({', '.join(sorted(needs_gateway))}): {why}")
    if "stepgate" in opts.groups:
        if command is None:
            for key, label in runner.stepgate_labels():
                runner.scenarios[key] = Scenario(key=key, label=label, skipped=why)
        else:
            runner.run_stepgate(command)
    if "postgres" in opts.groups:
        if command is None:
            runner.skip("stepgate-pg", "stepgate-pg scenarios", why)
        else:
            runner.run_postgres(command)
    if "restate" in opts.groups:
        runner.run_restate()
    if "growth" in opts.groups and command is not None:
        say(
            f"== 6. growth: {', '.join(f'{n:,}' for n in opts.growth.sizes)} finished runs, "
            f"{opts.growth.unfinished:,} unfinished"
        )
        growth = run_growth(bench, command, upstream, opts.growth)
    if "soak" in opts.groups and command is not None:
        say(f"== soak: {opts.soak_minutes:g} min")
        soak = run_soak(
            bench,
            command,
            upstream,
            minutes=opts.soak_minutes,
            connections=max(opts.connections),
            threads=opts.threads,
            durability=opts.durability,
            extra=opts.gateway_extra,
        )
        if "error" in soak:
            say(f"  soak failed: {soak['error']}")

    ordered = list(runner.scenarios.values())
    table = render_table(ordered, opts.connections)
    verdicts = evaluate(runner.scenarios, growth, soak)
    growth_text = render_growth(growth) if growth else ""
    elapsed = time.monotonic() - t0

    say("")
    say(table)
    for line in render_skips(ordered) + render_noise(ordered):
        say(line)
    if growth_text:
        say("")
        say(growth_text)
    say("")
    for v in verdicts:
        say(v.line())
    for line in info_lines(runner.scenarios):
        say(line)

    command_line = "python bench/run.py" + ("" if not opts.argv else " " + " ".join(opts.argv))
    markdown = "\n".join(
        [
            f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine.one_line(info)}; "
            f"git {info['git_commit']}; durability {opts.durability}; `{command_line}` "
            f"({elapsed / 60:.1f} min).",
            "",
            table,
            "",
            *render_skips(ordered),
            "",
            growth_text,
            "",
            "```",
            *[v.line() for v in verdicts],
            *info_lines(runner.scenarios),
            "```",
            "",
        ]
    )
    doc = {
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "command": command_line,
        "machine": info,
        "options": {
            "groups": list(opts.groups),
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "connections": list(opts.connections),
            "threads": opts.threads,
            "durability": opts.durability,
            "gateway_extra": opts.gateway_extra,
            "nginx_workers": opts.nginx_workers,
            "quick": opts.quick,
        },
        "scenarios": [s.to_json() for s in ordered],
        "growth": growth,
        "soak": soak,
        "verdicts": [
            {"target": v.target, "status": v.status, "value": v.value, "note": v.note}
            for v in verdicts
        ],
    }
    path = write_results(opts, doc, markdown)
    say(f"\nresults: {path} (and latest.json, latest.md); {elapsed / 60:.1f} min")
    if opts.strict and any(v.status == "FAIL" for v in verdicts):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.install:
        done = subprocess.run([str(BENCH_DIR / "setup.sh")], check=False)
        if done.returncode != 0:
            say("bench/setup.sh did not finish; continuing, missing peers will be skipped")
    procs = Processes()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        procs.hurry = True
        raise KeyboardInterrupt(f"signal {signum}")

    # Ctrl-C, SIGTERM and SIGHUP all stop every child, then exit. SIGINT is set
    # explicitly: a shell starting us in the background may have left it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return run(opts, procs)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every child process")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if not opts.keep_work:
            shutil.rmtree(opts.work_dir, ignore_errors=True)
        else:
            say(f"scratch space kept: {opts.work_dir}")


if __name__ == "__main__":
    sys.exit(main())
