"""The expectation language of scenarios.yaml: pure functions, no I/O, tested on their own.

An expectation maps dotted paths into a JSON value to what must be found there:

    {"status": 200, "payment.data.trip": "$run_id", "flight.reference": {"$matches": "^FL-"}}

- a plain value must be JSON-equal (a bool is not a number; 1 equals 1.0);
- an operator object, whose keys all start with "$": `$min`/`$max` (numbers, inclusive),
  `$matches` (a regular expression searched in a string), `$contains` (substrings of a
  string), `$absent: true` (the path must not exist);
- a string "$name.path" anywhere in an expectation stands for the value at `name.path` in the
  references (the run id, the recorded steps), so a scenario can say "the answer holds the output
  the run recorded" without knowing that output in advance.

A path segment that is a decimal number indexes a list. Headers are looked up lower-cased.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = [
    "MISSING",
    "ScenarioError",
    "check",
    "check_all",
    "check_list",
    "json_equal",
    "lookup",
    "resolve",
]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()
OPERATORS: Final = frozenset({"$min", "$max", "$matches", "$contains", "$absent"})


class ScenarioError(ValueError):
    """The scenario itself is wrong (a typo, an unknown operator): not a conformance failure."""


def lookup(value: Any, path: str) -> Any:
    """The value at the dotted `path` in `value`, or MISSING. An empty path is `value` itself."""
    for part in path.split(".") if path else ():
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def resolve(expected: Any, refs: Mapping[str, Any]) -> Any:
    """`expected` with every "$name.path" string replaced by what it names in `refs`."""
    if isinstance(expected, str) and expected.startswith("$"):
        found = lookup(refs, expected[1:])
        if found is MISSING:
            raise ScenarioError(f"{expected} names nothing; known: {sorted(refs)}")
        return found
    if isinstance(expected, list):
        return [resolve(item, refs) for item in expected]
    if isinstance(expected, Mapping):
        # Operator names are keys, never references.
        return {key: resolve(item, refs) for key, item in expected.items()}
    return expected


def json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _is_operator(expected: Any) -> bool:
    if not isinstance(expected, Mapping) or not expected:
        return False
    dollars = [key for key in expected if isinstance(key, str) and key.startswith("$")]
    if dollars and len(dollars) != len(expected):
        raise ScenarioError(f"operators cannot be mixed with plain keys: {dict(expected)}")
    unknown = set(dollars) - OPERATORS
    if unknown:
        raise ScenarioError(f"unknown operator {sorted(unknown)[0]}; known: {sorted(OPERATORS)}")
    return bool(dollars)


def check(actual: Any, expected: Any) -> str | None:
    """Why `actual` does not meet the (resolved) expectation, or None when it does."""
    if not _is_operator(expected):
        if actual is MISSING:
            return f"missing, expected {expected!r}"
        return None if json_equal(actual, expected) else f"{actual!r} != expected {expected!r}"
    if expected.get("$absent") is True:
        return None if actual is MISSING else f"{actual!r} present, expected absent"
    if actual is MISSING:
        return f"missing, expected {dict(expected)}"
    for op, want in expected.items():
        if op in ("$min", "$max"):
            if not isinstance(actual, int | float) or isinstance(actual, bool):
                return f"{actual!r} is not a number ({op} {want})"
            if (actual < want) if op == "$min" else (actual > want):
                return f"{actual!r} is {'below' if op == '$min' else 'above'} {want}"
        elif op == "$matches":
            if not isinstance(actual, str) or re.search(want, actual) is None:
                return f"{actual!r} does not match /{want}/"
        elif op == "$contains":
            wanted = want if isinstance(want, list) else [want]
            lacking = [w for w in wanted if not isinstance(actual, str) or str(w) not in actual]
            if lacking:
                return f"{actual!r} does not contain {lacking!r}"
        elif op == "$absent":
            raise ScenarioError("$absent only takes true")
    return None


def check_all(
    actual: Any, expectations: Mapping[str, Any], refs: Mapping[str, Any], where: str
) -> list[str]:
    """Every dotted path of `expectations` checked in `actual`; the problems, labelled."""
    problems = []
    for path, expected in expectations.items():
        problem = check(lookup(actual, path), resolve(expected, refs))
        if problem is not None:
            problems.append(f"{where}.{path}: {problem}" if path else f"{where}: {problem}")
    return problems


def check_list(
    actual: Sequence[Any],
    expectations: Sequence[Mapping[str, Any]],
    refs: Mapping[str, Any],
    where: str,
) -> list[str]:
    """All of `actual`, item by item: the lengths must agree too."""
    problems = []
    if len(actual) != len(expectations):
        problems.append(f"{where}: {len(actual)} items, expected {len(expectations)}")
    for n, (item, expected) in enumerate(zip(actual, expectations, strict=False)):
        problems += check_all(item, expected, refs, f"{where}[{n}]")
    return problems
