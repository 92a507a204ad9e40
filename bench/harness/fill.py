"""Issue many requests as fast as the gateway takes them (pre-filling a store).

wrk cannot stop after N requests, and the growth scenarios need exact counts and
the status of every answer, so this is a small aiohttp client instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class FillStats:
    wanted: int
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)  # unexpected statuses
    errors: Counter[str] = field(default_factory=Counter)  # no answer, by exception type
    seconds: float = 0.0
    timed_out: bool = False
    gave_up: bool = False  # too many failures to go on

    @property
    def failed(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    def summary(self) -> str:
        rate = self.ok / self.seconds if self.seconds else 0.0
        text = f"{self.ok:,}/{self.wanted:,} in {self.seconds:.1f} s ({rate:,.0f}/s)"
        if self.failed:
            text += f", failed: {dict(self.statuses)} {dict(self.errors)}"
        if self.timed_out:
            text += ", stopped at the time limit"
        if self.gave_up:
            text += ", gave up after too many failures"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "wanted": self.wanted,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "errors": dict(self.errors),
            "timed_out": self.timed_out,
            "gave_up": self.gave_up,
        }


async def _fill(
    url: str,
    count: int,
    *,
    body: bytes,
    headers: dict[str, str],
    ok_statuses: frozenset[int],
    concurrency: int,
    time_limit: float,
    max_failures: int,
) -> FillStats:
    stats = FillStats(wanted=count)
    remaining = count
    started = time.monotonic()
    deadline = started + time_limit
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0 and not stats.gave_up:
            if time.monotonic() >= deadline:
                stats.timed_out = True
                return
            remaining -= 1
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status in ok_statuses:
                        stats.ok += 1
                    else:
                        stats.statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                stats.errors[type(exc).__name__] += 1
            if stats.failed > max_failures:
                stats.gave_up = True

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with asyncio.TaskGroup() as group:
            for i in range(concurrency):
                group.create_task(worker(session), name=f"fill-worker-{i}")
    stats.seconds = time.monotonic() - started
    return stats


def fill(
    url: str,
    count: int,
    *,
    body: bytes = b"{}",
    headers: dict[str, str] | None = None,
    ok_statuses: frozenset[int] = frozenset({200}),
    concurrency: int = 32,
    time_limit: float = 600.0,
    max_failures: int = 1000,
) -> FillStats:
    """POST `count` requests to `url` with `concurrency` in flight; blocking."""
    if count <= 0:
        return FillStats(wanted=0)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return asyncio.run(
        _fill(
            url,
            count,
            body=body,
            headers=all_headers,
            ok_statuses=ok_statuses,
            concurrency=concurrency,
            time_limit=time_limit,
            max_failures=max_failures,
        )
    )
