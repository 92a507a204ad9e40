"""The ``stepgate`` command: serve, check a config, and talk to a running gateway's admin API.

Exit codes: 0 success; 1 the gateway answered with an error or could not be reached;
2 bad usage or a bad config file (always one line on stderr, never a traceback).
The admin commands use only the standard library (urllib): they run wherever Python does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from gateway.config import ConfigError, Settings, load_settings, parse_duration

__all__ = ["main"]

DEFAULT_INTERNAL_URL = "http://127.0.0.1:8081"
TOKEN_ENV = "STEPGATE_ADMIN_TOKEN"


class _Failure(Exception):
    """Ends a command: ``message`` goes to stderr as one line, ``code`` is the exit code.

    ``bare``: print the message without the "stepgate: " prefix (config errors already start
    with the file name).
    """

    def __init__(self, message: str, code: int = 1, *, bare: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.bare = bare


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- serve / check --------------------------------------------------------------------------


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as err:
        raise _Failure(str(err), code=2, bare=True) from None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # optional: the default loop works, only slower
        return None
    return uvloop.new_event_loop


def _cmd_serve(args: argparse.Namespace, child: list[str] | None) -> int:
    settings = _load(args.config)
    # Imported here so `check` and the admin commands start fast and need no server code.
    from gateway.app import serve

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(serve(settings, child))
    except KeyboardInterrupt:  # a second Ctrl-C before the gateway's own handler took over
        return 130
    except OSError as exc:  # e.g. the listen port is taken: an environment problem, not a bug
        raise _Failure(_one_line(str(exc))) from None
    # A child killed by a signal reports -N; shells spell that 128 + N.
    return 128 - code if code < 0 else code


def _cmd_check(args: argparse.Namespace, child: list[str] | None) -> int:
    settings = _load(args.config)
    count = len(settings.routes)
    print(f"{args.config}: ok ({count} route{'' if count == 1 else 's'})")
    return 0


# --- admin API client -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Admin:
    base: str  # the internal URL, without a trailing "/"
    token: str | None
    timeout: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Admin:
        settings = _load(args.config) if args.config else None
        base = args.url or (settings.internal_url if settings else DEFAULT_INTERNAL_URL)
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise _Failure(f"--url must be an http:// or https:// URL, got {base!r}", 2)
        token = args.token or os.environ.get(TOKEN_ENV) or (settings and settings.admin_token)
        return cls(base.rstrip("/"), token or None)

    def _opener(self) -> urllib.request.OpenerDirector:
        host = urllib.parse.urlsplit(self.base).hostname or ""
        if host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
            # An http_proxy from the environment must not carry loopback admin calls away.
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: object = None,
    ) -> tuple[str, object]:
        """Returns the response text and its decoded JSON; every failure is a _Failure."""
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener().open(request, timeout=self.timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            raise _Failure(f"{method} {url}: {_describe_http_error(exc)}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
            raise _Failure(f"cannot reach {self.base}: {_one_line(str(reason or exc))}") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, a malformed --url
            raise _Failure(f"{method} {url}: {_one_line(str(exc) or type(exc).__name__)}") from None
        try:
            return text, json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            raise _Failure(
                f"{method} {url}: the answer is not JSON: {_one_line(text, 80)}"
            ) from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _describe_http_error(exc: urllib.error.HTTPError) -> str:
    """``409 Conflict: run has already ended`` from a problem+json (or any) error answer."""
    status = f"{exc.code} {exc.reason}"
    try:
        text = exc.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    detail = _one_line(text, 200) if _one_line(text) != str(exc.reason) else ""
    try:
        problem = json.loads(text)
    except json.JSONDecodeError:
        problem = None
    if isinstance(problem, dict):
        title, more = problem.get("title"), problem.get("detail")
        parts = [str(part) for part in (title, more) if part and str(part) != str(exc.reason)]
        detail = _one_line(": ".join(parts), 200)
    hint = f" (pass --token or set {TOKEN_ENV})" if exc.code == 401 else ""
    return f"{status}: {detail}{hint}" if detail else f"{status}{hint}"


# --- output ---------------------------------------------------------------------------------


def _when(value: object) -> str:
    """A timestamp for people: RFC 3339 strings as sent, epoch seconds converted to UTC."""
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = dt.datetime.fromtimestamp(value, dt.UTC)
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return str(value)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _brief_json(value: object, limit: int = 60) -> str:
    return _one_line(json.dumps(value, ensure_ascii=False, default=str), limit)


def _took(milliseconds: object) -> str:
    if not isinstance(milliseconds, int | float) or isinstance(milliseconds, bool):
        return "-"
    return f"{milliseconds:.0f}ms" if milliseconds < 1000 else f"{milliseconds / 1000:.2f}s"


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return _one_line(str(error.get("message") or error.get("detail") or _brief_json(error)))
    return _one_line(str(error)) if error else ""


def _step_result(step: dict[str, Any]) -> str:
    if step.get("error"):
        return "error: " + _error_text(step["error"])
    if step.get("status") == "sleeping":
        return f"until {_when(step.get('wake_at'))}"
    if step.get("status") == "waiting":
        deadline = f" (until {_when(step['wake_at'])})" if step.get("wake_at") else ""
        return f"event {step.get('event', '?')} {_brief_json(step.get('match') or {})}{deadline}"
    if step.get("status") == "completed" and "output" in step:
        return "output: " + _brief_json(step["output"])
    return ""


def _render_run(run: dict[str, Any]) -> str:
    """``stepgate runs show``: the run's facts, then its attempts and steps in order."""
    status = str(run.get("status", "?"))
    if run.get("response_status") is not None:
        status += f" (response {run['response_status']})"
    facts = [
        ("run", run.get("id")),
        ("route", run.get("route")),
        ("request", f"{run.get('method', '')} {run.get('target', '')}".strip() or None),
        ("status", status),
        ("attempt", run.get("attempt")),
        ("failures", run.get("failures") or None),
        ("error", _error_text(run.get("error")) or None),
        ("created", _when(run.get("created_at"))),
        ("updated", _when(run.get("updated_at"))),
        ("ended", run.get("ended_at") and _when(run["ended_at"])),
        ("due", run.get("due_at") and _when(run["due_at"])),
        ("trace", run.get("trace_id")),
    ]
    lines = [f"{label:<9}{value}" for label, value in facts if value not in (None, "")]

    attempts = [item for item in run.get("attempts") or [] if isinstance(item, dict)]
    if attempts:
        rows = [
            [
                str(item.get("n", index)),
                _when(item.get("started_at")),
                _took(item.get("duration_ms")) if item.get("ended_at") else "running",
                str(item.get("outcome") or "-"),
                str(item.get("status") or "-"),
                _error_text(item.get("error")),
            ]
            for index, item in enumerate(attempts, start=1)
        ]
        header = ["#", "STARTED", "TOOK", "OUTCOME", "STATUS", "ERROR"]
        lines += ["", "attempts", _indent(_table(rows, header))]

    steps = [item for item in run.get("steps") or [] if isinstance(item, dict)]
    if steps:
        rows = [
            [
                str(item.get("seq", "")),
                str(item.get("id", "?")),
                str(item.get("kind", "")),
                str(item.get("status", "")),
                str(item.get("attempts", "")),
                _took(item.get("duration_ms")) if item.get("status") == "completed" else "-",
                _step_result(item),
            ]
            for item in steps
        ]
        header = ["SEQ", "STEP", "KIND", "STATUS", "ATTEMPTS", "TOOK", "RESULT"]
        lines += ["", "steps", _indent(_table(rows, header))]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --- admin commands -------------------------------------------------------------------------


