"""Verdicts and formatting of bench/run.py's report."""

from __future__ import annotations

from typing import Any

from harness.load import LoadResult, parse_wrk_output
from harness.report import (
    Scenario,
    evaluate,
    render_growth,
    render_table,
    resume_time,
    rss_after_runs,
)
from harness.soak import baseline_index


def load(c: int, rps: float, p50: float, *, errors: int = 0, requests: int = 10_000) -> LoadResult:
    return LoadResult(
        connections=c,
        threads=1,
        seconds=10.0,
        requests=requests,
        rps=rps,
        p50_ms=p50,
        p90_ms=p50,
        p99_ms=p50 * 2,
        max_ms=p50 * 3,
        mean_ms=p50,
        errors=errors,
        non_2xx=errors,
    )


def scenario(key: str, at1: tuple[float, float], at32: tuple[float, float], **kw: Any) -> Scenario:
    return Scenario(key=key, label=key, loads={1: load(1, *at1, **kw), 32: load(32, *at32, **kw)})


def suite() -> dict[str, Scenario]:
    items = [
        scenario("upstream", (8000, 0.10), (16000, 1.5)),
        scenario("nginx", (5000, 0.15), (9000, 3.0)),
        scenario("stepgate-plain", (3000, 0.35), (3000, 9.0)),
        scenario("stepgate-sdk-0", (800, 0.8), (2000, 15.0)),
        scenario("stepgate-sdk-3", (500, 1.3), (2200, 20.0)),
        scenario("stepgate-sdk-10", (250, 3.8), (600, 50.0)),
        scenario("restate-3", (100, 4.0), (700, 40.0)),
    ]
    return {s.key: s for s in items}


def by_target(verdicts: list[Any], prefix: str) -> Any:
    return next(v for v in verdicts if v.target.startswith(prefix))


def test_wrk_result_line_is_parsed() -> None:
    out = (
        "Running 1s test @ http://127.0.0.1:1/plain\n"
        'BENCH_RESULT {"requests": 5000, "duration_us": 2000000, "bytes": 1, '
        '"connect_errors": 1, "read_errors": 2, "write_errors": 0, "status_errors": 3, '
        '"timeouts": 4, "p50_us": 250, "p90_us": 400, "p99_us": 1200, "max_us": 9000, '
        '"mean_us": 300.5, "stdev_us": 10.0}\n'
    )
    r = parse_wrk_output(out, connections=32, threads=2)
    assert r.rps == 2500.0
    assert (r.p50_ms, r.p99_ms) == (0.25, 1.2)
    assert r.errors == 10 and r.non_2xx == 3


def test_targets_pass_and_fail_on_the_numbers() -> None:
    verdicts = evaluate(suite(), None, None)
    # 3000 / 9000 = 0.33 >= 0.30
    assert by_target(verdicts, "plain route throughput").status == "PASS"
    # 0.35 - 0.10 = 0.25 ms <= 0.3
    assert by_target(verdicts, "added p50").status == "PASS"
    # 2000 / 3000 = 0.67 >= 0.6
    assert (
        by_target(verdicts, "durable 0 steps throughput >= 0.6 x plain (32 conns) [sdk]").status
        == "PASS"
    )
    # (3.8 - 0.8) / 10 = 0.30 ms per step
    assert (
        by_target(verdicts, "one checkpointed step <= 0.30 ms p50 (1 conn) [sdk]").status == "PASS"
    )
    # 1.3 / 4.0 = 0.325 <= 0.35; 2200 / 700 = 3.14 >= 3
    assert (
        by_target(verdicts, "durable 3-step p50 (1 conn) <= 0.35 x Restate's [sdk]").status
        == "PASS"
    )
    assert (
        by_target(verdicts, "durable 3-step throughput (32 conns) >= 3 x Restate's [sdk]").status
        == "PASS"
    )
    # The raw variant was not measured at all: skipped, not failed.
    assert (
        by_target(verdicts, "one checkpointed step <= 0.30 ms p50 (1 conn) [raw]").status == "SKIP"
    )

    slow = suite()
    slow["stepgate-plain"] = scenario("stepgate-plain", (3000, 0.45), (2000, 9.0))
    verdicts = evaluate(slow, None, None)
    assert by_target(verdicts, "plain route throughput").status == "FAIL"
    assert by_target(verdicts, "added p50").status == "FAIL"


