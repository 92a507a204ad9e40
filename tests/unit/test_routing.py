from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import RetryPolicy, Route
from gateway.routing import BadTarget, MethodNotAllowed, Router, Target, match_route, read_target

_POLICY = RetryPolicy(1, 0.5, 30.0, 2.0, frozenset({"5xx"}), False)


def route(name: str, path: str, methods: Iterable[str] | None = None) -> Route:
    prefix = path.endswith("/*")
    return Route(
        name=name,
        path=path,
        prefix=prefix,
        base=path[:-2] if prefix else path,
        methods=None if methods is None else frozenset(methods),
        upstream="http://127.0.0.1:3000",
        durable=False,
        timeout=30.0,
        hold=5.0,
        max_body=1 << 20,
        retry=_POLICY,
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api", "api"),
        ("/api/", "api"),
        ("/api/x/y", "api"),
        ("/apix", None),
        ("/ap", None),
        ("/process", "process"),
        ("/process/", None),
        ("/process/x", None),
        ("/", None),
    ],
)
def test_exact_and_prefix_paths(path: str, expected: str | None) -> None:
    router = Router([route("api", "/api/*"), route("process", "/process")])
    found = router.match("GET", path)
    if expected is None:
        assert found is None
    else:
        assert isinstance(found, Route) and found.name == expected


def test_first_matching_route_in_order_wins() -> None:
    routes = [route("narrow", "/api/admin/*"), route("wide", "/api/*"), route("late", "/api/x")]
    router = Router(routes)
    assert _name(router.match("GET", "/api/admin/users")) == "narrow"
    assert _name(router.match("GET", "/api/x")) == "wide"
    reordered = Router([routes[1], routes[0]])
    assert _name(reordered.match("GET", "/api/admin/users")) == "wide"


def test_methods_are_part_of_the_match() -> None:
    router = Router(
        [route("post", "/jobs", ["POST"]), route("read", "/jobs", ["GET"]), route("any", "/*")]
    )
    assert _name(router.match("POST", "/jobs")) == "post"
    assert _name(router.match("GET", "/jobs")) == "read"
    # A later catch-all still matches, so no 405 here.
    assert _name(router.match("DELETE", "/jobs")) == "any"


def test_other_methods_only_is_405_with_every_allowed_method() -> None:
    router = Router([route("post", "/jobs", ["POST"]), route("put", "/jobs/*", ["PUT", "GET"])])
    result = router.match("DELETE", "/jobs")
    assert isinstance(result, MethodNotAllowed)
    assert result.allowed == frozenset({"POST", "PUT", "GET", "HEAD"})
    assert result.allow_header == "GET, HEAD, POST, PUT"
    assert router.match("DELETE", "/elsewhere") is None


def test_get_implies_head() -> None:
    router = Router([route("read", "/r", ["GET"]), route("write", "/w", ["POST"])])
    assert _name(router.match("HEAD", "/r")) == "read"
    assert router.match("HEAD", "/w") == MethodNotAllowed(frozenset({"POST"}))


def test_root_prefix_matches_everything() -> None:
    router = Router([route("all", "/*")])
    for path in ("/", "/a", "/a/b/c", "/_x"):
        assert _name(router.match("PATCH", path)) == "all"


def test_match_route_convenience_and_empty_table() -> None:
    assert match_route([], "GET", "/") is None
    only = route("only", "/only", ["GET"])
    assert match_route([only], "GET", "/only") is only
    assert match_route([replace(only, methods=None)], "TRACE", "/only") is not None


def _name(found: Route | MethodNotAllowed | None) -> str | None:
    assert not isinstance(found, MethodNotAllowed)
    return None if found is None else found.name


@pytest.mark.parametrize(
    ("raw", "forward", "path"),
    [
        ("/a/b", "/a/b", "/a/b"),
        ("/a/b?x=1&y=%2F", "/a/b?x=1&y=%2F", "/a/b"),
        ("/caf%C3%A9/x%20y", "/caf%C3%A9/x%20y", "/café/x y"),
        # An encoded slash stays inside its segment, as a segment-aware upstream sees it.
        ("/pub%2Fx", "/pub%2Fx", "/pub%2Fx"),
        ("/pub/a%2fb", "/pub/a%2fb", "/pub/a%2Fb"),
        ("/x.json", "/x.json", "/x.json"),
        ("/.well-known/x", "/.well-known/x", "/.well-known/x"),
        ("/a/...", "/a/...", "/a/..."),
        ("/a/..b/.c", "/a/..b/.c", "/a/..b/.c"),
        ("//double//slash", "//double//slash", "//double//slash"),
        ("/a?../..", "/a?../..", "/a"),
        # Absolute-form naming the Host it arrives with is origin-form (RFC 9112 §3.2.2).
        ("http://shop.example/d/echo?q=1", "/d/echo?q=1", "/d/echo"),
        ("HTTP://Shop.Example:80/d", "/d", "/d"),
        ("http://shop.example", "/", "/"),
        ("http://shop.example?q", "/?q", "/"),
    ],
)
def test_accepted_targets(raw: str, forward: str, path: str) -> None:
    target = read_target("GET", raw, "shop.example")
    assert target == Target(forward=forward, path=path)