def _moment(text: str) -> str:
    """``--since 1h`` means an hour ago; anything else is passed on as written (RFC 3339)."""
    try:
        ago = parse_duration(text)
    except ValueError:
        return text
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=ago)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _emit(args: argparse.Namespace, text: str, render: Callable[[], str]) -> int:
    print(text if args.json else render())
    return 0


def _expect_dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Failure(f"unexpected answer for {what}: {_brief_json(value)}")
    return value


def _cmd_runs_list(args: argparse.Namespace, child: list[str] | None) -> int:
    query = {
        name: value
        for name, value in (
            ("status", args.status),
            ("route", args.route),
            ("since", _moment(args.since) if args.since else None),
            ("until", _moment(args.until) if args.until else None),
            ("limit", str(args.limit) if args.limit is not None else None),
            ("cursor", args.cursor),
        )
        if value is not None
    }
    text, answer = _Admin.from_args(args).call("GET", "/v1/runs", query=query)

    def render() -> str:
        page = _expect_dict(answer, "runs list")
        runs = [run for run in page.get("runs") or [] if isinstance(run, dict)]
        rows = [
            [
                str(run.get("id", "")),
                str(run.get("route", "")),
                str(run.get("status", "")),
                str(run.get("attempt", "")),
                _when(run.get("created_at")),
                _when(run.get("updated_at")),
            ]
            for run in runs
        ]
        out = _table(rows, ["ID", "ROUTE", "STATUS", "ATTEMPT", "CREATED", "UPDATED"])
        if not rows:
            out = "no runs"
        if page.get("next_cursor"):
            out += f"\nnext cursor: {page['next_cursor']}"
        return out

    return _emit(args, text, render)


def _run_path(run_id: str, action: str = "") -> str:
    return f"/v1/runs/{urllib.parse.quote(run_id, safe='')}{action}"


def _cmd_runs_show(args: argparse.Namespace, child: list[str] | None) -> int:
    text, answer = _Admin.from_args(args).call("GET", _run_path(args.id))
    return _emit(args, text, lambda: _render_run(_expect_dict(answer, "runs show")))


