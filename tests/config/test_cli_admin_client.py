"""`stepgate runs ...` and `stepgate events send`: request shapes, output, and error paths.

The gateway side here is a small aiohttp app on loopback that answers with the admin API's
shapes; tests against the real gateway live with the gateway's tests.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import REPO, Outcome, RunCli, WriteConfig, run_process

RUN_SUMMARY = {
    "id": "r-new",
    "route": "trips",
    "status": "retrying",
    "attempt": 2,
    "created_at": "2025-01-02T03:04:05.000Z",
    "updated_at": "2025-01-02T03:04:09.000Z",
}
RUN_DETAIL = RUN_SUMMARY | {
    "method": "POST",
    "target": "/trips?x=1",
    "trace_id": "0af7651916cd43dd8448eb211c80319c",
    "ended_at": None,
    "due_at": "2025-01-02T03:04:10.000Z",
    "failures": 1,
    "error": None,
    "response_status": None,
    "attempts": [
        {"n": 1, "started_at": "2025-01-02T03:04:05.000Z", "ended_at": "2025-01-02T03:04:06.500Z",
         "duration_ms": 1500.0, "outcome": "response", "status": 502, "error": None},
        {"n": 2, "started_at": "2025-01-02T03:04:09.000Z", "ended_at": None,
         "duration_ms": None, "outcome": "running", "status": None, "error": None},
    ],
    "steps": [
        {"id": "book-flight", "seq": 0, "kind": "run", "status": "completed", "attempts": 1,
         "duration_ms": 12.0, "output": {"flight": "LH123"}, "error": None},
        {"id": "book-hotel", "seq": 1, "kind": "run", "status": "failed", "attempts": 2,
         "duration_ms": 3.0, "output": None, "error": {"message": "no rooms", "type": "Full"}},
        {"id": "paid", "seq": 2, "kind": "wait", "status": "waiting", "attempts": 0,
         "duration_ms": 0.0, "output": None, "error": None, "event": "order.paid",
         "match": {"data.order": 7}, "wake_at": "2025-01-03T03:04:09.000Z"},
        {"id": "charge", "seq": 3, "kind": "run", "status": "failed", "attempts": 3,
         "final": True, "duration_ms": 1.0, "output": None,
         "error": {"message": "declined", "type": "Card"}},
    ],
}  # fmt: skip


class FakeAdmin:
    """Records the requests it gets; answers like the gateway's admin API."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], str | None, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = await request.json() if request.can_read_body else None
        self.requests.append(
            (request.method, request.path, dict(request.query),
             request.headers.get("Authorization"), body)
        )  # fmt: skip
        route = (request.method, request.path)
        if route == ("GET", "/v1/runs"):
            return web.json_response(
                {"runs": [RUN_SUMMARY, RUN_SUMMARY | {"id": "r-old", "status": "completed"}],
                 "next_cursor": "abc"}
            )  # fmt: skip
        if route == ("GET", "/v1/runs/r-new"):
            return web.json_response(RUN_DETAIL)
        if route == ("POST", "/v1/runs/r-new/retry"):
            return web.json_response(RUN_SUMMARY | {"status": "running"}, status=202)
        if route == ("POST", "/v1/runs/r-done/cancel"):
            return problem(409, "Conflict", "the run has ended (completed)")
        if request.path.startswith("/v1/runs/-"):  # ids that look like options
            run_id, _, action = request.path.removeprefix("/v1/runs/").partition("/")
            if request.method == "GET" and not action:
                return web.json_response(RUN_DETAIL | {"id": run_id})
            return web.json_response(RUN_SUMMARY | {"id": run_id, "status": "running"})
        if route in (("POST", "/v1/runs/retry"), ("POST", "/v1/runs/cancel")):
            dry = request.query.get("dry_run") == "true"
            return web.json_response({"count": 3, "more": False, "dry_run": dry})
        if route == ("POST", "/v1/events"):
            return web.json_response({"id": body["id"], "woke": 2}, status=202)
        if request.path == "/v1/runs/secret":
            return problem(401, "Unauthorized", "this call needs the admin token")
        if request.path == "/v1/runs/broken":
            return web.Response(status=500, text="Internal\nServer Error")
        if request.path == "/v1/runs/notjson":
            return web.Response(text="<html>")
        return problem(404, "Not Found", "no such run")


def problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


Cli = Callable[..., Awaitable[Outcome]]


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    fake = FakeAdmin()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.url = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    yield fake
    await server.close()


@pytest.fixture
def run_cli(cli: RunCli) -> Cli:
    """The blocking CLI in a thread, so the fake admin server keeps serving meanwhile."""

    async def run(*args: str) -> Outcome:
        return await asyncio.to_thread(cli, *args)

    return run


