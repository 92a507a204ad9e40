"""Load generation with wrk, and the single-request checks that precede it.

wrk is driven through `wrk/report.lua`, which prints one `BENCH_RESULT {json}` line;
that line, not wrk's human summary, is what we parse.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .processes import Processes, cpu_snapshot, foreign_cpu

LUA_SCRIPT = Path(__file__).resolve().parent.parent / "wrk" / "report.lua"
RESULT_PREFIX = "BENCH_RESULT "


class LoadError(Exception):
    """wrk could not run or printed no result line."""


@dataclass(frozen=True, slots=True)
class Request:
    """What every request of one load run looks like."""

    url: str
    method: str = "POST"
    body: str = ""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


@dataclass(frozen=True, slots=True)
class LoadResult:
    connections: int
    threads: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers together
    non_2xx: int
    foreign_cpu: float = 0.0  # share of the machine's CPU used by others meanwhile

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 1.0

    @property
    def busy_ratio(self) -> float:
        """Share of connection-time covered by completed requests.

        Near 1 in a healthy run. Well below 1 means time went to requests that never
        completed before wrk stopped (a stall at the end), which req/s then hides.
        """
        capacity = self.seconds * self.connections * 1000
        return self.requests * self.mean_ms / capacity if capacity else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_ratio"] = round(self.error_ratio, 6)
        data["busy_ratio"] = round(self.busy_ratio, 4)
        return data


def parse_wrk_output(stdout: str, *, connections: int, threads: int) -> LoadResult:
    """Turn wrk's output (with our Lua report line) into a LoadResult."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            raw = json.loads(line[len(RESULT_PREFIX) :])
            break
    else:
        raise LoadError("wrk printed no BENCH_RESULT line:\n" + stdout[-2000:])
    seconds = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    errors = (
        raw["connect_errors"]
        + raw["read_errors"]
        + raw["write_errors"]
        + raw["status_errors"]
        + raw["timeouts"]
    )
    return LoadResult(
        connections=connections,
        threads=threads,
        seconds=round(seconds, 3),
        requests=requests,
        rps=round(requests / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        mean_ms=round(raw["mean_us"] / 1000, 4),
        errors=int(errors),
        non_2xx=int(raw["status_errors"]),
    )


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    procs: Processes,
    request: Request,
    *,
    connections: int,
    threads: int,
    seconds: float,
    timeout_s: float = 10.0,
    on_tick: Callable[[float], None] | None = None,
    tick_s: float = 5.0,
    also_ours: Callable[[], Sequence[int]] | None = None,
) -> LoadResult:
    """One wrk run; wrk is a child like the servers so that Ctrl-C stops it too.

    `on_tick(elapsed_seconds)` is called every `tick_s` while wrk runs (RSS sampling).
    `also_ours()` lists processes outside the harness's tree whose CPU is part of what is
    measured, not noise (a PostgreSQL server's).
    """
    wrk = wrk_path()
    if wrk is None:
        raise LoadError("wrk not found")
    threads = max(1, min(threads, connections))
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(LUA_SCRIPT),
    ]
    for name, value in request.headers:
        argv += ["-H", f"{name}: {value}"]
    argv += [request.url, "--", request.method, request.body]
    ours: Callable[[], Sequence[int]] = also_ours or (lambda: ())
    before = cpu_snapshot(ours())
    child = procs.start("wrk", argv, log_path=None, capture=True)
    try:
        if on_tick is not None:
            # wrk prints only at the end, far below a pipe's capacity: waiting is safe.
            while child.popen.poll() is None:
                elapsed = time.monotonic() - child.started_at
                if elapsed > seconds + timeout_s + 30:
                    raise subprocess.TimeoutExpired(argv, elapsed)
                on_tick(elapsed)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=tick_s)
        out, _ = child.popen.communicate(timeout=seconds + timeout_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise LoadError("wrk did not finish in time") from exc
    finally:
        procs.stop(child)
    text = out.decode("utf-8", "replace")
    if child.popen.returncode != 0:
        raise LoadError(f"wrk exited with {child.popen.returncode}:\n{text[-2000:]}")
    result = parse_wrk_output(text, connections=connections, threads=threads)
    after = cpu_snapshot(ours())
    return replace(result, foreign_cpu=round(foreign_cpu(before, after), 4))


def check_once(
    request: Request,
    *,
    expect: Callable[[int, bytes], str | None],
    timeout: float = 10.0,
    attempts_for: float = 0.0,
) -> str | None:
    """Send one request; return None when `expect` accepts it, else why not.

    `attempts_for` > 0 retries for that many seconds (a peer that is still warming up).
    """
    deadline = time.monotonic() + attempts_for
    while True:
        problem = _check(request, expect=expect, timeout=timeout)
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(0.2)


def _check(
    request: Request, *, expect: Callable[[int, bytes], str | None], timeout: float
) -> str | None:
    req = urllib.request.Request(
        request.url,
        data=request.body.encode() if request.body else None,
        method=request.method,
        headers=dict(request.headers),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return expect(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()[:300]
        return f"HTTP {exc.code}: {body.decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return f"no answer: {exc}"


def expect_json(**fields: object) -> Callable[[int, bytes], str | None]:
    """A check that wants a 2xx JSON object containing `fields`."""

    def check(status: int, body: bytes) -> str | None:
        if not 200 <= status < 300:
            return f"HTTP {status}"
        try:
            data = json.loads(body)
        except ValueError:
            return f"not JSON: {body[:200]!r}"
        if not isinstance(data, dict):
            return f"not a JSON object: {body[:200]!r}"
        for key, value in fields.items():
            if data.get(key) != value:
                return f"expected {key}={value!r}, got {body[:200]!r}"
        return None

    return check


def headers_of(mapping: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(mapping.items())
