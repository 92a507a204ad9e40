from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from gateway.config import RetryPolicy, Route
from gateway.routing import MethodNotAllowed, Router, match_route, normalize_path

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
    ("raw", "normal"),
    [
        ("/a/b", "/a/b"),
        ("/public/../admin", "/admin"),
        ("/a/./b/../../c", "/c"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("/a/b/", "/a/b/"),
        ("/x.json", "/x.json"),
        ("/.well-known/x", "/.well-known/x"),
    ],
)
def test_dot_segments_are_removed_before_matching(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal
