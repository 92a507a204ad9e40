"""Several gateways on one PostgreSQL (issue 11, DESIGN.md "Several gateways on one
PostgreSQL"): three real gateway processes A, B and C share the store, each in front of its own
upstream (tests/replicas/conftest.py). Every endpoint answers the same on every replica; a
replica killed with SIGKILL has its runs finished by the others, and no acknowledged step runs
again."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.replicas.conftest import LEASE, NAMES, SLEEP, TOKEN, Cluster

Answer = tuple[int, dict[str, str], Any]


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait for `condition` (checked every 20 ms) for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


async def read(resp: aiohttp.ClientResponse) -> Answer:
    text = await resp.text()
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    return resp.status, dict(resp.headers), body


async def start_async(
    cluster: Cluster, name: str, path: str, body: bytes = b"", **headers: str
) -> tuple[str, str]:
    """POST with `Prefer: respond-async` to replica `name`: (run id, poll location)."""
    async with cluster.session.post(
        cluster[name].url + path,
        data=body,
        allow_redirects=False,
        headers={"Prefer": "respond-async", **headers},
    ) as resp:
        status, hdrs, answer = await read(resp)
    assert status == 202, (status, answer)
    assert hdrs["Preference-Applied"] == "respond-async"
    location = hdrs["Location"]
    assert location.startswith("/_stepgate/runs/"), location
    assert answer["run_id"] == hdrs["Stepgate-Run-Id"]
    assert answer["poll_url"] == location
    return answer["run_id"], location


async def poll(cluster: Cluster, name: str, location: str, wait: float = 0) -> Answer:
    async with cluster.session.get(f"{cluster[name].url}{location}&wait={wait:g}") as resp:
        return await read(resp)


async def final(cluster: Cluster, name: str, location: str, timeout: float) -> Answer:
    """Long-poll replica `name` until the run has ended; its answer."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{location} did not end within {timeout}s (asked {name})"
        status, headers, body = await poll(cluster, name, location, wait=min(left, 10))
        if status != 202:
            return status, headers, body


async def held(
    cluster: Cluster,
    name: str,
    location: str,
    request: Callable[[aiohttp.ClientSession], Awaitable[Answer]],
) -> asyncio.Task[tuple[Answer, float]]:
    """Start `request` (a long-poll or a hold on replica `name`) and return once replica `name`
    is serving it: its headers are sent, and a later poll of the same run on that replica has
    been answered 202 (the run is still pending). The task gives the answer and its time."""
    sent = asyncio.Event()

    async def on_sent(*_: object) -> None:
        sent.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_sent)

    async def go() -> tuple[Answer, float]:
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            answer = await request(session)
            return answer, time.monotonic()

    task = asyncio.create_task(go())
    await asyncio.wait_for(sent.wait(), 5)
    status, _, body = await poll(cluster, name, location)
    assert status == 202, (status, body)
    assert not task.done()
    return task


async def run_status(cluster: Cluster, name: str, run_id: str) -> str:
    status, run = await cluster.admin(name, "GET", f"/v1/runs/{run_id}")
    assert status == 200, run
    return str(run["status"])


async def test_a_poll_url_is_answered_by_every_replica(cluster: Cluster) -> None:
    ledger = cluster.ledger
    run_id, location = await start_async(cluster, "A", "/jobs/gated/poll", b"p")
    await asyncio.wait_for(ledger.event(ledger.entered, "poll").wait(), 10)

    pending = [await poll(cluster, name, location) for name in NAMES]
    for status, headers, body in pending:
        assert status == 202, body
        assert headers["Stepgate-Run-Id"] == run_id
        assert headers["Cache-Control"] == "no-store"
        assert "Retry-After" in headers
        assert body["run_id"] == run_id
        assert (body["status"], body["attempt"]) == ("running", 1)
    wrong = location.split("?token=")[0] + "?token=not-the-token"
    for name in NAMES:
        status, _, _ = await poll(cluster, name, wrong)
        assert status == 404

    ledger.release("poll")
    answers = [await final(cluster, name, location, 10) for name in NAMES]
    for status, headers, body in answers:
        assert status == 200, body
        assert headers["Stepgate-Run-Id"] == run_id
        assert headers["Cache-Control"] == "no-store"
        assert body == {"work": {"key": "poll", "by": "A"}, "body": "p"}
    assert [(i.upstream, i.attempt) for i in ledger.of(run_id)] == [("A", 1)]
    assert ledger.steps_of(run_id) == {"work": 1}


