"""The results table and the verdicts against issues #6 and #15's targets (pure: no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .load import LoadResult

MB = 1_000_000
MAX_ERROR_RATIO = 0.01  # above this a figure is not a measurement of the happy path
NOISE_THRESHOLD = 0.05  # other processes' share of the CPU worth a warning
STALL_THRESHOLD = 0.8  # busy ratio below which a load probably had a stuck request

# Restate as measured for issue #6 on this kind of machine; shown when Restate
# could not run here. Targets are only judged against a peer measured in the same run.
RESTATE_REFERENCE_P50_MS = {0: 2.9, 3: 4.8, 10: 10.6}
RESTATE_REFERENCE_RPS_32 = {0: 1650.0, 3: 690.0}

Status = Literal["PASS", "FAIL", "SKIP"]

PG_KEY = "stepgate-pg-sdk"  # the gateway on PostgreSQL, SDK handler: stepgate-pg-sdk-{0,3,10}


@dataclass(slots=True)
class Scenario:
    # upstream, nginx, bare, stepgate-plain, stepgate-{sdk,raw,min}-3, stepgate-pg-sdk-3, restate-3
    key: str
    label: str
    loads: dict[int, LoadResult] = field(default_factory=dict)  # by connections
    rss_bytes: int | None = None  # the process in the middle, after the load
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "skipped": self.skipped,
            "rss_bytes": self.rss_bytes,
            "loads": {str(c): r.to_json() for c, r in sorted(self.loads.items())},
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    status: Status
    value: str
    note: str = ""

    def line(self) -> str:
        note = f"  [{self.note}]" if self.note else ""
        return f"{self.status:4}  {self.target}: {self.value}{note}"


# --- formatting ------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def fmt_mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def render_table(scenarios: Sequence[Scenario], connections: Sequence[int]) -> str:
    """One markdown row per scenario: req/s, p50, p99 per connection count, and RSS."""
    head = ["scenario"]
    for c in connections:
        head += [f"req/s @{c}", f"p50 ms @{c}", f"p99 ms @{c}"]
    head += ["errors", "RSS MB"]
    rows = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for s in scenarios:
        if s.skipped:
            continue
        cells = [s.label]
        for c in connections:
            r = s.loads.get(c)
            cells += [fmt_rps(r.rps), fmt_ms(r.p50_ms), fmt_ms(r.p99_ms)] if r else ["-"] * 3
        errors = sum(r.errors for r in s.loads.values())
        cells += [f"{errors:,}", fmt_mb(s.rss_bytes)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def render_skips(scenarios: Sequence[Scenario]) -> list[str]:
    return [f"SKIP  {s.label}: {s.skipped}" for s in scenarios if s.skipped]


def render_noise(scenarios: Sequence[Scenario]) -> list[str]:
    """Loads whose figures deserve suspicion: a busy machine, or a stall."""
    lines = []
    for s in scenarios:
        for c, r in sorted(s.loads.items()):
            if r.foreign_cpu >= NOISE_THRESHOLD:
                lines.append(
                    f"NOISE {s.label} @{c}: other processes used {r.foreign_cpu:.0%} "
                    "of the machine's CPU meanwhile"
                )
            if r.busy_ratio < STALL_THRESHOLD:
                lines.append(
                    f"STALL {s.label} @{c}: completed requests cover only {r.busy_ratio:.0%} "
                    "of the run; a request was stuck when wrk stopped, req/s is understated"
                )
    return lines


def render_growth(growth: Mapping[str, Any]) -> str:
    lines: list[str] = []
    finished = growth.get("finished", {})
    if "error" in finished:
        lines.append(f"finished runs: not measured ({finished['error']})")
    sizes = finished.get("sizes", {})
    if sizes:
        lines += [
            "| finished runs in store | poll p50 ms | poll p99 ms | start-up s "
            "| RSS MB serving | RSS MB after start-up |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in sizes.values():
            poll = entry.get("poll", {})
            start = entry.get("startup", {})
            lines.append(
                f"| {entry['runs']:,} | {fmt_ms(poll.get('p50_ms', math.nan))} "
                f"| {fmt_ms(poll.get('p99_ms', math.nan))} "
                f"| {_fmt_s(start.get('ready_s'))} | {fmt_mb(entry.get('rss_bytes'))} "
                f"| {fmt_mb(start.get('rss_bytes'))} |"
            )
    unfinished = growth.get("unfinished", {})
    if "error" in unfinished:
        lines.append(f"unfinished runs: not measured ({unfinished['error']})")
    elif unfinished:
        resumed = unfinished.get("all_resumed_s")
        fill_s = unfinished.get("fill", {}).get("seconds")
        lines.append(
            f"unfinished runs: {unfinished.get('expected', 0):,} accepted"
            + (f" (in {fill_s:.1f} s)" if fill_s is not None else "")
            + ", gateway killed "
            f"(SIGKILL) and restarted: ready in {_fmt_s(unfinished.get('ready_s'))} s, "
            f"{unfinished.get('resumed', 0):,} resumed"
            + (f", the last {resumed:.2f} s after spawn" if resumed is not None else "")
        )
    return "\n".join(lines)


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- verdicts ----------------------------------------------------------------------------


def _get(scenarios: Mapping[str, Scenario], key: str, c: int) -> tuple[LoadResult | None, str]:
    s = scenarios.get(key)
    if s is None:
        return None, f"{key} not run"
    if s.skipped:
        return None, f"{key} skipped"
    r = s.loads.get(c)
    if r is None:
        return None, f"{key} not measured at {c} connection(s)"
    if r.error_ratio > MAX_ERROR_RATIO:
        return None, f"{key} had {r.error_ratio:.1%} errors at {c} connection(s)"
    return r, ""


def _missing(target: str, ours: str, why_ours: str, why_ref: str) -> Verdict:
    """Our side broken is a FAIL (the gateway erred); a missing reference is a SKIP."""
    if why_ours and "errors" in why_ours:
        return Verdict(target, "FAIL", why_ours)
    return Verdict(target, "SKIP", why_ours or why_ref)


def _judge(ok: bool) -> Status:
    return "PASS" if ok else "FAIL"


def plain_vs_nginx(sc: Mapping[str, Scenario]) -> Verdict:
    target = "plain route throughput >= 0.30 x nginx (32 conns)"
    ours, why = _get(sc, "stepgate-plain", 32)
    ref, why_ref = _get(sc, "nginx", 32)
    if ours is None or ref is None:
        return _missing(target, "stepgate-plain", why, why_ref)
    ratio = ours.rps / ref.rps
    return Verdict(
        target,
        _judge(ratio >= 0.30),
        f"{ratio:.2f} x ({fmt_rps(ours.rps)} vs {fmt_rps(ref.rps)} req/s)",
    )


def plain_vs_bare(sc: Mapping[str, Scenario]) -> Verdict:
    target = "plain route throughput >= 0.95 x a bare aiohttp proxy (32 conns)"
    ours, why = _get(sc, "stepgate-plain", 32)
    ref, why_ref = _get(sc, "bare", 32)
    if ours is None or ref is None:
        return _missing(target, "stepgate-plain", why, why_ref)
    ratio = ours.rps / ref.rps
    return Verdict(
        target,
        _judge(ratio >= 0.95),
        f"{ratio:.2f} x ({fmt_rps(ours.rps)} vs {fmt_rps(ref.rps)} req/s)",
    )


def added_latency(sc: Mapping[str, Scenario]) -> Verdict:
    target = "added p50 latency, plain route, 1 conn <= 0.3 ms"
    ours, why = _get(sc, "stepgate-plain", 1)
    ref, why_ref = _get(sc, "upstream", 1)
    if ours is None or ref is None:
        return _missing(target, "stepgate-plain", why, why_ref)
    added = ours.p50_ms - ref.p50_ms
    return Verdict(
        target,
        _judge(added <= 0.3),
        f"{added:+.3f} ms ({fmt_ms(ours.p50_ms)} vs {fmt_ms(ref.p50_ms)} direct)",
    )


def durable_vs_plain(sc: Mapping[str, Scenario], via: str) -> Verdict:
    target = f"durable 0 steps throughput >= 0.6 x plain (32 conns) [{via}]"
    ours, why = _get(sc, f"stepgate-{via}-0", 32)
    ref, why_ref = _get(sc, "stepgate-plain", 32)
    if ours is None or ref is None:
        return _missing(target, via, why, why_ref)
    ratio = ours.rps / ref.rps
    return Verdict(
        target,
        _judge(ratio >= 0.6),
        f"{ratio:.2f} x ({fmt_rps(ours.rps)} vs {fmt_rps(ref.rps)} req/s)",
    )


def step_cost(p50_0: float, p50_10: float) -> float:
    """Cost of one checkpointed step: the p50 slope from 0 to 10 steps."""
    return (p50_10 - p50_0) / 10


def _step_cost_of(sc: Mapping[str, Scenario], key: str) -> tuple[float | None, str, str]:
    """(cost per step, the figures it comes from, why not) for scenarios `{key}-0`, `{key}-10`."""
    zero, why0 = _get(sc, f"{key}-0", 1)
    ten, why10 = _get(sc, f"{key}-10", 1)
    if zero is None or ten is None:
        return None, "", why0 or why10
    figures = f"p50 {fmt_ms(zero.p50_ms)} ms at 0, {fmt_ms(ten.p50_ms)} ms at 10 steps"
    return step_cost(zero.p50_ms, ten.p50_ms), figures, ""


def per_step(
    sc: Mapping[str, Scenario], via: str, *, key: str = "", limit: float = 0.30, label: str = ""
) -> Verdict:
    """One checkpointed step: `stepgate-{via}` (or `key`) from 0 to 10 steps, p50 at 1 conn."""
    target = f"{label}one checkpointed step <= {limit:.2f} ms p50 (1 conn) [{via}]"
    cost, figures, why = _step_cost_of(sc, key or f"stepgate-{via}")
    if cost is None:
        return _missing(target, via, why, "")
    return Verdict(target, _judge(cost <= limit), f"{cost:.3f} ms/step ({figures})")


def sdk_vs_minimal(sc: Mapping[str, Scenario], limit: float = 0.05) -> Verdict:
    """Issue 15: the SDK's transport within `limit` ms a step of the minimal client's."""
    target = f"SDK transport within {limit:.2f} ms/step of the minimal client [sdk - min]"
    sdk, _, why = _step_cost_of(sc, "stepgate-sdk")
    ref, _, why_ref = _step_cost_of(sc, "stepgate-min")
    if sdk is None or ref is None:
        return _missing(target, "sdk", why, why_ref)
    gap = sdk - ref
    return Verdict(
        target,
        _judge(gap <= limit),
        f"{gap:+.3f} ms/step ({sdk:.3f} ms/step [sdk] vs {ref:.3f} [min])",
    )


def vs_restate_latency(sc: Mapping[str, Scenario], via: str) -> Verdict:
    target = f"durable 3-step p50 (1 conn) <= 0.35 x Restate's [{via}]"
    ours, why = _get(sc, f"stepgate-{via}-3", 1)
    ref, why_ref = _get(sc, "restate-3", 1)
    if ours is None:
        return _missing(target, via, why, "")
    if ref is None:
        vs = ours.p50_ms / RESTATE_REFERENCE_P50_MS[3]
        return Verdict(
            target,
            "SKIP",
            f"{why_ref}",
            f"vs issue #6 reference {RESTATE_REFERENCE_P50_MS[3]} ms: {vs:.2f} x",
        )
    ratio = ours.p50_ms / ref.p50_ms
    return Verdict(
        target,
        _judge(ratio <= 0.35),
        f"{ratio:.2f} x ({fmt_ms(ours.p50_ms)} vs {fmt_ms(ref.p50_ms)} ms)",
    )


def vs_restate_throughput(
    sc: Mapping[str, Scenario], via: str, *, key: str = "", factor: float = 3.0, label: str = ""
) -> Verdict:
    target = f"{label}durable 3-step throughput (32 conns) >= {factor:g} x Restate's [{via}]"
    ours, why = _get(sc, f"{key or f'stepgate-{via}'}-3", 32)
    ref, why_ref = _get(sc, "restate-3", 32)
    if ours is None:
        return _missing(target, via, why, "")
    if ref is None:
        vs = ours.rps / RESTATE_REFERENCE_RPS_32[3]
        return Verdict(
            target,
            "SKIP",
            f"{why_ref}",
            f"vs issue #6 reference {RESTATE_REFERENCE_RPS_32[3]:,.0f} req/s: {vs:.2f} x",
        )
    ratio = ours.rps / ref.rps
    return Verdict(
        target,
        _judge(ratio >= factor),
        f"{ratio:.2f} x ({fmt_rps(ours.rps)} vs {fmt_rps(ref.rps)} req/s)",
    )


def rss_after_runs(growth: Mapping[str, Any] | None, runs: int = 100_000) -> Verdict:
    target = f"gateway RSS <= 100 MB after {runs:,} runs"
    sizes = (growth or {}).get("finished", {}).get("sizes", {})
    if not sizes:
        return Verdict(target, "SKIP", "growth scenario not run or failed")
    largest = max(sizes.values(), key=lambda e: int(e["runs"]))
    rss = int(largest["rss_bytes"])
    value = f"{rss / MB:.1f} MB after {int(largest['runs']):,} runs"
    if int(largest["runs"]) < runs:
        return Verdict(target, "SKIP", value, f"fewer than {runs:,} runs measured")
    return Verdict(target, _judge(rss <= 100 * MB), value)


def soak_flat(soak: Mapping[str, Any] | None, minutes: float = 10.0) -> Verdict:
    target = f"RSS flat (< 10% growth) over a {minutes:.0f}-minute soak"
    if not soak:
        return Verdict(target, "SKIP", "soak not run (use --soak)")
    if "error" in soak:
        return Verdict(target, "FAIL", str(soak["error"]))
    growth = float(soak["growth"])
    value = (
        f"{growth:+.1%} ({fmt_mb(soak['baseline_rss_bytes'])} -> "
        f"{fmt_mb(soak['final_rss_bytes'])} MB over {soak['minutes']:.1f} min, "
        f"{fmt_rps(soak['rps'])} req/s)"
    )
    if float(soak["minutes"]) < minutes:
        return Verdict(target, "SKIP", value, "shorter than the target's soak")
    if float(soak.get("error_ratio", 0.0)) > MAX_ERROR_RATIO:
        return Verdict(target, "FAIL", value, f"{soak['error_ratio']:.1%} errors")
    return Verdict(target, _judge(growth < 0.10), value)


RESUME_RUNS = 100_000  # issue 15: "100,000 unfinished runs resumed in <= 20 s"
RESUME_LIMIT_S = 20.0


def resume_time(
    growth: Mapping[str, Any] | None, runs: int = RESUME_RUNS, limit_s: float = RESUME_LIMIT_S
) -> Verdict:
    target = f"{runs:,} unfinished runs resumed within {limit_s:g} s of start-up"
    unfinished = (growth or {}).get("unfinished", {})
    if not unfinished:
        return Verdict(target, "SKIP", "growth scenario not run")
    if "error" in unfinished:
        return Verdict(target, "FAIL", str(unfinished["error"]))
    expected = int(unfinished.get("expected", 0))
    when = unfinished.get("all_resumed_s")
    value = f"{unfinished.get('resumed', 0):,}/{expected:,} resumed" + (
        f", the last {when:.2f} s after spawn" if when is not None else ""
    )
    if expected < runs:
        return Verdict(target, "SKIP", value, f"only {expected:,} runs measured")
    return Verdict(target, _judge(when is not None and when <= limit_s), value)


def evaluate(
    scenarios: Mapping[str, Scenario],
    growth: Mapping[str, Any] | None,
    soak: Mapping[str, Any] | None,
) -> list[Verdict]:
    verdicts = [plain_vs_nginx(scenarios), plain_vs_bare(scenarios), added_latency(scenarios)]
    for via in ("sdk", "raw"):
        verdicts += [
            durable_vs_plain(scenarios, via),
            per_step(scenarios, via),
            vs_restate_latency(scenarios, via),
            vs_restate_throughput(scenarios, via),
        ]
    verdicts += [per_step(scenarios, "min"), sdk_vs_minimal(scenarios)]
    verdicts += [
        per_step(scenarios, "sdk", key=PG_KEY, limit=0.6, label="PostgreSQL: "),
        vs_restate_throughput(scenarios, "sdk", key=PG_KEY, factor=2.0, label="PostgreSQL: "),
    ]
    verdicts += [rss_after_runs(growth), soak_flat(soak), resume_time(growth)]
    return verdicts


def info_lines(scenarios: Mapping[str, Scenario]) -> list[str]:
    """Context that is not a target: Restate's own per-step cost, as issue #6 quotes it."""
    lines = []
    zero, _ = _get(scenarios, "restate-0", 1)
    ten, _ = _get(scenarios, "restate-10", 1)
    if zero and ten:
        lines.append(
            f"INFO  Restate per step: {step_cost(zero.p50_ms, ten.p50_ms):.3f} ms p50 "
            f"(issue #6 reference: "
            f"{step_cost(RESTATE_REFERENCE_P50_MS[0], RESTATE_REFERENCE_P50_MS[10]):.2f} ms)"
        )
    for n in (0, 3):
        r, _ = _get(scenarios, f"restate-{n}", 32)
        if r:
            lines.append(
                f"INFO  Restate {n} steps @32: {fmt_rps(r.rps)} req/s "
                f"(issue #6 reference: {fmt_rps(RESTATE_REFERENCE_RPS_32[n])})"
            )
    return lines
