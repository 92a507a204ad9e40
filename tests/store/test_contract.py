"""The store contract, straight on the Store interface, for each dialect: what every named
transaction promises, whichever dialect keeps the runs. The PostgreSQL cases also hold two
replicas of one database: leases, take-over and notifications between them."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway import lifecycle
from gateway.auth import attempt_token
from gateway.config import parse_settings
from gateway.model import Outcome, Run, RunStatus, StepKind, StepStatus, UpstreamReply
from gateway.policies import StepPolicy
from gateway.store import (
    AttemptFenced,
    Change,
    DuplicateIdempotencyKey,
    QueueFull,
    StepCall,
    Store,
    UnknownRun,
    WrongToken,
)
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore
from tests.conftest import DIALECTS, empty_pg

ROUTE = parse_settings(
    {
        "routes": [
            {
                "name": "r",
                "path": "/r",
                "upstream": "http://127.0.0.1:9",
                "durable": True,
                "retry": {"attempts": 3, "initial": "10ms", "max": "10ms"},
            }
        ]
    },
    source="test",
).routes[0]

Opener = Callable[..., Awaitable[Store]]


@pytest.fixture(params=DIALECTS)
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens stores of one dialect; on PostgreSQL each is a replica of one emptied database."""
    opened: list[Store] = []
    url = ""
    if request.param == "postgres":
        url = await empty_pg(request.getfixturevalue("pg_database"))

    async def open_one(replica: str = "a", lease: float = 1.0) -> Store:
        store: Store
        if url:
            store = PostgresStore(url, replica_id=replica, lease=lease, durability="relaxed")
        else:
            store = SQLiteStore(str(tmp_path / "contract.db"), durability="relaxed")
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        await store.close()


def new_run(
    run_id: str,
    *,
    status: RunStatus = RunStatus.RUNNING,
    idem: str | None = None,
    due: float | None = None,
) -> Run:
    now = time.time()
    return Run(
        id=run_id,
        route="r",
        status=status,
        attempt=1,
        token=f"secret-{run_id}",
        poll_token="poll",
        method="POST",
        target="/r?q=1",
        headers=[("Content-Type", "text/plain"), ("X-Caf\u00e9", "v")],
        body=b"\x00body",
        created_at=now,
        updated_at=now,
        idem_key=idem,
        due_at=due,
    )


def token(run: Run, attempt: int | None = None) -> str:
    return attempt_token(run.token, run.attempt if attempt is None else attempt)


def answered(attempt: int, status: int = 200) -> Outcome:
    now = time.time()
    reply = UpstreamReply(status, "OK", [("ETag", '"v"')], b"done", False, False, None)
    return Outcome(attempt, now, now, reply, None)


def after(outcome: Outcome) -> Callable[..., lifecycle.AfterAttempt]:
    return lambda run, parked: lifecycle.after_attempt(
        run, outcome, ROUTE, parked, time.time(), random.Random(1)
    )


OUTPUT = StepCall(StepKind.RUN, StepStatus.COMPLETED, 0, output='{"n":1}')


async def test_a_run_reads_back_as_it_was_created(open_store: Opener) -> None:
    store = await open_store()
    run = new_run("r1", idem="k1")
    await store.create_run(run)
    assert await store.get_run("r1") == run
    assert await store.find_idempotent("r", "k1") == run
    assert await store.get_run("nope") is None
    with pytest.raises(DuplicateIdempotencyKey):
        await store.create_run(new_run("r2", idem="k1"))
    assert (await store.count_by_status()) == {"running": 1}


async def test_an_attempt_ends_once_and_a_later_finish_is_fenced(open_store: Opener) -> None:
    store = await open_store()
    await store.create_run(new_run("r1"))
    done = await store.finish_attempt("r1", answered(1), after(answered(1)))
    assert done.decision is not None and done.run.status == RunStatus.COMPLETED
    stored = await store.get_run("r1")
    assert stored is not None and stored.resp_body == b"done"
    assert stored.resp_headers == [("ETag", '"v"')]
    late = await store.finish_attempt("r1", answered(1, 500), after(answered(1, 500)))
    assert late.decision is None  # the run had ended: nothing changed
    assert (await store.get_run("r1")) == stored
    assert [a.n for a in await store.attempts("r1")] == [1]