async def test_an_event_posted_to_c_wakes_a_run_parked_by_a(cluster: Cluster) -> None:
    ledger = cluster.ledger
    run_id, location = await start_async(cluster, "A", "/jobs/parked/k2")

    async def parked() -> bool:
        return await run_status(cluster, "A", run_id) == "waiting"

    await until(parked, 10, "the run to park at its wait")
    for name in ("B", "C"):  # every replica's admin API sees the same run
        assert await run_status(cluster, name, run_id) == "waiting"

    for key, woke in (("someone-else", 0), ("k2", 1)):
        status, answer = await cluster.admin(
            "C",
            "POST",
            "/v1/events",
            json={"name": "order.paid", "data": {"key": key, "by": "card"}},
        )
        assert status == 202, answer
        assert answer["woke"] == woke, (key, answer)

    status, headers, body = await final(cluster, "A", location, 10)
    assert status == 200, body
    assert headers["Stepgate-Run-Id"] == run_id
    assert body["before"] == "before by A"
    assert body["paid"] == {"key": "k2", "by": "card"}
    assert body["after"].startswith("after by ")
    invocations = ledger.of(run_id)
    assert [(i.upstream, i.attempt) for i in invocations][:1] == [("A", 1)]
    assert [i.attempt for i in invocations] == [1, 2]  # re-invoked once, by one replica
    assert body["after"] == f"after by {invocations[1].upstream}"
    assert ledger.steps_of(run_id) == {"before": 1, "after": 1}


async def test_a_long_poll_on_b_answers_when_a_ends_the_run(cluster: Cluster) -> None:
    ledger = cluster.ledger
    run_id, location = await start_async(cluster, "A", "/jobs/gated/hold", b"h")
    await asyncio.wait_for(ledger.event(ledger.entered, "hold").wait(), 10)

    async def long_poll(session: aiohttp.ClientSession) -> Answer:
        async with session.get(f"{cluster['B'].url}{location}&wait=10") as resp:
            return await read(resp)

    task = await held(cluster, "B", location, long_poll)
    released = time.monotonic()
    ledger.release("hold")
    (status, headers, body), answered = await asyncio.wait_for(task, 15)
    assert status == 200, body
    assert headers["Stepgate-Run-Id"] == run_id
    assert body == {"work": {"key": "hold", "by": "A"}, "body": "h"}
    # Told by a notification, not by a timer: within about a second of the end on A.
    assert answered - released < 1.0, f"B answered {answered - released:.3f}s after release"
    assert [(i.upstream, i.attempt) for i in ledger.of(run_id)] == [("A", 1)]


