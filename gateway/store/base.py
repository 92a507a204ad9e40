"""The store interface: one method per named transaction, and the notification of committed
changes.

A dialect (SQLite, PostgreSQL) implements these; the domain rules they apply inside
their transactions are the pure functions of `gateway.lifecycle` and `gateway.store.rules`.
Every transition is a compare-and-set on the stored run: it reads the run, lets the rule decide
on that, and writes the result in the same transaction, so concurrent callers can never undo
each other. After a commit that changed a run the store tells its listeners (`subscribe`), and
only then does the caller get its answer: a waiter woken by a notification always finds the
change when it reads.

Errors:

    GatewayError
    └── StoreError               the store failed or refused a write (503 material)
        ├── DuplicateIdempotencyKey
        └── StoreLocked          another gateway process serves this store
    └── Refused                  a transaction's answer to a caller that may not do this
        ├── QueueFull            the route's queue is at its queue_limit; no run was created
        ├── UnknownRun
        ├── WrongToken
        └── AttemptFenced        run, attempt: a callback from a superseded attempt
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.auth import token_attempt, token_valid
from gateway.config import Rate, Route
from gateway.errors import GatewayError, StoreError
from gateway.flow import allowed
from gateway.lifecycle import AfterAttempt
from gateway.model import Attempt, Outcome, Run, RunHead, RunStatus, Step
from gateway.store.rows import RUN_COLUMNS
from gateway.store.rules import SignalVerdict, StepCall, StepWrite, fenced


class DuplicateIdempotencyKey(StoreError):
    """A run with this (route, Idempotency-Key) exists already."""


class StoreLocked(StoreError):
    """Another live gateway process serves this store."""


class Refused(GatewayError):
    """A transaction refused its caller; nothing was written."""


class UnknownRun(Refused):
    pass


class QueueFull(Refused):
    """A new run would have queued beyond its route's queue_limit; nothing was written."""


class WrongToken(Refused):
    pass


class AttemptFenced(Refused):
    """A callback came from an attempt that is not the run's current running attempt."""

    def __init__(self, run: Run | RunHead, attempt: int) -> None:
        super().__init__(f"attempt {attempt} of run {run.id} was superseded")
        self.run = run
        self.attempt = attempt


AnyRun = TypeVar("AnyRun", Run, RunHead)


def authorize_callback(run: AnyRun | None, run_id: str, token: str) -> tuple[AnyRun, int]:
    """The run and attempt a callback's token speaks for, or the refusal (every dialect asks
    this inside its transaction, on the run it just read)."""
    if run is None:
        raise UnknownRun(run_id)
    attempt = token_attempt(token)
    if attempt is None or attempt > run.attempt or not token_valid(run.token, token, attempt):
        raise WrongToken(run_id)
    if fenced(run, attempt):
        raise AttemptFenced(run, attempt)
    return run, attempt


@dataclass(frozen=True, slots=True)
class Change:
    """A committed change to a run. `run` is the run as committed when this process committed
    it; a change another replica committed comes as its id, status and due time only."""

    run_id: str
    status: RunStatus
    due_at: float | None
    run: Run | None
    # The store started this run's next invocation itself, for this process to send: a slot
    # freed in a transaction went to the run waiting longest for it (gateway.flow).
    started: bool = False


@dataclass(frozen=True, slots=True)
class Replica:
    """A gateway process serving the store: its lease is renewed, its runs counted."""

    id: str
    started_at: float
    last_seen: float
    runs: int  # running invocations it owns


@dataclass(slots=True)
class RunPage:
    runs: list[Run] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class SignalRef:
    """A signal step's public id, where it lives, and its secret."""

    id: str
    run_id: str
    step_id: str
    token: str


@dataclass(frozen=True, slots=True)
class Link:
    """A child run and the parent's invoke step that started it."""

    child_id: str
    parent_id: str
    step_id: str


Listener = Callable[[Change], None]
# The route a run belongs to as configured now (flow control reads its limits), or None.
RouteLookup = Callable[[str], Route | None]
# Decides a run's fate after an attempt from the run as stored and its parked steps.
AttemptRule = Callable[[Run, Sequence[Step]], AfterAttempt]
InterruptRule = Callable[[Run], AfterAttempt]


