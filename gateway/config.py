"""Stepgate settings: a YAML file turned into validated, frozen :class:`Settings`.

Every key and value is checked here, once, so the rest of the gateway can trust what it gets.
A problem is reported as one line that names the file and the key path, e.g.
``stepgate.yaml: routes[0].timeout: "30" needs a unit: ms, s, m, h or d (e.g. "30s")``.

Errors::

    ConfigError        a problem with a config file (fields: file, key, message)
    ValueError         from parse_duration / parse_size / parse_address, which are also used
                       for values that do not come from a file (e.g. a wait's timeout)
"""

from __future__ import annotations

import base64
import binascii
import difflib
import importlib.util
import ipaddress
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final, Literal, TypeVar

import yaml

from gateway.errors import GatewayError

__all__ = [
    "Address",
    "Concurrency",
    "ConfigError",
    "FlowKey",
    "Limits",
    "Otel",
    "Rate",
    "RetryPolicy",
    "Route",
    "Settings",
    "StoreKey",
    "load_settings",
    "parse_address",
    "parse_duration",
    "parse_settings",
    "parse_size",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Address:
    """A listen address; ``host`` is bare (no brackets around IPv6)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # total invocations that may fail, the first included
    initial: float  # seconds
    max: float  # seconds
    multiplier: float
    on: frozenset[str]  # "5xx", "4xx", "connect", "timeout" or a 3-digit status such as "429"
    non_idempotent: bool


@dataclass(frozen=True, slots=True)
class FlowKey:
    """Where a request's flow-control key comes from: `header:NAME`, `query:NAME` or
    `body:dotted.path` (a JSON body). A request without it has the key ""."""

    source: Literal["header", "query", "body"]
    name: str  # the header (as written), the query parameter, or the dotted path
    text: str  # as written in the config


@dataclass(frozen=True, slots=True)
class Concurrency:
    limit: int  # invocations of the route (per key value) upstream at once
    key: FlowKey | None


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: `burst` at once, refilled by one every `per / limit` seconds."""

    limit: int
    per: float  # seconds
    burst: int
    key: FlowKey | None

    @property
    def interval(self) -> float:
        return self.per / self.limit


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path: str  # as written, e.g. "/process" or "/api/*"
    prefix: bool  # path ended with "/*"
    base: str  # path without the "/*"
    methods: frozenset[str] | None  # upper-case; None = all
    upstream: str  # "http://host:port", no path or query
    durable: bool
    timeout: float  # seconds, per attempt
    hold: float  # seconds
    max_body: int  # bytes
    retry: RetryPolicy
    max_response: int = 10 * 1024 * 1024  # bytes of an upstream's answer a durable route keeps
    # What the upstream gets in place of `base`: "" strips it (strip_prefix), a path
    # replaces it (rewrite); None forwards the path as it came. See routing.upstream_target.
    replace_base: str | None = None
    # Flow control (gateway/flow.py): concurrency and throttle queue a durable route's runs,
    # rate_limit refuses requests of any route, queue_limit bounds the queue.
    concurrency: Concurrency | None = None
    throttle: Rate | None = None
    rate_limit: Rate | None = None
    queue_limit: int = 10_000  # runs of the route queued at once (DEFAULT_QUEUE_LIMIT)

    @property
    def flow_controlled(self) -> bool:
        """Whether the route's invocations wait for a slot or a turn."""
        return self.concurrency is not None or self.throttle is not None


@dataclass(frozen=True, slots=True)
class Limits:
    """What a client may hold of a listener (`limits:`); enforced by gateway/limits.py."""

    header_timeout: float = 10.0  # seconds for a whole request head, from its first byte
    body_timeout: float = 60.0  # seconds a request body may go without a byte
    idle_timeout: float = 75.0  # seconds a kept-alive connection may wait for a request
    max_connections: int = 10_000  # open connections per listener
    max_header_size: int = 64 * 1024  # bytes of request line and header fields together
    send_timeout: float = 60.0  # seconds a client may take no byte of an answer waiting for it


@dataclass(frozen=True, slots=True)
class StoreKey:
    """The key that seals stored requests and answers (`store_key`), read from where the config
    points; the config file itself never holds it. Its bytes are never shown."""

    source: str  # "env:NAME" or "file:PATH", as written
    secret: bytes = field(repr=False)  # 32 bytes: AES-256


@dataclass(frozen=True, slots=True)
class Otel:
    """Where the gateway sends its spans (`otel:`), as OTLP/HTTP; see gateway/tracing.py."""

    endpoint: str  # the collector's base URL, no trailing "/": spans go to {endpoint}/v1/traces
    service_name: str = "stepgate"
    # Sent with every export (a collector's API key, say), so never shown.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = 10.0  # seconds one export may take, its retries included


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Address
    internal_listen: Address
    internal_url: str  # no trailing "/"
    store: str  # URL as written
    store_path: str  # SQLite: the file named by the store URL; PostgreSQL: ""
    durability: Literal["full", "relaxed"]
    retention: float  # seconds
    admin_token: str | None
    events_lookback: float  # seconds
    log_level: str
    log_format: Literal["json", "console"]
    metrics_listen: Address | None
    shutdown_grace: float  # seconds
    routes: tuple[Route, ...]
    limits: Limits = Limits()
    store_key: StoreKey | None = None
    lease: float = 10.0  # PostgreSQL: a replica silent this long has its runs taken over
    replica_id: str = ""  # PostgreSQL: this replica's name; "" until the gateway picks one
    otel: Otel | None = None  # None: no tracing, and no OpenTelemetry module is imported
    public_url: str = ""  # the base of signal URLs; "" for URLs relative to the public listener

    @property
    def postgres(self) -> bool:
        return self.store.startswith(("postgresql://", "postgres://"))


class ConfigError(GatewayError):
    """One problem in a config file. ``key`` is a path like ``routes[0].retry.on[2]``, or None
    when the problem concerns the whole file (unreadable, not YAML, not a mapping)."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        super().__init__(file, key, message)
        self.file = file
        self.key = key
        self.message = message

    def __str__(self) -> str:
        parts = [self.file, self.key, self.message] if self.key else [self.file, self.message]
        # Always one line: the CLI prints it as-is and tooling greps for it.
        return ": ".join(" ".join(part.splitlines()) for part in parts)


# --- defaults -------------------------------------------------------------------------------

DEFAULT_LISTEN: Final = "0.0.0.0:8080"
DEFAULT_INTERNAL_LISTEN: Final = "127.0.0.1:8081"
DEFAULT_STORE: Final = "sqlite:///stepgate.db"
DEFAULT_RETRY_ON: Final = frozenset({"5xx", "connect", "timeout", "429"})
DEFAULT_MAX_BODY: Final = 1024 * 1024
DEFAULT_MAX_RESPONSE: Final = 10 * 1024 * 1024
# A recorded answer is one SQLite value (at most 1e9 bytes) and is held in memory while it is
# written; far below that, so a setting can never make the record of an attempt impossible.
MAX_STORED: Final = 512 * 1024 * 1024
DURABLE_ATTEMPTS: Final = 4
DEFAULT_QUEUE_LIMIT: Final = 10_000
MAX_FLOW_LIMIT: Final = 1_000_000  # of concurrency, throttle, rate_limit and queue_limit
PLAIN_ATTEMPTS: Final = 1

_TOP_KEYS: Final = (
    "listen", "internal_listen", "internal_url", "store", "durability", "retention",
    "admin_token", "events", "log_level", "log_format", "metrics_listen", "shutdown_grace",
    "routes", "limits", "store_key", "lease", "replica_id", "otel", "public_url",
)  # fmt: skip
_ROUTE_KEYS: Final = (
    "name", "path", "methods", "upstream", "durable", "timeout", "hold", "max_body",
    "max_response", "retry", "strip_prefix", "rewrite", "concurrency", "throttle", "rate_limit",
    "queue_limit",
)  # fmt: skip
_CONCURRENCY_KEYS: Final = ("limit", "key")
_THROTTLE_KEYS: Final = ("limit", "per", "burst", "key")
_RATE_LIMIT_KEYS: Final = ("limit", "per", "key")
_RETRY_KEYS: Final = ("attempts", "initial", "max", "multiplier", "on", "non_idempotent")
_EVENTS_KEYS: Final = ("lookback",)
_LIMITS_KEYS: Final = (
    "header_timeout", "body_timeout", "idle_timeout", "max_connections", "max_header_size",
    "send_timeout",
)  # fmt: skip
_OTEL_KEYS: Final = ("endpoint", "service_name", "headers", "timeout")
_MIN_HEADER_SIZE: Final = 1024

# --- scalar parsers (public: also used outside config files) --------------------------------

_NUMBER_UNIT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)")
_DURATION_UNITS: Final = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
_SIZE_UNITS: Final = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _show(value: object) -> str:
    """A value quoted for an error message, kept short and on one line."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# Digits a duration or size may have: more are never meant, and a million of them would
# overflow decimal's exponent.
_MAX_DIGITS = 30


def _number(number: str, text: str, what: str) -> Decimal:
    if len(number) > _MAX_DIGITS:
        raise ValueError(f"{what} {_show(text)} is too large")
    return Decimal(number)


def parse_duration(text: str) -> float:
    """``"500ms"``, ``"1.5s"``, ``"10m"``, ``"2h"``, ``"7d"`` -> seconds. Raises ValueError."""
    match = _NUMBER_UNIT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'expected a duration such as "500ms", "30s" or "7d", got {_show(text)}')
    number, unit = match["number"], match["unit"]
    if not unit:
        raise ValueError(f'{_show(text)} needs a unit: ms, s, m, h or d (e.g. "{number}s")')
    factor = _DURATION_UNITS.get(unit)
    if factor is None:
        raise ValueError(f'unknown duration unit "{unit}" in {_show(text)}: use ms, s, m, h or d')
    seconds = float(_number(number, text, "duration") * factor)
    if not math.isfinite(seconds):
        raise ValueError(f"duration {_show(text)} is too large")
    return seconds