async def test_runs_list_table(admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli(
        "runs", "list", "--url", admin.url + "/", "--status", "retrying", "--route", "trips",
        "--limit", "2", "--cursor", "xyz", "--until", "2025-01-01T00:00:00Z",
    )  # fmt: skip

    assert (outcome.code, outcome.err) == (0, "")
    assert outcome.out.splitlines() == [
        "ID     ROUTE  STATUS     ATTEMPT  CREATED                   UPDATED",
        "r-new  trips  retrying   2        2025-01-02T03:04:05.000Z  2025-01-02T03:04:09.000Z",
        "r-old  trips  completed  2        2025-01-02T03:04:05.000Z  2025-01-02T03:04:09.000Z",
        "next cursor: abc",
    ]
    method, path, query, _, _ = admin.requests[0]
    assert (method, path) == ("GET", "/v1/runs")
    assert query == {
        "status": "retrying",
        "route": "trips",
        "limit": "2",
        "cursor": "xyz",
        "until": "2025-01-01T00:00:00Z",
    }


async def test_runs_list_since_a_duration_ago_is_sent_as_rfc3339(admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli("runs", "list", "--url", admin.url, "--since", "1h")
    assert outcome.code == 0
    since = admin.requests[0][2]["since"]
    assert len(since) == len("2025-01-02T03:04:05Z") and since.endswith("Z")


async def test_json_prints_the_answer_as_is(admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli("runs", "show", "r-new", "--url", admin.url, "--json")
    assert outcome.code == 0
    assert json.loads(outcome.out) == RUN_DETAIL


async def test_runs_show_timeline(admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli("runs", "show", "r-new", "--url", admin.url)
    assert outcome.code == 0, outcome.err
    lines = outcome.out.splitlines()
    assert lines[:4] == ["run      r-new", "route    trips", "request  POST /trips?x=1",
                         "status   retrying"]  # fmt: skip
    assert "attempts" in lines and "steps" in lines
    text = outcome.out
    assert "1.50s    response  502" in text
    assert "running" in text
    assert 'output: {"flight": "LH123"}' in text
    assert "error: no rooms" in text
    assert 'event order.paid {"data.order": 7}' in text
    assert "failed (final)" in text  # a step whose own retry policy is spent
    assert text.count("(final)") == 1
    # steps in seq order
    assert text.index("book-flight") < text.index("book-hotel") < text.index("paid ")


async def test_retry_and_events_send(admin: Any, run_cli: Cli, monkeypatch: Any) -> None:
    monkeypatch.setenv("STEPGATE_ADMIN_TOKEN", "from-env")
    retry = await run_cli("runs", "retry", "r-new", "--url", admin.url)
    send = await run_cli(
        "events", "send", "order.paid", "--data", '{"order": 7}', "--id", "e1", "--url", admin.url
    )

    assert (retry.code, retry.out) == (0, "run r-new: retry requested (running)\n")
    assert (send.code, send.out) == (0, "event e1: woke 2 runs\n")
    assert admin.requests[0][:2] == ("POST", "/v1/runs/r-new/retry")
    assert admin.requests[1][1:] == (
        "/v1/events",
        {},
        "Bearer from-env",
        {"name": "order.paid", "data": {"order": 7}, "id": "e1"},
    )


async def test_url_and_token_from_config(
    admin: Any, run_cli: Cli, write_config: WriteConfig
) -> None:
    path = write_config({"internal_url": admin.url, "admin_token": "from-config"})
    outcome = await run_cli("runs", "list", "--config", str(path))
    assert outcome.code == 0
    assert admin.requests[0][3] == "Bearer from-config"

    await run_cli("runs", "list", "--config", str(path), "--token", "flag")
    assert admin.requests[1][3] == "Bearer flag"


async def test_bulk_retry_and_cancel_send_the_filters(admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli(
        "runs", "retry", "--url", admin.url, "--status", "failed", "--route", "trips",
        "--since", "2025-01-01T00:00:00Z", "--yes",
    )  # fmt: skip
    assert (outcome.code, outcome.out.strip()) == (0, "3 runs: retry requested")
    method, path, query, _, _ = admin.requests[-1]
    assert (method, path) == ("POST", "/v1/runs/retry")
    assert query == {"status": "failed", "route": "trips", "since": "2025-01-01T00:00:00Z"}
    outcome = await run_cli(
        "runs", "cancel", "--url", admin.url, "--status=retrying", "--limit", "50", "--yes",
        "--json",
    )  # fmt: skip
    assert outcome.code == 0 and json.loads(outcome.out)["count"] == 3
    assert admin.requests[-1][:3] == (
        "POST", "/v1/runs/cancel", {"status": "retrying", "limit": "50"},
    )  # fmt: skip
    # An id or filters, one of the two.
    for args in (
        ("runs", "retry", "--url", admin.url),
        ("runs", "cancel", "r-new", "--status", "failed", "--url", admin.url),
    ):
        before = len(admin.requests)
        outcome = await run_cli(*args)
        assert outcome.code == 2 and "filters" in outcome.err
        assert len(admin.requests) == before


async def test_bulk_actions_count_and_ask_first_unless_yes(
    admin: Any, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --yes: a dry run counts the runs; with no terminal to ask, nothing is done."""
    outcome = await run_cli("runs", "retry", "--url", admin.url, "--status", "failed")
    assert outcome.code == 2 and "3 runs would be affected; add --yes" in outcome.err
    assert [r[2] for r in admin.requests] == [{"status": "failed", "dry_run": "true"}]
    # At a terminal: asked, and "n" does nothing, "y" acts.
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["n", "y"])
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or next(answers))
    outcome = await run_cli("runs", "cancel", "--url", admin.url, "--route", "trips")
    assert outcome.code == 1 and outcome.out.strip() == "nothing done"
    assert asked == ["cancel 3 runs (route=trips)? [y/N] "]
    outcome = await run_cli("runs", "cancel", "--url", admin.url, "--route", "trips")
    assert (outcome.code, outcome.out.strip()) == (0, "3 runs: cancel requested")
    assert [r[2] for r in admin.requests[-3:]] == [
        {"route": "trips", "dry_run": "true"},
        {"route": "trips", "dry_run": "true"},
        {"route": "trips"},
    ]


async def test_admin_commands_do_not_need_the_store_key(
    admin: Any, run_cli: Cli, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They only call the admin API, so the gateway's config works where its key is not at
    hand (an operator's shell has no STEPGATE_STORE_KEY)."""
    monkeypatch.delenv("STEPGATE_STORE_KEY", raising=False)
    path = write_config(
        {
            "internal_url": admin.url,
            "admin_token": "from-config",
            "store_key": "env:STEPGATE_STORE_KEY",
        }
    )
    outcome = await run_cli("runs", "list", "--config", str(path))
    assert (outcome.code, outcome.err) == (0, "")
    assert admin.requests[0][3] == "Bearer from-config"


async def test_run_ids_are_percent_encoded(admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli("runs", "show", "a/b?c", "--url", admin.url)
    assert outcome.code == 1
    assert admin.requests[0][1] == "/v1/runs/a/b?c"  # aiohttp decodes the path it got
    assert "/v1/runs/a%2Fb%3Fc" in outcome.err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["runs", "show", "missing"], "404 Not Found: no such run"),
        (["runs", "cancel", "r-done"], "409 Conflict: the run has ended (completed)"),
        (["runs", "show", "secret"], "401 Unauthorized: this call needs the admin token (pass "),
        (["runs", "show", "broken"], "/v1/runs/broken: 500 Internal Server Error\n"),
        (["runs", "show", "notjson"], "the answer is not JSON: <html>"),
    ],
)
async def test_error_answers_are_one_line_exit_1(
    args: list[str], expected: str, admin: Any, run_cli: Cli
) -> None:
    outcome = await run_cli(*args, "--url", admin.url)
    assert outcome.code == 1
    assert outcome.out == ""
    assert len(outcome.err_lines) == 1
    assert outcome.err.startswith("stepgate: ")
    assert expected in outcome.err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "list"],
        ["runs", "show", "r1"],
        ["runs", "retry", "r1"],
        ["runs", "cancel", "r1"],
        ["events", "send", "order.paid", "--data", "{}"],
    ],
)
def test_connection_refused_is_one_line_exit_1(args: list[str], cli: RunCli) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    outcome = cli(*args, "--url", url)
    assert outcome.code == 1
    assert outcome.err == f"stepgate: cannot reach {url}: Connection refused\n"


def test_connection_refused_in_a_real_process() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    outcome = run_process("runs", "list", "--url", url)
    assert (outcome.code, outcome.out) == (1, "")
    assert outcome.err_lines == [f"stepgate: cannot reach {url}: Connection refused"]


def test_bad_event_data_is_a_usage_error(cli: RunCli) -> None:
    outcome = cli("events", "send", "x", "--data", "{nope", "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert outcome.err_lines == [
        "stepgate: --data is not valid JSON: Expecting property name enclosed in double quotes "
        "at column 2"
    ]


def test_bad_config_for_an_admin_command_is_exit_2(write_config: WriteConfig, cli: RunCli) -> None:
    path = write_config({"internal_url": "gateway:8081"})
    outcome = cli("runs", "list", "--config", str(path))
    assert outcome.code == 2
    assert outcome.err_lines == [
        f'{path}: internal_url: expected an http:// or https:// URL, got "gateway:8081"'
    ]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "127.0.0.1:8081", "http://"])
