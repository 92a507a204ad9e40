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

    async def serve(self, settings: Settings, child: Sequence[str] | None = None) -> int:
        loop = type(asyncio.get_running_loop()).__module__
        self.calls.append((settings, child, loop))
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