def parse_size(text: str) -> int:
    """``"1048576"``, ``"512B"``, ``"64KiB"``, ``"1.5MiB"``, ``"1GiB"`` -> bytes.

    Raises ValueError.
    """
    match = _NUMBER_UNIT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'expected a size such as "1048576", "64KiB" or "1MiB", got {_show(text)}')
    number, unit = match["number"], match["unit"] or "B"
    factor = _SIZE_UNITS.get(unit)
    if factor is None:
        hint = (
            f' (did you mean "{unit[0].upper()}iB"?)' if unit.upper() in {"KB", "MB", "GB"} else ""
        )
        raise ValueError(
            f'unknown size unit "{unit}" in {_show(text)}: use B, KiB, MiB or GiB{hint}'
        )
    value = _number(number, text, "size") * factor
    if value != value.to_integral_value():
        raise ValueError(f"size {_show(text)} is not a whole number of bytes")
    return int(value)


_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def parse_address(text: str) -> Address:
    """``"0.0.0.0:8080"``, ``"[::1]:8081"``, ``"localhost:0"`` -> Address. Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f'{_show(text)} is missing the "]" after the IPv6 address')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(host)} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f'{_show(text)} needs a port, e.g. "[{host}]:8080"')
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f'{_show(text)} needs host:port, e.g. "127.0.0.1:8080"')
        if ":" in host:
            raise ValueError(f'IPv6 addresses need brackets, e.g. "[::1]:8080", got {_show(text)}')
        if not host:
            raise ValueError(f'{_show(text)} needs a host, e.g. "0.0.0.0{text}"')
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{_show(host)} is not a valid host name or IP address")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"port {_show(port_text)} is not a number from 0 to 65535")
    return Address(host, int(port_text))


# --- reading nested mappings ----------------------------------------------------------------


class _Invalid(Exception):
    """Raised inside parse_settings; becomes a ConfigError once the file name is attached."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


