"""The ``stepgate`` command: serve, check a config, and talk to a running gateway's admin API.

Exit codes: 0 success; 1 the gateway answered with an error or could not be reached;
2 bad usage or a bad config file (always one line on stderr, never a traceback).
The admin commands use only the standard library (urllib): they run wherever Python does.

Run ids are URL-safe base64, so one in 64 starts with "-": ``stepgate runs show -AbC...`` works
when the id is the only word that is not an option, and ``stepgate runs show -- -AbC...`` always.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

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


def _load(path: str, *, read_key: bool = True) -> Settings:
    try:
        return load_settings(path, read_key=read_key)
    except ConfigError as err:
        raise _Failure(str(err), code=2, bare=True) from None


def _load_gateway(path: str) -> Settings:
    """A config to serve: the admin commands may read one without routes, a gateway may not."""
    settings = _load(path)
    if not settings.routes:
        message = (
            "no routes: the gateway would answer 404 to every request; "
            "add at least one (see config.example.yaml)"
        )
        raise _Failure(str(ConfigError(path, "routes", message)), code=2, bare=True)
    return settings


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # optional: the default loop works, only slower
        return None
    return uvloop.new_event_loop


def _cmd_serve(args: argparse.Namespace, child: list[str] | None) -> int:
    settings = _load_gateway(args.config)
    # Imported here so `check` and the admin commands start fast and need no server code.
    from gateway.app import serve

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(serve(settings, child, config_path=args.config))
    except KeyboardInterrupt:  # a second Ctrl-C before the gateway's own handler took over
        return 130
    except OSError as exc:  # e.g. the listen port is taken: an environment problem, not a bug
        raise _Failure(_one_line(str(exc))) from None
    # A child killed by a signal reports -N; shells spell that 128 + N.
    return 128 - code if code < 0 else code


def _cmd_check(args: argparse.Namespace, child: list[str] | None) -> int:
    settings = _load_gateway(args.config)
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
        settings = _load(args.config, read_key=False) if args.config else None
        if args.url:
            base = _admin_url(args.url)
        else:  # internal_url was checked with the config
            base = settings.internal_url if settings else DEFAULT_INTERNAL_URL
        if args.token:
            token: str | None = _bearer(args.token, "--token")
        elif os.environ.get(TOKEN_ENV):
            token = _bearer(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
        else:
            token = settings.admin_token if settings else None
        return cls(base.rstrip("/"), token)

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
        always_there: bool = False,
    ) -> tuple[str, object]:
        """Returns the response text and its decoded JSON; every failure is a _Failure.

        ``always_there``: the admin API never answers 404 for this path, so a 404 means that
        the URL points elsewhere (most often at the public listener).
        """
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
            hint = self._elsewhere() if exc.code == 404 and always_there else ""
            raise _Failure(f"{method} {url}: {_describe_http_error(exc)}{hint}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
            raise _Failure(f"cannot reach {self.base}: {_one_line(str(reason or exc))}") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, a malformed --url
            raise _Failure(f"{method} {url}: {_one_line(str(exc) or type(exc).__name__)}") from None
        try:
            return text, json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            raise _Failure(
                f"{method} {url}: the answer is not JSON: {_one_line(text, 80)}{self._elsewhere()}"
            ) from None

    def _elsewhere(self) -> str:
        return (
            f" (is {self.base} the gateway's internal URL? "
            "the admin API is served on internal_listen)"
        )


def _admin_url(text: str) -> str:
    """``--url``, checked before any call: urllib's own complaints are tracebacks or misleading."""
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise _Failure(f"--url {text!r} must not contain spaces or control characters", 2)
    authority = text.partition("://")[2].partition("/")[0].partition("?")[0].partition("#")[0]
    if "@" in authority:  # said without echoing the URL: it holds a password
        raise _Failure("--url must not carry credentials: pass --token", 2)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        raise _Failure(f"--url {text!r} is not a valid URL", 2) from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise _Failure(f"--url must be an http:// or https:// URL, got {text!r}", 2)
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise _Failure(f"--url {text!r} has an invalid port", 2) from None
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise _Failure(f"--url {text!r} must not have a query or fragment", 2)
    return text


