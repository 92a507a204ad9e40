"""Which configured route a request belongs to. Pure: no I/O.

Routes are tried in the order they are configured and `methods` is part of the match:

- a route with `prefix` matches its `base` and everything below it ("/api/*" matches "/api"
  and "/api/x", never "/apix"); any other route matches its path exactly;
- the first route whose path and method both match wins;
- a path that some route matches, but only with other methods, is `MethodNotAllowed`
  (the caller answers 405 with an `Allow` header); no path match at all is `None` (404).

A route that allows GET also allows HEAD: RFC 9110 §9.3.2 expects HEAD wherever GET is
served, and aiohttp's own router does the same.

Before any of that, `read_target` decides whether a request target is acceptable at all, and
what is routed and what is forwarded. The two must never disagree: a proxy that routes one path
and forwards another lets a client reach what no route allows (`/admin/..%2f..%2fpub/x` routed
as `/pub/x`, forwarded raw, resolved by the upstream as `/admin`). nginx and Envoy normalise
and forward the normalised path; the gateway instead *refuses* every target whose meaning
depends on who resolves it, with 400, and forwards everything else exactly as the client wrote
it (a path signature, such as AWS SigV4's or a webhook's HMAC, keeps working):

- dot segments in any spelling: `.` and `..`, percent-encoded (`%2e`, `%2E%2e`, `.%2e`),
  formed with an encoded slash or a backslash, raw or encoded (`..%2f`, `..%5c`), or with a path
  parameter (`..;`, which Tomcat reads as `..`). Clients resolve dot segments before they
  send (RFC 3986 §5.2.4; browsers, curl, fetch), so only probes and attacks carry them;
- malformed percent-escapes (`%zz`, a lone `%`) and an encoded NUL (`%00`);
- absolute-form targets for another host (RFC 9112 §3.2.2: the gateway is not a forward
  proxy). One that names the Host it arrives with is taken as origin-form;
- a fragment (`#`), which is never part of a request target, and a Host header that is not
  `host[:port]` (RFC 9112 §3.2);
- authority-form (`CONNECT host:port`) and the asterisk-form, except `OPTIONS *`.

Routes match the percent-decoded path, except that an encoded slash (`%2F`) stays encoded:
it does not separate segments for the gateway, as it does not for the upstreams that keep
`a%2Fb` as one segment. An upstream that does decode it sees a path no route granted, which
fails closed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

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
        self.load(routes)

    def load(self, routes: Sequence[Route]) -> None:
        """Take a new route table (a reload): one assignment, so a match sees the old table or
        the new one, never a mix."""
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


def upstream_target(route: Route, raw: str) -> str:
    """The request target the upstream gets for `raw` (path and query as the client wrote
    them): the route's base stripped or replaced when the route says so (`strip_prefix`,
    `rewrite`), everything after it byte for byte. The base's segments are counted on the raw
    path, which routes as its decoded form does: an encoded slash never separates segments."""
    replace = route.replace_base
    if replace is None:
        return raw
    path, mark, query = raw.partition("?")
    depth = route.base.count("/")
    rest = path.split("/")[depth + 1 :]  # what follows the base's segments
    new_path = replace + "".join("/" + segment for segment in rest)
    return (new_path or "/") + mark + query


def match_route(routes: Sequence[Route], method: str, path: str) -> Route | MethodNotAllowed | None:
    """One-off `Router(routes).match(method, path)`; build a `Router` once for repeated use."""
    return Router(routes).match(method, path)


@dataclass(frozen=True, slots=True)
class Target:
    """An accepted request target: what to forward, and the path to route on."""

    forward: str  # origin-form path and query, byte for byte as the client sent them
    path: str  # percent-decoded, with %2F kept; "*" for `OPTIONS *`


@dataclass(frozen=True, slots=True)
class BadTarget:
    """A request target the gateway refuses; `detail` says why, for the problem answer."""

    status: int
    detail: str


_ABSOLUTE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_SLASH: Final = re.compile(r"%2[Ff]")
_DOTS: Final = frozenset({".", ".."})
_DEFAULT_PORT: Final = {"http": ":80", "https": ":443"}
# RFC 3986 §3.2.2 host (reg-name or a bracketed IP literal), then an optional port.
_AUTHORITY: Final = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]{1,5}))?"
)


def read_target(method: str, raw: str, host: str | None) -> Target | BadTarget:
    """Accept or refuse the request target `raw` (as on the request line), given the Host
    header; see the module docstring for the rules."""
    if host and not _valid_authority(host):
        # RFC 9112 §3.2: a Host that is not host[:port] is a 400, as is a second Host (which
        # aiohttp's parser refuses already).
        return BadTarget(400, "the Host header is not a host name or address with a port")
    if "#" in raw:
        return BadTarget(400, "a request target has no fragment (#)")
    if raw.startswith("/"):
        return _origin(raw)
    if raw == "*":
        if method == "OPTIONS":
            return Target(forward="*", path="*")
        return BadTarget(400, "the asterisk-form target is only for OPTIONS")
    if _ABSOLUTE.match(raw):
        return _absolute(raw, host)
    return BadTarget(400, "the request target must be a path (origin-form)")


def _absolute(raw: str, host: str | None) -> Target | BadTarget:
    foreign = BadTarget(
        400, "an absolute-form target for another host: this gateway is not a forward proxy"
    )
    try:
        parts = urlsplit(raw)
    except ValueError:  # an unbalanced "[" in the authority
        return foreign
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORT or not _valid_authority(parts.netloc) or host is None:
        return foreign
    if _authority(parts.netloc, scheme) != _authority(host, scheme):
        return foreign
    path = raw[len(parts.scheme) + 3 + len(parts.netloc) :] or "/"
    if path.startswith("?"):
        path = "/" + path
    if not path.startswith("/"):
        return foreign
    return _origin(path)


def _valid_authority(authority: str) -> bool:
    valid = _AUTHORITY.fullmatch(authority)
    return valid is not None and (valid.group(1) is None or int(valid.group(1)) <= 65535)


def _authority(authority: str, scheme: str) -> str:
    lower = authority.strip().lower()
    return lower.removesuffix(_DEFAULT_PORT[scheme])


def _origin(raw: str) -> Target | BadTarget:
    raw_path = raw.partition("?")[0]
    if "%" in raw_path and _ESCAPE.search(raw_path):
        return BadTarget(400, "the path has a malformed percent-escape")
    if "." in raw_path or "%" in raw_path or "\\" in raw_path:
        for segment in raw_path.split("/"):
            decoded = unquote(segment, errors="surrogateescape")
            if "\x00" in decoded:
                return BadTarget(400, "the path has an encoded NUL (%00)")
            if "." not in decoded:
                continue
            for piece in decoded.replace("\\", "/").split("/"):
                if piece.partition(";")[0] in _DOTS:
                    return BadTarget(
                        400,
                        "the path has a dot segment ('.' or '..', maybe percent-encoded); "
                        "resolve it before sending (RFC 3986 §5.2.4)",
                    )
    if "%" not in raw_path:
        return Target(forward=raw, path=raw_path)
    # Decode everything but %2F, which must go on separating nothing.
    path = "%2F".join(
        unquote(part, errors="surrogateescape") for part in _ENCODED_SLASH.split(raw_path)
    )
    return Target(forward=raw, path=path)
