"""One runner for scenarios.yaml, against the trip-booking example written with each SDK.

Every scenario runs twice: against examples/python/trip_service.py (the Python SDK) and
examples/js/trip_service.mjs (the JavaScript client). Each service runs as its own process, one
per language for the whole module; each test gets a fresh in-process gateway (and SQLite file)
in front of it. The scenarios say what to send, what to do while the request waits, and what the
client, GET /stats and the admin API must show afterwards; this file only knows how to do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tests.conformance.matching import (
    ScenarioError,
    check,
    check_all,
    check_list,
    json_equal,
    resolve,
)
from tests.conftest import GatewayFactory, Running
from tests.gateway.procs import free_port

ROOT: Final = Path(__file__).resolve().parents[2]
SCENARIOS_FILE: Final = Path(__file__).with_name("scenarios.yaml")
LANGUAGES: Final = ("python", "js")
STEPS: Final = (
    "reserve-flight",
    "reserve-hotel",
    "charge-card",
    "send-confirmation",
    "refund-flight",
)
REQUEST_KEYS: Final = frozenset({"method", "path", "query", "headers", "body"})
EXPECT_KEYS: Final = frozenset(
    {"status", "headers", "body", "elapsed", "stats", "run", "attempts", "steps"}
)
ACTION_KEYS: Final = frozenset({"wait_for_run", "run_status", "pause", "event", "signal"})
EVENT_KEYS: Final = frozenset({"name", "data", "woke"})
SIGNAL_KEYS: Final = frozenset({"step", "body", "status"})
# What a scenario may set on the durable route for itself (the rest stays as in routes()).
ROUTE_KEYS: Final = frozenset({"timeout", "hold", "retry"})


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    about: str
    request: Mapping[str, Any]
    actions: tuple[Mapping[str, Any], ...]
    expect: Mapping[str, Any]
    known_gaps: Mapping[str, str]
    route: Mapping[str, Any]


def _only(keys: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    # A misspelt key would silently drop a check: refuse it when the file is read.
    unknown = set(keys) - allowed
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; known: {sorted(allowed)}"
        )


def load_scenarios(path: Path = SCENARIOS_FILE) -> list[Scenario]:
    data = yaml.safe_load(path.read_text())
    _only(data, frozenset({"defaults", "scenarios"}), path.name)
    defaults = data["defaults"]["request"]
    scenarios = []
    for raw in data["scenarios"]:
        name = raw["name"]
        _only(
            raw,
            frozenset({"name", "about", "known_gaps", "route", "request", "actions", "expect"}),
            name,
        )
        route = raw.get("route", {})
        _only(route, ROUTE_KEYS, f"{name}.route")
        request = raw.get("request", {})
        _only(request, REQUEST_KEYS, f"{name}.request")
        actions = tuple(raw.get("actions", ()))
        for action in actions:
            _only(action, ACTION_KEYS, f"{name}.actions")
            if len(action) != 1:
                raise ScenarioError(f"{name}.actions: one action per item, got {sorted(action)}")
            if "event" in action:
                _only(action["event"], EVENT_KEYS, f"{name}.actions.event")
            if "signal" in action:
                _only(action["signal"], SIGNAL_KEYS, f"{name}.actions.signal")
        _only(raw["expect"], EXPECT_KEYS, f"{name}.expect")
        _only(raw["expect"].get("stats", {}), frozenset(STEPS), f"{name}.expect.stats")
        gaps = raw.get("known_gaps", {})
        _only(gaps, frozenset(LANGUAGES), f"{name}.known_gaps")
        scenarios.append(
            Scenario(
                name,
                raw.get("about", "").strip(),
                defaults | request,
                actions,
                raw["expect"],
                {lang: why.strip() for lang, why in gaps.items()},
                route,
            )
        )
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{path.name}: scenario names repeat")
    return scenarios


SCENARIOS: Final = load_scenarios()


# --- the example services, one process per language for the module -------------------------


@dataclass(frozen=True, slots=True)
class Service:
    language: str
    url: str
    log: Path

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int, chars: int = 6000) -> str:
        """What the service logged from `offset` on (one test's share), at most its last `chars`."""
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")[-chars:]


def node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10)
    try:
        return int(version.stdout.strip().lstrip("v").split(".")[0])
    except ValueError:
        return None


