"""bench/replicas.py: spreading a load, merging wrk figures, the ledger check, the verdicts."""

from __future__ import annotations

from typing import Any

import replicas
from harness.load import LoadResult
from replicas import TOP, Load, Target


def wrk(rps: float, p50: float, requests: int) -> LoadResult:
    return LoadResult(
        connections=11,
        threads=1,
        seconds=8.0,
        requests=requests,
        rps=rps,
        p50_ms=p50,
        p90_ms=p50,
        p99_ms=p50 * 3,
        max_ms=p50 * 4,
        mean_ms=p50,
        errors=0,
        non_2xx=0,
    )


def figures(p50: float, rps: float) -> dict[int, Load]:
    def one(c: int, p: float, r: float) -> Load:
        return Load(
            connections=c,
            seconds=8.0,
            requests=int(r * 8),
            rps=r,
            p50_ms=p,
            p99_ms=p * 3,
            errors=0,
            target_cpu_ms=1.0,
            pg_cpu_ms=0.5,
            others=0.0,
        )

    return {1: one(1, p50, 1000 / p50), TOP: one(TOP, p50 * 10, rps)}


def target(key: str, rounds: list[tuple[float, float]]) -> Target:
    t = Target(key, key, "u", ["u"], "", [], lambda s, b: None)
    t.rounds = [figures(p50, rps) for p50, rps in rounds]
    return t


def test_thirty_two_connections_over_three_replicas() -> None:
    assert replicas.split(32, 3) == [11, 11, 10]
    assert replicas.split(1, 1) == [1]


def test_concurrent_wrk_figures_add_up() -> None:
    requests, rps, p50, p99, errors = replicas.combine([wrk(300, 10.0, 3000), wrk(100, 20.0, 1000)])
    assert (requests, rps, errors) == (4000, 400, 0)
    assert p50 == (10.0 * 3000 + 20.0 * 1000) / 4000
    assert p99 == 60.0


def ledger(
    executed: dict[str, dict[str, list[float]]],
    acked: dict[str, dict[str, float]],
    invoked: dict[str, list[float]],
) -> dict[str, Any]:
    return {"executed": executed, "acked": acked, "invoked": invoked}


def test_a_step_executed_after_its_ack_is_caught_and_a_cut_one_is_not() -> None:
    a = ledger({"r1": {"s0": [1.0], "s1": [1.1]}}, {"r1": {"s0": 1.05}}, {"r1": [0.9]})
    # B replays s0, runs s1 again (it was cut short on A) and s2.
    b = ledger({"r1": {"s1": [5.0], "s2": [5.1]}}, {"r1": {"s1": 5.05, "s2": 5.15}}, {"r1": [4.9]})
    good = replicas.analyse_ledgers({"A": a, "B": b, "C": ledger({}, {}, {})}, ["r1"])
    assert good["repeated_after_ack"] == []
    assert good["executions_by_step"] == {"s0": 1, "s1": 2, "s2": 1}
    assert good["resumed_by"] == {"B": 1}
    assert good["first_resumed_at"] == 4.9

    # C ran s0 again although A's write of it had been acknowledged.
    c = ledger({"r1": {"s0": [6.0]}}, {}, {"r1": [5.9]})
    bad = replicas.analyse_ledgers({"A": a, "B": b, "C": c}, ["r1"])
    assert bad["repeated_after_ack"] == ["r1/s0"]


def test_table_ratios_and_the_one_replica_verdict() -> None:
    targets = [
        target("sqlite", [(3.0, 1000.0), (3.2, 900.0), (3.1, 950.0)]),
        target("pg1", [(4.0, 700.0), (4.1, 650.0), (4.2, 690.0)]),
        target("restate", [(8.0, 400.0)]),
    ]
    table = replicas.render_table(targets)
    row = next(line for line in table.splitlines() if line.startswith("| pg1 "))
    # medians: p50 4.1 vs 3.1 ms, 690 vs 950 req/s
    assert "| 4.100 | 1.32 | 690 | 0.73 | 1.73 |" in row
    status, note = replicas.pg1_verdict(targets)
    assert status == "PASS" and note.startswith("0.73 x")
    targets[1] = target("pg1", [(4.0, 500.0)])
    assert replicas.pg1_verdict(targets)[0] == "FAIL"
