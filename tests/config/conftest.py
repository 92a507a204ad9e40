"""Fixtures for the config, CLI and supervisor tests: write a config file, run the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from gateway.cli import main

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


WriteConfig = Callable[[Any], Path]
RunCli = Callable[..., Outcome]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """A config file from YAML text (dedented) or from data (dumped as YAML)."""

    def write(content: Any, name: str = "stepgate.yaml") -> Path:
        path = tmp_path / name
        text = textwrap.dedent(content) if isinstance(content, str) else yaml.safe_dump(content)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """gateway.cli.main in this process, with its output captured."""

    def run(*args: str) -> Outcome:
        code = main(list(args))
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run


def run_process(*args: str, cwd: Path = REPO) -> Outcome:
    """`python -m gateway ARGS` as a real process."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The supervisor runs under uvloop in `stepgate serve`: test it on both loops.

    (pytest-asyncio needs a mapping for every async test under this conftest.)
    """
    if item.path.name != "test_supervisor_child.py":
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