def test_errors_on_our_side_fail_but_a_broken_reference_skips() -> None:
    scenarios = suite()
    scenarios["stepgate-plain"] = scenario("stepgate-plain", (3000, 0.3), (3000, 9.0), errors=500)
    assert by_target(evaluate(scenarios, None, None), "plain route throughput").status == "FAIL"

    scenarios = suite()
    scenarios["nginx"] = scenario("nginx", (5000, 0.15), (9000, 3.0), errors=500)
    assert by_target(evaluate(scenarios, None, None), "plain route throughput").status == "SKIP"


def test_restate_missing_skips_with_the_issue_reference_in_the_note() -> None:
    scenarios = suite()
    del scenarios["restate-3"]
    verdict = by_target(evaluate(scenarios, None, None), "durable 3-step p50 (1 conn)")
    assert verdict.status == "SKIP"
    assert "4.8 ms" in verdict.note


def test_growth_targets_need_the_full_sizes() -> None:
    small = {"finished": {"sizes": {"5000": {"runs": 5000, "rss_bytes": 50_000_000}}}}
    assert rss_after_runs(small).status == "SKIP"
    big = {"finished": {"sizes": {"100000": {"runs": 100_000, "rss_bytes": 120_000_000}}}}
    assert rss_after_runs(big).status == "FAIL"
    resumed = {"unfinished": {"expected": 100_000, "resumed": 100_000, "all_resumed_s": 19.5}}
    verdict = resume_time(resumed)
    assert verdict.status == "PASS"
    assert verdict.target == "100,000 unfinished runs resumed within 20 s of start-up"
    slow = {"unfinished": {"expected": 100_000, "resumed": 100_000, "all_resumed_s": 20.5}}
    assert resume_time(slow).status == "FAIL"
    late = {"unfinished": {"expected": 100_000, "resumed": 90_000}}
    assert resume_time(late).status == "FAIL"
    # A quick run's 1,000 (or the 10,000 of issue 6) say nothing of 100,000.
    few = {"unfinished": {"expected": 10_000, "resumed": 10_000, "all_resumed_s": 4.2}}
    assert resume_time(few).status == "SKIP"


def test_table_has_a_row_per_measured_scenario_only() -> None:
    scenarios = [*suite().values(), Scenario(key="x", label="skipped one", skipped="why")]
    table = render_table(scenarios, (1, 32))
    assert table.count("\n") == 1 + len(suite())
    assert "skipped one" not in table
    assert "| nginx | 5,000 | 0.150 | 0.300 | 9,000 | 3.000 | 6.000 | 0 | - |" in table


def test_soak_baseline_skips_the_first_minute() -> None:
    samples = [(0.0, 10), (5.0, 20), (59.0, 30), (61.0, 40), (600.0, 41)]
    assert baseline_index(samples, 600.0) == 3
    # A two-minute smoke soak warms up for a tenth of its length.
    assert baseline_index([(0.0, 1), (10.0, 2), (13.0, 3)], 120.0) == 2


def test_a_stall_at_the_end_of_a_load_is_reported() -> None:
    from harness.report import render_noise

    healthy = scenario("restate-0", (333, 3.0), (1064, 30.0), requests=3330)
    # 508 requests of ~7.8 ms in 10 s at one connection: 6 s are missing.
    stalled = Scenario(
        key="restate-3", label="restate 3 steps", loads={1: load(1, 50.8, 7.8, requests=508)}
    )
    healthy.loads[32] = load(32, 1064, 30.0, requests=10640)
    lines = render_noise([healthy, stalled])
    assert len(lines) == 1 and lines[0].startswith("STALL restate 3 steps @1")


