from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.proxy import HOP_BY_HOP, forward_request_headers, forward_response_headers

VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


def forward(
    pairs: list[tuple[str, str]], peer: str | None = "10.0.0.9"
) -> tuple[CIMultiDict[str], str]:
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    return forward_request_headers(headers, peer=peer, scheme="https", host="shop.example")


def test_request_headers_are_cleaned_and_extended() -> None:
    out, trace_id = forward(
        [
            ("Host", "shop.example"),
            ("Content-Length", "3"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Connection", "keep-alive"),
            ("Trailer", "X-Sum"),
            ("Expect", "100-continue"),
            ("Stepgate-Run-Id", "forged"),
            ("stepgate-token", "forged"),
            ("X-Forwarded-Proto", "gopher"),
            ("X-Forwarded-Host", "evil.example"),
            ("Accept", "*/*"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
        ]
    )
    assert out.getall("Cookie") == ["a=1", "b=2"]
    assert out["Host"] == "shop.example"
    assert out["Content-Length"] == "3"
    assert out["Accept"] == "*/*"
    assert out["X-Forwarded-For"] == "10.0.0.9"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "shop.example"
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out["Via"] == "1.1 stepgate"
    for gone in [*HOP_BY_HOP, "x-hop", "expect", "stepgate-run-id", "stepgate-token"]:
        assert gone not in out, gone
    match = TRACEPARENT.fullmatch(out["traceparent"])
    assert match is not None and match.group(1) == trace_id
    assert "tracestate" not in out


def test_forwarded_for_and_via_append() -> None:
    out, _ = forward(
        [
            ("X-Forwarded-For", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
            ("Via", "1.0 edge"),
            ("Via", "1.1 lb"),
        ],
        peer="::1",
    )
    assert out.getall("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, ::1"]
    assert out.getall("Via") == ["1.0 edge, 1.1 lb, 1.1 stepgate"]


def test_no_peer_keeps_existing_forwarded_for_and_no_host_sets_none() -> None:
    headers = CIMultiDict([("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-Host", "spoof")])
    out, _ = forward_request_headers(headers, peer=None, scheme="http", host=None)
    assert out["X-Forwarded-For"] == "1.1.1.1"
    assert "X-Forwarded-Host" not in out
    out, _ = forward_request_headers({}, peer=None, scheme="http", host=None)
    assert "X-Forwarded-For" not in out


def test_valid_traceparent_and_tracestate_are_kept() -> None:
    out, trace_id = forward(
        [("traceparent", VALID_TP), ("tracestate", "a=1"), ("TraceState", "b=2")]
    )
    assert out["traceparent"] == VALID_TP
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert out["tracestate"] == "a=1,b=2"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        VALID_TP.upper(),
        "01" + VALID_TP[2:],
        "ff" + VALID_TP[2:],
        VALID_TP + "-extra",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    ],
)
def test_invalid_traceparent_starts_a_new_trace_and_drops_tracestate(bad: str) -> None:
    out, trace_id = forward([("traceparent", bad), ("tracestate", "vendor=x")])
    match = TRACEPARENT.fullmatch(out["traceparent"])
    assert match is not None
    assert match.group(1) == trace_id != "0" * 32
    assert match.group(2) != "0" * 16
    assert "tracestate" not in out


def test_two_traceparents_are_invalid() -> None:
    out, trace_id = forward([("traceparent", VALID_TP), ("traceparent", VALID_TP)])
    assert out["traceparent"] != VALID_TP
    assert trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_new_traces_differ() -> None:
    ids = {forward([])[1] for _ in range(50)}
    assert len(ids) == 50


def test_plain_mapping_input() -> None:
    out, _ = forward_request_headers(
        {"connection": "X-A", "x-a": "1", "X-B": "2", "Stepgate-Steps": "0"},
        peer="127.0.0.1",
        scheme="http",
        host="h",
    )
    assert "x-a" not in out and "Stepgate-Steps" not in out
    assert out["X-B"] == "2"


@pytest.mark.parametrize(
    "name",
    [
        "Stepgate_Callback",
        "Stepgate_Token",
        "Stepgate_Steps",
        "STEPGATE_RUN_ID",
        "stepgate_attempt",
        "Stepgate-Callback_",
        "X_Api_Key",
        "_",
        "x-a_b",
    ],
)
def test_request_names_with_underscores_are_dropped(name: str) -> None:
    """nginx's default (`underscores_in_headers off`): CGI, WSGI, PHP and Rack map `_` and `-`
    to the same variable, so `Stepgate_Token` would pass for `Stepgate-Token` upstream."""
    out, _ = forward([(name, "forged"), ("X-Kept", "1")])
    assert name not in out
    assert [n for n in out if "_" in n] == []
    assert out["X-Kept"] == "1"


def test_proxy_credentials_stay_with_the_proxy() -> None:
    """Go's ReverseProxy and nginx treat both as hop-by-hop: they belong to the gateway's hop."""
    out, _ = forward([("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Authorization", "Bearer t")])
    assert "Proxy-Authorization" not in out
    assert out["Authorization"] == "Bearer t"
    back = forward_response_headers(
        CIMultiDict([("Proxy-Authenticate", 'Basic realm="x"'), ("WWW-Authenticate", "Basic")])
    )
    assert list(back.items()) == [("WWW-Authenticate", "Basic")]


def test_stepgate_response_fields_are_dropped_however_spelt() -> None:
    back = forward_response_headers(
        CIMultiDict([("Stepgate_Suspend", "true"), ("X_Upstream", "kept"), ("A", "1")])
    )
    assert list(back.items()) == [("X_Upstream", "kept"), ("A", "1")]


def test_response_headers_are_cleaned() -> None:
    upstream = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", "5"),
                ("Content-Encoding", "gzip"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Connection", "close, X-Internal"),
                ("X-Internal", "yes"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Trailer", "X-Sum"),
                ("Stepgate-Suspend", "true"),
                ("STEPGATE-NO-RETRY", "true"),
                ("Via", "1.1 upstream-cache"),
            ]
        )
    )
    out = forward_response_headers(upstream)
    assert list(out.items()) == [
        ("Content-Type", "text/plain"),
        ("Content-Length", "5"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Via", "1.1 upstream-cache"),
    ]


# --- properties ---------------------------------------------------------------------------

_tchar = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=_tchar, min_size=1, max_size=12)
special = st.sampled_from(
    sorted(
        HOP_BY_HOP
        | {
            "Stepgate-Run-Id",
            "stepgate-x",
            "STEPGATE-",
            "X-Forwarded-For",
            "Via",
            "Stepgate_Token",
            "stepgate_",
            "X_Forwarded_For",
        }
    )
)
names = st.one_of(tokens, special, special.map(str.swapcase), tokens.map("Stepgate-{}".format))
values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    pairs = draw(st.lists(st.tuples(names, values), max_size=15))
    named: list[str] = draw(st.lists(st.one_of(tokens, names), max_size=4))
    with_connection: bool = draw(st.booleans())
    if named or with_connection:
        spaced = draw(st.sampled_from([",", ", ", " ,\t"]))
        at = draw(st.integers(0, len(pairs)))
        pairs.insert(at, (draw(st.sampled_from(["Connection", "connection"])), spaced.join(named)))
    return pairs