class Store(abc.ABC):
    """What the gateway needs from a run store. Every method is safe to call concurrently."""

    # Run secrets never change, so the ones callbacks use are kept to check tokens without
    # a read; enough for every run in flight on a busy gateway, a few hundred KiB.
    SECRETS_KEPT = 4096

    # This process's name among the replicas of a shared store; how long one may go without
    # renewing its lease (None: the store is this process's alone, as an SQLite file is).
    replica_id: str = "local"
    lease: float | None = None
    # Told how long each write transaction took (the store_write_duration metric).
    write_observer: Callable[[float], None] | None = None
    # Rate-limit buckets of a store that is this process's alone, by name: their `tat`.
    RATE_BUCKETS_KEPT = 100_000

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._secrets: OrderedDict[str, str] = OrderedDict()
        self.started_at = time.time()
        # Whether changes committed elsewhere are heard of as they happen (see `subscribe`);
        # while they are not, waiters read the store instead.
        self.live_notifications = True
        # The routes as configured now: whose runs are flow-controlled (the engine sets it).
        self.route_of: RouteLookup = lambda name: None
        # Whether a freed slot starts the next run's invocation at once (the engine sends it),
        # or leaves it queued and due, for a claim; false once the gateway is stopping.
        self.start_promoted = True
        self._rate_buckets: OrderedDict[str, float] = OrderedDict()

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(change)` after every committed change to a run, this process's own
        (with the run as committed) and, on a shared store, other replicas' too."""
        self._listeners.append(listener)

    def _changed(self, run: Run, *, started: bool = False) -> None:
        if run.status == RunStatus.RUNNING:
            self._remember_secret(run.id, run.token)  # its callbacks come next: no read for it
        self._told(Change(run.id, run.status, run.due_at, run, started))

    def _given(self, runs: Sequence[Run]) -> None:
        """Tell of the runs a freed slot went to: started here, or queued for their turn."""
        for run in runs:
            self._changed(run, started=run.status == RunStatus.RUNNING)

    def _told(self, change: Change) -> None:
        for listener in self._listeners:
            listener(change)

    # -- lifetime ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def checkpoint(self) -> None:
        """Housekeeping of the dialect's own files (SQLite folds its WAL back)."""

    @abc.abstractmethod
    async def writable(self) -> bool:
        """Whether a write can be committed now (for /readyz)."""

    # -- reads: each sees every write acknowledged before it started --------------------------

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> Run | None: ...

    @abc.abstractmethod
    async def find_idempotent(self, route: str, key: str) -> Run | None: ...

    @abc.abstractmethod
    async def steps(self, run_id: str) -> list[Step]: ...

    @abc.abstractmethod
    async def count_steps(self, run_id: str) -> int: ...

    @abc.abstractmethod
    async def attempts(self, run_id: str) -> list[Attempt]: ...

    async def list_runs(
        self,
        *,
        status: str | None = None,
        route: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: tuple[float, str] | None = None,
    ) -> RunPage:
        """Runs newest first, filtered; `cursor` continues where a page's `next_cursor` ended."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("status = ?", status),
            ("route = ?", route),
            ("created_at >= ?", since),
            ("created_at < ?", until),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        if cursor is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [cursor[0], cursor[0], cursor[1]]
        sql = f"SELECT {RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        found = await self._select_runs(sql, params)
        page = RunPage(runs=found[:limit])
        if len(found) > limit:
            last = found[limit - 1]
            page.next_cursor = f"{last.created_at!r}~{last.id}"
        return page

    @abc.abstractmethod
    async def _select_runs(self, sql: str, params: Sequence[Any]) -> list[Run]:
        """The runs a SELECT of RUN_COLUMNS finds (`?` placeholders)."""

    @abc.abstractmethod
    async def count_by_status(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def count_queued(self) -> dict[str, int]:
        """Queued runs by route (routes with none are left out)."""

    @abc.abstractmethod
    async def due(
        self, before: float, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[float, str]]:
        """(due_at, run id) of parked runs due before `before`, soonest first (ties by id);
        only those that come after `after` in that order, when given."""

    # -- transactions --------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_run(self, run: Run) -> Run:
        """Record a new run, running, or queued when its route's flow control says it must wait
        (raises DuplicateIdempotencyKey, QueueFull); the run as recorded."""

    @abc.abstractmethod
    async def promote_waiting(self, now: float) -> int:
        """Give the runs that wait for a slot the slots that are free under the routes' limits
        as configured now (after a start, or a reload that raised or removed a limit); how
        many were given one."""

    async def rate_limit(self, name: str, rate: Rate, now: float) -> float:
        """Take one request from the token bucket `name`: 0 when allowed, else the seconds
        until it would be. A store that is this process's alone keeps its buckets in memory."""
        buckets = self._rate_buckets
        wait, tat = allowed(rate, buckets.get(name), now)
        if tat is not None:
            buckets[name] = tat
            buckets.move_to_end(name)
            if len(buckets) > self.RATE_BUCKETS_KEPT:
                # Bounded under a flood of key values: the bucket used longest ago goes, and
                # its key starts again with a full one.
                buckets.popitem(last=False)
        return wait

    @abc.abstractmethod
    async def recover(self, rule: InterruptRule, *, before: float) -> list[AfterAttempt]:
        """Fence, with `rule`, every attempt still running that started before `before` (a
        gateway that is gone left it so)."""

    @abc.abstractmethod
    async def claim(self, run_id: str, now: float) -> Run | None:
        """Start the next attempt of a parked run that is due: its due sleeps and timed-out
        waits complete, it becomes running with attempt + 1. None: not due, or not parked."""

    @abc.abstractmethod
    async def finish_attempt(
        self, run_id: str, outcome: Outcome, rule: AttemptRule
    ) -> AfterAttempt:
        """Record the end of an attempt and apply `rule` to the run as stored."""

    @abc.abstractmethod
    async def put_step(
        self,
        run_id: str,
        token: str,
        step_id: str,
        call: StepCall,
        *,
        now: float,
        lookback_since: float,
    ) -> StepWrite:
        """Record a step for the attempt the token belongs to (raises UnknownRun, WrongToken,
        AttemptFenced). A new wait is completed at once by a matching event of the look-back."""

    async def take_over(self, rule: InterruptRule) -> list[AfterAttempt]:
        """Fence the running attempts of replicas whose lease has expired (nothing to do where
        the store has one process)."""
        return []

    async def replicas(self) -> list[Replica]:
        """The live replicas of the store; one process alone is its only one."""
        running = (await self.count_by_status()).get(RunStatus.RUNNING, 0)
        return [Replica(self.replica_id, self.started_at, time.time(), running)]

    async def authenticate(self, run_id: str, token: str) -> None:
        """Whether `token` is one the gateway minted for some attempt of the run (raises
        UnknownRun, WrongToken), asked before a callback's body is read. It does not say the
        attempt is current: put_step and check_callback judge that in their transaction."""
        secret = self._secrets.get(run_id)
        if secret is None:
            run = await self.get_run(run_id)
            if run is None:
                raise UnknownRun(run_id)
            secret = run.token
            self._remember_secret(run_id, secret)
        else:
            self._secrets.move_to_end(run_id)
        attempt = token_attempt(token)
        if attempt is None or not token_valid(secret, token, attempt):
            raise WrongToken(run_id)

    def _remember_secret(self, run_id: str, secret: str) -> None:
        self._secrets[run_id] = secret
        self._secrets.move_to_end(run_id)
        if len(self._secrets) > self.SECRETS_KEPT:
            self._secrets.popitem(last=False)

    async def check_callback(self, run_id: str, token: str) -> Run:
        """The run a read callback may see (raises like put_step)."""
        run, _ = authorize_callback(await self.get_run(run_id), run_id, token)
        return run

    @abc.abstractmethod
    async def deliver_event(
        self, event_id: str, name: str, data: str, ts: float
    ) -> list[str] | None:
        """Store an event and complete every wait it matches; None if the id was seen before."""

    @abc.abstractmethod
    async def cancel(self, run_id: str, now: float) -> Run | None:
        """Cancel a run that has not ended, and with it every child run it started that has
        not ended (and theirs)."""

    # -- signals and child runs (step.signal, step.invoke) -------------------------------------

    @abc.abstractmethod
    async def find_signal(self, signal_id: str) -> SignalRef | None: ...

    @abc.abstractmethod
    async def signals(self, run_id: str) -> dict[str, SignalRef]:
        """The run's signals by step id."""

    @abc.abstractmethod
    async def deliver_signal(
        self, signal_id: str, token: str, output: str, now: float
    ) -> SignalVerdict | None:
        """Complete a waiting signal step with `output` (JSON) and wake its run; None when the id
        is unknown or the token wrong (compared in constant time)."""

    @abc.abstractmethod
    async def links(self, run_id: str) -> tuple[Link | None, list[Link]]:
        """The run's parent link (if it is a child run) and its children, oldest first."""

    @abc.abstractmethod
    async def retry_ended(self, run_id: str, now: float) -> Run | None: ...

    @abc.abstractmethod
    async def purge_ended(self, before: float) -> int: ...

    @abc.abstractmethod
    async def purge_events(self, before: float) -> int: ...
