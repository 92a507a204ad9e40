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


APP = """
import { createServer } from 'node:http';
import { step, wrapNodeHandler } from '@stepgate/client';

const server = createServer(wrapNodeHandler(async (req, res) => {
  const answer = await step.run('add', (a, b) => a + b, 40, 2);
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ answer }));
}));
server.listen(0, '127.0.0.1', async () => {
  const { port } = server.address();
  const reply = await fetch(`http://127.0.0.1:${port}/`, { method: 'POST' });
  console.log(reply.status, await reply.text());
  server.close();
});
"""


@pytest.mark.timeout(120)
def test_the_package_installs_from_its_tarball_and_runs(tmp_path: Path) -> None:
    """`npm pack` gives a tarball that installs with no registry at hand, and what it holds is
    enough to import and run a wrapped handler (outside a gateway, steps run in place)."""
    major = node_major()
    if major is None or major < 18 or shutil.which("npm") is None:
        pytest.skip("Node.js >= 18 with npm is needed for the JavaScript package")
    packed = subprocess.run(
        ["npm", "pack", "--pack-destination", str(tmp_path), "--silent"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    tarball = tmp_path / packed.stdout.strip().splitlines()[-1]
    assert tarball.name == "stepgate-client-0.1.0.tgz" and tarball.exists()
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    subprocess.run(
        ["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    installed = app / "node_modules" / "@stepgate" / "client"
    assert (installed / "src" / "index.d.ts").exists()  # the types travel with it
    assert not (installed / "test").exists()  # and the tests do not
    (app / "main.mjs").write_text(APP)
    done = subprocess.run(["node", "main.mjs"], cwd=app, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '200 {"answer":42}'
