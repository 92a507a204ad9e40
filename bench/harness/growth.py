"""Scenario 6, growth: how Stepgate behaves with a full store.

Finished runs: one gateway serves N runs (POST /raw/0, durable, no steps), and at
each size we measure the poll latency of an old run, the gateway's RSS, and the
start-up time of a second gateway opened on a snapshot of that store (so the first
one keeps its whole history in memory for the RSS-after-N figure).

Unfinished runs: the upstream's /gate holds every request; N runs are accepted with
`Prefer: respond-async` (128 in flight by default: each acceptance is a committed write,
and more of them at once share a commit), the gateway is killed with SIGKILL (a crash),
the gate is opened and the gateway started again; we time how long until the upstream
has seen every one of the N runs again.

Everything here goes through `stepgate serve` and its HTTP API only; the single
exception is the snapshot, a SQLite online backup of the store file.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sqlite3
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fill import fill
from .load import LoadError, Request, check_once, expect_json, run_wrk
from .peers import (
    Bench,
    PeerUnavailable,
    Stepgate,
    Upstream,
    start_stepgate,
    write_stepgate_config,
)
from .processes import rss_bytes, wait_until


@dataclass(frozen=True, slots=True)
class GrowthOptions:
    sizes: tuple[int, ...]  # finished runs, ascending
    unfinished: int
    poll_seconds: float
    fill_concurrency: int
    unfinished_concurrency: int  # requests in flight while the unfinished runs are accepted
    fill_time_limit: float  # per fill step
    resume_timeout: float
    threads: int
    durability: str
    extra: dict[str, Any]


def _say(text: str) -> None:
    print(f"  growth: {text}", flush=True)


def _request(
    url: str, method: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request without following redirects (urllib would chase a 303)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def create_poll_probe(gateway: Stepgate) -> tuple[str | None, str]:
    """Start a run with respond-async and wait for it to end; return its poll URL."""
    public = gateway.config.public_url
    status, headers, body = _request(
        public + "/raw/0",
        "POST",
        body=b"{}",
        headers={"Content-Type": "application/json", "Prefer": "respond-async"},
    )
    location = headers.get("location")
    if status != 202 or not location:
        return None, f"respond-async answered {status} without Location: {body[:200]!r}"
    poll_url = urllib.parse.urljoin(public + "/", location)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sep = "&" if "?" in poll_url else "?"
        status, _, body = _request(poll_url + f"{sep}wait=5", "GET")
        if status == 200:
            return poll_url, "ok"
        if status != 202:
            return None, f"poll answered {status}: {body[:200]!r}"
    return None, "the probe run did not finish within 30 s"


def snapshot_store(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite store (online backup; WAL included)."""
    target.unlink(missing_ok=True)
    with (
        contextlib.closing(sqlite3.connect(source, timeout=30)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def _poll_latency(bench: Bench, poll_url: str, opts: GrowthOptions) -> dict[str, Any]:
    request = Request(url=poll_url, method="GET", body="", headers=())
    problem = check_once(request, expect=expect_json(steps=0))
    if problem:
        return {"error": problem}
    try:
        result = run_wrk(bench.procs, request, connections=1, threads=1, seconds=opts.poll_seconds)
    except LoadError as exc:
        return {"error": str(exc)}
    return result.to_json()


def _startup_on_snapshot(
    bench: Bench,
    command: Sequence[str],
    upstream: Upstream,
    source: Stepgate,
    size: int,
    opts: GrowthOptions,
) -> dict[str, Any]:
    config = write_stepgate_config(
        bench, f"startup-{size}", upstream, durability=opts.durability, extra=opts.extra
    )
    try:
        snapshot_store(source.config.store_path, config.store_path)
    except sqlite3.Error as exc:
        return {"error": f"could not snapshot the store: {exc}"}
    try:
        gateway = start_stepgate(bench, command, config, name=f"startup-{size}")
    except PeerUnavailable as exc:
        return {"error": str(exc)}
    out = {
        "ready_s": round(gateway.ready_s, 3),
        "ready_by": gateway.ready_by,
        "rss_bytes": rss_bytes(gateway.child.pid),
    }
    bench.procs.stop(gateway.child)
    with contextlib.suppress(OSError):
        for suffix in ("", "-wal", "-shm"):
            Path(str(config.store_path) + suffix).unlink(missing_ok=True)
    return out


def finished_runs(
    bench: Bench, command: Sequence[str], upstream: Upstream, opts: GrowthOptions
) -> dict[str, Any]:
    config = write_stepgate_config(
        bench, "growth", upstream, durability=opts.durability, extra=opts.extra
    )
    gateway = start_stepgate(bench, command, config, name="growth")
    out: dict[str, Any] = {"sizes": {}}
    poll_url, why = create_poll_probe(gateway)
    if poll_url is None:
        _say(f"poll latency not measured: {why}")
        out["poll_probe_error"] = why
    done = 1 if poll_url else 0  # the probe is a finished run too
    try:
        for size in sorted(opts.sizes):
            stats = fill(
                config.public_url + "/raw/0",
                size - done,
                concurrency=opts.fill_concurrency,
                time_limit=opts.fill_time_limit,
            )
            done += stats.ok
            _say(f"filled to {done:,} finished runs: {stats.summary()}")
            entry: dict[str, Any] = {
                "runs": done,
                "fill": stats.to_json(),
                "rss_bytes": rss_bytes(gateway.child.pid),
            }
            if poll_url:
                entry["poll"] = _poll_latency(bench, poll_url, opts)
            entry["startup"] = _startup_on_snapshot(bench, command, upstream, gateway, size, opts)
            out["sizes"][str(size)] = entry
            poll = entry.get("poll", {})
            _say(
                f"{done:,} runs: RSS {entry['rss_bytes'] / 2**20:.1f} MiB, "
                f"poll p50 {poll.get('p50_ms', float('nan')):.3f} ms, "
                f"start-up {entry['startup'].get('ready_s', float('nan')):.2f} s"
            )
            if stats.timed_out or stats.gave_up:
                _say("stopping the growth fill early (see above)")
                break
    finally:
        bench.procs.stop(gateway.child)
    return out


def _gate(upstream: Upstream, *, open_: bool) -> None:
    _request(f"{upstream.url}/_bench/gate?open={1 if open_ else 0}", "POST")


def _gate_stats(upstream: Upstream) -> dict[str, Any]:
    _, _, body = _request(upstream.url + "/_bench/stats", "GET")
    data: dict[str, Any] = json.loads(body)
    return data


def unfinished_runs(
    bench: Bench, command: Sequence[str], upstream: Upstream, opts: GrowthOptions
) -> dict[str, Any]:
    config = write_stepgate_config(
        bench, "resume", upstream, durability=opts.durability, extra=opts.extra
    )
    gateway = start_stepgate(bench, command, config, name="resume")
    out: dict[str, Any] = {"runs": opts.unfinished}
    _gate(upstream, open_=False)
    try:
        stats = fill(
            config.public_url + "/gate",
            opts.unfinished,
            headers={"Prefer": "respond-async"},
            ok_statuses=frozenset({202}),
            concurrency=opts.unfinished_concurrency,
            time_limit=opts.fill_time_limit,
        )
        out["fill"] = stats.to_json()
        out["held_at_kill"] = _gate_stats(upstream)["gate_held"]
        _say(f"accepted {stats.summary()}; upstream holds {out['held_at_kill']:,}")
        bench.procs.kill(gateway.child)
    finally:
        _gate(upstream, open_=True)  # also resets the count of runs seen since open
    if stats.ok == 0:
        out["error"] = "no run was accepted"
        return out
    expected = stats.ok

    gateway = start_stepgate(bench, command, config, name="resume-restart")
    spawned = gateway.child.started_wall
    out["ready_s"] = round(gateway.ready_s, 3)
    _say(f"restart: ready in {gateway.ready_s:.2f} s; waiting for {expected:,} runs")
    next_report = time.monotonic() + 30

    def all_seen() -> bool:
        nonlocal next_report
        seen = int(_gate_stats(upstream)["gate_runs_since_open"])
        if time.monotonic() >= next_report:  # a long wait says how it goes
            next_report += 30
            _say(f"{seen:,} resumed, {time.time() - spawned:.0f} s after spawn")
        return seen >= expected

    try:
        reached = wait_until(
            all_seen,
            timeout=opts.resume_timeout,
            interval=0.05,
            child=gateway.child,
        )
        seen = _gate_stats(upstream)
        out["resumed"] = seen["gate_runs_since_open"]
        out["expected"] = expected
        out["all_resumed"] = reached
        if seen["gate_first_since_open"] is not None:
            out["first_resumed_s"] = round(seen["gate_first_since_open"] - spawned, 3)
        if reached and seen["gate_last_since_open"] is not None:
            out["all_resumed_s"] = round(seen["gate_last_since_open"] - spawned, 3)
        out["rss_bytes"] = rss_bytes(gateway.child.pid)
        _say(
            f"restart: ready in {out['ready_s']:.2f} s, resumed {out['resumed']:,}/{expected:,}"
            + (
                f" by {out['all_resumed_s']:.2f} s after spawn"
                if "all_resumed_s" in out
                else f" (gave up after {opts.resume_timeout:.0f} s)"
            )
        )
    finally:
        bench.procs.stop(gateway.child)
    return out


def run_growth(
    bench: Bench, command: Sequence[str], upstream: Upstream, opts: GrowthOptions
) -> dict[str, Any]:
    result: dict[str, Any] = {"options": {"sizes": list(opts.sizes), "unfinished": opts.unfinished}}
    try:
        result["finished"] = finished_runs(bench, command, upstream, opts)
    except PeerUnavailable as exc:
        result["finished"] = {"error": str(exc)}
        _say(f"finished-runs part failed: {exc}")
    try:
        result["unfinished"] = unfinished_runs(bench, command, upstream, opts)
    except PeerUnavailable as exc:
        result["unfinished"] = {"error": str(exc)}
        _say(f"unfinished-runs part failed: {exc}")
    return result
