"""Event matching for waits. Pure: the store calls these inside its write transaction, so an
event and a wait registered at the same moment can never miss each other."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeGuard

_MISSING = object()

MAX_NAME = 256  # characters of an event name (and of an event id)


def is_name(value: object, longest: int = MAX_NAME) -> TypeGuard[str]:
    """A name or id the gateway keeps as text: 1 to `longest` characters, none of them NUL
    (PostgreSQL's text cannot hold it, and no one means it)."""
    return isinstance(value, str) and 1 <= len(value) <= longest and "\x00" not in value


def event_object(event_id: str, name: str, data: Any, ts: float) -> dict[str, Any]:
    """The shape a waiting step receives as its output."""
    return {"name": name, "data": data, "id": event_id, "ts": rfc3339(ts)}


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: unlike Python's ==, true is not 1 and 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def matches(match: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """Every dotted path in `match` must lead to a JSON-equal value in the event object."""
    for path, expected in match.items():
        found = _lookup(event, path)
        if found is _MISSING or not json_equal(found, expected):
            return False
    return True


def matches_text(match_json: str | None, event: Mapping[str, Any]) -> bool:
    return matches(json.loads(match_json) if match_json else {}, event)