async def test_steps_first_write_wins_and_only_the_current_attempt_writes(
    open_store: Opener,
) -> None:
    store = await open_store()
    run = new_run("r1")
    await store.create_run(run)
    now = time.time()
    first = await store.put_step("r1", token(run), "s", OUTPUT, now=now, lookback_since=now)
    again = await store.put_step(
        "r1",
        token(run),
        "s",
        StepCall(StepKind.RUN, StepStatus.COMPLETED, 0, output="2"),
        now=now,
        lookback_since=now,
    )
    assert first.created and not again.created and again.step.output == '{"n":1}'
    with pytest.raises(WrongToken):
        await store.put_step("r1", "1.forged", "t", OUTPUT, now=now, lookback_since=now)
    with pytest.raises(UnknownRun):
        await store.put_step("gone", token(run), "t", OUTPUT, now=now, lookback_since=now)
    await store.authenticate("r1", token(run))
    with pytest.raises(WrongToken):
        await store.authenticate("r1", "1.forged")
    # The crash of attempt 1: it is fenced, attempt 2 claims the run and writes.
    recovered = await store.recover(
        lambda r: lifecycle.after_interruption(r, ROUTE, time.time(), crashed=True),
        before=time.time() + 1,
    )
    assert [a.run.status for a in recovered] == [RunStatus.RETRYING]
    claimed = await store.claim("r1", time.time() + 1)
    assert claimed is not None and claimed.attempt == 2
    with pytest.raises(AttemptFenced):
        await store.put_step("r1", token(run, 1), "t", OUTPUT, now=now, lookback_since=now)
    write = await store.put_step("r1", token(claimed), "t", OUTPUT, now=now, lookback_since=now)
    assert write.created
    assert [s.id for s in await store.steps("r1")] == ["s", "t"]
    assert await store.count_steps("r1") == 2


async def test_an_event_completes_a_wait_and_the_lookback_finds_an_early_one(
    open_store: Opener,
) -> None:
    store = await open_store()
    run = new_run("r1")
    await store.create_run(run)
    now = time.time()
    wait = StepCall(
        StepKind.WAIT,
        StepStatus.WAITING,
        0,
        wake_at=now + 60,
        event="paid",
        match='{"data.order":7}',
    )
    await store.put_step("r1", token(run), "w", wait, now=now, lookback_since=now - 60)
    assert await store.deliver_event("e1", "paid", '{"order":8}', now) == []
    assert await store.deliver_event("e2", "paid", '{"order":7}', now) == ["r1"]
    assert await store.deliver_event("e2", "paid", '{"order":7}', now) is None  # seen before
    (step,) = await store.steps("r1")
    assert step.status == StepStatus.COMPLETED and '"e2"' in (step.output or "")
    # An event that came first is found by a wait registered after it.
    early = await store.put_step(
        "r1",
        token(run),
        "w2",
        StepCall(StepKind.WAIT, StepStatus.WAITING, 1, wake_at=now + 60, event="paid", match="{}"),
        now=now,
        lookback_since=now - 60,
    )
    assert early.step.status == StepStatus.COMPLETED


async def test_cancel_retry_and_purge(open_store: Opener) -> None:
    store = await open_store()
    await store.create_run(new_run("r1"))
    cancelled = await store.cancel("r1", time.time())
    assert cancelled is not None and cancelled.status == RunStatus.CANCELLED
    assert await store.cancel("r1", time.time()) is None
    retried = await store.retry_ended("r1", time.time())
    assert retried is not None and retried.status == RunStatus.RETRYING
    assert [run_id for _, run_id in await store.due(time.time() + 1, 10)] == ["r1"]
    await store.cancel("r1", time.time())
    assert await store.purge_ended(time.time() + 1) == 1
    assert await store.get_run("r1") is None