def service_command(language: str, port: int) -> tuple[list[str], dict[str, str]]:
    # The service's own failure knob must not leak in from the environment running the tests.
    env = {k: v for k, v in os.environ.items() if k not in ("TRIP_FAIL", "PORT")}
    if language == "python":
        return [
            sys.executable,
            str(ROOT / "examples" / "python" / "trip_service.py"),
            "--port",
            str(port),
        ], env
    major = node_major()
    if major is None or major < 18:
        pytest.skip(
            "Node.js >= 18 is needed for the JavaScript half "
            f"(found {'no node' if major is None else f'node {major}'})"
        )
    node = shutil.which("node")
    assert node is not None
    return [node, str(ROOT / "examples" / "js" / "trip_service.mjs")], env | {"PORT": str(port)}


def wait_until_serving(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/stats", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the service did not start within 15 s:\n{log.read_text()}")


@pytest.fixture(scope="module", params=LANGUAGES)
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    language: str = request.param
    port = free_port()
    command, env = service_command(language, port)
    log = tmp_path_factory.mktemp(f"service-{language}") / "service.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until_serving(proc, url, log)
        yield Service(language, url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def routes(upstream: str, durable: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "name": "trips",
            "path": "/trips",
            "upstream": upstream,
            "durable": True,
            "hold": "10s",
            "retry": {"attempts": 3, "initial": "50ms"},
            **(durable or {}),
        },
        # The insurer, invoked by ?insure as a child run (step.invoke).
        {"name": "insurance", "path": "/insurance", "upstream": upstream, "durable": True},
        {"name": "stats", "path": "/stats", "methods": ["GET"], "upstream": upstream},
    ]


# --- the runner ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    elapsed: float


async def get_json(gw: Running, url: str) -> Any:
    async with gw.session.get(url) as resp:
        assert resp.status == 200, f"GET {url}: {resp.status} {await resp.text()}"
        return await resp.json()


async def send(gw: Running, request: Mapping[str, Any]) -> Answer:
    started = time.monotonic()
    query = {k: v if isinstance(v, list) else str(v) for k, v in request["query"].items()}
    async with gw.session.request(
        request["method"],
        gw.url + request["path"],
        params=query,
        headers=request["headers"],
        json=request["body"],
        allow_redirects=False,  # a 303 is an answer to check, not follow
    ) as resp:
        raw = await resp.read()
        elapsed = time.monotonic() - started
        headers = {name.lower(): value for name, value in resp.headers.items()}
        kind = headers.get("content-type", "")
        body = await resp.json(content_type=None) if "json" in kind and raw else raw.decode()
        return Answer(resp.status, headers, body, elapsed)


async def only_run(gw: Running) -> dict[str, Any] | None:
    runs = (await get_json(gw, gw.internal + "/v1/runs?route=trips"))["runs"]
    assert len(runs) <= 1, f"one request made {len(runs)} runs"
    return runs[0] if runs else None


async def perform(action: Mapping[str, Any], gw: Running, refs: dict[str, Any]) -> None:
    if "pause" in action:
        await asyncio.sleep(float(action["pause"]))
    elif "wait_for_run" in action:
        wanted, deadline, run = action["wait_for_run"], time.monotonic() + 10, None
        while time.monotonic() < deadline:
            run = await only_run(gw)
            if run is not None and run["status"] == wanted:
                refs["run_id"] = run["id"]
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the run did not become {wanted!r} within 10 s: {run}")
    elif "run_status" in action:
        run = await only_run(gw)
        assert run is not None and run["status"] == action["run_status"], run
        refs["run_id"] = run["id"]
    elif "event" in action:
        event = resolve(action["event"], refs)
        async with gw.session.post(
            gw.internal + "/v1/events", json={"name": event["name"], "data": event.get("data")}
        ) as resp:
            assert resp.status == 202, await resp.text()
            sent = await resp.json()
        if "woke" in event:
            assert sent["woke"] == event["woke"], f"event {event}: woke {sent['woke']}"
    elif "signal" in action:
        signal = resolve(action["signal"], refs)
        # The URL as the run's timeline shows it (the service "mails" the same one).
        run = await get_json(gw, f"{gw.internal}/v1/runs/{refs['run_id']}")
        (url,) = [step["url"] for step in run["steps"] if step["id"] == signal["step"]]
        async with gw.session.post(gw.url + url, json=signal.get("body")) as resp:
            wanted = signal.get("status", 202)
            assert resp.status == wanted, f"signal {signal}: {resp.status} {await resp.text()}"