async def test_one_idempotency_key_on_a_and_b_gives_one_run(cluster: Cluster) -> None:
    ledger = cluster.ledger
    key = {"Idempotency-Key": "order-4"}
    run_id, location = await start_async(cluster, "A", "/jobs/gated/idem", b"order 4", **key)
    await asyncio.wait_for(ledger.event(ledger.entered, "idem").wait(), 10)

    # B attaches to A's run while it runs.
    again, again_location = await start_async(cluster, "B", "/jobs/gated/idem", b"order 4", **key)
    assert (again, again_location.split("?")[0]) == (run_id, location.split("?")[0])
    # The same key with another request, on C: 422, naming the run.
    async with cluster.session.post(
        cluster["C"].url + "/jobs/gated/idem", data=b"order 5", headers=key, allow_redirects=False
    ) as resp:
        status, headers, body = await read(resp)
    assert status == 422, body
    assert headers["Stepgate-Run-Id"] == run_id

    # A client holding on B (no Prefer: the route's 10 s hold) gets the answer directly.
    async def hold_on_b(session: aiohttp.ClientSession) -> Answer:
        async with session.post(
            cluster["B"].url + "/jobs/gated/idem",
            data=b"order 4",
            headers=key,
            allow_redirects=False,
        ) as resp:
            return await read(resp)

    task = await held(cluster, "B", location, hold_on_b)
    released = time.monotonic()
    ledger.release("idem")
    (status, headers, body), answered = await asyncio.wait_for(task, 15)
    expected = {"work": {"key": "idem", "by": "A"}, "body": "order 4"}
    assert (status, body) == (200, expected)
    assert headers["Stepgate-Run-Id"] == run_id
    assert answered - released < 1.0, f"B answered {answered - released:.3f}s after release"

    # After the end: the recorded response, on every replica.
    for name in NAMES:
        async with cluster.session.post(
            cluster[name].url + "/jobs/gated/idem",
            data=b"order 4",
            headers=key,
            allow_redirects=False,
        ) as resp:
            status, headers, body = await read(resp)
        assert (status, body) == (200, expected), name
        assert headers["Stepgate-Run-Id"] == run_id
    assert [(i.upstream, i.attempt) for i in ledger.invocations] == [("A", 1)]
    assert ledger.steps_of(run_id) == {"work": 1}
    status, listing = await cluster.admin("C", "GET", "/v1/runs")
    assert status == 200
    assert [run["id"] for run in listing["runs"]] == [run_id]


async def test_sigkill_a_mid_step_b_and_c_finish_its_runs(cluster: Cluster) -> None:
    ledger = cluster.ledger
    runs = [await start_async(cluster, "A", f"/jobs/crash/{i}") for i in range(20)]
    await until(lambda: len(ledger.blocked) == 20, 15, "20 runs to block in step two on A")
    assert ledger.blocked == {run_id for run_id, _ in runs}

    cluster["A"].kill()
    killed = time.monotonic()
    answers = await asyncio.gather(
        *(final(cluster, "BC"[i % 2], location, LEASE + 10) for i, (_, location) in enumerate(runs))
    )
    elapsed = time.monotonic() - killed

    for (run_id, _), (status, headers, body) in zip(runs, answers, strict=True):
        assert status == 200, body
        assert headers["Stepgate-Run-Id"] == run_id
        assert body["one"] == "A"  # recorded by A, replayed elsewhere
        assert body["two"] in ("B", "C")
        assert body["three"] == body["two"]
        # `one` was acknowledged before A died: it never ran again. `two` was cut short.
        assert ledger.steps_of(run_id) == {"one": 1, "two": 2, "three": 1}, run_id
        invocations = ledger.of(run_id)
        assert [(i.upstream, i.attempt) for i in invocations] == [("A", 1), (body["two"], 2)]
    assert elapsed < LEASE + 5, f"the last run ended {elapsed:.1f}s after the kill"
    # Not taken over before A's lease could have expired (A renewed it every third of it).
    resumed = min(inv.at for inv in ledger.invocations if inv.attempt == 2) - killed
    assert resumed >= LEASE * 2 / 3 - 0.1, f"taken over {resumed:.2f}s after the kill"

    status, run = await cluster.admin("B", "GET", f"/v1/runs/{runs[0][0]}")
    assert status == 200
    assert run["status"] == "completed"
    assert len(run["attempts"]) == 2
    assert run["attempts"][-1]["outcome"] == "response"
    assert (run["attempts"][0]["outcome"], run["attempts"][0]["error"]) == (
        "interrupted",
        "gateway crashed",
    )
    assert {s["id"]: s["attempts"] for s in run["steps"]} == {"one": 1, "two": 1, "three": 1}