async def test_listing_pages_newest_first(open_store: Opener) -> None:
    store = await open_store()
    for n in range(5):
        await store.create_run(new_run(f"r{n}"))
    first = await store.list_runs(limit=2)
    assert [r.id for r in first.runs] == ["r4", "r3"] and first.next_cursor
    created, run_id = first.next_cursor.split("~")
    rest = await store.list_runs(limit=10, cursor=(float(created), run_id))
    assert [r.id for r in rest.runs] == ["r2", "r1", "r0"] and rest.next_cursor is None
    assert (await store.list_runs(route="other")).runs == []


async def test_this_process_is_a_replica_of_its_store(open_store: Opener) -> None:
    store = await open_store()
    await store.create_run(new_run("r1"))
    (me,) = await store.replicas()
    assert me.id == store.replica_id and me.runs == 1


# --- two replicas of one PostgreSQL database ------------------------------------------------


@pytest.fixture
async def replicas(pg_database: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    url = await empty_pg(pg_database)
    a = PostgresStore(url, replica_id="a", lease=1.0, durability="relaxed")
    b = PostgresStore(url, replica_id="b", lease=1.0, durability="relaxed")
    await a.open()
    await b.open()
    yield a, b
    await b.close()
    await a.close()


async def test_a_replica_hears_of_the_other_ones_changes(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    heard: asyncio.Queue[Change] = asyncio.Queue()
    b.subscribe(heard.put_nowait)
    await a.create_run(new_run("r1"))
    created = await asyncio.wait_for(heard.get(), 5)
    assert (created.run_id, created.status, created.run) == ("r1", RunStatus.RUNNING, None)
    await a.finish_attempt("r1", answered(1), after(answered(1)))
    ended = await asyncio.wait_for(heard.get(), 5)
    assert ended.status == RunStatus.COMPLETED


async def test_the_runs_of_a_replica_whose_lease_expired_are_taken_over_once(
    replicas: tuple[PostgresStore, PostgresStore],
    pg_database: str,
) -> None:
    a, b = replicas
    await a.create_run(new_run("mine"))
    await b.create_run(new_run("theirs"))

    def crashed(run: Run) -> lifecycle.AfterAttempt:
        return lifecycle.after_interruption(run, ROUTE, time.time(), crashed=True)

    assert await a.take_over(crashed) == []  # b renews its lease
    assert {r.id: r.runs for r in await a.replicas()} == {"a": 1, "b": 1}
    # b stops renewing (as a SIGKILLed process would): its lease runs out.
    for task in b._tasks:
        task.cancel()
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(
            "UPDATE replicas SET last_seen = now() - interval '2 seconds' WHERE id = 'b'"
        )
    finally:
        await conn.close()
    assert [r.id for r in await a.replicas()] == ["a"]
    taken = await a.take_over(crashed)
    assert [t.run.id for t in taken] == ["theirs"]
    assert taken[0].run.status == RunStatus.RETRYING and taken[0].run.failures == 1
    assert await a.take_over(crashed) == []  # once
    claimed = await a.claim("theirs", time.time() + 1)
    assert claimed is not None and claimed.attempt == 2
    assert await b.claim("theirs", time.time() + 1) is None  # the timer acts on one replica
    mine = await a.get_run("mine")
    assert mine is not None and mine.status == RunStatus.RUNNING


async def test_a_step_write_waits_for_an_attempt_end_in_progress_and_is_then_fenced(
    replicas: tuple[PostgresStore, PostgresStore], pg_database: str
) -> None:
    """Forced interleaving: another replica has locked the run to end attempt 1 (it moves the
    run on to attempt 2) and has not committed yet, when attempt 1 records a step in one
    statement. The statement must wait for that commit and then refuse the stale attempt;
    reading the last committed row instead would record a step of a superseded attempt."""
    a, _ = replicas
    run = await a.create_run(new_run("r1"))  # a keeps the run's secret: the one-statement path
    other = await asyncpg.connect(pg_database)
    try:
        ending = other.transaction()
        await ending.start()
        await other.execute("SELECT 1 FROM runs WHERE id = 'r1' FOR UPDATE")
        await other.execute("UPDATE runs SET attempt = 2 WHERE id = 'r1'")
        write = asyncio.ensure_future(
            a.put_step("r1", token(run), "s1", OUTPUT, now=time.time(), lookback_since=0)
        )
        await asyncio.sleep(0.3)
        assert not write.done(), "the step write did not wait for the run's lock"
        await ending.commit()
        with pytest.raises(AttemptFenced):
            await asyncio.wait_for(write, 10)
    finally:
        await other.close()
    assert await a.steps("r1") == []


async def test_a_wait_and_its_event_cannot_miss_each_other_across_replicas(
    replicas: tuple[PostgresStore, PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forced interleaving: replica a's new wait has looked back (no event yet) and is paused
    before it commits; replica b delivers the event meanwhile. Under READ COMMITTED alone b
    would not see the uncommitted wait and a would not see b's event: the wake-up would be
    lost. The advisory lock on the event's name makes b wait for a's commit."""
    a, b = replicas
    run = new_run("r1")
    await a.create_run(run)
    looked = asyncio.Event()
    go_on = asyncio.Event()
    lookback = PostgresStore._lookback

    async def paused(*args: object) -> StepCall:
        call = await lookback(*args)  # type: ignore[arg-type]
        looked.set()
        await go_on.wait()
        return call

    monkeypatch.setattr(a, "_lookback", paused)
    now = time.time()
    wait = StepCall(StepKind.WAIT, StepStatus.WAITING, 0, wake_at=now + 60, event="paid")
    writing = asyncio.create_task(
        a.put_step("r1", token(run), "w", wait, now=now, lookback_since=now - 60)
    )
    await asyncio.wait_for(looked.wait(), 5)
    delivering = asyncio.create_task(b.deliver_event("e1", "paid", "{}", time.time()))
    await asyncio.sleep(0.3)
    assert not delivering.done()  # held until the wait is committed
    go_on.set()
    assert (await writing).step.status == StepStatus.WAITING
    assert await delivering == ["r1"]
    (step,) = await a.steps("r1")
    assert step.status == StepStatus.COMPLETED


# -- flow control (gateway.flow) ---------------------------------------------------------------

LIMITED = parse_settings(
    {
        "routes": [
            {**{"name": "r", "path": "/r", "upstream": "http://127.0.0.1:9", "durable": True},
             "concurrency": 1, "queue_limit": 2}
        ]
    },
    source="test",
).routes[0]  # fmt: skip


def limited(store: Store) -> Store:
    store.route_of = {"r": LIMITED}.get
    return store


def flow_run(run_id: str, created: float) -> Run:
    return new_run(run_id).but(slot_key="", created_at=created, updated_at=created)


async def test_a_freed_slot_goes_to_the_run_waiting_longest(open_store: Opener) -> None:
    store = limited(await open_store())
    heard: list[Change] = []
    store.subscribe(heard.append)
    now = time.time()
    first = await store.create_run(flow_run("r1", now))
    second = await store.create_run(flow_run("r2", now + 1))
    third = await store.create_run(flow_run("r3", now + 2))
    assert [r.status for r in (first, second, third)] == [RunStatus.RUNNING] + [
        RunStatus.QUEUED
    ] * 2
    with pytest.raises(QueueFull):  # two queued: its queue_limit
        await store.create_run(flow_run("r4", now + 3))
    assert await store.get_run("r4") is None
    assert await store.count_queued() == {"r": 2}
    heard.clear()
    await store.finish_attempt("r1", answered(1), after(answered(1)))
    started = [change for change in heard if change.started]
    assert [(c.run_id, c.status) for c in started] == [("r2", RunStatus.RUNNING)]
    r2 = await store.get_run("r2")
    assert r2 is not None and (r2.status, r2.attempt) == (RunStatus.RUNNING, 1)
    # A cancelled run that held the slot frees it too; the last one starts.
    heard.clear()
    await store.cancel("r2", time.time())
    assert [c.run_id for c in heard if c.started] == ["r3"]
    assert await store.count_queued() == {}


async def test_a_run_waiting_for_a_slot_is_not_claimed_and_a_stopping_gateway_starts_none(
    open_store: Opener,
) -> None:
    store = limited(await open_store())
    now = time.time()
    await store.create_run(flow_run("r1", now))
    await store.create_run(flow_run("r2", now + 1))
    assert await store.claim("r2", time.time() + 60) is None  # no due time: it waits
    store.start_promoted = False  # the gateway is stopping: nobody would send it
    await store.finish_attempt("r1", answered(1), after(answered(1)))
    r2 = await store.get_run("r2")
    assert r2 is not None and r2.status == RunStatus.QUEUED and r2.due_at is not None
    assert [run_id for _, run_id in await store.due(time.time() + 1, 10)] == ["r2"]
    claimed = await store.claim("r2", time.time() + 1)  # the next start's scheduler does
    assert claimed is not None and (claimed.status, claimed.attempt) == (RunStatus.RUNNING, 1)


async def test_two_replicas_admitting_at_once_count_one_limit(
    replicas: tuple[PostgresStore, PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forced interleaving: replica a has counted a free slot for its new run and is paused
    before it inserts the run; replica b admits another run meanwhile. Under READ COMMITTED
    alone b would count the same free slot and both would run. The flow's advisory lock makes
    b wait for a's commit, then count a's run and queue behind it."""
    a, b = (limited(store) for store in replicas)
    counted = asyncio.Event()
    go_on = asyncio.Event()
    admit = PostgresStore._admit

    async def paused(self: PostgresStore, *args: object) -> Run:
        admitted = await admit(self, *args)  # type: ignore[arg-type]
        counted.set()
        await go_on.wait()
        return admitted

    monkeypatch.setattr(a, "_admit", paused.__get__(a))
    now = time.time()
    creating = asyncio.create_task(a.create_run(flow_run("r1", now)))
    await asyncio.wait_for(counted.wait(), 5)
    competing = asyncio.create_task(b.create_run(flow_run("r2", now + 1)))
    await asyncio.sleep(0.3)
    assert not competing.done()  # held until a's run is committed
    go_on.set()
    assert (await creating).status == RunStatus.RUNNING
    assert (await competing).status == RunStatus.QUEUED


# --- step policies (protocol v1.1) -----------------------------------------------------------


async def test_a_policy_counts_a_steps_attempts_and_makes_it_final(open_store: Opener) -> None:
    """The count is the store's: each failed attempt under a policy is counted in the write's
    transaction, the one that reaches `attempts` makes the step final, and a final step keeps
    its record whatever is written next. The end of each attempt sees the failure (the rule
    gets it with the parked steps) and retries on the step's back-off."""
    store = await open_store()
    await store.create_run(new_run("r1"))
    policy = StepPolicy(attempts=2, initial=0.01, max=0.02, multiplier=2.0)
    failed = StepCall(StepKind.RUN, StepStatus.FAILED, 0, error='{"message":"no"}', policy=policy)
    now = time.time()
    run = await store.get_run("r1")
    assert run is not None
    first = await store.put_step("r1", token(run), "s", failed, now=now, lookback_since=now)
    assert (first.step.attempts, first.step.final, first.step.failed_in) == (1, False, 1)
    seen: list[list[str]] = []

    def rule(stored: Run, steps: list[Any]) -> lifecycle.AfterAttempt:
        seen.append([step.id for step in steps])
        return after(answered(stored.attempt, 500))(stored, steps)

    ended = await store.finish_attempt("r1", answered(1, 500), rule)
    assert seen == [["s"]]
    assert ended.retry_reason == "step_policy"
    assert ended.run.failures == 0  # the route's budget is untouched
    claimed = await store.claim("r1", time.time() + 1)
    assert claimed is not None and claimed.attempt == 2
    second = await store.put_step("r1", token(claimed), "s", failed, now=now, lookback_since=now)
    assert (second.step.attempts, second.step.final, second.step.failed_in) == (2, True, 2)
    again = await store.put_step("r1", token(claimed), "s", OUTPUT, now=now, lookback_since=now)
    assert not again.created and again.step.final and again.step.status == StepStatus.FAILED
    retried = await store.finish_attempt("r1", answered(2, 500), rule)
    assert retried.delay == 0.0  # final: at once, for the handler to catch it
    # An operator's retry of the ended run gives the step its attempts again.
    await store.cancel("r1", time.time())
    assert await store.retry_ended("r1", time.time()) is not None
    (step,) = await store.steps("r1")
    assert (step.final, step.attempts, step.status) == (False, 0, StepStatus.FAILED)
    assert step.error == '{"message":"no"}'


async def test_an_event_step_is_recorded_once(open_store: Opener) -> None:
    store = await open_store()
    await store.create_run(new_run("r1"))
    run = await store.get_run("r1")
    assert run is not None
    now = time.time()
    sent = StepCall(StepKind.EVENT, StepStatus.COMPLETED, 0, output='{"id":"a","name":"e"}')
    first = await store.put_step("r1", token(run), "e", sent, now=now, lookback_since=now)
    other = StepCall(StepKind.EVENT, StepStatus.COMPLETED, 0, output='{"id":"b","name":"e"}')
    second = await store.put_step("r1", token(run), "e", other, now=now, lookback_since=now)
    assert first.created and not second.created
    assert second.step.output == '{"id":"a","name":"e"}'
    assert second.step.kind == StepKind.EVENT and second.step.attempts == 0


# -- signals and child runs (step.signal, step.invoke) -------------------------------------------


def signal_call(signal_id: str, secret: str, wake_at: float) -> StepCall:
    return StepCall(
        StepKind.SIGNAL,
        StepStatus.WAITING,
        0,
        wake_at=wake_at,
        signal_id=signal_id,
        signal_token=secret,
    )


async def test_a_signal_is_kept_with_its_step_and_delivered_once(open_store: Opener) -> None:
    store = await open_store()
    run = new_run("r1")
    await store.create_run(run)
    now = time.time()
    first = await store.put_step(
        "r1",
        token(run),
        "approve",
        signal_call("sig-1", "secret-1", now + 60),
        now=now,
        lookback_since=now,
    )
    # A repeated PUT keeps the first id and secret (the call's new ones are not kept).
    again = await store.put_step(
        "r1",
        token(run),
        "approve",
        signal_call("sig-2", "secret-2", now + 99),
        now=now,
        lookback_since=now,
    )
    assert first.signal == again.signal == ("sig-1", "secret-1")
    assert not again.created and again.step.wake_at == now + 60
    ref = await store.find_signal("sig-1")
    assert ref is not None and (ref.run_id, ref.step_id, ref.token) == ("r1", "approve", "secret-1")
    assert await store.find_signal("sig-2") is None
    assert set(await store.signals("r1")) == {"approve"}

    assert await store.deliver_signal("sig-1", "secret-x", '{"ok":true}', now) is None
    assert await store.deliver_signal("nope", "secret-1", '{"ok":true}', now) is None
    assert await store.deliver_signal("sig-1", "secret-1", '{"ok":true}', now) == "deliver"
    assert await store.deliver_signal("sig-1", "secret-1", '{"ok":false}', now) == "done"
    (step,) = await store.steps("r1")
    assert (step.status, step.output) == (StepStatus.COMPLETED, '{"ok":true}')
    # Delivered while the attempt runs: the run is woken as soon as it parks.
    stored = await store.get_run("r1")
    assert stored is not None and stored.wake_pending


async def test_a_signal_past_its_time_out_or_of_an_ended_run_is_not_delivered(
    open_store: Opener,
) -> None:
    store = await open_store()
    runs = [new_run("r1"), new_run("r2")]
    now = time.time()
    for n, run in enumerate(runs):
        await store.create_run(run)
        call = signal_call(f"sig-{n}", "s", now - 1 if n == 0 else now + 60)
        await store.put_step(run.id, token(run), "approve", call, now=now, lookback_since=now)
    await store.cancel("r2", now)
    assert await store.deliver_signal("sig-0", "s", "1", now) == "done"  # timed out
    assert await store.deliver_signal("sig-1", "s", "1", now) == "ended"
    assert [s.status for s in await store.steps("r1")] == [StepStatus.WAITING]


def suspended(attempt: int) -> Outcome:
    now = time.time()
    reply = UpstreamReply(202, "Accepted", [], b"", True, False, None)
    return Outcome(attempt, now, now, reply, None)


def child_of(child_id: str) -> StepCall:
    return StepCall(StepKind.INVOKE, StepStatus.WAITING, 0, child=new_run(child_id))


async def test_a_child_run_is_created_once_and_its_end_completes_the_parents_step(
    open_store: Opener,
) -> None:
    store = await open_store()
    parent = new_run("p")
    await store.create_run(parent)
    now = time.time()
    first = await store.put_step(
        "p", token(parent), "book", child_of("c1"), now=now, lookback_since=now
    )
    again = await store.put_step(
        "p", token(parent), "book", child_of("c2"), now=now, lookback_since=now
    )
    assert first.started is not None and first.started.id == "c1" and first.child_id == "c1"
    assert again.started is None and again.child_id == "c1"
    assert await store.get_run("c2") is None
    up, down = await store.links("p")
    assert up is None and [(link.child_id, link.step_id) for link in down] == [("c1", "book")]
    up, down = await store.links("c1")
    assert up is not None and (up.parent_id, up.step_id) == ("p", "book") and down == []

    # The parent parks on its child; the child's end completes the step and wakes the parent.
    parked = await store.finish_attempt("p", suspended(1), after(suspended(1)))
    assert parked.run.status == RunStatus.WAITING and parked.run.due_at is None
    child = await store.get_run("c1")
    assert child is not None
    await store.finish_attempt("c1", answered(1), after(answered(1)))
    (step,) = await store.steps("p")
    assert step.status == StepStatus.COMPLETED and step.output is not None
    woken = await store.get_run("p")
    assert woken is not None and woken.due_at is not None


async def test_a_failed_child_fails_the_step_for_good(open_store: Opener) -> None:
    store = await open_store()
    parent = new_run("p")
    await store.create_run(parent)
    now = time.time()
    await store.put_step("p", token(parent), "book", child_of("c1"), now=now, lookback_since=now)
    await store.finish_attempt("c1", answered(1, 404), after(answered(1, 404)))
    (step,) = await store.steps("p")
    assert step.status == StepStatus.FAILED and step.final
    assert step.error is not None and '"status":404' in step.error


async def test_cancelling_a_run_cancels_its_children_and_theirs(open_store: Opener) -> None:
    store = await open_store()
    now = time.time()
    runs = {name: new_run(name) for name in ("p", "c", "g")}
    await store.create_run(runs["p"])
    await store.put_step("p", token(runs["p"]), "a", child_of("c"), now=now, lookback_since=now)
    child = await store.get_run("c")
    assert child is not None
    await store.put_step("c", token(child), "b", child_of("g"), now=now, lookback_since=now)
    heard: list[str] = []
    store.subscribe(lambda change: heard.append(f"{change.run_id}:{change.status}"))
    assert await store.cancel("p", now) is not None
    statuses = {name: (await store.get_run(name)) for name in runs}
    assert {name: run.status for name, run in statuses.items() if run} == dict.fromkeys(
        runs, RunStatus.CANCELLED
    )
    assert {"p:cancelled", "c:cancelled", "g:cancelled"} <= set(heard)
