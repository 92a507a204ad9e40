"""The bounded JSON parser on its own: what it refuses, and that everything else comes back as
the JSON value that was sent."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import jsonin
from gateway.jsonin import MAX_DEPTH, MAX_INT_DIGITS, BadJSON


def test_the_documented_bounds() -> None:
    assert (MAX_DEPTH, MAX_INT_DIGITS) == (128, 4300)  # docs/protocol.md, "Limits"


# JSON values as a well-behaved client has them: finite numbers, any Unicode text.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(value=values, ascii_only=st.booleans())
def test_json_within_the_bounds_comes_back_equal(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert jsonin.loads(raw) == value
    assert jsonin.loads(jsonin.dump(value).encode()) == value


def nested(depth: int, opener: str = "[") -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    inner = '"a":' if opener == "{" else ""
    return ((opener + inner) * depth + "1" + closer * depth).encode()


@pytest.mark.parametrize("opener", ["[", "{"])
def test_depth_is_bounded(opener: str) -> None:
    jsonin.loads(nested(MAX_DEPTH, opener))
    for depth in (MAX_DEPTH + 1, 999, 1_000, 50_000):
        with pytest.raises(BadJSON, match=f"deeper than {MAX_DEPTH}"):
            jsonin.loads(nested(depth, opener))


def test_depth_counts_the_deepest_branch_not_the_number_of_containers() -> None:
    wide = json.dumps([[[i]] for i in range(10_000)]).encode()
    assert len(jsonin.loads(wide)) == 10_000
    mixed = ("[" + "[]," * 500 + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "]").encode()
    with pytest.raises(BadJSON):
        jsonin.loads(mixed)


def test_brackets_inside_strings_are_text() -> None:
    assert jsonin.loads(json.dumps("[" * 5000).encode()) == "[" * 5000


@pytest.mark.parametrize(
    "raw",
    [
        b'"\\ud800"',
        b'"\\uDFFF"',
        b'{"\\udc00": 1}',
        b'["ok", ["\\ud83d"]]',
        b'"\\ude00\\ud83d"',
    ],
)
def test_lone_surrogates_are_refused(raw: bytes) -> None:
    with pytest.raises(BadJSON, match="lone surrogate"):
        jsonin.loads(raw)


def test_an_escaped_surrogate_pair_is_one_character() -> None:
    assert jsonin.loads(b'"\\ud83d\\ude00"') == "\U0001f600"
    assert jsonin.loads(b'"\\\\ud800"') == "\\ud800"  # an escaped backslash, then text


@pytest.mark.parametrize(
    "raw", [b"NaN", b"-Infinity", b"[Infinity]", b"1e400", b"-1e309", b"1" + b"0" * 400 + b".5"]
)
def test_numbers_that_are_not_finite_doubles_are_refused(raw: bytes) -> None:
    with pytest.raises(BadJSON):
        jsonin.loads(raw)


def test_integers_are_exact_up_to_the_bound() -> None:
    big = int("7" * MAX_INT_DIGITS)
    assert jsonin.loads(str(-big).encode()) == -big
    assert jsonin.dump(jsonin.loads(str(big).encode())) == str(big)
    with pytest.raises(BadJSON, match=f"more than {MAX_INT_DIGITS} digits"):
        jsonin.loads(b"8" * (MAX_INT_DIGITS + 1))


def test_tiny_numbers_are_numbers() -> None:
    assert jsonin.loads(b"1e-400") == 0.0
    assert math.isclose(jsonin.loads(b"1.7976931348623157e308"), 1.7976931348623157e308)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b'"\xed\xa0\x80"',
        b'"\xc0\x80"',
        '"x"'.encode("utf-16"),
        b"\xef\xbb\xbf1",
        b"",
        b"{",
        b"[1,]",
    ],
)
def test_bodies_that_are_not_utf8_json_are_refused(raw: bytes) -> None:
    with pytest.raises(BadJSON):
        jsonin.loads(raw)
