"""The conformance runner's own checks must be able to fail: the matcher and the loader alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conformance.matching import (
    MISSING,
    ScenarioError,
    check,
    check_all,
    check_list,
    json_equal,
    lookup,
    resolve,
)
from tests.conformance.test_conformance import SCENARIOS, STEPS, load_scenarios

REFS = {"run_id": "r1", "steps": {"reserve-flight": {"output": {"reference": "FL-1"}}}}


def test_lookup_walks_dicts_and_lists() -> None:
    value = {"a": {"b": [10, {"c": None}]}}
    assert lookup(value, "a.b.0") == 10
    assert lookup(value, "a.b.1.c") is None
    assert lookup(value, "") is value
    assert lookup(value, "a.x") is MISSING
    assert lookup(value, "a.b.2") is MISSING
    assert lookup("text", "a") is MISSING


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (1, 1.0, True),
        (True, 1, False),
        (0, False, False),
        (None, None, True),
        ({"a": [1, "x"]}, {"a": [1, "x"]}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ([1, 2], [2, 1], False),
        ("1", 1, False),
    ],
)
def test_json_equal(a: Any, b: Any, equal: bool) -> None:
    assert json_equal(a, b) is equal


@pytest.mark.parametrize(
    ("actual", "expected", "ok"),
    [
        (200, 200, True),
        (201, 200, False),
        (MISSING, None, False),
        (None, None, True),
        (5, {"$min": 5, "$max": 6}, True),
        (4.9, {"$min": 5}, False),
        (7, {"$max": 6}, False),
        ("5", {"$min": 1}, False),
        (True, {"$min": 0}, False),
        ("FL-0A1B2C3D", {"$matches": "^FL-[0-9A-F]{8}$"}, True),
        ("HT-1", {"$matches": "^FL-"}, False),
        (3, {"$matches": "3"}, False),
        ("a b c", {"$contains": ["a", "c"]}, True),
        ("a b", {"$contains": ["a", "c"]}, False),
        ("x-v2", {"$contains": "x-v2", "$matches": "x(?!-v2)"}, False),
        (MISSING, {"$absent": True}, True),
        (None, {"$absent": True}, False),
        (MISSING, {"$min": 0}, False),
    ],
)
def test_check(actual: Any, expected: Any, ok: bool) -> None:
    assert (check(actual, expected) is None) is ok


def test_references_resolve_everywhere_and_must_exist() -> None:
    expected = {
        "trip": "$run_id",
        "refs": ["$steps.reserve-flight.output.reference"],
        "op": {"$contains": "$run_id"},
        "plain": "text",
    }
    assert resolve(expected, REFS) == {
        "trip": "r1",
        "refs": ["FL-1"],
        "op": {"$contains": "r1"},
        "plain": "text",
    }
    with pytest.raises(ScenarioError, match=r"\$steps.charge-card.output names nothing"):
        resolve("$steps.charge-card.output", REFS)


def test_bad_operators_are_scenario_errors() -> None:
    with pytest.raises(ScenarioError, match="unknown operator"):
        check(1, {"$mni": 0})
    with pytest.raises(ScenarioError, match="mixed"):
        check(1, {"$min": 0, "max": 2})


def test_check_all_and_check_list_report_every_problem() -> None:
    body = {"flight": {"reference": "FL-2"}, "status": 200}
    problems = check_all(
        body,
        {
            "flight.reference": "$steps.reserve-flight.output.reference",
            "status": 200,
            "payment": {"$absent": True},
        },
        REFS,
        "body",
    )
    assert problems == ["body.flight.reference: 'FL-2' != expected 'FL-1'"]
    listed = check_list(
        [{"id": "a"}, {"id": "b"}], [{"id": "a"}, {"id": "c"}, {"id": "d"}], REFS, "steps"
    )
    assert listed == ["steps: 2 items, expected 3", "steps[1].id: 'b' != expected 'c'"]


def test_the_scenarios_cover_the_brief() -> None:
    names = {s.name for s in SCENARIOS}
    assert {
        "retry-from-failed-step",
        "memoized-outputs",
        "parallel-steps",
        "non-retriable-error",
        "sleep",
        "wait-for-event",
        "wait-times-out",
        "replay-mismatch",
        "step-policy-retries",
        "step-timeout",
        "final-failure-compensated",
        "event-sent-once",
    } <= names
    for scenario in SCENARIOS:
        # Stats are compared exactly over every counted step; the ones a scenario leaves out
        # must not have run, so it may name only counted steps.
        assert set(scenario.expect.get("stats", {})) <= set(STEPS), scenario.name


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "scenarios: [{name: x, expect: {status: 200, stauts: 1}}]",
            "x.expect: unknown key 'stauts'",
        ),
        (
            "scenarios: [{name: x, request: {qeury: {}}, expect: {}}]",
            "x.request: unknown key 'qeury'",
        ),
        ("scenarios: [{name: x, actions: [{pause: 1, event: {}}], expect: {}}]", "one action per"),
        ("scenarios: [{name: x, known_gaps: {go: y}, expect: {}}]", "unknown key 'go'"),
        ("scenarios: [{name: x, expect: {}}, {name: x, expect: {}}]", "names repeat"),
    ],
)
def test_the_loader_refuses_typos(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "scenarios.yaml"
    path.write_text("defaults: {request: {method: POST, path: /trips}}\n" + text)
    with pytest.raises(ScenarioError, match=error):
        load_scenarios(path)
