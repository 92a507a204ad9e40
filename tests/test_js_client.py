"""The JavaScript client's own suite (`npm test` in client/js), run from pytest so the README's
one test command covers both SDKs. Its end-to-end test starts this checkout's real gateway."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "client" / "js"


def node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    return int(version.strip().lstrip("v").split(".")[0])


@pytest.mark.timeout(300)
def test_javascript_client_suite() -> None:
    major = node_major()
    if major is None or major < 18 or shutil.which("npm") is None:
        pytest.skip("Node.js >= 18 with npm is needed for the JavaScript client's tests")
    env = dict(os.environ, STEPGATE_E2E_CMD=f"{sys.executable} -m gateway serve")
    done = subprocess.run(
        ["npm", "test", "--silent"], cwd=JS, env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout
    assert "# skipped 0" in done.stdout or "# skip 0" in done.stdout, done.stdout[-2000:]
