"""Wires the gateway together: the store, the upstream session, the engine and two listeners.

    public    (listen)           proxied routes; poll and signal URLs under /_stepgate/
    internal  (internal_listen)  callbacks, events, admin, /metrics, /healthz, /readyz, /ui
    scrape    (metrics_listen)   /metrics, /healthz, /readyz only (optional)

The shared resources outlive both listeners and are shut down in an order no single
application's cleanup context can express: stop taking client requests, let invocations in
flight finish (their callbacks still need the internal listener), close the internal listener,
stop the child, then close the session and the store. `Gateway` owns that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yarl import URL

from gateway import admin, callbacks, ratelimit, ui
from gateway.config import Address, ConfigError, Settings, load_settings
from gateway.engine import ENGINE, Engine
from gateway.errors import GatewayError
from gateway.limits import BodyTimeout, GuardedSite, body_timeout_problem, raise_open_file_limit
from gateway.logging import configure as configure_logging
from gateway.logging import set_level as set_log_level
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.poll import poll
from gateway.problem import problem, problems
from gateway.proxy import (
    create_upstream_session,
    defer_continue,
    expects_continue,
    no_server_banner,
    proxy_plain,
    send_continue,
    undecodable_field,
)
from gateway.routing import BadTarget, MethodNotAllowed, Router, Target, read_target
from gateway.signals import post_signal
from gateway.store import StoreKeyError, StoreLocked, open_store
from gateway.supervisor import ChildProcess, SupervisorError, upstream_addresses
from gateway.upgrade import relay_upgrade, wants_websocket

if TYPE_CHECKING:
    from gateway.tracing import RunTracer

log = structlog.get_logger("stepgate")

SESSION = web.AppKey("stepgate.session", aiohttp.ClientSession)
ROUTER = web.AppKey("stepgate.router", Router)
METRICS = web.AppKey("stepgate.metrics", Metrics)
GATEWAY: web.AppKey[Gateway] = web.AppKey("stepgate.gateway")
TARGET = web.RequestKey("stepgate.target", Target)  # set by before_routes

RESERVED_PREFIX = "/_stepgate/"
INTERNAL_MAX_BODY = 16 * 1024 * 1024  # step outputs and events


@web.middleware
async def before_routes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every public request must pass before any route, poll URLs included: its target
    and Host (gateway.routing.read_target) and field values the gateway can forward. An
    absolute-form target for this host goes on as the origin-form request it stands for."""
    started = time.perf_counter()
    target = read_target(request.method, request.raw_path, request.headers.get(hdrs.HOST))
    undecodable = undecodable_field(request.headers)
    if isinstance(target, BadTarget):
        response: web.StreamResponse = problem(target.status, detail=target.detail)
    elif undecodable is not None:
        response = problem(
            400,
            detail=f"the value of {undecodable} is not UTF-8, and the "
            "gateway cannot forward its bytes unchanged",
        )
    elif target.path == "*":
        # `OPTIONS *` asks about the server itself; Go's server answers it the same way.
        response = web.Response(headers={hdrs.CONTENT_LENGTH: "0"})
    else:
        if target.forward != request.raw_path:
            request = request.clone(rel_url=URL(target.forward, encoded=True))
        request[TARGET] = target
        response = await handler(request)
        if expects_continue(request) and not request.content.is_eof():
            # Refused before the body was asked for: a client may then skip sending it, so
            # the connection cannot carry another request (RFC 9110 §10.1.1).
            response.force_close()
        return response
    if expects_continue(request):
        response.force_close()
    request.app[METRICS].request(
        "none", request.method, response.status, time.perf_counter() - started
    )
    return response


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every public request that is not a poll, once `before_routes` has passed it: route it,
    then proxy or run it durably."""
    started = time.perf_counter()
    label, response = await _dispatch(request)
    request.app[METRICS].request(
        label, request.method, response.status, time.perf_counter() - started
    )
    return response


async def _dispatch(request: web.Request) -> tuple[str, web.StreamResponse]:
    app = request.app
    target = request.get(TARGET) or read_target(
        request.method, request.raw_path, request.headers.get(hdrs.HOST)
    )
    if isinstance(target, BadTarget):  # not through before_routes: still never routed
        return "none", problem(target.status, detail=target.detail)
    match = app[ROUTER].match(request.method, target.path)
    if match is None or target.path.startswith(RESERVED_PREFIX):
        return "none", problem(404, detail="no route matches this path")
    if isinstance(match, MethodNotAllowed):
        return "none", problem(
            405,
            detail=f"this path takes {match.allow_header}",
            headers={"Allow": match.allow_header},
        )
    if ratelimit.checked_before_body(match):
        refused = await ratelimit.refusal(app[ENGINE].store, app[METRICS], match, request)
        if refused is not None:
            return match.name, refused
    if not match.durable or (request.content_length or 0) <= match.max_body:
        await send_continue(request)  # else the engine answers 413 without wanting the body
    if match.durable:
        try:
            return match.name, await app[ENGINE].handle(request, match)
        except BodyTimeout as exc:  # nothing is recorded of a body that never arrived
            return match.name, body_timeout_problem(exc)
    on_attempt = app[METRICS].plain_attempt(match.name)
    if wants_websocket(request):
        return match.name, await relay_upgrade(request, match, on_attempt=on_attempt)
    return match.name, await proxy_plain(request, match, app[SESSION], on_attempt=on_attempt)


async def poll_any_method(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        return problem(405, detail="poll URLs take GET", headers={"Allow": "GET, HEAD"})
    return await poll(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if not await request.app[ENGINE].store.writable():
        return problem(503, detail="the store does not take writes: new runs would be refused")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    engine = request.app[ENGINE]
    registry.set_run_counts(await engine.store.count_by_status())
    flow_routes = [name for name, route in engine.routes.items() if route.flow_controlled]
    registry.set_queued(await engine.store.count_queued(), flow_routes)
    return web.Response(body=registry.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Gateway:
    """One running gateway. `await start()`, then `await stop()`; ports 0 are resolved."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path  # what a reload reads again
        self.metrics = Metrics()
        self.store = open_store(settings)
        self.store.write_observer = self.metrics.store_write_duration.observe
        self.metrics.replica.labels(
            self.store.replica_id, "postgresql" if settings.postgres else "sqlite"
        ).set(1)
        self.public_port = 0
        self.internal_port = 0
        self._runners: list[web.AppRunner] = []
        self._public: web.AppRunner | None = None
        self._internal: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.engine: Engine | None = None
        self.router: Router | None = None
        self._stopped = False
        self._store_open = False
        self.tracer: RunTracer | None = None

    def _apps(
        self, engine: Engine, session: aiohttp.ClientSession
    ) -> tuple[web.Application, web.Application]:
        public = web.Application(middlewares=[before_routes])
        public[ENGINE] = engine
        public[SESSION] = session
        public[ROUTER] = self.router = Router(self.settings.routes)
        public[METRICS] = self.metrics
        public.router.add_route("*", RESERVED_PREFIX + "runs/{run_id}", poll_any_method)
        public.router.add_route("*", RESERVED_PREFIX + "signals/{signal_id}", post_signal)
        public.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=defer_continue)

        internal = web.Application(client_max_size=INTERNAL_MAX_BODY, middlewares=[problems])
        internal[ENGINE] = engine
        internal[METRICS] = self.metrics
        internal[GATEWAY] = self
        internal.router.add_post("/v1/reload", reload_endpoint)
        callbacks.add_routes(internal)
        admin.add_routes(internal)
        ui.add_routes(internal)
        internal.router.add_get("/metrics", metrics)
        internal.router.add_get("/healthz", healthz)
        internal.router.add_get("/readyz", readyz)
        return public, internal

    async def _listen(self, app: web.Application, address: Address) -> web.AppRunner:
        app.on_response_prepare.append(no_server_banner)
        # A listener's in-flight requests get shutdown_grace to finish when it closes, as the
        # invocations do; aiohttp's own default is a minute.
        runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=self.settings.shutdown_grace
        )
        await runner.setup()
        self._runners.append(runner)
        # Connections are served by GuardedHandler: time-outs, a connection cap, a bound on
        # header bytes, problem+json for malformed requests (gateway.limits).
        site = GuardedSite(runner, address, limits=self.settings.limits, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise GatewayError(
                f"cannot listen on {address.host}:{address.port}: {exc.strerror or exc}"
            ) from exc
        return runner

    async def open_store(self) -> None:
        """Lock and open the store: the first thing a gateway does, before it starts anything
        (a child, a listener) that a second gateway on the same store must not start."""
        if not self._store_open:
            await self.store.open()
            self._store_open = True

    def _start_tracing(self) -> None:
        """With `otel` configured, spans for every run that ends here (gateway/tracing.py,
        imported only then: without it no OpenTelemetry module is loaded)."""
        if self.settings.otel is None or self.tracer is not None:
            return
        from gateway.tracing import RunTracer

        self.tracer = RunTracer(self.settings.otel, self.store)
        self.store.subscribe(self.tracer.changed)
        self.tracer.start()

    async def start(self) -> None:
        await self.open_store()
        self._start_tracing()  # before the engine: runs that recovery ends are traced too
        self._session = create_upstream_session()
        self.engine = engine = Engine(self.settings, self.store, self._session, self.metrics)
        public, internal = self._apps(engine, self._session)
        self._internal = await self._listen(internal, self.settings.internal_listen)
        self.internal_port = _bound_port(self._internal)
        if urlsplit(self.settings.internal_url).port == 0:
            engine.internal_url = _with_port(self.settings.internal_url, self.internal_port)
        if self.settings.metrics_listen is not None:
            scrape = web.Application()
            scrape[ENGINE] = engine
            scrape[METRICS] = self.metrics
            scrape.router.add_get("/metrics", metrics)
            # Probes too: a kubelet reaches the pod's address, and the internal listener, with
            # the admin API on it, can then stay on loopback.
            scrape.router.add_get("/healthz", healthz)
            scrape.router.add_get("/readyz", readyz)
            await self._listen(scrape, self.settings.metrics_listen)
        await engine.start()
        self._public = await self._listen(public, self.settings.listen)
        self.public_port = _bound_port(self._public)
        log.info(
            "gateway.listening",
            public=self.public_port,
            internal=self.internal_port,
            routes=len(self.settings.routes),
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._public is not None:
            await self._public.cleanup()  # stop taking client requests first
            self._runners.remove(self._public)
        if self.engine is not None:
            await self.engine.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.tracer is not None:  # every run that could end here has: send their spans
            await self.tracer.close()
        if self._session is not None:
            await self._session.close()
        if self._store_open:
            await self.store.close()


# What a reload may change; the rest (listeners, store, limits, …) is bound at start.
RELOADABLE: Final = (
    "routes",
    "log_level",
    "admin_token",
    "events_lookback",
    "retention",
    "shutdown_grace",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Reloaded:
    changed: list[str]  # keys that took their new values
    kept: list[str]  # keys that differ but need a restart


def reload(gateway: Gateway, path: str) -> Reloaded:
    """Read the config again and take what may change without a restart (SIGHUP, or
    POST /v1/reload). A config that does not load raises ConfigError, logged with its one-line
    error, and the running one stays. Attempts in flight finish on the route they started
    with; a run's next attempt, and every new request, use the new one."""
    old = gateway.settings
    try:
        new = load_settings(path)
        if not new.routes:
            raise ConfigError(path, "routes", "no routes: the gateway would answer 404 to all")
    except ConfigError as exc:
        log.error("config.reload_refused", error=str(exc), kept="the running config")
        raise
    kept = [
        field.name
        for field in dataclasses.fields(Settings)
        if field.name not in RELOADABLE and getattr(new, field.name) != getattr(old, field.name)
    ]
    taken = dataclasses.replace(old, **{name: getattr(new, name) for name in RELOADABLE})
    gateway.settings = taken
    if gateway.router is not None:
        gateway.router.load(taken.routes)
    if gateway.engine is not None:
        gateway.engine.reload(taken)
    set_log_level(taken.log_level)
    changed = [name for name in RELOADABLE if getattr(taken, name) != getattr(old, name)]
    log.info("config.reloaded", routes=len(taken.routes), changed=changed)
    if kept:
        log.warning(
            "config.reload_kept",
            keys=kept,
            why="listeners, the store, limits and otel change only with a restart",
        )
    return Reloaded(changed, kept)


async def reload_endpoint(request: web.Request) -> web.StreamResponse:
    """POST /v1/reload: what a SIGHUP does, for `stepgate reload` and hosts without signals."""
    gateway = request.app[GATEWAY]
    admin.authorize(request, request.app[ENGINE])
    if gateway.config_path is None:
        return problem(409, detail="this gateway was not started from a config file")
    try:
        done = reload(gateway, gateway.config_path)
    except ConfigError as exc:
        return problem(422, detail=f"the config was not reloaded: {exc}")
    return web.json_response({"reloaded": True, "changed": done.changed, "kept": done.kept})


async def serve(
    settings: Settings, child: Sequence[str] | None = None, config_path: str | None = None
) -> int:
    """Run until SIGTERM or SIGINT (or until the child exits); return the exit code. SIGHUP
    reloads `config_path`; a supervised child keeps running (SIGUSR1 and SIGUSR2 are passed on
    to it, SIGHUP is not: most programs end on one)."""
    configure_logging(settings.log_level, settings.log_format)
    was, now = raise_open_file_limit()
    log.info("gateway.open_files", limit=now, raised_from=was if was != now else None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    process: ChildProcess | None = None
    gateway = Gateway(settings, config_path)

    def hangup() -> None:  # the child keeps running: SIGHUP would end most programs
        if config_path is not None:
            with contextlib.suppress(ConfigError):  # logged; the running config stays
                reload(gateway, config_path)

    code = 0
    try:
        await gateway.open_store()
        if child:
            process = await ChildProcess.start(child)
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                loop.add_signal_handler(sig, process.send_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, hangup)
        if process is not None:
            await process.wait_ready(
                upstream_addresses(route.upstream for route in settings.routes), timeout=30.0
            )
        await gateway.start()
        waits: list[asyncio.Task[object]] = [
            asyncio.create_task(stop.wait(), name="stepgate-stop-signal")
        ]
        if process is not None:
            waits.append(asyncio.create_task(process.wait(), name="stepgate-child-exit"))
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if process is not None and process.returncode is not None and not stop.is_set():
            code = process.returncode
            log.warning("child.exited", code=code)
        log.info("gateway.stopping")
    except (StoreLocked, StoreKeyError) as exc:  # a store this gateway must not serve
        print(f"stepgate: {exc}", file=sys.stderr)
        code = 2
    except (GatewayError, SupervisorError) as exc:
        print(f"stepgate: {exc}", file=sys.stderr)
        code = 1
    finally:
        with contextlib.suppress(Exception):
            await gateway.stop()
        if process is not None:
            await process.terminate(settings.shutdown_grace)
    return code