def _run_action(action: str, done: str) -> Callable[[argparse.Namespace, list[str] | None], int]:
    def command(args: argparse.Namespace, child: list[str] | None) -> int:
        text, answer = _Admin.from_args(args).call("POST", _run_path(args.id, f"/{action}"))
        status = answer.get("status") if isinstance(answer, dict) else None
        return _emit(
            args, text, lambda: f"run {args.id}: {done}" + (f" ({status})" if status else "")
        )

    return command


def _cmd_events_send(args: argparse.Namespace, child: list[str] | None) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise _Failure(f"--data is not valid JSON: {exc.msg} at column {exc.colno}", 2) from None
    event: dict[str, object] = {"name": args.name, "data": data}
    if args.id is not None:
        event["id"] = args.id
    text, answer = _Admin.from_args(args).call("POST", "/v1/events", body=event)

    def render() -> str:
        reply = _expect_dict(answer, "events send")
        if reply.get("duplicate"):
            return f"event {reply.get('id', '?')}: already received, not delivered again"
        woke = reply.get("woke", 0)
        return f"event {reply.get('id', '?')}: woke {woke} run{'' if woke == 1 else 's'}"

    return _emit(args, text, render)


# --- argument parsing -----------------------------------------------------------------------


def _admin_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("gateway")
    where.add_argument(
        "--url",
        help=f"the gateway's internal URL (default: from --config, else {DEFAULT_INTERNAL_URL})",
    )
    where.add_argument(
        "--config", metavar="FILE", help="read internal_url and admin_token from FILE"
    )
    where.add_argument(
        "--token", help=f"admin bearer token (default: ${TOKEN_ENV}, else from --config)"
    )
    where.add_argument("--json", action="store_true", help="print the gateway's JSON answer as is")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepgate", description="A sidecar gateway that makes HTTP endpoints durable."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        usage="stepgate serve --config FILE [-- CMD ARGS...]",
        description="Run the gateway; after `--`, a command to start and supervise as upstream.",
    )
    serve.add_argument("--config", required=True, metavar="FILE")
    serve.set_defaults(handler=_cmd_serve, takes_child=True)

    check = commands.add_parser("check", help="validate a config file without serving")
    check.add_argument("--config", required=True, metavar="FILE")
    check.set_defaults(handler=_cmd_check)

    common = _admin_options()
    runs = commands.add_parser("runs", help="list, inspect, retry or cancel runs")
    run_commands = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    listing = run_commands.add_parser("list", parents=[common], help="list runs, newest first")
    listing.add_argument("--status", help="only runs in this state (e.g. failed)")
    listing.add_argument("--route", help="only runs of this route")
    listing.add_argument("--since", help="created at or after: RFC 3339, or a duration ago (1h)")
    listing.add_argument("--until", help="created before: RFC 3339, or a duration ago (10m)")
    listing.add_argument("--limit", type=_limit, help="at most this many runs (1-500, default 50)")
    listing.add_argument("--cursor", help="continue from a previous list's `next cursor`")
    listing.set_defaults(handler=_cmd_runs_list)
    for action, handler, help_text in (
        ("show", _cmd_runs_show, "show a run and its timeline"),
        (
            "retry",
            _run_action("retry", "retry requested"),
            "re-run an ended run from its failed step",
        ),
        ("cancel", _run_action("cancel", "cancel requested"), "cancel a run that has not ended"),
    ):
        sub = run_commands.add_parser(action, parents=[common], help=help_text)
        sub.add_argument("id", metavar="ID", help="the run id")
        sub.set_defaults(handler=handler)

    events = commands.add_parser("events", help="send events to waiting runs")
    event_commands = events.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    send = event_commands.add_parser("send", parents=[common], help="send one event")
    send.add_argument("name", metavar="NAME", help="the event name, e.g. order.paid")
    send.add_argument("--data", default="null", metavar="JSON", help="the event's data (JSON)")
    send.add_argument("--id", help="an id for deduplication: a repeated id is accepted once")
    send.set_defaults(handler=_cmd_events_send)
    return parser


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 500:
        raise argparse.ArgumentTypeError("must be from 1 to 500")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stepgate")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the entry point passes it to sys.exit)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    child: list[str] | None = None
    if "--" in arguments:  # everything after `--` is the supervised command, verbatim
        split = arguments.index("--")
        arguments, child = arguments[:split], arguments[split + 1 :]
    parser = _parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # usage errors and --help: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    handler = cast(Callable[[argparse.Namespace, list[str] | None], int], args.handler)
    try:
        if child is not None and not getattr(args, "takes_child", False):
            raise _Failure("`-- CMD ARGS` is only accepted by `stepgate serve`", 2)
        if child is not None and not child:
            raise _Failure("no command after `--`", 2)
        return handler(args, child)
    except _Failure as failure:
        print(failure.message if failure.bare else f"stepgate: {failure.message}", file=sys.stderr)
        return failure.code
    except BrokenPipeError:  # `stepgate runs list | head`
        return 0