def _bearer(token: str, source: str) -> str:
    # What a header can carry and the gateway compares as sent (config checks admin_token alike).
    if not all("!" <= ch <= "~" for ch in token):
        raise _Failure(
            f"{source} must be printable ASCII without spaces (it is sent as a bearer token)", 2
        )
    return token


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
    if step.get("status") == "completed":
        # The record keeps the last error for the timeline even once the step has succeeded.
        result = "output: " + _brief_json(step.get("output"))
        if step.get("error"):
            result += "; earlier error: " + _one_line(_error_text(step["error"]), 60)
        return result
    if step.get("error"):
        return "error: " + _error_text(step["error"])
    if step.get("status") == "sleeping":
        return f"until {_when(step.get('wake_at'))}"
    if step.get("status") == "waiting":
        deadline = f" (until {_when(step['wake_at'])})" if step.get("wake_at") else ""
        if step.get("kind") == "signal":
            return f"a POST to {step.get('url', '?')}{deadline}"
        if step.get("kind") == "invoke":
            return f"child run {step.get('run_id', '?')}"
        return f"event {step.get('event', '?')} {_brief_json(step.get('match') or {})}{deadline}"
    return ""


def _children(children: object) -> str | None:
    if not isinstance(children, list) or not children:
        return None
    return ", ".join(
        f"{child.get('id')} ({child.get('status', '?')})"
        for child in children
        if isinstance(child, dict)
    )


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
        # step.invoke: the run whose step started this one, and the runs its steps started.
        ("parent", run.get("parent_id") and f"{run['parent_id']} (step {run.get('parent_step')})"),
        ("children", _children(run.get("children"))),
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
                # A step whose policy is spent (issue 13): the handler was told, not rerun.
                str(item.get("status", "")) + (" (final)" if item.get("final") is True else ""),
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


def _moment(text: str, flag: str) -> str:
    """``--since 1h`` means an hour ago; RFC 3339 and Unix seconds are passed on as written."""
    bad = _Failure(
        f"{flag} {text!r}: expected an RFC 3339 time (2025-01-02T03:04:05Z), Unix seconds, "
        "or a duration ago (1h)",
        2,
    )
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            moment = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=ago)
        except OverflowError:
            raise _Failure(f"{flag} {text!r} reaches back before year 1", 2) from None
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        if math.isfinite(float(text)):
            return text
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bad from None
    if when.tzinfo is None:
        raise _Failure(f"{flag} {text!r} needs a time zone, e.g. {text}Z", 2)
    return text


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
            ("since", _moment(args.since, "--since") if args.since else None),
            ("until", _moment(args.until, "--until") if args.until else None),
            ("limit", str(args.limit) if args.limit is not None else None),
            ("cursor", args.cursor),
        )
        if value is not None
    }
    text, answer = _Admin.from_args(args).call("GET", "/v1/runs", query=query, always_there=True)

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


def _cmd_replicas(args: argparse.Namespace, child: list[str] | None) -> int:
    text, answer = _Admin.from_args(args).call("GET", "/v1/replicas", always_there=True)

    def render() -> str:
        listing = _expect_dict(answer, "replicas")
        me = listing.get("self")
        rows = [
            [
                str(replica.get("id", "")) + (" (this one)" if replica.get("id") == me else ""),
                _when(replica.get("started_at")),
                _when(replica.get("last_seen")),
                str(replica.get("runs", "")),
            ]
            for replica in listing.get("replicas") or []
            if isinstance(replica, dict)
        ]
        return _table(rows, ["ID", "STARTED", "LAST SEEN", "RUNNING"]) if rows else "no replicas"

    return _emit(args, text, render)


def _bulk(args: argparse.Namespace, action: str, done: str, filters: dict[str, str]) -> int:
    """`runs retry|cancel FILTERS`: count first and ask, unless --yes."""
    admin = _Admin.from_args(args)
    path = f"/v1/runs/{action}"
    if args.limit is not None:
        filters = {**filters, "limit": str(args.limit)}
    if not args.yes:
        _, preview = admin.call("POST", path, query={**filters, "dry_run": "true"})
        count = preview.get("count") if isinstance(preview, dict) else None
        if not count:
            print(f"no run to {action}")
            return 0
        more = " (and more: repeat it)" if isinstance(preview, dict) and preview.get("more") else ""
        if not sys.stdin.isatty():
            raise _Failure(
                f"{count} runs would be affected{more}; add --yes to {action} them "
                "without a question",
                2,
            )
        shown = ", ".join(f"{name}={value}" for name, value in filters.items())
        answer = input(f"{action} {count} run{'' if count == 1 else 's'} ({shown}){more}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing done")
            return 1
    text, result = admin.call("POST", path, query=filters)
    acted = result.get("count") if isinstance(result, dict) else None
    left = "; more remain: run it again" if isinstance(result, dict) and result.get("more") else ""
    return _emit(args, text, lambda: f"{acted} run{'' if acted == 1 else 's'}: {done}{left}")


