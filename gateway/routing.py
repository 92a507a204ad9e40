"""Which configured route a request belongs to. Pure: no I/O.

Routes are tried in the order they are configured and `methods` is part of the match:

- a route with `prefix` matches its `base` and everything below it ("/api/*" matches "/api"
  and "/api/x", never "/apix"); any other route matches its path exactly;
- the first route whose path and method both match wins;
- a path that some route matches, but only with other methods, is `MethodNotAllowed`
  (the caller answers 405 with an `Allow` header); no path match at all is `None` (404).

A route that allows GET also allows HEAD: RFC 9110 §9.3.2 expects HEAD wherever GET is
served, and aiohttp's own router does the same.

Match against the decoded request path (`request.path`); the upstream still receives the
raw, undecoded target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Route


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    """The path is routed, but not for this method."""

    allowed: frozenset[str]

    @property
    def allow_header(self) -> str:
        """The value for the 405 answer's `Allow` header (RFC 9110 §10.2.1), in a stable order."""
        return ", ".join(sorted(self.allowed))


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route
    # Exact routes compare against `path`; prefix routes against `base` or `base + "/"`.
    path: str
    below: str | None
    methods: frozenset[str] | None


def _effective_methods(methods: frozenset[str] | None) -> frozenset[str] | None:
    if methods is not None and "GET" in methods:
        return methods | {"HEAD"}
    return methods


class Router:
    """A route table compiled once at start-up; `match` is on every request's path."""

    __slots__ = ("_entries",)

    def __init__(self, routes: Sequence[Route]) -> None:
        # A linear scan over a few precomputed strings beats an index for the handful of
        # routes a sidecar has, and it is the configured order by construction.
        self._entries: tuple[_Entry, ...] = tuple(
            _Entry(
                route=r,
                path=r.base if r.prefix else r.path,
                below=r.base + "/" if r.prefix else None,
                methods=_effective_methods(r.methods),
            )
            for r in routes
        )

    def match(self, method: str, path: str) -> Route | MethodNotAllowed | None:
        """The route for `method` (upper-case) and the decoded `path`.

        `MethodNotAllowed` lists every method of the routes whose path matched.
        """
        allowed: set[str] | None = None
        for entry in self._entries:
            if path != entry.path and (entry.below is None or not path.startswith(entry.below)):
                continue
            methods = entry.methods
            if methods is None or method in methods:
                return entry.route
            if allowed is None:
                allowed = set(methods)
            else:
                allowed |= methods
        if allowed is None:
            return None
        return MethodNotAllowed(frozenset(allowed))


def match_route(routes: Sequence[Route], method: str, path: str) -> Route | MethodNotAllowed | None:
    """One-off `Router(routes).match(method, path)`; build a `Router` once for repeated use."""
    return Router(routes).match(method, path)


def normalize_path(path: str) -> str:
    """Remove dot segments (RFC 3986 §5.2.4) so `/public/../admin` is routed as `/admin`,
    the way the upstream will resolve it. Only matching uses this; the target is sent as is."""
    if "." not in path:
        return path  # the common case costs one scan
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments[1:], start=1):
        last = index == len(segments) - 1
        if segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        elif segment == ".":
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)
