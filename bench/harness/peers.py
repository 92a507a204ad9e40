"""Starting the benchmark's servers: the upstream, nginx, Restate and Stepgate.

Each `start_*` returns a handle once the server answers, or raises `PeerUnavailable`
with one line saying what is missing and how to get it; the harness prints that line
and skips the peer's scenarios.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .processes import Child, Processes, free_port, http_status, wait_until

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / ".peers"
RESTATE_VERSION = "1.7.12"
SETUP_HINT = "run bench/setup.sh"


class PeerUnavailable(Exception):
    """A peer cannot run here; str() is the one-line reason shown to the user."""


@dataclass(slots=True)
class Bench:
    """Where a benchmark run keeps its things, and who owns its processes."""

    procs: Processes
    work_dir: Path  # stores, peer data, configs; on the repo's disk so fsync is real
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, procs: Processes, work_dir: Path) -> Bench:
        log_dir = work_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Children import `gateway` and `stepgate` from this checkout even before
        # `pip install -e .`, so a fresh clone works.
        paths = [str(REPO_DIR), str(REPO_DIR / "client" / "python")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return cls(procs=procs, work_dir=work_dir, log_dir=log_dir, env=env)


def _wait_tcp(port: int, child: Child, timeout: float) -> bool:
    import socket

    def connects() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    return wait_until(connects, timeout=timeout, child=child)


def _fail(bench: Bench, child: Child, what: str) -> PeerUnavailable:
    tail = child.log_tail(8)
    bench.procs.stop(child)
    detail = f"; log tail:\n{tail}" if tail else ""
    return PeerUnavailable(f"{what} (log: {child.log_path}){detail}")


# --- upstream ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    port: int
    child: Child


def start_upstream(bench: Bench, *, uvloop: bool = True) -> Upstream:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "upstream.py"), "--port", str(port)]
    if not uvloop:
        argv.append("--no-uvloop")
    child = bench.procs.start(
        "upstream", argv, log_path=bench.log_dir / "upstream.log", env=bench.env
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: http_status(url + "/_bench/health") == 200, timeout=20, child=child):
        raise _fail(bench, child, "the bench upstream did not start")
    return Upstream(url=url, port=port, child=child)


# --- nginx ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nginx:
    url: str
    child: Child
    version: str


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def render_nginx_conf(
    template: str, *, prefix: Path, port: int, upstream_port: int, workers: str
) -> str:
    values = {
        "@PREFIX@": str(prefix),
        "@PORT@": str(port),
        "@UPSTREAM_PORT@": str(upstream_port),
        "@WORKERS@": workers,
    }
    for key, value in values.items():
        template = template.replace(key, value)
    return template


def start_nginx(bench: Bench, upstream: Upstream, *, workers: str) -> Nginx:
    binary = nginx_binary()
    if binary is None:
        raise PeerUnavailable(f"nginx not found: {SETUP_HINT} (or apt-get install nginx)")
    version = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, check=False
    ).stderr.strip()
    prefix = bench.work_dir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    template = (BENCH_DIR / "nginx.conf.template").read_text()
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_nginx_conf(
            template, prefix=prefix, port=port, upstream_port=upstream.port, workers=workers
        )
    )
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = bench.procs.start("nginx", argv, log_path=bench.log_dir / "nginx.log")
    url = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: http_status(url + "/plain") == 200, timeout=15, child=child):
        raise _fail(bench, child, "nginx did not start")
    return Nginx(url=url, child=child, version=version)


# --- a bare aiohttp proxy --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BareProxy:
    url: str
    child: Child


def start_bare_proxy(bench: Bench, upstream: Upstream, *, uvloop: bool = True) -> BareProxy:
    """bench/bare_proxy.py: the framework's ceiling, measured beside the plain route."""
    port = free_port()
    argv = [
        sys.executable,
        str(BENCH_DIR / "bare_proxy.py"),
        "--port",
        str(port),
        "--upstream",
        upstream.url,
    ]
    if not uvloop:
        argv.append("--no-uvloop")
    child = bench.procs.start(
        "bare-proxy", argv, log_path=bench.log_dir / "bare-proxy.log", env=bench.env
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: http_status(url + "/plain") == 200, timeout=20, child=child):
        raise _fail(bench, child, "the bare aiohttp proxy did not start")
    return BareProxy(url=url, child=child)