def _cmd_reload(args: argparse.Namespace, child: list[str] | None) -> int:
    text, answer = _Admin.from_args(args).call("POST", "/v1/reload")

    def render() -> str:
        done = _expect_dict(answer, "reload")
        changed = ", ".join(done.get("changed") or []) or "nothing"
        line = f"reloaded: {changed} changed"
        if done.get("kept"):
            line += f"; kept until a restart: {', '.join(done['kept'])}"
        return line

    return _emit(args, text, render)


def _run_path(run_id: str, action: str = "") -> str:
    if not run_id:  # would be /v1/runs/, which is not a run
        raise _Failure("the run ID must not be empty", 2)
    return f"/v1/runs/{urllib.parse.quote(run_id, safe='')}{action}"


def _cmd_runs_show(args: argparse.Namespace, child: list[str] | None) -> int:
    text, answer = _Admin.from_args(args).call("GET", _run_path(args.id))
    return _emit(args, text, lambda: _render_run(_expect_dict(answer, "runs show")))


def _run_action(action: str, done: str) -> Callable[[argparse.Namespace, list[str] | None], int]:
    def command(args: argparse.Namespace, child: list[str] | None) -> int:
        filters = {
            name: value
            for name, value in (
                ("status", args.status),
                ("route", args.route),
                ("since", _moment(args.since, "--since") if args.since else None),
                ("until", _moment(args.until, "--until") if args.until else None),
            )
            if value is not None
        }
        if args.id is not None and filters:
            raise _Failure(
                "give a run ID or filters (--status, --route, --since, --until), not both", 2
            )
        if args.id is None:
            if not filters:
                raise _Failure(
                    f"give the ID of the run to {action}, or filters to {action} "
                    "every run they select (--status, --route, --since, --until)",
                    2,
                )
            return _bulk(args, action, done, filters)
        text, answer = _Admin.from_args(args).call("POST", _run_path(args.id, f"/{action}"))
        status = answer.get("status") if isinstance(answer, dict) else None
        return _emit(
            args, text, lambda: f"run {args.id}: {done}" + (f" ({status})" if status else "")
        )

    return command


class _NotJson(ValueError):
    pass


def _not_json(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text} is too large for a JSON number")
    return value


def _event_data(text: str) -> object:
    """``--data``: strict JSON (Python's json also reads NaN and Infinity, which JSON has not)."""
    try:
        data = json.loads(text, parse_constant=_not_json, parse_float=_finite)
        json.dumps({"data": data})  # as deep as it will be sent
    except json.JSONDecodeError as exc:
        raise _Failure(f"--data is not valid JSON: {exc.msg} at column {exc.colno}", 2) from None
    except _NotJson as exc:
        raise _Failure(f"--data is not valid JSON: {exc}", 2) from None
    except RecursionError:
        raise _Failure("--data is nested too deeply", 2) from None
    return data