def test_url_must_be_http(url: str, cli: RunCli) -> None:
    outcome = cli("runs", "list", "--url", url)
    assert outcome.code == 2
    assert outcome.err_lines == [f"stepgate: --url must be an http:// or https:// URL, got {url!r}"]


async def test_loopback_calls_ignore_an_http_proxy(
    admin: Any, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    outcome = await run_cli("runs", "list", "--url", admin.url)
    assert outcome.code == 0, outcome.err


@pytest.mark.parametrize("limit", ["0", "501", "ten"])
def test_limit_is_checked_before_calling(limit: str, cli: RunCli) -> None:
    outcome = cli("runs", "list", "--limit", limit, "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert "--limit" in outcome.err


# --- run ids that start with "-" (URL-safe base64: 1 id in 64) -----------------------------

DASH_ID = "-Ab3_dEf-GhIjKlMnOpQrS"
H_ID = "-hAb3_dEf-GhIjKlMnOpQr"  # would read as `-h` with an argument
DOUBLE_ID = "--b3_dEf-GhIjKlMnOpQrS"  # would read as a long option


@pytest.mark.parametrize(
    ("args", "run_id"),
    [
        (["show", DASH_ID], DASH_ID),
        (["show", "--json", DASH_ID], DASH_ID),
        (["show", "--", DASH_ID], DASH_ID),
        (["show", "--json", "--", DASH_ID], DASH_ID),
        (["show", H_ID], H_ID),
        (["show", DOUBLE_ID], DOUBLE_ID),
        (["show", "--", DOUBLE_ID], DOUBLE_ID),
    ],
)
async def test_runs_show_an_id_that_starts_with_a_dash(
    args: list[str], run_id: str, admin: Any, run_cli: Cli
) -> None:
    action, *rest = args
    outcome = await run_cli("runs", action, "--url", admin.url, *rest)

    assert (outcome.code, outcome.err) == (0, "")
    assert admin.requests[0][:2] == ("GET", f"/v1/runs/{run_id}")
    assert run_id in outcome.out


@pytest.mark.parametrize("action", ["retry", "cancel"])
@pytest.mark.parametrize("where", ["first", "last", "after --"])
async def test_retry_and_cancel_an_id_that_starts_with_a_dash(
    action: str, where: str, admin: Any, run_cli: Cli
) -> None:
    args = {
        "first": [DASH_ID, "--url", admin.url],
        "last": [f"--url={admin.url}", DASH_ID],
        "after --": ["--url", admin.url, "--", DASH_ID],
    }[where]
    outcome = await run_cli("runs", action, *args)

    assert (outcome.code, outcome.err) == (0, "")
    assert admin.requests[0][:2] == ("POST", f"/v1/runs/{DASH_ID}/{action}")
    assert outcome.out == f"run {DASH_ID}: {action} requested (running)\n"


@pytest.mark.parametrize("action", ["show", "retry", "cancel"])
def test_help_says_how_to_pass_an_id_that_starts_with_a_dash(action: str, cli: RunCli) -> None:
    outcome = cli("runs", action, "--help")
    assert outcome.code == 0
    text = " ".join(outcome.out.split())
    assert "[--] ID" in text
    assert f'An ID that starts with "-" can follow "--": stepgate runs {action} -- -AbC...' in text


def test_an_unknown_option_next_to_an_id_is_still_a_usage_error(cli: RunCli) -> None:
    outcome = cli("runs", "show", "r1", "--jsn", "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert "unrecognized arguments: --jsn" in outcome.err


def test_only_serve_takes_a_command_after_dashes(cli: RunCli) -> None:
    outcome = cli("runs", "list", "--url", "http://127.0.0.1:1", "--", "ls")
    assert outcome.code == 2
    assert outcome.err_lines == ["stepgate: `-- CMD ARGS` is only accepted by `stepgate serve`"]


# --- bad input is one line and exit 2, checked before any call ------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "--url 'http://[::1' is not a valid URL"),
        ("http://127.0.0.1:abc", "--url 'http://127.0.0.1:abc' has an invalid port"),
        ("http://127.0.0.1:99999", "--url 'http://127.0.0.1:99999' has an invalid port"),
        (
            "http://a b:8081",
            "--url 'http://a b:8081' must not contain spaces or control characters",
        ),
        ("http://user:pw@127.0.0.1:1", "--url must not carry credentials: pass --token"),
        (
            "http://127.0.0.1:1/x?y=1",
            "--url 'http://127.0.0.1:1/x?y=1' must not have a query or fragment",
        ),
        (
            "http://127.0.0.1:1/#top",
            "--url 'http://127.0.0.1:1/#top' must not have a query or fragment",
        ),
    ],
)
def test_a_malformed_url_is_a_usage_error(url: str, message: str, cli: RunCli) -> None:
    outcome = cli("runs", "list", "--url", url)
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err_lines == [f"stepgate: {message}"]


def test_credentials_in_the_url_are_not_echoed(cli: RunCli) -> None:
    outcome = cli("runs", "list", "--url", "http://user:s3cret@127.0.0.1:1")
    assert outcome.code == 2
    assert "s3cret" not in outcome.err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("[" * 100_000, "--data is nested too deeply"),
        ("NaN", "--data is not valid JSON: NaN is not a JSON value"),
        ("[1, -Infinity]", "--data is not valid JSON: -Infinity is not a JSON value"),
        ('{"a": 1e999}', "--data is not valid JSON: 1e999 is too large for a JSON number"),
    ],
)
def test_event_data_that_is_not_json_is_a_usage_error(data: str, message: str, cli: RunCli) -> None:
    outcome = cli("events", "send", "x", "--data", data, "--url", "http://127.0.0.1:1")
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err_lines == [f"stepgate: {message}"]


