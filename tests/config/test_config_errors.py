"""Every kind of bad config: exit code 2, one stderr line naming the file and key path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings, parse_settings

from .conftest import RunCli, WriteConfig, run_process

DROP = object()  # marks a key to leave out of the base route


def route(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "process",
        "path": "/process",
        "upstream": "http://127.0.0.1:3000",
        "durable": True,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not DROP}


def with_route(**changes: Any) -> dict[str, Any]:
    return {"routes": [route(**changes)]}


# (config data or YAML text, key path or None for a file-level problem, fragment of the message)
CASES: dict[str, tuple[Any, str | None, str]] = {
    # unknown keys, at every level, with a suggestion
    "unknown top key": ({"listn": "0.0.0.0:8080"}, "listn", 'did you mean "listen"'),
    "unknown route key": (with_route(timout="5s"), "routes[0].timout", 'did you mean "timeout"'),
    "unknown retry key": (
        with_route(retry={"attempt": 3}),
        "routes[0].retry.attempt",
        'did you mean "attempts"',
    ),
    "unknown events key": ({"events": {"lookbak": "1s"}}, "events.lookbak", "lookback"),
    "unknown key no suggestion": ({"zzz": 1}, "zzz", "known keys: listen"),
    # flow control (issue 12)
    "concurrency zero": (with_route(concurrency=0), "routes[0].concurrency", "between 1 and"),
    "concurrency text": (with_route(concurrency="10"), "routes[0].concurrency", "a number such"),
    "concurrency bad key": (
        with_route(concurrency={"limit": 2, "key": "cookie:sid"}),
        "routes[0].concurrency.key",
        "header:NAME, query:NAME or body:dotted.path",
    ),
    "concurrency no limit": (
        with_route(concurrency={"key": "header:X-Tenant"}),
        "routes[0].concurrency.limit",
        "missing",
    ),
    "concurrency on plain": (
        with_route(durable=False, concurrency=2),
        "routes[0].concurrency",
        "only applies to durable routes",
    ),
    "throttle bad rate": (with_route(throttle="100 per s"), "routes[0].throttle", "100/s"),
    "throttle no per": (
        with_route(throttle={"limit": 5}),
        "routes[0].throttle.per",
        "missing",
    ),
    "throttle unknown key": (
        with_route(throttle={"limit": 5, "per": "1s", "brust": 2}),
        "routes[0].throttle.brust",
        'did you mean "burst"',
    ),
    "rate_limit has no burst": (
        with_route(rate_limit={"limit": 5, "per": "1s", "burst": 2}),
        "routes[0].rate_limit.burst",
        "unknown key",
    ),
    "rate_limit body key on plain": (
        with_route(durable=False, rate_limit={"limit": 5, "per": "1s", "key": "body:a"}),
        "routes[0].rate_limit.key",
        "needs a durable route",
    ),
    "queue_limit negative": (with_route(queue_limit=-1), "routes[0].queue_limit", "between 0"),
    "queue_limit on plain": (
        with_route(durable=False, queue_limit=5),
        "routes[0].queue_limit",
        "only applies to durable routes",
    ),
    # types (bool is not an int)
    "durable not bool": (with_route(durable=1), "routes[0].durable", "expected true or false"),
    "attempts bool": (
        with_route(retry={"attempts": True}),
        "routes[0].retry.attempts",
        "got a boolean",
    ),
    "attempts float": (
        with_route(retry={"attempts": 2.5}),
        "routes[0].retry.attempts",
        "expected a whole number",
    ),
    "multiplier bool": (
        with_route(retry={"multiplier": True}),
        "routes[0].retry.multiplier",
        "got a boolean",
    ),
    "multiplier string": (
        with_route(retry={"multiplier": "2"}),
        "routes[0].retry.multiplier",
        "expected a number",
    ),
    "name not string": (with_route(name=12), "routes[0].name", "quote it"),
    "token not string": ({"admin_token": 12345}, "admin_token", "expected a string"),
    "token empty": ({"admin_token": " "}, "admin_token", "must not be empty"),
    "events not mapping": ({"events": "60s"}, "events", "expected a mapping"),
    "routes not list": ({"routes": {"process": {}}}, "routes", "expected a list of routes"),
    "route not mapping": ({"routes": ["process"]}, "routes[0]", "expected a route mapping"),
    # durations
    "duration bare int": (with_route(timeout=30), "routes[0].timeout", "needs a unit"),
    "duration bare float": (with_route(hold=1.5), "routes[0].hold", "needs a unit"),
    "duration bare string": (with_route(timeout="30"), "routes[0].timeout", "needs a unit"),
    "duration bad unit": (with_route(timeout="30sec"), "routes[0].timeout", 'unit "sec"'),
    "duration garbage": (with_route(timeout="soon"), "routes[0].timeout", "expected a duration"),
    "duration negative": (with_route(timeout="-5s"), "routes[0].timeout", "expected a duration"),
    "duration zero timeout": (with_route(timeout="0s"), "routes[0].timeout", "longer than 0s"),
    "duration list": (with_route(hold=["1s"]), "routes[0].hold", "got a list"),
    "duration bool": (with_route(hold=False), "routes[0].hold", "got a boolean"),
    "retention bare": ({"retention": 7}, "retention", "needs a unit"),
    "retention zero": ({"retention": "0d"}, "retention", "longer than 0s"),
    "lookback bare": ({"events": {"lookback": 60}}, "events.lookback", "needs a unit"),
    "grace bad": ({"shutdown_grace": "10 seconds"}, "shutdown_grace", "unit"),
    "initial bare": (with_route(retry={"initial": 1}), "routes[0].retry.initial", "needs a unit"),
    "max bare": (with_route(retry={"max": 30}), "routes[0].retry.max", "needs a unit"),
    # sizes
    "size MB": (with_route(max_body="1MB"), "routes[0].max_body", 'did you mean "MiB"'),
    "size unit": (with_route(max_body="1TiB"), "routes[0].max_body", 'unknown size unit "TiB"'),
    "size fraction of a byte": (
        with_route(max_body="0.5B"),
        "routes[0].max_body",
        "not a whole number of bytes",
    ),
    "size negative": (with_route(max_body=-1), "routes[0].max_body", "must not be negative"),
    "size float": (with_route(max_body=1.5), "routes[0].max_body", "expected a size"),
    "size garbage": (with_route(max_body="big"), "routes[0].max_body", "expected a size"),
    # missing required keys
    "missing upstream": (with_route(upstream=DROP), "routes[0].upstream", "missing"),
    "missing path": (with_route(path=DROP), "routes[0].path", "missing"),
    "missing name": (with_route(name=DROP), "routes[0].name", "missing"),
    # upstream URLs
    "upstream scheme": (with_route(upstream="ftp://h:21"), "routes[0].upstream", "http://"),
    "upstream no scheme": (with_route(upstream="127.0.0.1:3000"), "routes[0].upstream", "http"),
    "upstream no host": (with_route(upstream="http://:3000"), "routes[0].upstream", "no host"),
    "upstream path": (
        with_route(upstream="http://h:3000/api"),
        "routes[0].upstream",
        "must not have a path",
    ),
    "upstream query": (with_route(upstream="http://h:3000/?a=1"), "routes[0].upstream", "query"),
    "upstream port": (with_route(upstream="http://h:99999"), "routes[0].upstream", "invalid port"),
    "upstream credentials": (
        with_route(upstream="http://u:p@h:1"),
        "routes[0].upstream",
        "credentials",
    ),
    "upstream not string": (with_route(upstream=3000), "routes[0].upstream", "expected a string"),
    # paths
    "path relative": (with_route(path="process"), "routes[0].path", 'must start with "/"'),
    "path inner star": (with_route(path="/api*"), "routes[0].path", 'only allowed as a final "/*"'),
    "path middle star": (with_route(path="/a/*/b"), "routes[0].path", 'final "/*"'),
    "path query": (with_route(path="/a?b=1"), "routes[0].path", "plain path"),
    "path reserved": (with_route(path="/_stepgate/runs"), "routes[0].path", "reserved"),
    "path reserved prefix": (with_route(path="/_stepgate/*"), "routes[0].path", "reserved"),
    # methods
    "method token": (with_route(methods=["GE T"]), "routes[0].methods[0]", "not a valid HTTP"),
    "method not list": (with_route(methods="POST"), "routes[0].methods", "expected a list"),
    "method empty": (with_route(methods=[]), "routes[0].methods", "must not be empty"),
    "method not string": (with_route(methods=["GET", 1]), "routes[0].methods[1]", "string"),
    # names
    "name invalid": (with_route(name="my route"), "routes[0].name", "not a valid route name"),
    "name duplicate": (
        {"routes": [route(), route(path="/other")]},
        "routes[1].name",
        'duplicate route name "process" (also routes[0])',
    ),
    # retry
    "attempts zero": (with_route(retry={"attempts": 0}), "routes[0].retry.attempts", "at least 1"),
    "multiplier below one": (
        with_route(retry={"multiplier": 0.5}),
        "routes[0].retry.multiplier",
        "at least 1",
    ),
    "initial above max": (
        with_route(retry={"initial": "1m", "max": "30s"}),
        "routes[0].retry.initial",
        "60s is longer than max (30s)",
    ),
    "initial above default max": (
        with_route(retry={"initial": "31s"}),
        "routes[0].retry.initial",
        "longer than max (30s)",
    ),
    "retry on word": (
        with_route(retry={"on": ["5xx", "teapot"]}),
        "routes[0].retry.on[1]",
        "got a string",
    ),
    "retry on status range": (
        with_route(retry={"on": [600]}),
        "routes[0].retry.on[0]",
        "status code (100-599)",
    ),
    "retry on two digits": (with_route(retry={"on": ["99"]}), "routes[0].retry.on[0]", "99"),
    "retry on 2xx": (with_route(retry={"on": ["2xx"]}), "routes[0].retry.on[0]", "2xx"),
    "retry on bool": (with_route(retry={"on": [True]}), "routes[0].retry.on[0]", "a boolean"),
    "retry on not list": (with_route(retry={"on": "5xx"}), "routes[0].retry.on", "a list"),
    "retry not mapping": (with_route(retry=3), "routes[0].retry", "expected a mapping"),
    "non_idempotent on durable": (
        with_route(retry={"non_idempotent": True}),
        "routes[0].retry.non_idempotent",
        "only applies to plain routes",
    ),
    "retry on unquoted twice": (
        """\
        routes:
          - name: process
            path: /process
            upstream: http://127.0.0.1:3000
            retry:
              on: [5xx]
              "on": [4xx]
        """,
        "routes[0].retry.on",
        "given twice",
    ),
    # store, durability
    "store postgres": (
        {"store": "postgresql://db"},
        "store",
        "the PostgreSQL URL names no database",
    ),
    "store postgres port": ({"store": "postgresql://db:99999/x"}, "store", "Port out of range"),
    "lease on sqlite": ({"lease": "5s"}, "lease", "only a PostgreSQL store has leases"),
    "lease short": ({"store": "postgresql://db/x", "lease": "100ms"}, "lease", "at least 1s"),
    "replica id": ({"replica_id": "a b"}, "replica_id", "is not a replica id"),
    "store other": ({"store": "mysql://db/x"}, "store", "not a store URL"),
    "store host": ({"store": "sqlite://host/x.db"}, "store", "no host part"),
    "store no file": ({"store": "sqlite:///"}, "store", "does not name a database file"),
    "store relative path only": ({"store": "stepgate.db"}, "store", "sqlite:///"),
    "durability": ({"durability": "fast"}, "durability", "expected one of full, relaxed"),
    # listen addresses
    "listen int": ({"listen": 8080}, "listen", "expected host:port"),
    "listen no port": ({"listen": "localhost"}, "listen", "needs host:port"),
    "listen no host": ({"listen": ":8080"}, "listen", "needs a host"),
    "listen v6 brackets": ({"listen": "::1:8080"}, "listen", "need brackets"),
    "listen v6 no port": ({"listen": "[::1]8080"}, "listen", "needs a port"),
    "listen v6 unclosed": ({"listen": "[::1:8080"}, "listen", 'missing the "]"'),
    "listen v6 bad": ({"listen": "[zz]:80"}, "listen", "not an IPv6 address"),
    "listen port range": ({"listen": "0.0.0.0:65536"}, "listen", "from 0 to 65535"),
    "listen port word": ({"listen": "0.0.0.0:http"}, "listen", "from 0 to 65535"),
    "listen bad host": ({"listen": "bad host:80"}, "listen", "not a valid host"),
    "internal listen": ({"internal_listen": "127.0.0.1"}, "internal_listen", "host:port"),
    "metrics listen": ({"metrics_listen": "9090"}, "metrics_listen", "host:port"),
    "internal url scheme": ({"internal_url": "gw:8081"}, "internal_url", "http://"),
    "internal url query": ({"internal_url": "http://gw:8081/?x"}, "internal_url", "query"),
    # otel
    "otel not mapping": ({"otel": "http://collector:4318"}, "otel", "expected a mapping"),
    "otel unknown key": (
        {"otel": {"endpoint": "http://c:4318", "servce_name": "x"}},
        "otel.servce_name",
        'did you mean "service_name"',
    ),
    "otel no endpoint": ({"otel": {"service_name": "x"}}, "otel.endpoint", "missing"),
    "otel endpoint scheme": (
        {"otel": {"endpoint": "grpc://c:4317"}},
        "otel.endpoint",
        "expected an http:// or https:// URL",
    ),
    "otel endpoint no host": ({"otel": {"endpoint": "http://:4318"}}, "otel.endpoint", "no host"),
    "otel endpoint signal path": (
        {"otel": {"endpoint": "http://c:4318/v1/traces"}},
        "otel.endpoint",
        'base URL, e.g. "http://c:4318": spans go to its /v1/traces',
    ),
    "otel endpoint query": (
        {"otel": {"endpoint": "http://c:4318/?a=1"}},
        "otel.endpoint",
        "query",
    ),
    "otel service name": (
        {"otel": {"endpoint": "http://c", "service_name": 7}},
        "otel.service_name",
        "quote it",
    ),
    "otel headers list": (
        {"otel": {"endpoint": "http://c", "headers": ["a: b"]}},
        "otel.headers",
        "expected a mapping of header names",
    ),
    "otel header name": (
        {"otel": {"endpoint": "http://c", "headers": {"api key": "k"}}},
        "otel.headers.api key",
        "not a valid HTTP header name",
    ),
    "otel header number": (
        {"otel": {"endpoint": "http://c", "headers": {"x-key": 123}}},
        "otel.headers.x-key",
        "quote it",
    ),
    "otel header line break": (
        {"otel": {"endpoint": "http://c", "headers": {"x-key": "a\nb"}}},
        "otel.headers.x-key",
        "printable ASCII",
    ),
    "otel timeout bare": (
        {"otel": {"endpoint": "http://c", "timeout": 5}},
        "otel.timeout",
        "needs a unit",
    ),
    # logging
    "log level": ({"log_level": "verbose"}, "log_level", "debug, info, warning, error"),
    "log format": ({"log_format": "text"}, "log_format", "expected one of json, console"),
    # file-level problems
    "yaml syntax": ("routes: [\n  - name: a\n", None, "invalid YAML at line 2, column 3: expected"),
    "yaml indentation": ("listen: a\n  bad: b\n", None, "invalid YAML at line 2, column 6"),
    "yaml tab": ("routes:\n\t- name: a\n", None, "invalid YAML at line 2"),
    "top level list": ("- listen\n", None, "at the top level, got a list"),
    "top level scalar": ("hello\n", None, 'at the top level, got a string ("hello")'),
    "empty file": ("", None, "the file is empty"),
    "only comments": ("# nothing yet\n", None, "the file is empty"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_bad_config_is_one_line_and_exit_2(
    case: tuple[Any, str | None, str], write_config: WriteConfig, cli: RunCli
) -> None:
    content, key, fragment = case
    path = write_config(content)

    outcome = cli("check", "--config", str(path))

    assert outcome.code == 2
    assert outcome.out == ""
    assert len(outcome.err_lines) == 1, outcome.err
    line = outcome.err_lines[0]
    assert line.startswith(f"{path}: {key}: " if key else f"{path}: "), line
    assert fragment in line
    assert "Traceback" not in outcome.err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("duration bare int", ": routes[0].timeout: 30 needs a unit"),
        ("yaml syntax", ": invalid YAML at line 2, column 3"),
        ("store postgres", ": store: the PostgreSQL URL names no database"),
        ("unknown retry key", ": routes[0].retry.attempt: unknown key"),
        ("top level list", ": expected a mapping of settings at the top level"),
        ("otel endpoint signal path", ": otel.endpoint: give the collector's base URL"),
    ],
)
def test_bad_config_through_the_real_process(
    name: str, expected: str, write_config: WriteConfig
) -> None:
    path = write_config(CASES[name][0])

    for command in ("check", "serve"):
        outcome = run_process(command, "--config", str(path))
        assert outcome.code == 2, outcome.err
        assert outcome.out == ""
        assert outcome.err_lines == [outcome.err_lines[0]]
        assert outcome.err_lines[0].startswith(f"{path}{expected}")
        assert "Traceback" not in outcome.err


def test_missing_file(tmp_path: Path, cli: RunCli) -> None:
    path = tmp_path / "nope.yaml"
    outcome = cli("check", "--config", str(path))
    assert (outcome.code, outcome.err) == (2, f"{path}: file not found\n")


def test_directory_instead_of_file(tmp_path: Path, cli: RunCli) -> None:
    outcome = cli("check", "--config", str(tmp_path))
    assert (outcome.code, outcome.err) == (2, f"{tmp_path}: is a directory, not a config file\n")


def test_not_utf8(tmp_path: Path, cli: RunCli) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"admin_token: caf\xe9\n")
    outcome = cli("check", "--config", str(path))
    assert (outcome.code, outcome.err) == (2, f"{path}: not UTF-8 text (byte 16)\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(write_config: WriteConfig, cli: RunCli) -> None:
    path = write_config({"routes": []})
    path.chmod(0)
    outcome = cli("check", "--config", str(path))
    assert (outcome.code, outcome.err) == (2, f"{path}: permission denied\n")


def test_unquoted_on_is_read_as_the_key_on(write_config: WriteConfig) -> None:
    """YAML 1.1 reads a bare `on:` as the boolean true; a mistake inside it still says `on`."""
    path = write_config(
        """\
        routes:
          - name: process
            path: /process
            upstream: http://127.0.0.1:3000
            retry:
              on: [5xx, nope]
        """
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.key == "routes[0].retry.on[1]"


def test_config_error_fields_and_text() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(with_route(timeout="5"), source="gw.yaml")
    error = caught.value
    assert (error.file, error.key) == ("gw.yaml", "routes[0].timeout")
    assert (
        str(error) == 'gw.yaml: routes[0].timeout: "5" needs a unit: ms, s, m, h or d (e.g. "5s")'
    )
    assert str(ConfigError("f.yaml", None, "line one\nline two")) == "f.yaml: line one line two"


def test_the_first_route_problem_wins_and_later_routes_are_named(write_config: WriteConfig) -> None:
    data = {"routes": [route(), route(name="second", path="/b", hold="x")]}
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(data))
    assert caught.value.key == "routes[1].hold"


# `python -m gateway`, in a process where the OpenTelemetry packages cannot be imported.
_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # what an install without stepgate[otel] looks like
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_otel_without_the_extra_installed_names_it(write_config: WriteConfig) -> None:
    otel = {"otel": {"endpoint": "http://collector:4318"}, **with_route()}
    path = write_config(otel)

    for command in ("check", "serve"):
        done = without_otel(command, "--config", str(path))
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr == (
            f"{path}: otel: the OpenTelemetry packages are not installed: "
            "pip install 'stepgate[otel]'\n"
        )
    # The same file, where the packages are there (as in this test's own environment).
    assert run_process("check", "--config", str(path)).code == 0
    # Without `otel`, a gateway needs none of them.
    plain = without_otel("check", "--config", str(write_config(with_route(), name="plain.yaml")))
    assert (plain.returncode, plain.stderr) == (0, "")


def without_otel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_OTEL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