def _cmd_events_send(args: argparse.Namespace, child: list[str] | None) -> int:
    event: dict[str, object] = {"name": args.name, "data": _event_data(args.data)}
    if args.id is not None:
        event["id"] = args.id
    text, answer = _Admin.from_args(args).call("POST", "/v1/events", body=event, always_there=True)

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
        bulk = action != "show"
        sub = run_commands.add_parser(
            action,
            parents=[common],
            help=help_text + (" (or every run the filters select)" if bulk else ""),
            usage=f"stepgate runs {action} [-h] [--url URL] [--config FILE] [--token TOKEN] "
            "[--json] " + ("([--] ID | FILTERS)" if bulk else "[--] ID"),
            epilog=f'An ID that starts with "-" can follow "--": stepgate runs {action} -- -AbC...'
            + (
                f"\nFilters act on many runs: stepgate runs {action} --status failed --route X"
                if bulk
                else ""
            ),
        )
        if bulk:
            sub.add_argument(
                "id", metavar="ID", nargs="?", help='the run id (one that starts with "-" too)'
            )
            sub.add_argument("--status", help="every run in this state (e.g. failed)")
            sub.add_argument("--route", help="every run of this route")
            sub.add_argument("--since", help="created at or after: RFC 3339, or a duration ago")
            sub.add_argument("--until", help="created before: RFC 3339, or a duration ago")
            sub.add_argument(
                "--limit", type=_bulk_limit, help="act on at most this many runs (default 10000)"
            )
            sub.add_argument(
                "--yes",
                action="store_true",
                help="act at once; without it the command counts the runs and asks",
            )
        else:
            sub.add_argument("id", metavar="ID", help='the run id (one that starts with "-" too)')
        sub.set_defaults(handler=handler)

    events = commands.add_parser("events", help="send events to waiting runs")
    event_commands = events.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    send = event_commands.add_parser("send", parents=[common], help="send one event")
    send.add_argument("name", metavar="NAME", help="the event name, e.g. order.paid")
    send.add_argument("--data", default="null", metavar="JSON", help="the event's data (JSON)")
    send.add_argument("--id", help="an id for deduplication: a repeated id is accepted once")
    send.set_defaults(handler=_cmd_events_send)

    replicas = commands.add_parser(
        "replicas", parents=[common], help="list the gateways serving the store"
    )
    replicas.set_defaults(handler=_cmd_replicas)

    reloading = commands.add_parser(
        "reload",
        parents=[common],
        help="make the gateway read its config file again (what a SIGHUP does)",
    )
    reloading.set_defaults(handler=_cmd_reload)
    return parser


_ID_ACTIONS: Final = ("show", "retry", "cancel")
# The options of those commands (see _admin_options); argparse also takes unique abbreviations.
_VALUED_OPTIONS: Final = (
    "--url",
    "--config",
    "--token",
    "--status",
    "--route",
    "--since",
    "--until",
    "--limit",
)
_FLAG_OPTIONS: Final = ("--json", "--help", "--yes")


def _option(word: str) -> str | None:
    """The option ``word`` means (``--url=x``, ``--tok``), or None if it is not one of ours."""
    if word == "-h":
        return "--help"
    name = word.partition("=")[0]
    if len(name) < 3 or not name.startswith("--"):
        return None
    matches = [option for option in _VALUED_OPTIONS + _FLAG_OPTIONS if option.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def _dashed_id_last(arguments: list[str]) -> list[str]:
    """``runs show -AbC... --json`` -> ``runs show --json -- -AbC...``.

    argparse reads any word that starts with "-" as an option, and one run id in 64 does. If the
    one word that is no option of ours (nor an option's value) starts with "-", it is the id:
    behind "--", argparse takes it as the ID. Anything else is left to argparse as it is.
    """
    head, rest = arguments[:2], arguments[2:]
    plain: list[int] = []
    dashed: list[int] = []
    index = 0
    while index < len(rest):
        word = rest[index]
        if word == "--":  # the user's own: argparse knows what to do
            return arguments
        option = _option(word)
        if option is not None:
            index += 2 if option in _VALUED_OPTIONS and "=" not in word else 1
            continue
        (dashed if word.startswith("-") and word != "-" else plain).append(index)
        index += 1
    if plain or len(dashed) != 1:
        return arguments
    (at,) = dashed
    return [*head, *rest[:at], *rest[at + 1 :], "--", rest[at]]


def _whole(most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to `most`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"must be from 1 to {most}")
        return value

    return parse


_limit = _whole(500)
_bulk_limit = _whole(100_000)


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
    if arguments[:1] == ["runs"] and arguments[1:2] and arguments[1] in _ID_ACTIONS:
        arguments = _dashed_id_last(arguments)  # `--` ends the options; the ID may follow it
    elif "--" in arguments:  # everything after `--` is the supervised command, verbatim
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
    except KeyboardInterrupt:  # Ctrl-C while waiting for the gateway: no traceback
        return 130
    except _Failure as failure:
        print(failure.message if failure.bare else f"stepgate: {failure.message}", file=sys.stderr)
        return failure.code
    except BrokenPipeError:  # `stepgate runs list | head`
        return 0
