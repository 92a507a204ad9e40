"""Ten SIGKILL/restart cycles of a real gateway under concurrent clients (bench/crashloop.py;
`python bench/crashloop.py --kills 50` is the long version, docs/reliability.md its table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crashloop import run_crash_loop


@pytest.mark.timeout(150)
async def test_ten_kills_lose_no_run_and_repeat_no_acknowledged_step(tmp_path: Path) -> None:
    report = await run_crash_loop(tmp_path, kills=10, clients=8)
    assert report.problems() == []
    assert report.accepted > 50  # the clients did get work in between the kills
    assert report.ok