# --- Restate -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restate:
    ingress_url: str
    admin_url: str
    server: Child  # restate-server: the process whose RSS we report
    service: Child  # hypercorn serving restate_service.py
    version: str


def restate_binary() -> str | None:
    pattern = str(
        PEERS_DIR
        / "restate"
        / "node_modules"
        / "@restatedev"
        / "restate-server-*"
        / "bin"
        / "restate-server"
    )
    # The native binary, not the node launcher: signals and RSS must reach the server.
    for path in sorted(glob.glob(pattern)):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("restate-server")


def restate_config(data_dir: Path, *, fabric: int, ingress: int, admin: int) -> str:
    # Loopback and TCP only, no telemetry, no web UI; everything else at its defaults
    # (durable: RocksDB WAL fsync on, as in production).
    return "\n".join(
        [
            'listen-mode = "tcp"',
            'bind-ip = "127.0.0.1"',
            f"bind-port = {fabric}",
            f'base-dir = "{data_dir}"',
            'node-name = "bench"',
            "disable-telemetry = true",
            "",
            "[ingress]",
            f"bind-port = {ingress}",
            "",
            "[admin]",
            f"bind-port = {admin}",
            "disable-web-ui = true",
            "",
        ]
    )


def _post_json(url: str, body: object, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_restate(bench: Bench) -> Restate:
    binary = restate_binary()
    if binary is None:
        raise PeerUnavailable(
            f"restate-server not found: {SETUP_HINT} "
            f"(npm install @restatedev/restate-server@{RESTATE_VERSION} into bench/.peers/restate)"
        )
    try:
        import hypercorn  # noqa: F401
        import restate  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(
            f"Restate's Python side is missing ({exc.name}): {SETUP_HINT} "
            "(pip install restate-sdk hypercorn)"
        ) from exc
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()

    home = bench.work_dir / "restate"
    home.mkdir(parents=True, exist_ok=True)
    ingress, admin, fabric, service_port = (free_port() for _ in range(4))
    conf = home / "restate.toml"
    conf.write_text(restate_config(home / "data", fabric=fabric, ingress=ingress, admin=admin))
    server = bench.procs.start(
        "restate-server",
        [binary, "--config-file", str(conf), "--no-logo"],
        log_path=bench.log_dir / "restate-server.log",
        cwd=home,
    )
    admin_url = f"http://127.0.0.1:{admin}"
    if not wait_until(lambda: http_status(admin_url + "/health") == 200, timeout=60, child=server):
        raise _fail(bench, server, "restate-server did not become healthy")

    service = bench.procs.start(
        "restate-service",
        [
            sys.executable,
            "-m",
            "hypercorn",
            "--bind",
            f"127.0.0.1:{service_port}",
            "restate_service:app",
        ],
        log_path=bench.log_dir / "restate-service.log",
        cwd=BENCH_DIR,
        env=bench.env,
    )
    if not _wait_tcp(service_port, service, timeout=20):
        bench.procs.stop(server)
        raise _fail(bench, service, "hypercorn serving restate_service.py did not start")
    status, body = _post_json(
        admin_url + "/deployments", {"uri": f"http://127.0.0.1:{service_port}"}
    )
    if status not in (200, 201):
        bench.procs.stop(service)
        raise _fail(bench, server, f"registering the deployment failed: {status} {body[:200]!r}")
    return Restate(
        ingress_url=f"http://127.0.0.1:{ingress}",
        admin_url=admin_url,
        server=server,
        service=service,
        version=version,
    )


def stop_restate(bench: Bench, restate: Restate) -> None:
    bench.procs.stop(restate.service)
    bench.procs.stop(restate.server, grace=30)


# --- Stepgate ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepgateConfig:
    path: Path
    public_url: str
    internal_url: str
    store_path: Path


@dataclass(frozen=True, slots=True)
class Stepgate:
    config: StepgateConfig
    child: Child
    ready_s: float  # from spawn until it answered (see start_stepgate)
    ready_by: str  # which probe said so


def stepgate_command(override: str | None) -> list[str]:
    """How to invoke the `stepgate` CLI: an override, the console script, or the module."""
    if override:
        return shlex.split(override)
    beside = Path(sys.executable).parent / "stepgate"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("stepgate")
    if found:
        return [found]
    # A fresh clone without `pip install .`: the entry point's target, with PYTHONPATH.
    return [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())"]


def stepgate_settings(
    *,
    public_port: int,
    internal_port: int,
    store_path: Path,
    upstream_url: str,
    durability: str,
    extra: dict[str, Any],
    store: str | None = None,
) -> dict[str, Any]:
    """The gateway config every Stepgate scenario uses (see docs/performance.md); `store`
    (a postgresql:// URL) replaces the SQLite file at `store_path`."""
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{public_port}",
        "internal_listen": f"127.0.0.1:{internal_port}",
        # Four slashes: an absolute path.
        "store": store or f"sqlite:///{store_path}",
        "durability": durability,
        "routes": [
            {"name": "plain", "path": "/plain", "upstream": upstream_url},
            # The SDK's handler, the raw protocol over aiohttp's client, and over a minimal one.
            *(
                {
                    "name": name,
                    "path": f"/{name}/*",
                    "methods": ["POST"],
                    "upstream": upstream_url,
                    "durable": True,
                }
                for name in ("steps", "raw", "min")
            ),
            # Held by the upstream while its gate is closed; the attempt must outlive
            # the whole fill, so its timeout is long.
            {
                "name": "gate",
                "path": "/gate",
                "methods": ["POST"],
                "upstream": upstream_url,
                "durable": True,
                "timeout": "10m",
                "hold": "1s",
            },
        ],
    }
    settings.update(extra)
    return settings


