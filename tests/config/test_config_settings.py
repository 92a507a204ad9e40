"""Good configs: defaults, normalisation, and the example config shipped at the repo root."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from gateway.config import (
    Address,
    ConfigError,
    Otel,
    RetryPolicy,
    Route,
    Settings,
    load_settings,
    parse_settings,
)

from .conftest import REPO, RunCli, WriteConfig, run_process

EXAMPLE = REPO / "config.example.yaml"
DEFAULT_ON = frozenset({"5xx", "connect", "timeout", "429"})


def test_empty_routes_gives_every_default(write_config: WriteConfig) -> None:
    settings = load_settings(write_config("routes: []\n"))

    assert settings == Settings(
        listen=Address("0.0.0.0", 8080),
        internal_listen=Address("127.0.0.1", 8081),
        internal_url="http://127.0.0.1:8081",
        store="sqlite:///stepgate.db",
        store_path="stepgate.db",
        durability="full",
        retention=7 * 86400.0,
        admin_token=None,
        events_lookback=60.0,
        log_level="info",
        log_format="json",
        metrics_listen=None,
        shutdown_grace=10.0,
        routes=(),
    )


@pytest.mark.parametrize("text", ["routes:\n", "listen: 0.0.0.0:8080\n", "{}\n"])
def test_routes_may_be_empty_or_absent(text: str, write_config: WriteConfig) -> None:
    assert load_settings(write_config(text)).routes == ()


def test_durable_and_plain_route_defaults() -> None:
    settings = parse_settings(
        {
            "routes": [
                {"name": "d", "path": "/d", "upstream": "http://127.0.0.1:3000", "durable": True},
                {"name": "p", "path": "/p", "upstream": "http://127.0.0.1:3000"},
                # a retry block without `attempts` keeps the route kind's default
                {"name": "p2", "path": "/p2", "upstream": "http://h", "retry": {"max": "1m"}},
                {
                    "name": "d2",
                    "path": "/d2",
                    "upstream": "http://h",
                    "durable": True,
                    "retry": {"initial": "1s"},
                },
            ]
        },
        source="t",
    )
    durable, plain, plain2, durable2 = settings.routes
    assert durable == Route(
        name="d",
        path="/d",
        prefix=False,
        base="/d",
        methods=None,
        upstream="http://127.0.0.1:3000",
        durable=True,
        timeout=30.0,
        hold=5.0,
        max_body=1024 * 1024,
        retry=RetryPolicy(4, 0.5, 30.0, 2.0, DEFAULT_ON, False),
    )
    assert plain.durable is False
    assert plain.retry == RetryPolicy(1, 0.5, 30.0, 2.0, DEFAULT_ON, False)
    assert (plain2.retry.attempts, plain2.retry.max) == (1, 60.0)
    assert (durable2.retry.attempts, durable2.retry.initial) == (4, 1.0)


def test_everything_set_round_trips(write_config: WriteConfig) -> None:
    path = write_config(
        """\
        listen: "[::]:9000"
        internal_listen: localhost:0
        internal_url: https://gateway.internal:8443/stepgate/
        store: sqlite:////var/lib/stepgate/runs.db
        durability: relaxed
        retention: 36h
        admin_token: "s3cret"
        events: {lookback: 1.5s}
        log_level: DEBUG
        log_format: console
        metrics_listen: "[::1]:9090"
        shutdown_grace: 250ms
        routes:
          - name: api.v2
            path: /api/*
            methods: [get, Post, PURGE]
            upstream: HTTPS://backend.example:8443/
            durable: true
            timeout: 2m
            hold: 0s
            max_body: 1.5MiB
            retry:
              attempts: 10
              initial: 100ms
              max: 1h
              multiplier: 1.5
              on: [5XX, 4xx, connect, "409", 503]
          - name: all
            path: /*
            upstream: http://10.0.0.7
            max_body: 2048
            retry:
              on: []
              non_idempotent: true
        """
    )
    settings = load_settings(path)

    assert settings.listen == Address("::", 9000)
    assert settings.internal_listen == Address("localhost", 0)
    assert settings.internal_url == "https://gateway.internal:8443/stepgate"
    assert (settings.store, settings.store_path) == (
        "sqlite:////var/lib/stepgate/runs.db",
        "/var/lib/stepgate/runs.db",
    )
    assert settings.durability == "relaxed"
    assert settings.retention == 36 * 3600.0
    assert settings.admin_token == "s3cret"
    assert settings.events_lookback == 1.5
    assert (settings.log_level, settings.log_format) == ("debug", "console")
    assert settings.metrics_listen == Address("::1", 9090)
    assert settings.shutdown_grace == 0.25

    api, everything = settings.routes
    assert api == Route(
        name="api.v2",
        path="/api/*",
        prefix=True,
        base="/api",
        methods=frozenset({"GET", "POST", "PURGE"}),
        upstream="https://backend.example:8443",
        durable=True,
        timeout=120.0,
        hold=0.0,
        max_body=1572864,
        retry=RetryPolicy(10, 0.1, 3600.0, 1.5, frozenset({"5xx", "4xx", "connect", "409", "503"}),
                          False),
    )  # fmt: skip
    assert (everything.prefix, everything.base, everything.path) == (True, "", "/*")
    assert everything.upstream == "http://10.0.0.7"
    assert everything.max_body == 2048
    assert everything.retry == RetryPolicy(1, 0.5, 30.0, 2.0, frozenset(), True)


@pytest.mark.parametrize(
    ("internal_listen", "internal_url"),
    [
        ("127.0.0.1:8081", "http://127.0.0.1:8081"),
        ("[::1]:7000", "http://[::1]:7000"),
        ("gateway:8081", "http://gateway:8081"),
    ],
)
def test_internal_url_defaults_to_internal_listen_as_written(
    internal_listen: str, internal_url: str
) -> None:
    settings = parse_settings({"internal_listen": internal_listen}, source="t")
    assert settings.internal_url == internal_url


def test_relative_store_path() -> None:
    settings = parse_settings({"store": "sqlite:///data/gw.db"}, source="t")
    assert settings.store_path == "data/gw.db"


def test_settings_are_frozen_and_slotted() -> None:
    settings = parse_settings({"routes": []}, source="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log_level = "debug"  # type: ignore[misc]
    assert not hasattr(settings, "__dict__")
    for cls in (Address, RetryPolicy, Route, Settings):
        assert getattr(cls, "__dataclass_params__").frozen  # noqa: B009
        assert "__slots__" in vars(cls)


def test_check_prints_ok_with_route_count(write_config: WriteConfig, cli: RunCli) -> None:
    path = write_config(
        {"routes": [{"name": n, "path": f"/{n}", "upstream": "http://h"} for n in ("a", "b")]}
    )
    outcome = cli("check", "--config", str(path))
    assert (outcome.code, outcome.out, outcome.err) == (0, f"{path}: ok (2 routes)\n", "")


def test_example_config_passes_check_from_the_repo_root() -> None:
    outcome = run_process("check", "--config", "config.example.yaml", cwd=REPO)
    assert (outcome.code, outcome.out, outcome.err) == (
        0,
        "config.example.yaml: ok (3 routes)\n",
        "",
    )


def test_example_config_shows_every_option_at_its_default() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    example = load_settings(EXAMPLE)
    defaults = parse_settings({}, source="defaults")

    assert set(raw) == {
        "listen", "internal_listen", "internal_url", "store", "durability", "retention",
        "admin_token", "events", "log_level", "log_format", "metrics_listen", "shutdown_grace",
        "routes", "limits", "store_key", "replica_id", "otel", "public_url",
    }  # fmt: skip
    # lease is shown commented out: an SQLite store refuses it (it has no leases).
    assert "# lease: 10s" in EXAMPLE.read_text(encoding="utf-8")
    # otel is off by default; the example shows it commented out, and it would load.
    assert raw["otel"] is None
    shown = [line.removeprefix("#   ") for line in _commented_otel(EXAMPLE)]
    assert parse_settings(yaml.safe_load("\n".join(shown)), source="example").otel == Otel(
        "http://otel-collector:4318", "checkout-gateway", (("X-Api-Key", "your-key"),), 10.0
    )
    assert dataclasses.replace(example, routes=()) == defaults
    assert example.store == "sqlite:///stepgate.db"

    trips, insurance, stats = example.routes
    assert (trips.path, trips.methods, trips.durable) == ("/trips", frozenset({"POST"}), True)
    assert (insurance.path, insurance.durable) == ("/insurance", True)
    assert (stats.path, stats.methods, stats.durable) == ("/stats", frozenset({"GET"}), False)
    for route, attempts in ((trips, 4), (insurance, 4), (stats, 1)):
        assert route.upstream == "http://127.0.0.1:3000"
        assert route.retry == RetryPolicy(attempts, 0.5, 30.0, 2.0, DEFAULT_ON, False)
        assert (route.timeout, route.hold, route.max_body) == (30.0, 5.0, 1024 * 1024)
        assert route.max_response == 10 * 1024 * 1024
        # every route option is spelled out; the queueing ones on the durable route only
        flow = {"rate_limit"} | (
            {"concurrency", "throttle", "queue_limit"} if route.durable else set()
        )
        assert set(next(r for r in raw["routes"] if r["name"] == route.name)) == {
            "name", "path", "methods", "upstream", "durable", "timeout", "hold", "max_body",
            "max_response", "retry", "strip_prefix", "rewrite", *flow,
        }  # fmt: skip
        assert (route.concurrency, route.throttle, route.rate_limit) == (None, None, None)


def _commented_otel(path: Path) -> list[str]:
    """The commented-out `otel:` block of the example config."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index("#   otel:")
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("#     "):
            break
        block.append(line)
    return block


def test_otel_settings() -> None:
    settings = parse_settings(
        {
            "otel": {
                "endpoint": "https://collector.example:4318/otlp/",
                "service_name": "billing-gateway",
                "headers": {"Authorization": "Bearer t0ken", "X-Tenant": " acme "},
                "timeout": "2s",
            }
        },
        source="t",
    )
    assert settings.otel == Otel(
        endpoint="https://collector.example:4318/otlp",
        service_name="billing-gateway",
        headers=(("Authorization", "Bearer t0ken"), ("X-Tenant", "acme")),
        timeout=2.0,
    )
    assert "t0ken" not in repr(settings)
    defaults = parse_settings({"otel": {"endpoint": "http://c:4318"}}, source="t").otel
    assert defaults == Otel("http://c:4318", "stepgate", (), 10.0)
    assert parse_settings({"otel": None}, source="t").otel is None
    assert parse_settings({}, source="t").otel is None
    # A client of the admin API reads the config for its URL and token only.
    assert parse_settings({"otel": {"endpoint": 5}}, source="t", read_key=False).otel is None


def test_public_url_is_an_http_url_without_a_trailing_slash() -> None:
    def public(value: object) -> str:
        return parse_settings({"public_url": value}, source="t").public_url

    assert parse_settings({}, source="t").public_url == ""
    assert public("") == ""
    assert public("https://shop.example.com/") == "https://shop.example.com"
    assert public("http://gw.internal:8080/api") == "http://gw.internal:8080/api"
    for bad, why in (
        ("shop.example.com", "expected an http:// or https:// URL"),
        ("https://shop.example.com/?x=1", "must not have a query or fragment"),
        ("https://user@shop.example.com", "credentials in the URL"),
    ):
        with pytest.raises(ConfigError, match=why) as caught:
            public(bad)
        assert caught.value.key == "public_url"


def test_load_settings_accepts_a_path_object(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("log_level: warning\n", encoding="utf-8")
    assert load_settings(path).log_level == "warning"


def test_flow_control_knobs_read_as_written() -> None:
    from gateway.config import Concurrency, FlowKey, Rate, parse_settings

    route = {"name": "p", "path": "/p", "upstream": "http://127.0.0.1:1", "durable": True}
    flows = {
        "concurrency": {"limit": 10, "key": "header:X-Tenant"},
        "throttle": "20/1m",
        "rate_limit": {"limit": 3, "per": "10s", "key": "query:user"},
        "queue_limit": 50,
    }
    (read,) = parse_settings({"routes": [{**route, **flows}]}, source="t").routes
    assert read.concurrency == Concurrency(10, FlowKey("header", "X-Tenant", "header:X-Tenant"))
    assert read.throttle == Rate(20, 60.0, 20, None)  # burst defaults to the limit
    assert read.rate_limit == Rate(3, 10.0, 3, FlowKey("query", "user", "query:user"))
    assert read.queue_limit == 50 and read.flow_controlled
    (plain,) = parse_settings({"routes": [route]}, source="t").routes
    assert plain.concurrency is None and plain.queue_limit == 10_000
    assert not plain.flow_controlled
    (short,) = parse_settings({"routes": [{**route, "throttle": "100/s"}]}, source="t").routes
    assert short.throttle == Rate(100, 1.0, 100, None)