async def test_sleeping_runs_are_each_woken_once(cluster: Cluster) -> None:
    ledger = cluster.ledger
    runs = [await start_async(cluster, NAMES[i % 3], f"/jobs/sleepy/{i}") for i in range(10)]
    answers = await asyncio.gather(
        *(
            final(cluster, NAMES[(i + 1) % 3], location, SLEEP + 10)
            for i, (_, location) in enumerate(runs)
        )
    )

    for i, ((run_id, _), (status, headers, body)) in enumerate(zip(runs, answers, strict=True)):
        assert status == 200, body
        assert headers["Stepgate-Run-Id"] == run_id
        invocations = ledger.of(run_id)
        assert [inv.attempt for inv in invocations] == [1, 2], (run_id, invocations)
        first, woken = invocations
        assert first.upstream == NAMES[i % 3]
        assert woken.at - first.at >= SLEEP - 0.1, "woken before its sleep was over"
        assert body == {"before": first.upstream, "after": woken.upstream}
        assert ledger.steps_of(run_id) == {"before": 1, "after": 1}
        status, run = await cluster.admin(NAMES[(i + 2) % 3], "GET", f"/v1/runs/{run_id}")
        assert status == 200
        assert (run["status"], len(run["attempts"])) == ("completed", 2)


async def stepgate(*args: str) -> tuple[int, str]:
    """Run the `stepgate` command (the venv's console script, else `python -m gateway`)."""
    script = shutil.which("stepgate", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "gateway"]
    proc = await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_stepgate_replicas_lists_the_live_replicas(cluster: Cluster) -> None:
    ledger = cluster.ledger
    ids = {name: Cluster.replica_id(name) for name in NAMES}
    # One run in progress on B, so that its count shows.
    run_id, location = await start_async(cluster, "B", "/jobs/gated/cli")
    await asyncio.wait_for(ledger.event(ledger.entered, "cli").wait(), 10)
    started = time.monotonic()

    async def listing(name: str) -> dict[str, Any]:
        code, out = await stepgate(
            "replicas", "--url", cluster[name].internal, "--token", TOKEN, "--json"
        )
        assert code == 0, out
        result: dict[str, Any] = json.loads(out)
        return result

    listed = await listing("C")
    assert listed["self"] == ids["C"]
    assert listed["lease_s"] == LEASE
    assert {r["id"]: r["runs"] for r in listed["replicas"]} == {
        ids["A"]: 0,
        ids["B"]: 1,
        ids["C"]: 0,
    }

    code, table = await stepgate("replicas", "--url", cluster["B"].internal, "--token", TOKEN)
    assert code == 0, table
    for name in NAMES:
        assert ids[name] in table, table
    assert f"{ids['B']} (this one)" in table, table

    cluster["A"].kill()
    killed = time.monotonic()
    seen: list[set[str]] = []

    async def a_is_gone() -> bool:
        seen.append({r["id"] for r in (await listing("B"))["replicas"]})
        return ids["A"] not in seen[-1]

    await until(a_is_gone, LEASE + 3, "A to leave the listing")
    gone_after = time.monotonic() - killed
    assert seen[-1] == {ids["B"], ids["C"]}
    # Not before its lease could have expired (it renews every third of the lease).
    assert gone_after >= LEASE * 2 / 3 - 0.1, f"A left {gone_after:.2f}s after the kill"
    code, table = await stepgate("replicas", "--url", cluster["C"].internal, "--token", TOKEN)
    assert code == 0, table
    assert ids["A"] not in table and ids["B"] in table and ids["C"] in table, table

    # B's run, invoked for longer than the lease meanwhile, stayed B's: B renews its lease.
    await until(lambda: time.monotonic() - started > 1.5 * LEASE, 2 * LEASE, "1.5 leases")
    ledger.release("cli")
    status, _, body = await final(cluster, "C", location, 10)
    assert (status, body) == (200, {"work": {"key": "cli", "by": "B"}, "body": ""})
    assert [(i.upstream, i.attempt) for i in ledger.of(run_id)] == [("B", 1)]