async def stats(gw: Running) -> dict[str, int]:
    counts = await get_json(gw, gw.url + "/stats")  # through the gateway's plain route
    return {name: counts[name] for name in STEPS}


async def run_scenario(scenario: Scenario, gw: Running) -> list[str]:
    """Everything about one scenario that differs from its expectations."""
    before = await stats(gw)
    refs: dict[str, Any] = {}
    pending = asyncio.create_task(send(gw, scenario.request), name=f"request {scenario.name}")
    try:
        for action in scenario.actions:
            await perform(action, gw, refs)
        answer = await pending
    finally:
        if not pending.done():  # an action failed: do not leave the request behind
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    after = await stats(gw)

    run_id = answer.headers.get("stepgate-run-id")
    if run_id is None:
        return [f"no Stepgate-Run-Id on the answer: {answer}"]
    if refs.setdefault("run_id", run_id) != run_id:
        return [f"the answer is about run {run_id}, the actions saw run {refs['run_id']}"]
    run = await get_json(gw, f"{gw.internal}/v1/runs/{run_id}")
    refs["steps"] = {step["id"]: step for step in run["steps"]}

    expect = scenario.expect
    problems = []
    if "status" in expect and (why := check(answer.status, expect["status"])):
        problems.append(f"status: {why}; body: {answer.body!r}")
    if "headers" in expect:
        wanted = {name.lower(): value for name, value in expect["headers"].items()}
        problems += check_all(answer.headers, wanted, refs, "headers")
    problems += check_all(answer.body, expect.get("body", {}), refs, "body")
    if "elapsed" in expect and (why := check(answer.elapsed, expect["elapsed"])):
        problems.append(f"elapsed: {why}")
    if "stats" in expect:
        delta = {name: after[name] - before[name] for name in STEPS}
        # A step the scenario leaves out must not have run.
        wanted = {name: expect["stats"].get(name, 0) for name in STEPS}
        if not json_equal(delta, wanted):
            problems.append(f"stats: ran {delta}, expected {wanted}")
    summary = {k: v for k, v in run.items() if k not in ("attempts", "steps")}
    problems += check_all(summary, expect.get("run", {}), refs, "run")
    if "attempts" in expect:
        problems += check_list(run["attempts"], expect["attempts"], refs, "attempts")
    if "steps" in expect:
        problems += check_list(run["steps"], expect["steps"], refs, "steps")
    if problems:
        problems.append(f"(the run as the admin API shows it: {run})")
    return problems


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario(
    scenario: Scenario, service: Service, gateway: GatewayFactory, request: pytest.FixtureRequest
) -> None:
    if (gap := scenario.known_gaps.get(service.language)) is not None:
        # Strict: once the SDK is fixed the suite fails until the gap is struck from the data.
        request.applymarker(pytest.mark.xfail(reason=f"known gap: {gap}", strict=True))
    gw = await gateway(routes(service.url, scenario.route))
    logged = service.log_size()
    problems = await run_scenario(scenario, gw)
    assert not problems, (
        f"{service.language}: {scenario.name} — {scenario.about}\n  "
        + "\n  ".join(problems)
        + f"\n--- the {service.language} service's log meanwhile ---\n"
        + service.log_since(logged)
    )