def write_stepgate_config(
    bench: Bench,
    name: str,
    upstream: Upstream,
    *,
    durability: str,
    extra: dict[str, Any],
    store: str | None = None,
) -> StepgateConfig:
    home = bench.work_dir / f"stepgate-{name}"
    home.mkdir(parents=True, exist_ok=True)
    public_port, internal_port = free_port(), free_port()
    store_file = home / "stepgate.db"
    settings = stepgate_settings(
        public_port=public_port,
        internal_port=internal_port,
        store_path=store_file,
        upstream_url=upstream.url,
        durability=durability,
        extra=extra,
        store=store,
    )
    path = home / "stepgate.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return StepgateConfig(
        path=path,
        public_url=f"http://127.0.0.1:{public_port}",
        internal_url=f"http://127.0.0.1:{internal_port}",
        store_path=store_file,
    )


def check_stepgate(bench: Bench, command: Sequence[str], config: StepgateConfig) -> None:
    """`stepgate check --config FILE`; PeerUnavailable says why it cannot run yet."""
    try:
        done = subprocess.run(
            [*command, "check", "--config", str(config.path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=bench.env,
            cwd=REPO_DIR,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"stepgate is not runnable yet: {exc}") from exc
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise PeerUnavailable(
            f"stepgate is not runnable yet (`{shlex.join(command)} check` failed: {last})"
        )


def start_stepgate(
    bench: Bench,
    command: Sequence[str],
    config: StepgateConfig,
    *,
    name: str,
    timeout: float = 120.0,
) -> Stepgate:
    """`stepgate serve`, waiting until /readyz says 200.

    If the gateway has no /readyz yet (404), the first successful request to the
    plain route counts instead; `ready_by` records which one it was.
    """
    child = bench.procs.start(
        f"stepgate-{name}",
        [*command, "serve", "--config", str(config.path)],
        log_path=bench.log_dir / f"stepgate-{name}.log",
        env=bench.env,
        cwd=REPO_DIR,
    )
    probe = {"by": ""}

    def ready() -> bool:
        status = http_status(config.internal_url + "/readyz", timeout=1)
        if status == 200:
            probe["by"] = "readyz"
            return True
        if status == 404 and http_status(config.public_url + "/plain", timeout=1) == 200:
            probe["by"] = "plain-route"
            return True
        return False

    if not wait_until(ready, timeout=timeout, interval=0.01, child=child):
        raise _fail(bench, child, f"stepgate ({name}) did not become ready")
    return Stepgate(
        config=config,
        child=child,
        ready_s=time.monotonic() - child.started_at,
        ready_by=probe["by"],
    )