@pytest.mark.parametrize("token", ["tök€n", "two words", "line\nbreak", "tab\there"])
def test_a_token_that_cannot_travel_in_a_header_is_a_usage_error(
    token: str, cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome = cli("runs", "list", "--url", "http://127.0.0.1:1", "--token", token)
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err_lines == [
        "stepgate: --token must be printable ASCII without spaces (it is sent as a bearer token)"
    ]

    monkeypatch.setenv("STEPGATE_ADMIN_TOKEN", token)
    outcome = cli("runs", "list", "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert outcome.err_lines == [
        "stepgate: $STEPGATE_ADMIN_TOKEN must be printable ASCII without spaces "
        "(it is sent as a bearer token)"
    ]


@pytest.mark.parametrize("action", ["show", "retry", "cancel"])
def test_an_empty_run_id_is_a_usage_error(action: str, cli: RunCli) -> None:
    outcome = cli("runs", action, "", "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert outcome.err_lines == ["stepgate: the run ID must not be empty"]


@pytest.mark.parametrize("flag", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "2025-13-01T00:00:00Z", "1.5 days"])
def test_a_bad_since_or_until_is_a_usage_error(flag: str, value: str, cli: RunCli) -> None:
    outcome = cli("runs", "list", flag, value, "--url", "http://127.0.0.1:1")
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err_lines == [
        f"stepgate: {flag} {value!r}: expected an RFC 3339 time (2025-01-02T03:04:05Z), "
        "Unix seconds, or a duration ago (1h)"
    ]


@pytest.mark.parametrize("value", ["999999d", "99999999999999999999d"])
def test_a_duration_before_year_1_is_a_usage_error(value: str, cli: RunCli) -> None:
    outcome = cli("runs", "list", "--until", value, "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert outcome.err_lines == [f"stepgate: --until {value!r} reaches back before year 1"]


def test_a_time_without_a_zone_is_a_usage_error(cli: RunCli) -> None:
    outcome = cli("runs", "list", "--since", "2025-01-02T03:04:05", "--url", "http://127.0.0.1:1")
    assert outcome.code == 2
    assert outcome.err_lines == [
        "stepgate: --since '2025-01-02T03:04:05' needs a time zone, e.g. 2025-01-02T03:04:05Z"
    ]


@pytest.mark.parametrize(
    "value", ["2025-01-02T03:04:05Z", "2025-01-02T03:04:05.5+02:00", "1735787045"]
)
async def test_since_passes_times_on_as_written(value: str, admin: Any, run_cli: Cli) -> None:
    outcome = await run_cli("runs", "list", "--url", admin.url, "--since", value)
    assert outcome.code == 0, outcome.err
    assert admin.requests[0][2]["since"] == value


def test_ctrl_c_while_waiting_for_the_gateway_is_exit_130_without_a_traceback() -> None:
    with socket.socket() as silent:  # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(20)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "runs", "list", "--url", url],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            connection, _ = silent.accept()  # the CLI is now waiting for an answer
            with connection:
                connection.recv(4096)
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
    assert (proc.returncode, out) == (130, ""), err
    assert "Traceback" not in err