def test_the_plain_route_is_held_to_a_bare_aiohttp_proxy() -> None:
    scenarios = suite()
    target = "plain route throughput >= 0.95 x a bare aiohttp proxy"
    assert by_target(evaluate(scenarios, None, None), target).status == "SKIP"  # not measured
    scenarios["bare"] = scenario("bare", (3100, 0.30), (3150, 8.0))
    assert by_target(evaluate(scenarios, None, None), target).status == "PASS"  # 0.952 x
    scenarios["bare"] = scenario("bare", (3500, 0.30), (3200, 8.0))
    verdict = by_target(evaluate(scenarios, None, None), target)
    assert verdict.status == "FAIL" and verdict.value.startswith("0.94 x")


def with_steps(key: str, p50_0: float, p50_10: float, rps_3: float = 1000.0) -> dict[str, Scenario]:
    return {
        f"{key}-0": scenario(f"{key}-0", (800, p50_0), (2000, 15.0)),
        f"{key}-3": scenario(f"{key}-3", (500, p50_0 * 2), (rps_3, 20.0)),
        f"{key}-10": scenario(f"{key}-10", (250, p50_10), (600, 50.0)),
    }


def test_the_minimal_client_is_judged_per_step_and_the_sdk_against_it() -> None:
    scenarios = suite()  # sdk: (3.8 - 0.8) / 10 = 0.30 ms a step
    minimal = "SDK transport within 0.05 ms/step of the minimal client"
    assert by_target(evaluate(scenarios, None, None), minimal).status == "SKIP"
    scenarios |= with_steps("stepgate-min", 0.8, 3.35)  # 0.255 ms a step: the SDK +0.045
    verdicts = evaluate(scenarios, None, None)
    assert by_target(verdicts, "one checkpointed step <= 0.30 ms p50 (1 conn) [min]").status == (
        "PASS"
    )
    verdict = by_target(verdicts, minimal)
    assert verdict.status == "PASS" and verdict.value.startswith("+0.045 ms/step")
    scenarios |= with_steps("stepgate-min", 0.8, 3.2)  # 0.24: the SDK is 0.06 behind
    verdict = by_target(evaluate(scenarios, None, None), minimal)
    assert verdict.status == "FAIL" and verdict.value.startswith("+0.060 ms/step")
    # The minimal client erring is a broken reference, not a slow SDK.
    scenarios["stepgate-min-10"] = scenario("stepgate-min-10", (250, 3.2), (600, 50.0), errors=500)
    assert by_target(evaluate(scenarios, None, None), minimal).status == "SKIP"


def test_postgresql_per_step_and_throughput_against_restate() -> None:
    per_step = "PostgreSQL: one checkpointed step <= 0.60 ms p50 (1 conn) [sdk]"
    throughput = "PostgreSQL: durable 3-step throughput (32 conns) >= 2 x Restate's [sdk]"
    scenarios = suite()  # restate-3: 700 req/s at 32
    assert by_target(evaluate(scenarios, None, None), per_step).status == "SKIP"
    scenarios |= with_steps("stepgate-pg-sdk", 1.0, 7.0, rps_3=1500.0)  # 0.6 ms; 2.14 x
    verdicts = evaluate(scenarios, None, None)
    assert by_target(verdicts, per_step).status == "PASS"
    assert by_target(verdicts, throughput).value.startswith("2.14 x")
    assert by_target(verdicts, throughput).status == "PASS"
    scenarios |= with_steps("stepgate-pg-sdk", 1.0, 7.5, rps_3=1300.0)  # 0.65 ms; 1.86 x
    verdicts = evaluate(scenarios, None, None)
    assert by_target(verdicts, per_step).status == "FAIL"
    assert by_target(verdicts, throughput).status == "FAIL"
    del scenarios["restate-3"]
    assert by_target(evaluate(scenarios, None, None), throughput).status == "SKIP"


def test_the_unfinished_line_says_how_long_accepting_them_took() -> None:
    growth = {
        "unfinished": {
            "expected": 100_000,
            "fill": {"seconds": 67.84},
            "ready_s": 18.1,
            "resumed": 100_000,
            "all_resumed_s": 216.25,
        }
    }
    assert render_growth(growth) == (
        "unfinished runs: 100,000 accepted (in 67.8 s), gateway killed (SIGKILL) and restarted: "
        "ready in 18.10 s, 100,000 resumed, the last 216.25 s after spawn"
    )
