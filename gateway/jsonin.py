"""JSON in: every JSON document the internal listener takes (step PUTs, events) is parsed here,
with explicit bounds, so that whatever the gateway accepts it can store, read back and render.

Refused, each with a reason for a 400 (`BadJSON`):

- a body that is not UTF-8 (RFC 8259 §8.1), or starts with a byte order mark;
- `NaN`, `Infinity` and numbers that overflow a double (`1e400`): not JSON, and a strict reader
  of the stored value would fail on them;
- integer literals of more than `MAX_INT_DIGITS` digits: Python's own int-string limit (or the
  interpreter's lower one), enforced here even when PYTHONINTMAXSTRDIGITS lifts it, since
  converting longer ones is quadratic. Shorter ones are kept exactly, as text;
- nesting deeper than `MAX_DEPTH` arrays and objects: deeper documents exhaust the parser's
  recursion (a RecursionError) and could not be parsed again when the run is read;
- a string, key or value, holding a lone surrogate (`"\\ud800"`): it is not Unicode text and
  cannot be stored as UTF-8. Escaped pairs (`"\\ud83d\\ude00"`) are one character and are kept.

The size of a body is bounded by the listener's `client_max_size`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any, Final

from aiohttp import web

from gateway.problem import Problem

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "BadJSON", "dump", "loads", "read_object"]

MAX_DEPTH: Final = 128
MAX_INT_DIGITS: Final = 4300

# A lone surrogate can only arrive as a \u escape: the text itself was strictly decoded UTF-8.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")


class BadJSON(ValueError):
    """The document is refused; the message says why, for a 400's detail."""


def _float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadJSON(f"the number {text[:40]} does not fit a double")
    return number


def _int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise BadJSON(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _constant(name: str) -> Any:
    raise BadJSON(f"{name} is not JSON")


def _check(value: Any, *, strings: bool) -> None:
    """Walk the document level by level, without recursion: no deeper than MAX_DEPTH, and
    (when the text had a surrogate escape) every string encodable as UTF-8."""
    level: list[Any] = [value]
    depth = 0
    while level:
        below: list[Any] = []
        containers = False
        for item in level:
            kind = type(item)
            if kind is list:
                containers = True
                below.extend(item)
            elif kind is dict:
                containers = True
                below.extend(item.values())
                if strings:
                    for key in item:
                        _text(key)
            elif strings and kind is str:
                _text(item)
        if containers:
            depth += 1
            if depth > MAX_DEPTH:
                raise BadJSON(f"nested deeper than {MAX_DEPTH} arrays and objects")
        level = below


def _text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadJSON(
                "a string holds a lone surrogate (such as \\ud800): not Unicode text"
            ) from exc


def loads(raw: bytes) -> Any:
    """Parse a JSON document within the bounds above (raises BadJSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJSON(f"the body is not UTF-8 (byte {exc.start})") from exc
    if text.startswith("\ufeff"):
        raise BadJSON("the body starts with a byte order mark")
    hooks: dict[str, Any] = {"parse_constant": _constant, "parse_float": _float}
    if not 0 < sys.get_int_max_str_digits() <= MAX_INT_DIGITS:
        # The interpreter's own bound (4300 unless PYTHONINTMAXSTRDIGITS says otherwise) is
        # checked by the C scanner for free; without it, every integer is checked here.
        hooks["parse_int"] = _int
    try:
        value = json.loads(text, **hooks)
    except BadJSON:
        raise
    except RecursionError as exc:
        raise BadJSON(f"nested deeper than {MAX_DEPTH} arrays and objects") from exc
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # the interpreter's bound, as above
            raise BadJSON(
                f"an integer has more than {sys.get_int_max_str_digits()} digits"
            ) from exc
        raise BadJSON(f"the body is not JSON: {exc}") from exc
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    # Fewer openers than the bound cannot nest past it: most bodies skip the walk.
    if surrogates or text.count("[") + text.count("{") > MAX_DEPTH:
        _check(value, strings=surrogates)
    return value


def dump(value: Any) -> str:
    """Compact JSON text of a value `loads` returned, as it is stored."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object, or a 413/400 Problem."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise Problem(413, f"the body is larger than {request.client_max_size} bytes") from exc
    try:
        body = loads(raw)
    except BadJSON as exc:
        raise Problem(400, str(exc)) from exc
    if not isinstance(body, dict):
        raise Problem(400, "the body must be a JSON object")
    return body