@pytest.mark.parametrize(
    "raw",
    [
        # Dot segments, plain or encoded: routed on one path, they may reach another.
        "/public/../admin",
        "/a/./b",
        "/a/..",
        "/..",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/.%2e/admin",
        "/%2e/admin",
        "/admin/..%2f..%2fpub/x",
        "/admin/..%2F..%2Fpub/x",
        "/pub/x%2F..%2F..%2Fadmin",
        "/pub/..%5cadmin",
        "/pub/..\\admin",
        "/pub/..;/admin",
        "/pub/.;x/admin",
        # Broken or dangerous escapes.
        "/a%zz",
        "/a%2",
        "/a%",
        "/file%00.txt",
    ],
)
def test_ambiguous_paths_are_400(raw: str) -> None:
    refused = read_target("GET", raw, "shop.example")
    assert isinstance(refused, BadTarget) and refused.status == 400


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("http://evil.example/d/echo", "shop.example"),
        ("http://evil.example/d/echo", None),
        ("http://shop.example:8080/d", "shop.example"),
        ("https://shop.example:80/d", "shop.example"),
        ("ftp://shop.example/d", "shop.example"),
        ("http://user@shop.example/d", "user@shop.example"),
        ("http:///d", ""),
        ("evil.example:443", "evil.example:443"),
        ("d/echo", "shop.example"),
        ("*", "shop.example"),
        ("http://shop.example/../admin", "shop.example"),
        ("http://[::1/x", "[::1"),
        ("/a#b", "shop.example"),
        ("/x", "shop evil"),
        ("/x", "shop/x"),
        ("/x", "shop:99999"),
        ("/x", "user@shop"),
        ("http://shop.example:99999/x", "shop.example:99999"),
    ],
)
def test_other_targets_are_400(raw: str, host: str | None) -> None:
    refused = read_target("GET", raw, host)
    assert isinstance(refused, BadTarget) and refused.status == 400


@pytest.mark.parametrize("host", [None, "", "shop", "shop:8080", "[::1]:8080", "10.0.0.1"])
def test_any_valid_host_or_none_passes(host: str | None) -> None:
    assert read_target("GET", "/x", host) == Target("/x", "/x")


def test_asterisk_form_is_for_options_only() -> None:
    assert read_target("OPTIONS", "*", "h") == Target(forward="*", path="*")
    assert isinstance(read_target("GET", "*", "h"), BadTarget)


def test_absolute_form_default_ports() -> None:
    assert read_target("GET", "https://h:443/x", "h") == Target("/x", "/x")
    assert read_target("GET", "http://h/x", "h:80") == Target("/x", "/x")
    assert read_target("GET", "http://[::1]:8080/x", "[::1]:8080") == Target("/x", "/x")


_target_chars = st.sampled_from(
    [
        "/",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        ";",
        "%",
        "%00",
        "a",
        "b",
        "?",
        "%41",
        "%zz",
        "x.y",
    ]
)


@given(st.lists(_target_chars, max_size=12).map("".join))
def test_an_accepted_path_resolves_to_itself_however_the_upstream_decodes_it(tail: str) -> None:
    """The property behind the rules: whatever an upstream does with an accepted path (decode
    %2F or not, take a backslash for a slash, drop `;` parameters, resolve dot segments), it
    ends up with the segments that were routed: none of them is a dot segment."""
    raw = "/" + tail
    target = read_target("GET", raw, "h")
    if isinstance(target, BadTarget):
        assert target.status == 400
        return
    assert target.forward == raw
    path = raw.partition("?")[0]
    for decoded in (unquote(path), unquote(path).replace("\\", "/")):
        pieces = [piece.partition(";")[0] for piece in decoded.split("/")]
        assert "." not in pieces and ".." not in pieces
