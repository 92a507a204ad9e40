"""`stepgate serve` and `stepgate check`: argument handling and the hand-off to gateway.app."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Sequence

import pytest

from gateway.cli import main
from gateway.config import Settings

from .conftest import REPO, RunCli, WriteConfig, run_process

GOOD = {"routes": [{"name": "a", "path": "/a", "upstream": "http://127.0.0.1:3000"}]}


class FakeApp:
    """Stands in for gateway.app so the CLI's side of the hand-off is tested on its own."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls: list[tuple[Settings, Sequence[str] | None, str]] = []
        self.config_paths: list[str | None] = []

    async def serve(
        self, settings: Settings, child: Sequence[str] | None = None, config_path: str | None = None
    ) -> int:
        loop = type(asyncio.get_running_loop()).__module__
        self.calls.append((settings, child, loop))
        self.config_paths.append(config_path)
        return self.code


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> FakeApp:
    fake = FakeApp(0)
    module = types.ModuleType("gateway.app")
    module.serve = fake.serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.app", module)
    return fake


def test_serve_hands_settings_and_child_to_the_app(
    fake_app: FakeApp, write_config: WriteConfig, cli: RunCli
) -> None:
    path = write_config(GOOD)
    fake_app.code = 3

    outcome = cli("serve", "--config", str(path), "--", "python", "app.py", "--port", "3000")

    assert outcome.code == 3
    ((settings, child, loop),) = fake_app.calls
    assert settings.routes[0].name == "a"
    assert child == ["python", "app.py", "--port", "3000"]
    assert loop.startswith("uvloop")  # installed in the test environment
    assert fake_app.config_paths == [str(path)]  # what a SIGHUP reads again


def test_serve_without_child(fake_app: FakeApp, write_config: WriteConfig, cli: RunCli) -> None:
    outcome = cli("serve", "--config", str(write_config(GOOD)))
    assert outcome.code == 0
    assert fake_app.calls[0][1] is None


def test_a_child_killed_by_a_signal_exits_like_a_shell_says(
    fake_app: FakeApp, write_config: WriteConfig, cli: RunCli
) -> None:
    fake_app.code = -9
    assert cli("serve", "--config", str(write_config(GOOD)), "--", "x").code == 137


def test_serve_with_bad_config_never_reaches_the_app(
    fake_app: FakeApp, write_config: WriteConfig, cli: RunCli
) -> None:
    path = write_config({"routes": [{"name": "a", "path": "/a"}]})
    outcome = cli("serve", "--config", str(path), "--", "python", "app.py")
    assert outcome.code == 2
    assert outcome.err_lines == [
        f"{path}: routes[0].upstream: missing (every route needs name, path and upstream)"
    ]
    assert fake_app.calls == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["check", "--config", "x.yaml", "--", "ls"],
            "`-- CMD ARGS` is only accepted by `stepgate serve`",
        ),
        (["serve", "--config", "x.yaml", "--"], "no command after `--`"),
    ],
)
def test_child_command_misuse(args: list[str], message: str, cli: RunCli) -> None:
    outcome = cli(*args)
    assert outcome.code == 2
    assert outcome.err_lines == [f"stepgate: {message}"]


@pytest.mark.parametrize(
    "args", [[], ["check"], ["serve"], ["runs"], ["runs", "show"], ["frobnicate"]]
)
def test_usage_errors_exit_2(args: list[str], cli: RunCli) -> None:
    outcome = cli(*args)
    assert outcome.code == 2
    assert "usage: stepgate" in outcome.err
    assert "Traceback" not in outcome.err


def test_help_exits_0(cli: RunCli) -> None:
    outcome = cli("--help")
    assert outcome.code == 0
    for command in ("serve", "check", "runs", "events"):
        assert command in outcome.out