def _connection_named(pairs: list[tuple[str, str]]) -> set[str]:
    return {
        t.strip().lower() for n, v in pairs if n.lower() == "connection" for t in v.split(",")
    } - {""}


def _is_dropped(name: str, named: set[str], *, request: bool = True) -> bool:
    lower = name.lower()
    return (
        lower in HOP_BY_HOP
        or lower.replace("_", "-").startswith("stepgate-")
        or lower in named
        or (request and "_" in lower)
    )


@given(pairs=header_lists(), peer=st.one_of(st.none(), st.ip_addresses().map(str)))
def test_request_filter_properties(pairs: list[tuple[str, str]], peer: str | None) -> None:
    named = _connection_named(pairs)
    out, trace_id = forward(pairs, peer=peer)
    rewritten = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"}
    rewritten |= {"traceparent", "tracestate"}
    for name in out:
        lower = name.lower()
        assert lower not in HOP_BY_HOP and lower != "expect"
        assert not lower.startswith("stepgate-") and "_" not in lower
        assert lower not in named or lower in rewritten
    # Everything else passes through, in order and with repeats.
    kept = [(n, v) for n, v in pairs if not _is_dropped(n, named) and n.lower() not in rewritten]
    assert [(n, v) for n, v in out.items() if n.lower() not in rewritten] == kept
    # X-Forwarded-For: the surviving client values, then the peer, in one field.
    prior = [v for n, v in pairs if n.lower() == "x-forwarded-for" and not _is_dropped(n, named)]
    expected = ", ".join([*prior, *([peer] if peer else [])])
    assert out.get("X-Forwarded-For", "") == expected
    assert out.getall("Via")[-1].endswith("1.1 stepgate")
    assert trace_id in out["traceparent"]


@given(pairs=header_lists())
def test_response_filter_properties(pairs: list[tuple[str, str]]) -> None:
    named = _connection_named(pairs)
    out = forward_response_headers(CIMultiDictProxy(CIMultiDict(pairs)))
    kept = [(n, v) for n, v in pairs if not _is_dropped(n, named, request=False)]
    assert list(out.items()) == kept