def _kind(value: object) -> str:
    """How YAML spelled a value, in user terms."""
    if value is None:
        return "nothing (null)"
    for python_type, name in (
        (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
        (list, "a list"), (dict, "a mapping"),
    ):  # fmt: skip
        if isinstance(value, python_type):
            return f"{name} ({_show(value)})" if name not in {"a list", "a mapping"} else name
    return type(value).__name__


def _join(path: str | None, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Section:
    """One YAML mapping; unknown keys are rejected up front, with a suggestion."""

    _MISSING: Final = object()

    def __init__(
        self, data: object, path: str | None, known: tuple[str, ...], what: str,
        aliases: dict[object, str] | None = None,
    ) -> None:  # fmt: skip
        if not isinstance(data, dict):
            raise _Invalid(path, f"expected {what}, got {_kind(data)}")
        self.path = path
        self._values: dict[str, object] = {}
        for raw_key, value in data.items():
            # YAML 1.1 reads an unquoted `on:` as the boolean true; aliases map it back.
            key = (aliases or {}).get(raw_key) if not isinstance(raw_key, str) else raw_key
            if key is None:
                key = str(raw_key).lower() if isinstance(raw_key, bool) else str(raw_key)
            if key in self._values:
                raise _Invalid(self.key(key), "given twice")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "known keys: " + ", ".join(known)
                raise _Invalid(self.key(key), f"unknown key ({hint})")
            self._values[key] = value

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def optional(self, name: str, convert: Callable[[object, str], T], default: T) -> T:
        if name not in self._values:
            return default
        return convert(self._values[name], self.key(name))

    def required(self, name: str, convert: Callable[[object, str], T], why: str) -> T:
        if name not in self._values:
            raise _Invalid(self.key(name), f"missing ({why})")
        return convert(self._values[name], self.key(name))

    def raw(self, name: str) -> object:
        return self._values.get(name, self._MISSING)


# --- value converters: (value from YAML, key path) -> typed value ---------------------------


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, int | float | bool) else ""
        raise _Invalid(key, f"expected a string, got {_kind(value)}{hint}")
    if not value.strip():
        raise _Invalid(key, "must not be empty")
    return value.strip()


def _boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(key, f"expected true or false, got {_kind(value)}")
    return value


def _duration(*, allow_zero: bool) -> Callable[[object, str], float]:
    def convert(value: object, key: str) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise _Invalid(key, f'{_show(value)} needs a unit: ms, s, m, h or d (e.g. "{value}s")')
        if not isinstance(value, str):
            raise _Invalid(key, f'expected a duration such as "30s", got {_kind(value)}')
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(key, str(exc)) from None
        if seconds == 0 and not allow_zero:
            raise _Invalid(key, "must be longer than 0s")
        return seconds

    return convert


def _size(value: object, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Invalid(key, "must not be negative")
        return value
    if not isinstance(value, str):
        raise _Invalid(
            key, f'expected a size such as "1MiB" or a number of bytes, got {_kind(value)}'
        )
    try:
        return parse_size(value)
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None


def _max_response(value: object, key: str) -> int:
    size = _size(value, key)
    if size > MAX_STORED:
        raise _Invalid(key, "must be at most 512MiB: a durable route stores the whole answer")
    return size


def _max_body(value: object, key: str) -> int:
    size = _size(value, key)
    if size > MAX_STORED:
        raise _Invalid(key, "must be at most 512MiB: a durable route stores the whole body")
    return size


def _address_text(value: object, key: str) -> str:
    """The address as written (internal_url's default reuses it), once it is known to parse."""
    if not isinstance(value, str):
        raise _Invalid(key, f'expected host:port such as "127.0.0.1:8081", got {_kind(value)}')
    try:
        parse_address(value)
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None
    return value.strip()


def _address(value: object, key: str) -> Address:
    return parse_address(_address_text(value, key))


def _optional_address(value: object, key: str) -> Address | None:
    return None if value is None else _address(value, key)


def _choice(*choices: str) -> Callable[[object, str], str]:
    def convert(value: object, key: str) -> str:
        text = _string(value, key).lower()
        if text not in choices:
            raise _Invalid(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return text

    return convert


def _http_url(value: object, key: str, *, allow_path: bool) -> str:
    text = _string(value, key)
    if any(ch.isspace() for ch in text):
        raise _Invalid(key, f"{_show(text)} contains whitespace")
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise _Invalid(key, f"expected an http:// or https:// URL, got {_show(text)}")
    if not parts.hostname:
        raise _Invalid(key, f"{_show(text)} has no host")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port only when it is read
    except ValueError:
        raise _Invalid(key, f"{_show(text)} has an invalid port") from None
    if "@" in parts.netloc:
        raise _Invalid(key, "credentials in the URL are not supported")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise _Invalid(key, f"{_show(text)} must not have a query or fragment")
    path = parts.path.rstrip("/")
    if path and not allow_path:
        raise _Invalid(
            key, f"{_show(text)} must not have a path: the client's path is forwarded as it is"
        )
    return f"{scheme}://{parts.netloc}{path}"


def _public_url(value: object, key: str) -> str:
    """The base of signal URLs; "" (the default) keeps them relative to the public listener."""
    if value == "":
        return ""
    return _http_url(value, key, allow_path=True)


def _store(value: object, key: str) -> tuple[str, str]:
    text = _string(value, key)
    scheme = text.partition(":")[0].lower()
    if scheme in ("postgresql", "postgres"):
        return _postgres_url(text, key), ""
    usage = (
        "use sqlite:///relative/path, sqlite:////absolute/path or "
        "postgresql://user@host:5432/database"
    )
    if not text.startswith("sqlite://"):
        raise _Invalid(key, f"{_show(text)} is not a store URL: {usage}")
    rest = text.removeprefix("sqlite://")
    if not rest.startswith("/"):
        raise _Invalid(key, f"an sqlite URL has no host part: {usage}")
    path = rest[1:]
    if not path or path.endswith("/"):
        raise _Invalid(key, f"{_show(text)} does not name a database file: {usage}")
    if "?" in path or "#" in path:
        raise _Invalid(key, "store URL options are not supported")
    return text, path


def _postgres_url(text: str, key: str) -> str:
    """A libpq-style URL, as asyncpg takes it; checked for shape only (the server is asked at
    start). Written in lower case, so `postgresql://`."""
    scheme, _, rest = text.partition("://")
    if scheme not in ("postgresql", "postgres") or not rest:
        raise _Invalid(
            key, f"{_show(text)} is not a PostgreSQL URL: use postgresql://user@host:5432/database"
        )
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise _Invalid(key, f"not a PostgreSQL URL: {exc}") from None
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise _Invalid(
            key,
            "the PostgreSQL URL names no database: add /DATABASE, e.g. "
            "postgresql://stepgate@db:5432/stepgate",
        )
    return text


_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def _replica_id(value: object, key: str) -> str:
    if value is None:
        return ""  # the default: the gateway picks one at start
    text = _string(value, key)
    if not _REPLICA_ID.fullmatch(text):
        raise _Invalid(
            key,
            f"{_show(text)} is not a replica id: use letters, digits, '_', '.', "
            "':' and '-' (at most 100, starting with a letter or digit)",
        )
    return text


_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 tchar: a valid method name
_RESERVED_PREFIX: Final = "/_stepgate"


def _route_name(value: object, key: str) -> str:
    name = _string(value, key)
    if not _ROUTE_NAME.fullmatch(name):
        raise _Invalid(
            key,
            f"{_show(name)} is not a valid route name: use letters, digits, '_', '.' and '-' "
            "(at most 100, starting with a letter or digit)",
        )
    return name


def _route_path(value: object, key: str) -> tuple[str, bool, str]:
    path = _string(value, key)
    if not path.startswith("/"):
        raise _Invalid(key, f'{_show(path)} must start with "/"')
    if any(ch.isspace() or ch in "?#" for ch in path):
        raise _Invalid(key, f"{_show(path)} must be a plain path (no spaces, query or fragment)")
    prefix = path.endswith("/*")
    base = path[:-2] if prefix else path
    if "*" in base:
        raise _Invalid(key, f'"*" is only allowed as a final "/*" (a prefix), got {_show(path)}')
    if base == _RESERVED_PREFIX or (base + "/").startswith(_RESERVED_PREFIX + "/"):
        raise _Invalid(key, f"paths under {_RESERVED_PREFIX}/ are reserved for the gateway")
    return path, prefix, base


def _methods(value: object, key: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Invalid(key, f"expected a list of methods such as [GET, POST], got {_kind(value)}")
    if not value:
        raise _Invalid(key, "must not be empty (leave it out to allow every method)")
    methods = set()
    for index, item in enumerate(value):
        method = _string(item, f"{key}[{index}]").upper()
        if not _TOKEN.fullmatch(method):
            raise _Invalid(f"{key}[{index}]", f"{_show(item)} is not a valid HTTP method")
        methods.add(method)
    return frozenset(methods)


def _attempts(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(key, f"expected a whole number, got {_kind(value)}")
    if value < 1:
        raise _Invalid(key, "must be at least 1 (the first invocation counts)")
    return value


def _multiplier(value: object, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(key, f"expected a number, got {_kind(value)}")
    if not math.isfinite(value) or value < 1:
        raise _Invalid(key, f"must be a number of at least 1, got {_show(value)}")
    return float(value)


_RETRY_CLASSES: Final = frozenset({"5xx", "4xx", "connect", "timeout"})


def _retry_on(value: object, key: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise _Invalid(
            key, f"expected a list such as [5xx, connect, timeout, 429], got {_kind(value)}"
        )
    result = set()
    for index, item in enumerate(value):
        # A bare 429 in YAML is an integer; "429" and 429 mean the same.
        text = str(item).strip().lower() if isinstance(item, int | str) else ""
        if isinstance(item, bool) or not (
            text in _RETRY_CLASSES or re.fullmatch(r"[1-5][0-9]{2}", text)
        ):
            raise _Invalid(
                f"{key}[{index}]",
                "expected 5xx, 4xx, connect, timeout or a status code (100-599), "
                f"got {_kind(item)}",
            )
        result.add(text)
    return frozenset(result)


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


# --- sections -------------------------------------------------------------------------------


def _retry(data: object, key: str, *, durable: bool) -> RetryPolicy:
    attempts_default = DURABLE_ATTEMPTS if durable else PLAIN_ATTEMPTS
    if data is _Section._MISSING:
        return RetryPolicy(attempts_default, 0.5, 30.0, 2.0, DEFAULT_RETRY_ON, False)
    section = _Section(data, key, _RETRY_KEYS, "a mapping of retry settings", aliases={True: "on"})
    attempts = section.optional("attempts", _attempts, attempts_default)
    initial = section.optional("initial", _duration(allow_zero=True), 0.5)
    maximum = section.optional("max", _duration(allow_zero=False), 30.0)
    if initial > maximum:
        raise _Invalid(
            section.key("initial"),
            f"{_format_seconds(initial)} is longer than max ({_format_seconds(maximum)})",
        )
    multiplier = section.optional("multiplier", _multiplier, 2.0)
    on = section.optional("on", _retry_on, DEFAULT_RETRY_ON)
    non_idempotent = section.optional("non_idempotent", _boolean, False)
    if non_idempotent and durable:
        raise _Invalid(
            section.key("non_idempotent"),
            "only applies to plain routes (durable routes retry any method)",
        )
    return RetryPolicy(attempts, initial, maximum, multiplier, on, non_idempotent)


def _route(data: object, key: str) -> Route:
    section = _Section(data, key, _ROUTE_KEYS, "a route mapping with name, path and upstream")
    needed = "every route needs name, path and upstream"
    name = section.required("name", _route_name, needed)
    path, prefix, base = section.required("path", _route_path, needed)
    upstream = section.required("upstream", lambda v, k: _http_url(v, k, allow_path=False), needed)
    durable = section.optional("durable", _boolean, False)
    concurrency, throttle, rate_limit, queue_limit = _flow(section, durable)
    return Route(
        name=name,
        path=path,
        prefix=prefix,
        base=base,
        methods=section.optional("methods", _methods, None),
        upstream=upstream,
        durable=durable,
        timeout=section.optional("timeout", _duration(allow_zero=False), 30.0),
        hold=section.optional("hold", _duration(allow_zero=True), 5.0),
        max_body=section.optional("max_body", _max_body, DEFAULT_MAX_BODY),
        retry=_retry(section.raw("retry"), section.key("retry"), durable=durable),
        max_response=section.optional("max_response", _max_response, DEFAULT_MAX_RESPONSE),
        replace_base=_replace_base(section),
        concurrency=concurrency,
        throttle=throttle,
        rate_limit=rate_limit,
        queue_limit=queue_limit,
    )


# --- flow control ---------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 field name
_RATE_TEXT = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*(?:\.[0-9]+)?\s*[A-Za-z]+)\s*")


def _flow_key(value: object, key: str) -> FlowKey:
    text = _string(value, key)
    source, _, name = text.partition(":")
    if source == "header" and _HEADER_NAME.fullmatch(name):
        return FlowKey("header", name, text)
    if source == "query" and name and len(name) <= 200:
        return FlowKey("query", name, text)
    if source == "body" and name and all(name.split(".")) and name.count(".") < 32:
        return FlowKey("body", name, text)
    raise _Invalid(
        key,
        f"expected header:NAME, query:NAME or body:dotted.path (e.g. header:X-Tenant), "
        f"got {_show(text)}",
    )


def _flow_limit(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(key, f"expected a whole number, got {_kind(value)}")
    if not 1 <= value <= MAX_FLOW_LIMIT:
        raise _Invalid(key, f"must be between 1 and {MAX_FLOW_LIMIT}, got {value}")
    return value


def _queue_limit(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(key, f"expected a whole number, got {_kind(value)}")
    if not 0 <= value <= MAX_FLOW_LIMIT:
        raise _Invalid(key, f"must be between 0 and {MAX_FLOW_LIMIT}, got {value}")
    return value


def _per(value: object, key: str) -> float:
    seconds = _duration(allow_zero=False)(value, key)
    if seconds > 86400 * 366:
        raise _Invalid(key, "must be at most a year (366d)")
    return seconds


def _concurrency(value: object, key: str) -> Concurrency | None:
    if value is None:
        return None
    if isinstance(value, dict):
        section = _Section(value, key, _CONCURRENCY_KEYS, "a mapping such as {limit: 10}")
        limit = section.required("limit", _flow_limit, "the most invocations at once")
        return Concurrency(limit, section.optional("key", _flow_key, None))
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(
            key,
            f"expected a number such as 10 or a mapping such as {{limit: 10, key: "
            f"header:X-Tenant}}, got {_kind(value)}",
        )
    return Concurrency(_flow_limit(value, key), None)


def _rate(keys: tuple[str, ...], example: str) -> Callable[[object, str], Rate | None]:
    """A rate as `100/s` (`limit/per`) or as a mapping of `keys`; null is none."""

    def convert(value: object, key: str) -> Rate | None:
        if value is None:
            return None
        if isinstance(value, str):
            match = _RATE_TEXT.fullmatch(value)
            if match is None:
                raise _Invalid(key, f"expected a rate such as 100/s or 20/1m, got {_show(value)}")
            limit = _flow_limit(int(match[1]), key)
            per_text = match[2].strip()
            per = _per(per_text if per_text[0].isdigit() else "1" + per_text, key)
            return Rate(limit, per, limit, None)
        if not isinstance(value, dict):
            raise _Invalid(
                key, f"expected a rate such as 100/s or a mapping such as {example}, "
                f"got {_kind(value)}"
            )  # fmt: skip
        section = _Section(value, key, keys, f"a mapping such as {example}")
        limit = section.required("limit", _flow_limit, "how many per `per`")
        per = section.required("per", _per, "the time the limit applies to, e.g. 1s")
        burst = section.optional("burst", _flow_limit, limit)
        return Rate(limit, per, burst, section.optional("key", _flow_key, None))

    return convert


_throttle = _rate(_THROTTLE_KEYS, "{limit: 100, per: 1s, burst: 20}")
_rate_limit = _rate(_RATE_LIMIT_KEYS, "{limit: 20, per: 1m, key: header:X-Api-Key}")


def _flow(
    section: _Section, durable: bool
) -> tuple[Concurrency | None, Rate | None, Rate | None, int]:
    """A route's flow-control knobs; the queueing ones apply to durable routes only."""
    if not durable:
        for name in ("concurrency", "throttle", "queue_limit"):
            if section.raw(name) not in (_Section._MISSING, None):
                raise _Invalid(
                    section.key(name),
                    "only applies to durable routes, whose runs can wait in a queue "
                    "(a plain route can have rate_limit)",
                )
    rate_limit = section.optional("rate_limit", _rate_limit, None)
    if not durable and rate_limit is not None and rate_limit.key is not None:
        if rate_limit.key.source == "body":
            raise _Invalid(
                section.key("rate_limit.key"),
                "a body: key needs a durable route (a plain route streams the body it is "
                "given, unread); use header: or query:",
            )
    return (
        section.optional("concurrency", _concurrency, None),
        section.optional("throttle", _throttle, None),
        rate_limit,
        section.optional("queue_limit", _queue_limit, DEFAULT_QUEUE_LIMIT),
    )


_REWRITE = re.compile(r"(/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})+)+")


def _replace_base(section: _Section) -> str | None:
    """`strip_prefix: true` or `rewrite: /new/prefix`: what takes the route's base's place."""
    strip = section.optional("strip_prefix", _boolean, False)
    rewrite = section.raw("rewrite")
    if rewrite is _Section._MISSING or rewrite is None:
        return "" if strip else None
    if strip:
        raise _Invalid(section.key("rewrite"), "give strip_prefix or rewrite, not both")
    text = _string(rewrite, section.key("rewrite"))
    segments = text.split("/")[1:]
    if (
        not _REWRITE.fullmatch(text)
        or any(s in (".", "..") for s in segments)
        or ("%2e" in text.lower() or "%2f" in text.lower() or "%00" in text)
    ):
        raise _Invalid(
            section.key("rewrite"),
            f"{_show(text)} is not a path prefix: start with /, end without one, and use no "
            "dot segments, encoded dots or slashes, query or fragment (e.g. /v2/orders)",
        )
    return text


def _routes(value: object, key: str) -> tuple[Route, ...]:
    if value is None:  # `routes:` with every entry commented out
        return ()
    if not isinstance(value, list):
        raise _Invalid(key, f"expected a list of routes, got {_kind(value)}")
    routes: list[Route] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        route = _route(item, f"{key}[{index}]")
        if route.name in seen:
            raise _Invalid(
                f"{key}[{index}].name",
                f"duplicate route name {_show(route.name)} (also {key}[{seen[route.name]}])",
            )
        seen[route.name] = index
        routes.append(route)
    return tuple(routes)


def _events_lookback(value: object, key: str) -> float:
    section = _Section(value, key, _EVENTS_KEYS, "a mapping such as {lookback: 60s}")
    return section.optional("lookback", _duration(allow_zero=True), 60.0)


def _limits(value: object, key: str) -> Limits:
    section = _Section(value, key, _LIMITS_KEYS, "a mapping such as {header_timeout: 10s}")
    default = Limits()
    header_size = section.optional("max_header_size", _size, default.max_header_size)
    if header_size < _MIN_HEADER_SIZE:
        raise _Invalid(
            section.key("max_header_size"),
            f"must be at least {_MIN_HEADER_SIZE} bytes (1KiB): an ordinary browser "
            "request is larger",
        )
    return Limits(
        header_timeout=section.optional("header_timeout", _duration(allow_zero=False),
                                        default.header_timeout),
        body_timeout=section.optional("body_timeout", _duration(allow_zero=False),
                                      default.body_timeout),
        idle_timeout=section.optional("idle_timeout", _duration(allow_zero=False),
                                      default.idle_timeout),
        max_connections=section.optional("max_connections", _connections,
                                         default.max_connections),
        max_header_size=header_size,
        send_timeout=section.optional("send_timeout", _duration(allow_zero=False),
                                      default.send_timeout),
    )  # fmt: skip


def _connections(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(key, f"expected a whole number, got {_kind(value)}")
    if value < 1:
        raise _Invalid(key, "must be at least 1")
    return value


def _admin_token(value: object, key: str) -> str | None:
    if value is None:
        return None
    token = _string(value, key)
    if not all("!" <= ch <= "~" for ch in token):  # clients send it in an Authorization header
        raise _Invalid(key, "must be printable ASCII without spaces (it is sent as a bearer token)")
    return token


_LISTENERS: Final = (
    ("listen", DEFAULT_LISTEN), ("internal_listen", DEFAULT_INTERNAL_LISTEN),
    ("metrics_listen", None),
)  # fmt: skip


def _takes(address: Address) -> frozenset[tuple[str, str]]:
    """What binding ``address`` takes: (IP version, address or "*" for all), or ("name", host)."""
    host = address.host.lower()
    if host == "localhost":
        return frozenset({("4", "127.0.0.1"), ("6", "::1")})
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return frozenset({("name", host)})
    return frozenset({(str(ip.version), "*" if ip.is_unspecified else str(ip))})


def _wildcard(text: str) -> str | None:
    """``"IPv4"`` for 0.0.0.0:PORT, ``"IPv6"`` for [::]:PORT, else None."""
    try:
        ip = ipaddress.ip_address(parse_address(text).host)
    except ValueError:
        return None
    return f"IPv{ip.version}" if ip.is_unspecified else None


def _clash(a: Address, b: Address) -> bool:
    """Whether two listeners would take one port. asyncio and uvloop make IPv6 sockets IPv6-only,
    so 0.0.0.0 and :: do not clash; a host name may resolve to any address."""
    if a.port == 0 or a.port != b.port:  # port 0: the OS picks a free one for each
        return False
    return any(
        one == other
        or ("*" in (one[1], other[1]) and (one[0] == other[0] or "name" in (one[0], other[0])))
        for one in _takes(a)
        for other in _takes(b)
    )


def _listeners_apart(section: _Section) -> None:
    """Refuse two listeners on one port up front: `serve` would fail with "address in use"."""
    given: list[tuple[str, str, bool]] = []  # (key, address as written, left at its default)
    for name, fallback in _LISTENERS:
        text = section.optional(name, lambda v, k: None if v is None else _address_text(v, k),
                                fallback)  # fmt: skip
        if text is not None:
            given.append((name, text, section.raw(name) is _Section._MISSING))
    for index, later in enumerate(given):
        for earlier in given[:index]:
            if not _clash(parse_address(later[1]), parse_address(earlier[1])):
                continue
            # Blame the later key, unless the user never wrote it.
            (name, text, _), (other, other_text, other_default) = (
                (earlier, later) if later[2] else (later, earlier)
            )
            raise _Invalid(
                name,
                f"{_show(text)} {_clash_detail(text, other, other_text, other_default)}; "
                "give each listener its own port",
            )


def _clash_detail(text: str, other: str, other_text: str, other_default: bool) -> str:
    mine, theirs = _wildcard(text), _wildcard(other_text)
    default = ", the default" if other_default else ""
    if theirs and not mine:
        every = f"{': ' if default else ', '}every {theirs} address"
        return f"is inside {other} ({_show(other_text)}{default}{every})"
    if mine and not theirs:
        return f"(every {mine} address) takes {other}'s port too ({_show(other_text)}{default})"
    shown = f" ({_show(other_text)}{default})" if other_text != text or default else ""
    return f"is also {other}'s address{shown}"


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_BYTES: Final = 32
_KEY_HINT: Final = "32 random bytes in base64 or hex, e.g. from `openssl rand -base64 32`"


def _store_key(value: object, key: str) -> StoreKey | None:
    """`env:NAME` or `file:PATH`; the key is read now, so `check` and `serve` report a missing
    or malformed one with this key path. Messages never repeat the value: it may be a key
    pasted in by mistake."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(key, f"expected env:NAME or file:PATH, got {type(value).__name__}")
    kind, colon, where = value.strip().partition(":")
    if not colon or kind not in ("env", "file"):
        raise _Invalid(
            key, "expected env:NAME or file:PATH (the key itself never goes in the config file)"
        )
    if kind == "env":
        if not _ENV_NAME.fullmatch(where):
            raise _Invalid(
                key, "env: needs an environment variable name, e.g. env:STEPGATE_STORE_KEY"
            )
        text = os.environ.get(where)
        if not text:
            raise _Invalid(key, f"the environment variable {where} is not set")
        origin = f"the environment variable {where}"
    else:
        path = os.path.expanduser(where)
        if not where:
            raise _Invalid(key, "file: needs a path, e.g. file:/run/secrets/stepgate_store_key")
        try:
            with open(path, "rb") as file:
                raw = file.read(1024)
        except FileNotFoundError:
            raise _Invalid(key, f"{_show(path)}: file not found") from None
        except IsADirectoryError:
            raise _Invalid(key, f"{_show(path)} is a directory, not a key file") from None
        except PermissionError:
            raise _Invalid(key, f"{_show(path)}: permission denied") from None
        except OSError as exc:
            raise _Invalid(key, f"{_show(path)}: cannot read: {exc.strerror or exc}") from None
        text = raw.decode("ascii", "replace")
        origin = f"the file {_show(path)}"
    secret = _decode_key(text)
    if secret is None:
        raise _Invalid(key, f"{origin} does not hold a key: expected {_KEY_HINT}")
    return StoreKey(value.strip(), secret)


def _lease(section: _Section, store: str) -> float:
    lease: float = section.optional("lease", _duration(allow_zero=False), 10.0)
    if lease < 1.0:
        raise _Invalid(
            section.key("lease"), "must be at least 1s: a replica renews it every third of it"
        )
    if section.raw("lease") is not _Section._MISSING and not store.startswith("postgres"):
        raise _Invalid(
            section.key("lease"),
            "only a PostgreSQL store has leases: one gateway serves an SQLite file",
        )
    return lease


def _unread(value: object, key: str) -> None:
    return None


# What `stepgate[otel]` installs; looked for only when `otel` is configured.
_OTEL_MODULES: Final = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
OTEL_INSTALL_HINT: Final = "pip install 'stepgate[otel]'"


def _otel_installed() -> bool:
    """Whether the SDK and the OTLP/HTTP exporter can be imported, without importing them."""
    for name in _OTEL_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # a parent package is missing or unimportable
            return False
    return True


def _otel(value: object, key: str) -> Otel | None:
    """`otel: {endpoint: http://collector:4318, ...}`; null (the default) turns tracing off."""
    if value is None:
        return None
    section = _Section(
        value, key, _OTEL_KEYS, "a mapping such as {endpoint: http://collector:4318}"
    )
    endpoint = section.required(
        "endpoint", _otel_endpoint, "the collector's OTLP/HTTP URL, e.g. http://collector:4318"
    )
    timeout = section.optional("timeout", _duration(allow_zero=False), 10.0)
    otel = Otel(
        endpoint=endpoint,
        service_name=section.optional("service_name", _service_name, "stepgate"),
        headers=section.optional("headers", _otel_headers, ()),
        timeout=timeout,
    )
    if not _otel_installed():
        raise _Invalid(key, f"the OpenTelemetry packages are not installed: {OTEL_INSTALL_HINT}")
    return otel


def _unread_otel(value: object, key: str) -> Otel | None:
    """What a client of the admin API makes of `otel`: nothing (it sends no spans)."""
    return None


def _otel_endpoint(value: object, key: str) -> str:
    url = _http_url(value, key, allow_path=True)
    if url.endswith("/v1/traces"):
        raise _Invalid(
            key,
            f"give the collector's base URL, e.g. {_show(url.removesuffix('/v1/traces'))}: "
            "spans go to its /v1/traces",
        )
    return url


def _service_name(value: object, key: str) -> str:
    name = _string(value, key)
    if len(name) > 255 or not name.isprintable():
        raise _Invalid(key, f"{_show(name)} is not a service name: printable, at most 255")
    return name


def _otel_headers(value: object, key: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _Invalid(key, f"expected a mapping of header names to values, got {_kind(value)}")
    headers: list[tuple[str, str]] = []
    for name, text in value.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise _Invalid(f"{key}.{name}", f"{_show(name)} is not a valid HTTP header name")
        if not isinstance(text, str):
            hint = " (quote it)" if isinstance(text, int | float | bool) else ""
            raise _Invalid(f"{key}.{name}", f"expected a string, got {_kind(text)}{hint}")
        # Values are never repeated in messages: they are often keys.
        if not all(ch == "\t" or " " <= ch <= "~" for ch in text):
            raise _Invalid(f"{key}.{name}", "the value must be printable ASCII (no line breaks)")
        headers.append((name, text.strip()))
    return tuple(headers)


def _decode_key(text: str) -> bytes | None:
    text = text.strip()
    try:
        if len(text) == 2 * _KEY_BYTES:
            secret = bytes.fromhex(text)
        else:
            url_safe = "-" in text or "_" in text
            padded = text + "=" * (-len(text) % 4)
            secret = base64.b64decode(padded, altchars=b"-_" if url_safe else None, validate=True)
    except (ValueError, binascii.Error):
        return None
    return secret if len(secret) == _KEY_BYTES else None


def _durability(value: object, key: str) -> Literal["full", "relaxed"]:
    return "relaxed" if _choice("full", "relaxed")(value, key) == "relaxed" else "full"


def _log_format(value: object, key: str) -> Literal["json", "console"]:
    return "console" if _choice("json", "console")(value, key) == "console" else "json"


def _settings(data: object, read_key: bool) -> Settings:
    if data is None:
        raise _Invalid(None, "the file is empty; expected a mapping of settings")
    section = _Section(data, None, _TOP_KEYS, "a mapping of settings at the top level")
    internal_text = section.optional("internal_listen", _address_text, DEFAULT_INTERNAL_LISTEN)
    store, store_path = section.optional("store", _store, _store(DEFAULT_STORE, "store"))
    _listeners_apart(section)
    return Settings(
        listen=section.optional("listen", _address, parse_address(DEFAULT_LISTEN)),
        internal_listen=parse_address(internal_text),
        internal_url=section.optional(
            "internal_url", lambda v, k: _http_url(v, k, allow_path=True), "http://" + internal_text
        ),
        store=store,
        store_path=store_path,
        durability=section.optional("durability", _durability, "full"),
        retention=section.optional("retention", _duration(allow_zero=False), 7 * 86400.0),
        admin_token=section.optional("admin_token", _admin_token, None),
        events_lookback=section.optional("events", _events_lookback, 60.0),
        log_level=section.optional(
            "log_level", _choice("debug", "info", "warning", "error"), "info"
        ),
        log_format=section.optional("log_format", _log_format, "json"),
        metrics_listen=section.optional("metrics_listen", _optional_address, None),
        shutdown_grace=section.optional("shutdown_grace", _duration(allow_zero=True), 10.0),
        routes=section.optional("routes", _routes, ()),
        limits=section.optional("limits", _limits, Limits()),
        # A client of the admin API reads a gateway's config for its URL and token only, and
        # has no use for the key (nor, most often, access to it).
        store_key=section.optional("store_key", _store_key if read_key else _unread, None),
        lease=_lease(section, store),
        replica_id=section.optional("replica_id", _replica_id, ""),
        otel=section.optional("otel", _otel if read_key else _unread_otel, None),
        public_url=section.optional("public_url", _public_url, ""),
    )


# --- entry points ---------------------------------------------------------------------------


def parse_settings(data: object, *, source: str, read_key: bool = True) -> Settings:
    """Validate already-loaded YAML data. ``source`` names the file in error messages; with
    ``read_key=False`` the store_key is not looked up (and Settings.store_key is None)."""
    try:
        return _settings(data, read_key)
    except _Invalid as exc:
        raise ConfigError(source, exc.key, exc.message) from None


def load_settings(path: str | os.PathLike[str], *, read_key: bool = True) -> Settings:
    """Read and validate a YAML config file; every problem is a :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(source, None, "permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            source, None, f"invalid YAML{where}: {exc.problem or exc.context or 'syntax error'}"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, f"invalid YAML: {exc}") from None
    return parse_settings(data, source=source, read_key=read_key)