def test_python_dash_m_gateway_is_the_cli(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    outcome = run_process("check", "--config", str(path), cwd=REPO)
    assert (outcome.code, outcome.out) == (0, f"{path}: ok (1 route)\n")


def test_entry_point_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'stepgate = "gateway.cli:main"' in text


def test_main_reads_sys_argv_when_no_args_given(
    monkeypatch: pytest.MonkeyPatch, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(GOOD)
    monkeypatch.setattr(sys, "argv", ["stepgate", "check", "--config", str(path)])

    assert main() == 0
    assert capsys.readouterr().out == f"{path}: ok (1 route)\n"


# --- listeners that would take each other's port --------------------------------------------

ROUTES = GOOD["routes"]
CLASHES = {
    "the same address": (
        {"listen": "127.0.0.1:8080", "internal_listen": "127.0.0.1:8080"},
        'internal_listen: "127.0.0.1:8080" is also listen\'s address',
    ),
    "any IPv4 address and loopback": (
        {"listen": "0.0.0.0:8080", "internal_listen": "127.0.0.1:8080"},
        'internal_listen: "127.0.0.1:8080" is inside listen ("0.0.0.0:8080", every IPv4 address)',
    ),
    "loopback and any IPv4 address": (
        {"listen": "127.0.0.1:9000", "internal_listen": "0.0.0.0:9000"},
        'internal_listen: "0.0.0.0:9000" (every IPv4 address) takes listen\'s port too '
        '("127.0.0.1:9000")',
    ),
    "any IPv6 address and ::1": (
        {"listen": "[::]:8080", "internal_listen": "[::1]:8080"},
        'internal_listen: "[::1]:8080" is inside listen ("[::]:8080", every IPv6 address)',
    ),
    "localhost and loopback": (
        {"listen": "localhost:8080", "internal_listen": "127.0.0.1:8080"},
        'internal_listen: "127.0.0.1:8080" is also listen\'s address ("localhost:8080")',
    ),
    "one host name twice": (
        {"listen": "gateway:8080", "internal_listen": "GATEWAY:8080"},
        'internal_listen: "GATEWAY:8080" is also listen\'s address ("gateway:8080")',
    ),
    "listen on the default internal port": (
        {"listen": "0.0.0.0:8081"},
        'listen: "0.0.0.0:8081" (every IPv4 address) takes internal_listen\'s port too '
        '("127.0.0.1:8081", the default)',
    ),
    "internal on the default public port": (
        {"internal_listen": "127.0.0.1:8080"},
        'internal_listen: "127.0.0.1:8080" is inside listen ("0.0.0.0:8080", the default: '
        "every IPv4 address)",
    ),
    "metrics on the internal address": (
        {"listen": "127.0.0.1:8080", "internal_listen": "127.0.0.1:8081",
         "metrics_listen": "127.0.0.1:8081"},
        'metrics_listen: "127.0.0.1:8081" is also internal_listen\'s address',
    ),
    "metrics on the public port": (
        {"metrics_listen": "0.0.0.0:8080"},
        'metrics_listen: "0.0.0.0:8080" is also listen\'s address ("0.0.0.0:8080", the default)',
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CLASHES.values(), ids=list(CLASHES))
def test_check_refuses_listeners_on_one_port(
    case: tuple[dict[str, str], str], write_config: WriteConfig, cli: RunCli
) -> None:
    listeners, message = case
    path = write_config({**listeners, "routes": ROUTES})

    outcome = cli("check", "--config", str(path))

    assert (outcome.code, outcome.out) == (2, "")
    assert len(outcome.err_lines) == 1, outcome.err
    line = outcome.err_lines[0]
    assert line.startswith(f"{path}: {message}"), line
    assert line.endswith("; give each listener its own port"), line


@pytest.mark.parametrize(
    "listeners",
    [
        {"listen": "127.0.0.1:0", "internal_listen": "127.0.0.1:0", "metrics_listen": "[::1]:0"},
        {"listen": "127.0.0.1:8080", "internal_listen": "127.0.0.2:8080"},
        {"listen": "0.0.0.0:8080", "internal_listen": "[::1]:8080"},  # IPv4 and IPv6 are apart
        {"listen": "[::]:8080", "internal_listen": "127.0.0.1:8080"},
        {"listen": "gateway:8080", "internal_listen": "127.0.0.1:8080"},
        {"listen": "0.0.0.0:8080", "internal_listen": "127.0.0.1:8081", "metrics_listen": None},
        {"listen": "0.0.0.0:8080", "metrics_listen": "0.0.0.0:9090"},
    ],
)
def test_check_accepts_listeners_that_can_all_bind(
    listeners: dict[str, str], write_config: WriteConfig, cli: RunCli
) -> None:
    path = write_config({**listeners, "routes": ROUTES})
    outcome = cli("check", "--config", str(path))
    assert (outcome.code, outcome.err) == (0, ""), outcome.err


def test_serve_refuses_listeners_on_one_port_before_binding(write_config: WriteConfig) -> None:
    path = write_config({"listen": "127.0.0.1:8080", "internal_listen": "127.0.0.1:8080",
                         "routes": ROUTES})  # fmt: skip

    outcome = run_process("serve", "--config", str(path))

    assert (outcome.code, outcome.out) == (2, "")
    assert len(outcome.err_lines) == 1, outcome.err
    assert outcome.err.startswith(f"{path}: internal_listen: ")
    assert "in use" not in outcome.err


# --- a gateway needs at least one route -----------------------------------------------------


@pytest.mark.parametrize("text", ["routes: []\n", "routes:\n", "listen: 0.0.0.0:8080\n"])
@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_config_without_routes_is_refused(
    text: str, command: str, fake_app: FakeApp, write_config: WriteConfig, cli: RunCli
) -> None:
    path = write_config(text)

    outcome = cli(command, "--config", str(path))

    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err_lines == [
        f"{path}: routes: no routes: the gateway would answer 404 to every request; "
        "add at least one (see config.example.yaml)"
    ]
    assert fake_app.calls == []


def test_admin_commands_may_read_a_config_without_routes(
    write_config: WriteConfig, cli: RunCli
) -> None:
    """`--config` there only gives internal_url and admin_token."""
    path = write_config({"internal_url": "http://127.0.0.1:1", "routes": []})
    outcome = cli("runs", "list", "--config", str(path))
    assert outcome.err == "stepgate: cannot reach http://127.0.0.1:1: Connection refused\n"


@pytest.mark.parametrize("token", ["two words", "tök€n", "tab\there"])
def test_check_refuses_an_admin_token_no_header_can_carry(
    token: str, write_config: WriteConfig, cli: RunCli
) -> None:
    path = write_config({"admin_token": token, "routes": ROUTES})
    outcome = cli("check", "--config", str(path))
    assert outcome.code == 2
    assert outcome.err_lines == [
        f"{path}: admin_token: must be printable ASCII without spaces "
        "(it is sent as a bearer token)"
    ]
