"""The soak: steady durable load for minutes while the gateway's RSS is sampled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .load import LoadError, Request, check_once, expect_json, run_wrk
from .peers import Bench, PeerUnavailable, Upstream, start_stepgate, write_stepgate_config
from .processes import rss_bytes


def baseline_index(samples: Sequence[tuple[float, int]], duration_s: float) -> int:
    """The first sample after the warm-up (a minute, or a tenth of a short soak).

    Growth is judged from there: the first minute fills caches and pools, which is
    start-up, not a leak.
    """
    warm = min(60.0, duration_s * 0.1)
    for i, (elapsed, _) in enumerate(samples):
        if elapsed >= warm:
            return i
    return 0


def run_soak(
    bench: Bench,
    command: Sequence[str],
    upstream: Upstream,
    *,
    minutes: float,
    connections: int,
    threads: int,
    durability: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    config = write_stepgate_config(bench, "soak", upstream, durability=durability, extra=extra)
    try:
        gateway = start_stepgate(bench, command, config, name="soak")
    except PeerUnavailable as exc:
        return {"error": str(exc)}
    try:
        body = '{"bench": true}'
        request = Request(url=config.public_url + "/steps/3", body=body)
        via = "sdk"
        if check_once(request, expect=expect_json(steps=3)) is not None:
            request = Request(url=config.public_url + "/raw/3", body=body)
            via = "raw"
            problem = check_once(request, expect=expect_json(steps=3))
            if problem:
                return {"error": f"durable 3-step route does not work: {problem}"}
        samples: list[tuple[float, int]] = []

        def sample(elapsed: float) -> None:
            samples.append((round(elapsed, 1), rss_bytes(gateway.child.pid)))

        seconds = minutes * 60
        print(
            f"  soak: {minutes:g} min of durable 3-step [{via}] at {connections} conns", flush=True
        )
        try:
            result = run_wrk(
                bench.procs,
                request,
                connections=connections,
                threads=threads,
                seconds=seconds,
                on_tick=sample,
                tick_s=5.0,
            )
        except LoadError as exc:
            return {"error": str(exc)}
        sample(seconds)
        start = baseline_index(samples, seconds)
        baseline, final = samples[start][1], samples[-1][1]
        return {
            "minutes": minutes,
            "via": via,
            "rps": result.rps,
            "error_ratio": result.error_ratio,
            "load": result.to_json(),
            "baseline_at_s": samples[start][0],
            "baseline_rss_bytes": baseline,
            "final_rss_bytes": final,
            "max_rss_bytes": max(rss for _, rss in samples),
            "growth": final / baseline - 1 if baseline else 0.0,
            "samples": samples,
        }
    finally:
        bench.procs.stop(gateway.child)
