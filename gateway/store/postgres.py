"""The PostgreSQL dialect: several gateway replicas on one database.

Each named transaction runs on a connection of an asyncpg pool, in its own transaction, and
locks the run row it decides on (`SELECT … FOR UPDATE`) before it applies the rule, so two
replicas acting on one run are serialised by the database. Concurrent commits share the WAL
flush on the server (group commit is PostgreSQL's own); `durability: relaxed` is
`synchronous_commit = off`.

Waits and events meet under a transaction-scoped advisory lock on the event name: a new wait
that looks back at recent events and an event that looks for waiting steps cannot miss each
other, as they could under READ COMMITTED alone.

Replicas. Each gateway registers in `replicas` and renews `last_seen` (the database's clock)
every third of `lease`. A run being invoked names its replica in `runs.owner`. `take_over`
fences the running runs of replicas silent for longer than the lease (a crashed attempt, as at
a restart) so that some replica resumes them; the claim of a due run is a compare-and-set, so
each timer is acted on by one replica only.

Notifications. Every insert or update of a run's status or due time sends `NOTIFY stepgate`
with `<replica> <status> <due_at> <run id>` from a trigger (runs_notify), delivered at commit;
the replica is the `stepgate.replica` setting each gateway connects with. Each replica LISTENs on a
connection of its own and tells its listeners of changes committed elsewhere. While that
connection is down (it is re-established every second), `live_notifications` is false and the
waiters read the store instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, TypeVar

import asyncpg
import structlog

from gateway import flow
from gateway.auth import same_secret, token_attempt, token_valid
from gateway.config import Rate, Route
from gateway.errors import StoreError
from gateway.events import event_object
from gateway.lifecycle import AfterAttempt, claim, retry_ended
from gateway.lifecycle import cancel as cancel_run
from gateway.model import Attempt, Outcome, Run, RunStatus, Step, StepKind, StepStatus
from gateway.store import rules
from gateway.store.base import (
    AttemptRule,
    Change,
    DuplicateIdempotencyKey,
    InterruptRule,
    Link,
    QueueFull,
    Replica,
    SignalRef,
    Store,
    UnknownRun,
    authorize_callback,
)
from gateway.store.rows import (
    BUCKET_TAT,
    FLOW_COUNTS,
    HEAD_COLUMNS,
    HEAD_WIDTH,
    OLDEST_WAITING,
    QUEUED_ON_ROUTE,
    RESTART_FINAL_STEPS,
    RUN_COLUMNS,
    SET_BUCKET_TAT,
    STEP_COLUMNS,
    STEP_WIDTH,
    UPDATE_RUN,
    WAITING_FLOWS,
    Rows,
    head_from_row,
    step_from_row,
    step_values,
)
from gateway.store.rules import SignalVerdict, StepCall, StepWrite
from gateway.store.sealing import KEY_CHECK, Sealer, StoreKeyError

T = TypeVar("T")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

log = structlog.get_logger("stepgate.store")

CHANNEL: Final = "stepgate"
# pg_advisory_lock key under which replicas migrate the schema one at a time ("stepgate").
_MIGRATION_LOCK: Final = 0x5354455047415445
_TRIES: Final = 3  # a transaction that hit a deadlock or a serialisation failure runs again

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        route TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        no_retry INTEGER NOT NULL DEFAULT 0,
        wake_pending INTEGER NOT NULL DEFAULT 0,
        token TEXT NOT NULL,
        poll_token TEXT NOT NULL,
        method TEXT NOT NULL,
        target BYTEA NOT NULL,             -- sealable values are bytes (see gateway.store.rows)
        headers BYTEA NOT NULL,
        body BYTEA NOT NULL,
        idem_key TEXT,
        request_hash BYTEA,
        trace_id TEXT,
        due_at DOUBLE PRECISION,
        resp_status INTEGER,
        resp_reason TEXT,
        resp_headers BYTEA,
        resp_body BYTEA,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        sealed INTEGER NOT NULL DEFAULT 0,
        owner TEXT                         -- the replica invoking it, while it is running
    );
    CREATE INDEX runs_due ON runs (due_at) WHERE due_at IS NOT NULL;
    CREATE UNIQUE INDEX runs_idem ON runs (route, idem_key) WHERE idem_key IS NOT NULL;
    CREATE INDEX runs_created ON runs (created_at, id);
    CREATE INDEX runs_running ON runs (owner) WHERE status = 'running';
    CREATE INDEX runs_ended ON runs (ended_at) WHERE ended_at IS NOT NULL;

    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        seq INTEGER,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        output TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        wake_at DOUBLE PRECISION,
        event TEXT,
        match TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE INDEX steps_waiting ON steps (event) WHERE status = 'waiting';

    CREATE TABLE attempts (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        outcome TEXT NOT NULL,
        status INTEGER,
        error TEXT,
        PRIMARY KEY (run_id, n)
    );

    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX events_name_ts ON events (name, ts);

    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL
    );

    CREATE TABLE meta (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
    """,
    # Notifications are sent by the database as part of each write, rather than as a statement
    # of their own: a round trip less for every change to a run. The replica comes from the
    # session setting each gateway connects with.
    """
    CREATE FUNCTION stepgate_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM pg_notify('stepgate', concat_ws(' ',
            coalesce(current_setting('stepgate.replica', true), '-'), NEW.status,
            coalesce(NEW.due_at::text, '-'), NEW.id));
        RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER runs_notify AFTER INSERT OR UPDATE OF status, due_at ON runs
        FOR EACH ROW EXECUTE FUNCTION stepgate_notify();
    """,
    # Flow control (gateway.flow), as in SQLite's fourth migration.
    """
    ALTER TABLE runs ADD COLUMN slot_key TEXT, ADD COLUMN throttle_key TEXT,
        ADD COLUMN queued_at DOUBLE PRECISION;
    CREATE INDEX runs_flow ON runs (route, slot_key, status, due_at)
        WHERE status IN ('running', 'queued');
    CREATE INDEX runs_queue ON runs (route, slot_key, queued_at, id)
        WHERE status = 'queued' AND due_at IS NULL;
    CREATE INDEX runs_queued ON runs (route) WHERE status = 'queued';
    CREATE TABLE flow_buckets (
        name TEXT PRIMARY KEY,
        tat DOUBLE PRECISION NOT NULL,
        ok BOOLEAN NOT NULL DEFAULT true   -- a rate limit's last verdict (see _TAKE_RATE)
    );
    """,
    # Step policies (protocol v1.1): a step's own retry policy (JSON), whether it has failed for
    # good, and the run attempt that recorded its last failure.
    """
    ALTER TABLE steps ADD COLUMN policy TEXT;
    ALTER TABLE steps ADD COLUMN final INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE steps ADD COLUMN failed_in INTEGER;
    """,
    # As SQLite's: signal steps' ids and secrets, and the child runs of invoke steps.
    """
    CREATE TABLE signals (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        token TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE UNIQUE INDEX signals_step ON signals (run_id, step_id);
    CREATE TABLE children (
        child_id TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
        parent_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE UNIQUE INDEX children_step ON children (parent_id, step_id);
    """,
)


def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, …` (the statements share their text with
    SQLite's where the two speak the same SQL)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))


_UPDATE_RUN: Final = numbered(UPDATE_RUN)
_SELECT_RUN: Final = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"
_LOCK_RUN: Final = _SELECT_RUN + " FOR UPDATE"
_INSERT_RUN: Final = (
    f"INSERT INTO runs ({RUN_COLUMNS}, owner) VALUES "
    f"({', '.join(f'${n}' for n in range(1, RUN_COLUMNS.count(',') + 3))})"
)
# The run row, locked, with one step of it (or nulls): a step write's two reads in one.
_LOCK_RUN_AND_STEP: Final = (
    f"SELECT {', '.join('r.' + c.strip() for c in RUN_COLUMNS.split(','))}, "
    f"{', '.join('s.' + c.strip() for c in STEP_COLUMNS.split(','))} FROM runs r "
    "LEFT JOIN steps s ON s.run_id = r.id AND s.step_id = $2 WHERE r.id = $1 FOR UPDATE OF r"
)
# A step write's reads in one: the run's head (rows.HEAD_COLUMNS), locked, and the step.
_LOCK_HEAD_AND_STEP: Final = (
    f"SELECT {', '.join('r.' + c.strip() for c in HEAD_COLUMNS.split(','))}, "
    f"{', '.join('s.' + c.strip() for c in STEP_COLUMNS.split(','))} FROM runs r "
    "LEFT JOIN steps s ON s.run_id = r.id AND s.step_id = $2 WHERE r.id = $1 FOR UPDATE OF r"
)
# The run row, locked, with each of its parked steps and those that failed under a step policy
# in its current attempt (one row, with nulls, if none).
_LOCK_RUN_AND_PARKED: Final = (
    f"SELECT {', '.join('r.' + c.strip() for c in RUN_COLUMNS.split(','))}, "
    f"{', '.join('s.' + c.strip() for c in STEP_COLUMNS.split(','))} FROM runs r "
    "LEFT JOIN steps s ON s.run_id = r.id AND (s.status IN ('sleeping', 'waiting') "
    "OR (s.status = 'failed' AND s.policy IS NOT NULL AND s.failed_in = r.attempt)) "
    "WHERE r.id = $1 FOR UPDATE OF r"
)
_RUN_WIDTH: Final = RUN_COLUMNS.count(",") + 1
_UPSERT_STEP: Final = (
    f"INSERT INTO steps ({STEP_COLUMNS}) VALUES "
    f"({', '.join(f'${n}' for n in range(1, STEP_WIDTH + 1))}) "
    "ON CONFLICT (run_id, step_id) DO UPDATE SET "
    + ", ".join(
        f"{column} = EXCLUDED.{column}"
        for column in (c.strip() for c in STEP_COLUMNS.split(","))
        if column not in ("run_id", "step_id", "created_at")
    )
)
# A step's first record, in one statement: inserted only while the attempt writing it is the
# run's current one and the run is running, the run row share-locked meanwhile, so an attempt's
# end or a cancel (which lock it for update) comes wholly before or wholly after. The route,
# or nothing when the step was there already or the attempt is not current.
_FIRST_STEP: Final = (
    "WITH head AS (SELECT route FROM runs WHERE id = $1 AND status = 'running' "
    f"AND attempt = ${STEP_WIDTH + 1} FOR SHARE), "
    f"ins AS (INSERT INTO steps ({STEP_COLUMNS}) SELECT "
    + ", ".join(f"${n}" for n in range(1, STEP_WIDTH + 1))
    + " FROM head ON CONFLICT (run_id, step_id) DO NOTHING RETURNING run_id) "
    "SELECT head.route FROM head, ins"
)
_UPSERT_ATTEMPT: Final = (
    "INSERT INTO attempts (run_id, n, started_at, ended_at, outcome, status, error) "
    "VALUES ({}) ON CONFLICT (run_id, n) DO UPDATE SET "
    "started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at, "
    "outcome = EXCLUDED.outcome, status = EXCLUDED.status, error = EXCLUDED.error"
)
_UPDATE_WIDTH: Final = UPDATE_RUN.count("?")
# An attempt's end: its record and the run's new state in one statement (the run's id, the
# last parameter of the update, is the attempt's run too).
_FINISH: Final = (
    "WITH attempt AS ("
    + _UPSERT_ATTEMPT.format(
        ", ".join([f"${_UPDATE_WIDTH}", *(f"${_UPDATE_WIDTH + n}" for n in range(1, 7))])
    )
    + ") "
    + numbered(UPDATE_RUN)
)
# A claim's update also names the replica that will invoke the run.
_UPDATE_RUN_OWNED: Final = numbered(UPDATE_RUN.replace(" WHERE id = ?", ", owner = ? WHERE id = ?"))
_FLOW_COUNTS: Final = numbered(FLOW_COUNTS)
_QUEUED_ON_ROUTE: Final = numbered(QUEUED_ON_ROUTE)
# Rows locked by another transaction are passed over: a flow's lock is never held waiting for a
# run's (see _lock_flow).
_OLDEST_WAITING: Final = numbered(OLDEST_WAITING) + " FOR UPDATE SKIP LOCKED"
_BUCKET_TAT: Final = numbered(BUCKET_TAT)
_SET_BUCKET_TAT: Final = numbered(SET_BUCKET_TAT)
# One request taken from a rate limit's bucket (gateway.flow.allowed) in one statement: the SET
# expressions see the row as it was, so `ok` records whether it had room.
_TAKE_RATE: Final = (
    "INSERT INTO flow_buckets AS b (name, tat) VALUES ($1, $2::float8 + $3::float8) "
    "ON CONFLICT (name) DO UPDATE SET ok = ($2 >= b.tat - $4), tat = CASE "
    "WHEN $2 >= b.tat - $4 THEN greatest(b.tat, $2) + $3 ELSE b.tat END "
    "RETURNING tat, ok"
)
# PostgreSQL's text cannot hold NUL; ids that hold one name nothing stored, and say so.
_NUL: Final = "\x00"


async def _keep_session(conn: object) -> None:
    """A pool connection given back needs no reset: no transaction outlives its `_tx`, advisory
    locks are transaction-scoped, and nothing else sets session state. asyncpg's default
    reset is a statement of four commands on every release."""


def safe_url(url: str) -> str:
    """The store URL without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, asyncpg.UniqueViolationError) and "runs_idem" in str(
        exc.constraint_name or exc
    ):
        return DuplicateIdempotencyKey("idempotency key in use")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
        return StoreError(str(exc) or type(exc).__name__)
    if isinstance(exc, UnicodeError):
        return StoreError(f"a text cannot be stored: {exc}")
    return exc


class PostgresStore(Store):
    """`open()` connects, migrates, registers this replica and starts listening."""

    lease: float

    def __init__(
        self,
        url: str,
        *,
        replica_id: str,
        lease: float = 10.0,
        durability: str = "full",
        key: bytes | None = None,
        key_source: str = "store_key",
        pool_size: int = 16,
    ) -> None:
        super().__init__()
        self.url = url
        self.replica_id = replica_id
        self.lease = lease
        self._durability = durability
        self._rows = Rows(Sealer(key) if key is not None else None, binary_text=True)
        self._key_source = key_source
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.live_notifications = False
        self.write_observer: Callable[[float], None] | None = None
        self.last_write_failed: float | None = None

    # -- lifetime ------------------------------------------------------------------------------

    async def open(self) -> None:
        settings = {
            "application_name": f"stepgate {self.replica_id}"[:63],
            "stepgate.replica": self.replica_id,
        }  # read by the runs_notify trigger
        if self._durability != "full":
            settings["synchronous_commit"] = "off"
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self._pool_size,
                server_settings=settings,
                reset=_keep_session,
                command_timeout=30,
            )
            async with self._pool.acquire() as conn:
                await self._migrate(conn)
                await self._check_key(conn)
                await conn.execute(
                    "INSERT INTO replicas (id, started_at, last_seen) VALUES ($1, now(), now()) "
                    "ON CONFLICT (id) DO UPDATE SET started_at = now(), last_seen = now()",
                    self.replica_id,
                )
            await self._listen()
        except StoreKeyError:
            await self._close_pool()
            raise
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            await self._close_pool()
            raise StoreError(
                f"cannot open the store {safe_url(self.url)}: {str(exc) or type(exc).__name__}"
            ) from exc
        self._tasks = [
            asyncio.create_task(self._renew(), name="stepgate-lease"),
        ]

    async def _migrate(self, conn: Conn) -> None:
        """Bring the schema up to date, one replica at a time."""
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS stepgate_schema (version INTEGER NOT NULL)"
            )
            version = await conn.fetchval("SELECT max(version) FROM stepgate_schema") or 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the store {safe_url(self.url)} has schema version {version}, newer "
                    f"than this gateway understands ({len(MIGRATIONS)})"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                async with conn.transaction():
                    await conn.execute(script)
                    await conn.execute("INSERT INTO stepgate_schema (version) VALUES ($1)", number)
                log.info("store.migrated", version=number)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def _check_key(self, conn: Conn) -> None:
        """As SQLite's: the key must be the store's, and sealed runs need one."""
        sealer, where = self._rows.sealer, safe_url(self.url)
        async with conn.transaction():
            check = await conn.fetchval(
                "SELECT value FROM meta WHERE name = $1 FOR UPDATE", KEY_CHECK
            )
            if sealer is not None and check is not None:
                if not sealer.matches(bytes(check)):
                    raise StoreKeyError(
                        f"the store_key ({self._key_source}) does not open the "
                        f"store {where}: it was sealed with another key"
                    )
                return
            count = await conn.fetchval("SELECT count(*) FROM runs WHERE sealed != 0")
            if count:
                raise StoreKeyError(
                    f"the store {where} holds {count} run(s) sealed with a store_key"
                    + (
                        " but no check value for it"
                        if sealer is not None
                        else "; set store_key to the key they were sealed with"
                    )
                )
            if sealer is not None:
                await conn.execute(
                    "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    KEY_CHECK,
                    sealer.check_value(),
                )
            elif check is not None:
                await conn.execute("DELETE FROM meta WHERE name = $1", KEY_CHECK)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(
            self.url,
            server_settings={"application_name": f"stepgate-listen {self.replica_id}"[:63]},
        )
        conn.add_termination_listener(self._listener_lost)
        await conn.add_listener(CHANNEL, self._notified)
        self._listener = conn
        self.live_notifications = True

    def _listener_lost(self, conn: Conn) -> None:
        self.live_notifications = False
        self._listener = None
        if not self._closing:
            log.warning("store.notifications_lost", retrying=True)
            self._tasks.append(asyncio.create_task(self._relisten(), name="stepgate-listen"))

    async def _relisten(self) -> None:
        while not self._closing:
            await asyncio.sleep(1.0)
            try:
                await self._listen()
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                continue
            log.info("store.notifications_restored")
            return

    def _notified(self, conn: Conn, pid: int, channel: str, payload: object) -> None:
        assert isinstance(payload, str)
        replica, _, rest = payload.partition(" ")
        if replica == self.replica_id:
            return  # our own commit: told already, with the run
        status, due, run_id = rest.split(" ", 2)
        self._told(Change(run_id, RunStatus(status), None if due == "-" else float(due), None))

    async def _renew(self) -> None:
        """Renew this replica's lease every third of it."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._tx(self._renew_op)
            except StoreError as exc:
                log.warning("store.lease_renewal_failed", error=str(exc))

    async def _renew_op(self, conn: Conn) -> None:
        await conn.execute(
            "INSERT INTO replicas (id, started_at, last_seen) VALUES ($1, now(), now()) "
            "ON CONFLICT (id) DO UPDATE SET last_seen = now()",
            self.replica_id,
        )

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    # Gone for good: nothing of ours is running (drain fenced it).
                    await conn.execute("DELETE FROM replicas WHERE id = $1", self.replica_id)
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None

    async def checkpoint(self) -> None:
        """The server folds its own WAL; forget replicas gone for more than a day."""
        await self._tx(
            lambda conn: conn.execute(
                "DELETE FROM replicas WHERE last_seen < now() - interval '1 day'"
            )
        )

    async def writable(self) -> bool:
        try:  # a real write: a server in recovery (a standby) or read-only refuses it
            await self._tx(self._renew_op)
        except StoreError:
            return False
        return self.last_write_failed is None

    # -- plumbing ------------------------------------------------------------------------------

    async def _tx(self, op: Callable[[Conn], Awaitable[T]], *, single: bool = False) -> T:
        """Run `op` in a transaction of its own; translate what fails. `single`: `op` is one
        statement, atomic by itself, and BEGIN and COMMIT would only add two round trips."""
        if self._pool is None:
            raise StoreError("the store is closed")
        started = time.perf_counter()
        try:
            for attempt in range(_TRIES):
                try:
                    async with self._pool.acquire() as conn:
                        if single:
                            result = await op(conn)
                        else:
                            async with conn.transaction():
                                result = await op(conn)
                    break
                except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                    if attempt == _TRIES - 1:
                        raise
        except Exception as exc:
            translated = _translate(exc)
            if isinstance(translated, StoreError):
                self.last_write_failed = time.monotonic()
            if translated is exc:
                raise
            raise translated from exc
        finally:
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)
        self.last_write_failed = None
        return result

    async def _fetch(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        if self._pool is None:
            raise StoreError("the store is closed")
        try:
            return list(await self._pool.fetch(sql, *params))
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _read(self, conn: Conn, run_id: str) -> Run | None:
        if _NUL in run_id:
            return None
        row = await conn.fetchrow(_LOCK_RUN, run_id)
        return self._rows.run(row) if row else None

    async def _write_run(self, conn: Conn, run: Run) -> None:
        """Store a run's new state; the database notifies the other replicas (runs_notify)."""
        await conn.execute(_UPDATE_RUN, *self._rows.update(run))

    def _split(self, row: asyncpg.Record) -> tuple[Run, Step | None]:
        """A row of _LOCK_RUN_AND_*: the run, and the step joined to it, if any."""
        step = tuple(row[_RUN_WIDTH:])
        return self._rows.run(row), step_from_row(step) if step[0] is not None else None

    @staticmethod
    async def _write_attempt(conn: Conn, run_id: str, attempt: Attempt) -> None:
        await conn.execute(
            _UPSERT_ATTEMPT.format("$1, $2, $3, $4, $5, $6, $7"),
            run_id,
            attempt.n,
            attempt.started_at,
            attempt.ended_at,
            attempt.outcome,
            attempt.status,
            attempt.error,
        )

    # -- reads ---------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run | None:
        if _NUL in run_id:
            return None
        rows = await self._fetch(_SELECT_RUN, run_id)
        return self._rows.run(rows[0]) if rows else None

    async def find_idempotent(self, route: str, key: str) -> Run | None:
        if _NUL in route + key:
            return None
        rows = await self._fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE route = $1 AND idem_key = $2", route, key
        )
        return self._rows.run(rows[0]) if rows else None

    async def count_queued(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT route, count(*) FROM runs WHERE status = 'queued' GROUP BY route"
        )
        return {route: n for route, n in rows}

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, count(*) FROM runs GROUP BY status")
        return {status: n for status, n in rows}

    async def due(
        self, before: float, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[float, str]]:
        start, start_id = after if after is not None else (-math.inf, "")
        rows = await self._fetch(
            "SELECT due_at, id FROM runs WHERE due_at IS NOT NULL AND due_at <= $1 "
            "AND (due_at, id) > ($2, $3) ORDER BY due_at, id LIMIT $4",
            before,
            start,
            start_id,
            limit,
        )
        return [(due, run_id) for due, run_id in rows]

    async def _select_runs(self, sql: str, params: Sequence[Any]) -> list[Run]:
        if any(isinstance(value, str) and _NUL in value for value in params):
            return []  # a filter no stored value can match
        return [self._rows.run(r) for r in await self._fetch(numbered(sql), *params)]

    async def steps(self, run_id: str) -> list[Step]:
        if _NUL in run_id:
            return []
        rows = await self._fetch(
            f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 "
            "ORDER BY seq IS NULL, seq, created_at",
            run_id,
        )
        return [step_from_row(r) for r in rows]

    async def count_steps(self, run_id: str) -> int:
        if _NUL in run_id:
            return 0
        rows = await self._fetch("SELECT count(*) FROM steps WHERE run_id = $1", run_id)
        return int(rows[0][0])

    async def attempts(self, run_id: str) -> list[Attempt]:
        if _NUL in run_id:
            return []
        rows = await self._fetch(
            "SELECT n, started_at, ended_at, outcome, status, error FROM attempts "
            "WHERE run_id = $1 ORDER BY n",
            run_id,
        )
        return [Attempt(*r) for r in rows]

    async def replicas(self) -> list[Replica]:
        rows = await self._fetch(
            "SELECT p.id, extract(epoch FROM p.started_at), extract(epoch FROM p.last_seen), "
            "(SELECT count(*) FROM runs r WHERE r.status = 'running' AND r.owner = p.id) "
            "FROM replicas p WHERE p.last_seen > now() - make_interval(secs => $1) "
            "ORDER BY p.id",
            self.lease,
        )
        return [Replica(r[0], float(r[1]), float(r[2]), int(r[3])) for r in rows]

    # -- transactions --------------------------------------------------------------------------

    def _owned(self, run: Run) -> tuple[Any, ...]:
        """A new row's values, with its owner when it starts running here."""
        return (*self._rows.insert(run), self.replica_id if run.status == "running" else None)

    async def create_run(self, run: Run) -> Run:
        route = self.route_of(run.route)
        if route is None or not route.flow_controlled or _NUL in run.route:
            params = self._owned(run)

            async def insert(conn: Conn) -> None:
                await conn.execute(_INSERT_RUN, *params)

            await self._tx(insert, single=True)
            self._changed(run)
            return run

        async def op(conn: Conn) -> Run:
            await self._lock_flow(conn, run, route)
            admitted = await self._admit(conn, run, route, run.created_at)
            if admitted.status == RunStatus.QUEUED:
                if await conn.fetchval(_QUEUED_ON_ROUTE, run.route) >= route.queue_limit:
                    raise QueueFull(run.route)
            await conn.execute(_INSERT_RUN, *self._owned(admitted))
            return admitted

        recorded = await self._tx(op)
        self._changed(recorded)
        return recorded

    # -- flow control (gateway.flow) -----------------------------------------------------------

    @staticmethod
    async def _lock(conn: Conn, name: str) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", name)

    async def _lock_flow(self, conn: Conn, run: Run, route: Route, *, slots: bool = True) -> None:
        """Serialise the transactions that count a flow's slots or take its throttle's turns,
        across replicas: the slots' lock first, then the throttle's. A transaction holding one
        never waits for a run's row (promotions skip locked rows), so none can deadlock."""
        if slots and route.concurrency is not None:
            await self._lock(conn, flow.bucket("slots", run.route, run.slot_key or ""))
        if route.throttle is not None:
            await self._lock(conn, flow.bucket("throttle", run.route, run.throttle_key or ""))

    async def _admit(self, conn: Conn, run: Run, route: Route, now: float) -> Run:
        held = waiting = 0
        if route.concurrency is not None:
            counts = await conn.fetchrow(_FLOW_COUNTS, run.route, run.slot_key or "")
            assert counts is not None
            held, waiting = counts
        seen = flow.Seen(held, waiting, await self._tat(conn, run, route))
        admission = flow.admit(run, route, seen, now)
        await self._set_tat(conn, run, admission.tat)
        return admission.run

    @staticmethod
    async def _tat(conn: Conn, run: Run, route: Route) -> float | None:
        if route.throttle is None:
            return None
        name = flow.bucket("throttle", run.route, run.throttle_key or "")
        tat = await conn.fetchval(_BUCKET_TAT, name)
        return None if tat is None else float(tat)

    @staticmethod
    async def _set_tat(conn: Conn, run: Run, tat: float | None) -> None:
        if tat is not None:
            name = flow.bucket("throttle", run.route, run.throttle_key or "")
            await conn.execute(_SET_BUCKET_TAT, name, tat)

    async def _release(
        self, conn: Conn, route_name: str, slot_key: str | None, now: float
    ) -> list[Run]:
        """As SQLite's: a slot of the flow may be free; the runs waiting longest get it."""
        if slot_key is None:
            return []
        route = self.route_of(route_name)
        if route is not None and route.concurrency is not None:
            await self._lock(conn, flow.bucket("slots", route_name, slot_key))
            counts = await conn.fetchrow(_FLOW_COUNTS, route_name, slot_key)
            assert counts is not None
            held, waiting = counts
            free = min(route.concurrency.limit - held, waiting)
            if free <= 0:
                return []
        else:
            free = None  # no limit any more (or no route): the whole queue goes
        rows = await conn.fetch(_OLDEST_WAITING, route_name, slot_key, free)
        given = []
        for row in rows:
            run = self._rows.run(row)
            if route is None:
                admitted = flow.queued(run, now, due=now)
            else:
                await self._lock_flow(conn, run, route, slots=False)
                tat = await self._tat(conn, run, route)
                admission = flow.given_slot(run, route, tat, now, start=self.start_promoted)
                await self._set_tat(conn, run, admission.tat)
                admitted = admission.run
            if admitted.status == RunStatus.RUNNING:  # started here: this replica sends it
                await conn.execute(
                    _UPDATE_RUN_OWNED, *self._rows.update(admitted)[:-1], self.replica_id, run.id
                )
            else:
                await self._write_run(conn, admitted)
            given.append(admitted)
        return given

    async def promote_waiting(self, now: float) -> int:
        async def op(conn: Conn) -> list[Run]:
            given: list[Run] = []
            for route, slot_key in sorted(tuple(r) for r in await conn.fetch(WAITING_FLOWS)):
                given += await self._release(conn, route, slot_key, now)
            return given

        given = await self._tx(op)
        self._given(given)
        return len(given)

    async def rate_limit(self, name: str, rate: Rate, now: float) -> float:
        """Shared by the replicas: one statement on the bucket's row."""
        tolerance = (rate.burst - 1) * rate.interval

        async def op(conn: Conn) -> asyncpg.Record | None:
            return await conn.fetchrow(_TAKE_RATE, name, now, rate.interval, tolerance)

        row = await self._tx(op, single=True)
        assert row is not None
        if row["ok"]:
            return 0.0
        return max(float(row["tat"]) - tolerance - now, 0.001)

    async def _fence(self, rule: InterruptRule, where: str, *params: Any) -> list[AfterAttempt]:
        async def op(conn: Conn) -> tuple[list[AfterAttempt], list[Run]]:
            rows = await conn.fetch(
                f"SELECT {RUN_COLUMNS} FROM runs r WHERE status = 'running' AND {where} "
                "FOR UPDATE SKIP LOCKED",
                *params,
            )
            done = []
            woken.clear()  # a transaction tried again starts over
            for row in rows:
                after = rule(self._rows.run(row))
                await self._write_run(conn, after.run)
                await self._write_attempt(conn, after.run.id, after.attempt)
                if after.run.ended:
                    await self._settle_parent(conn, after.run, woken)
                done.append(after)
            flows = {(a.run.route, a.run.slot_key) for a in done if a.run.slot_key is not None}
            given = []
            for route, slot_key in sorted(flows, key=str):  # the flows' locks in one order
                given += await self._release(conn, route, slot_key, time.time())
            return done, given

        woken: list[Run] = []
        fenced, given = await self._tx(op)
        for after in fenced:
            self._changed(after.run)
        for parent in woken:
            self._changed(parent)
        self._given(given)
        return fenced

    async def recover(self, rule: InterruptRule, *, before: float) -> list[AfterAttempt]:
        """This replica's own runs: an earlier process's under the same replica_id, at start,
        or ours, at shutdown. Other replicas' are `take_over`'s."""
        return await self._fence(
            rule,
            "owner = $1 AND updated_at < $2",
            self.replica_id,
            before if before != float("inf") else 1e300,
        )

    async def take_over(self, rule: InterruptRule) -> list[AfterAttempt]:
        return await self._fence(
            rule,
            "(owner IS NULL OR owner NOT IN (SELECT id FROM replicas "
            "WHERE last_seen > now() - make_interval(secs => $1)))",
            self.lease,
        )

    async def claim(self, run_id: str, now: float) -> Run | None:
        async def op(conn: Conn) -> Run | None:
            run = await self._read(conn, run_id)
            claimed = None if run is None else claim(run, now)
            if claimed is None or run is None:
                return None
            if run.status in (RunStatus.SLEEPING, RunStatus.WAITING):
                await conn.execute(
                    "UPDATE steps SET status = 'completed', output = 'null', updated_at = $1 "
                    "WHERE run_id = $2 AND status IN ('sleeping', 'waiting') AND wake_at <= $1",
                    now,
                    run_id,
                )
            route = self.route_of(run.route)
            if run.status != RunStatus.QUEUED and route is not None and route.flow_controlled:
                await self._lock_flow(conn, run, route)  # a queued one has its turn already
                claimed = await self._admit(conn, run, route, now)
                if claimed.status != RunStatus.RUNNING:
                    await self._write_run(conn, claimed)
                    return claimed
            await conn.execute(
                _UPDATE_RUN_OWNED, *self._rows.update(claimed)[:-1], self.replica_id, run_id
            )
            return claimed

        claimed = await self._tx(op)
        if claimed is None:
            return None
        self._changed(claimed)
        return claimed if claimed.status == RunStatus.RUNNING else None

    async def finish_attempt(
        self, run_id: str, outcome: Outcome, rule: AttemptRule
    ) -> AfterAttempt:
        async def op(conn: Conn) -> tuple[AfterAttempt, list[Run]]:
            rows = await conn.fetch(_LOCK_RUN_AND_PARKED, run_id) if _NUL not in run_id else []
            if not rows:
                raise UnknownRun(run_id)
            joined = [self._split(row) for row in rows]
            run = joined[0][0]
            woken.clear()
            after = rule(run, [step for _, step in joined if step is not None])
            if after.decision is not None:  # the run and its attempt in one statement
                attempt = after.attempt
                await conn.execute(
                    _FINISH,
                    *self._rows.update(after.run),
                    attempt.n,
                    attempt.started_at,
                    attempt.ended_at,
                    attempt.outcome,
                    attempt.status,
                    attempt.error,
                )
                if after.run.ended:
                    await self._settle_parent(conn, after.run, woken)
            else:
                await self._write_attempt(conn, run_id, after.attempt)
            given: list[Run] = []
            if after.decision is not None and run.slot_key is not None:
                given = await self._release(conn, run.route, run.slot_key, after.run.updated_at)
            return after, given

        woken: list[Run] = []
        after, given = await self._tx(op)
        if after.decision is not None:
            self._changed(after.run)
        for parent in woken:
            self._changed(parent)
        self._given(given)
        return after

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
        first = await self._first_step(run_id, token, step_id, call, now)
        if first is not None:
            return first

        async def op(conn: Conn) -> StepWrite:
            if call.kind == StepKind.WAIT:
                await self._lock_event(conn, call.event)
            row = (
                await conn.fetchrow(_LOCK_HEAD_AND_STEP, run_id, step_id)
                if _NUL not in run_id
                else None
            )
            head, current = None, None
            if row is not None:
                step = tuple(row[HEAD_WIDTH:])
                head = head_from_row(row)
                current = step_from_row(step) if step[0] is not None else None
            run, attempt = authorize_callback(head, run_id, token)
            call_now = call
            if call.kind == StepKind.WAIT and (
                current is None or current.status == StepStatus.FAILED
            ):
                call_now = await self._lookback(conn, run_id, call, lookback_since)
            write = rules.merge_step(current, call_now, run_id, step_id, now, attempt)
            if write.created:
                if call.no_retry:
                    await conn.execute("UPDATE runs SET no_retry = 1 WHERE id = $1", run_id)
                await conn.execute(_UPSERT_STEP, *step_values(write.step))
            linked = StepWrite(write.created, write.step, run.route)
            return await self._linked(conn, linked, call, now)

        write = await self._tx(op)
        if write.started is not None:
            self._changed(write.started)
        return write

    async def _first_step(
        self, run_id: str, token: str, step_id: str, call: StepCall, now: float
    ) -> StepWrite | None:
        """A completed step's first record in one round trip instead of four (BEGIN, the
        locking read, the insert, COMMIT), when the token checks out against the run's secret
        kept from its start or its first callback. None: the transaction of put_step decides
        (a step recorded before, a stale attempt, a secret not at hand, any other kind)."""
        secret = self._secrets.get(run_id)
        attempt = token_attempt(token)
        if (
            call.kind != StepKind.RUN
            or call.status != StepStatus.COMPLETED
            or secret is None
            or attempt is None
            or not token_valid(secret, token, attempt)
            or _NUL in run_id + step_id
        ):
            return None
        write = rules.merge_step(None, call, run_id, step_id, now, attempt)
        values = (*step_values(write.step), attempt)

        async def op(conn: Conn) -> str | None:
            route: str | None = await conn.fetchval(_FIRST_STEP, *values)
            return route

        route = await self._tx(op, single=True)
        return None if route is None else StepWrite(True, write.step, route)

    async def _linked(self, conn: Conn, write: StepWrite, call: StepCall, now: float) -> StepWrite:
        """As SQLite's: a signal's id and secret, an invoke's child run, created with the step."""
        step = write.step
        if step.kind == StepKind.SIGNAL:
            if write.created and call.signal_id is not None and call.signal_token is not None:
                await conn.execute(
                    "INSERT INTO signals (id, run_id, step_id, token, created_at) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (run_id, step_id) DO UPDATE "
                    "SET id = EXCLUDED.id, token = EXCLUDED.token",
                    call.signal_id,
                    step.run_id,
                    step.id,
                    call.signal_token,
                    now,
                )
            row = await conn.fetchrow(
                "SELECT id, token FROM signals WHERE run_id = $1 AND step_id = $2",
                step.run_id,
                step.id,
            )
            return replace(write, signal=(row[0], row[1]) if row else None)
        if step.kind == StepKind.INVOKE:
            started = None
            if write.created and call.child is not None:
                child = call.child
                route = self.route_of(child.route)
                if route is not None and route.flow_controlled:  # it waits its turn, too
                    await self._lock_flow(conn, child, route)
                    child = await self._admit(conn, child, route, now)
                await conn.execute(_INSERT_RUN, *self._owned(child))
                await conn.execute(  # replaces the link to a failed child after an admin retry
                    "INSERT INTO children (child_id, parent_id, step_id, created_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (parent_id, step_id) DO UPDATE "
                    "SET child_id = EXCLUDED.child_id, created_at = EXCLUDED.created_at",
                    child.id,
                    step.run_id,
                    step.id,
                    now,
                )
                started = child if child.status == RunStatus.RUNNING else None
            child_id = await conn.fetchval(
                "SELECT child_id FROM children WHERE parent_id = $1 AND step_id = $2",
                step.run_id,
                step.id,
            )
            return replace(write, child_id=child_id, started=started)
        return write

    async def _settle_parent(self, conn: Conn, child: Run, woken: list[Run]) -> None:
        """As SQLite's: a child run's end completes its parent's invoke step and wakes it."""
        row = await conn.fetchrow(
            "SELECT parent_id, step_id FROM children WHERE child_id = $1", child.id
        )
        if row is None:
            return
        parent = await self._read(conn, row[0])  # locked, as every decision on a run is
        step_row = await conn.fetchrow(
            f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 AND step_id = $2", row[0], row[1]
        )
        step = step_from_row(step_row) if step_row else None
        if step is None or step.status != StepStatus.WAITING or parent is None or parent.ended:
            return
        now = child.ended_at or time.time()
        status, output, error = rules.child_result(child)
        await conn.execute(  # a failed child fails the step for good, as in SQLite's
            "UPDATE steps SET status = $1, output = $2, error = $3, final = $4, updated_at = $5 "
            "WHERE run_id = $6 AND step_id = $7",
            str(status),
            output,
            error,
            int(error is not None),
            now,
            step.run_id,
            step.id,
        )
        after = rules.woken(parent, now)
        await self._write_run(conn, after)
        woken.append(after)

    @staticmethod
    async def _lock_event(conn: Conn, name: str | None) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"event:{name}")

    @staticmethod
    async def _lookback(conn: Conn, run_id: str, call: StepCall, since: float) -> StepCall:
        assert call.event is not None
        outputs = await conn.fetch(
            "SELECT output FROM steps WHERE run_id = $1 AND kind = 'wait' "
            "AND status = 'completed' AND output != 'null'",
            run_id,
        )
        taken = rules.taken_event_ids(row[0] for row in outputs)
        events = await conn.fetch(
            "SELECT id, data, ts FROM events WHERE name = $1 AND ts >= $2 ORDER BY ts",
            call.event,
            since,
        )
        output = rules.lookback_match(
            call.event, call.match or "{}", [tuple(e) for e in events], taken
        )
        if output is None:
            return call
        return StepCall(
            kind=call.kind,
            status=StepStatus.COMPLETED,
            seq=call.seq,
            output=output,
            wake_at=call.wake_at,
            event=call.event,
            match=call.match,
        )

    async def deliver_event(
        self, event_id: str, name: str, data: str, ts: float
    ) -> list[str] | None:
        async def op(conn: Conn) -> list[Run] | None:
            await self._lock_event(conn, name)
            inserted = await conn.fetchval(
                "INSERT INTO events (id, name, data, ts) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (id) DO NOTHING RETURNING true",
                event_id,
                name,
                data,
                ts,
            )
            if not inserted:
                return None
            obj = event_object(event_id, name, json.loads(data), ts)
            output = rules.dump(obj)
            columns = ", ".join("s." + c.strip() for c in STEP_COLUMNS.split(","))
            waiting = await conn.fetch(
                f"SELECT {columns} FROM steps s JOIN runs r ON r.id = s.run_id "
                "WHERE s.status = 'waiting' AND s.event = $1 AND r.ended_at IS NULL "
                "ORDER BY s.run_id",
                name,
            )
            woken: dict[str, Run] = {}
            for row in waiting:
                step = step_from_row(row)
                if not rules.wait_is_completed_by(step, obj):
                    continue
                await conn.execute(
                    "UPDATE steps SET status = 'completed', output = $1, updated_at = $2 "
                    "WHERE run_id = $3 AND step_id = $4",
                    output,
                    ts,
                    step.run_id,
                    step.id,
                )
                if step.run_id not in woken:
                    run = await self._read(conn, step.run_id)
                    assert run is not None
                    after = rules.woken(run, ts)
                    await self._write_run(conn, after)
                    woken[step.run_id] = after
            return list(woken.values())

        woken = await self._tx(op)
        if woken is None:
            return None
        for run in woken:
            self._changed(run)
        return [run.id for run in woken]

    async def _transition(self, run_id: str, rule: Callable[[Run], Run | None]) -> Run | None:
        async def op(conn: Conn) -> tuple[Run | None, list[Run]]:
            run = await self._read(conn, run_id)
            changed = None if run is None else rule(run)
            given: list[Run] = []
            if changed is not None and run is not None:
                await self._write_run(conn, changed)
                if flow.holds_slot(run) and not flow.holds_slot(changed):
                    given = await self._release(conn, run.route, run.slot_key, changed.updated_at)
            return changed, given

        changed, given = await self._tx(op)
        if changed is not None:
            self._changed(changed)
        self._given(given)
        return changed

    async def cancel(self, run_id: str, now: float) -> Run | None:
        async def op(conn: Conn) -> Run | None:
            changed.clear()
            given.clear()  # a transaction tried again starts over
            run = await self._read(conn, run_id)
            cancelled = None if run is None else cancel_run(run, now)
            if cancelled is None:
                return None
            await self._write_run(conn, cancelled)
            await self._settle_parent(conn, cancelled, changed)
            assert run is not None
            freed = [run] if flow.holds_slot(run) else []
            parents = [run_id]  # the children it started go with it, and theirs
            while parents:
                below = await conn.fetch(
                    "SELECT child_id FROM children WHERE parent_id = ANY($1::text[])", parents
                )
                parents = []
                for (child_id,) in below:
                    child = await self._read(conn, child_id)
                    ended = None if child is None else cancel_run(child, now)
                    if ended is not None and child is not None:
                        await self._write_run(conn, ended)
                        changed.append(ended)
                        parents.append(child_id)
                        if flow.holds_slot(child):
                            freed.append(child)
            flows = {(held.route, held.slot_key) for held in freed if held.slot_key is not None}
            for route, slot_key in sorted(flows, key=str):  # their slots go to those waiting
                given.extend(await self._release(conn, route, slot_key, now))
            return cancelled

        changed: list[Run] = []
        given: list[Run] = []
        cancelled = await self._tx(op)
        if cancelled is not None:
            self._changed(cancelled)
        for run in changed:
            self._changed(run)
        self._given(given)
        return cancelled

    # -- signals and child runs ----------------------------------------------------------------

    async def find_signal(self, signal_id: str) -> SignalRef | None:
        if _NUL in signal_id:
            return None
        rows = await self._fetch(
            "SELECT id, run_id, step_id, token FROM signals WHERE id = $1", signal_id
        )
        return SignalRef(*rows[0]) if rows else None

    async def signals(self, run_id: str) -> dict[str, SignalRef]:
        if _NUL in run_id:
            return {}
        rows = await self._fetch(
            "SELECT id, run_id, step_id, token FROM signals WHERE run_id = $1", run_id
        )
        return {row[2]: SignalRef(*row) for row in rows}

    async def deliver_signal(
        self, signal_id: str, token: str, output: str, now: float
    ) -> SignalVerdict | None:
        async def op(conn: Conn) -> SignalVerdict | None:
            woken.clear()
            row = await conn.fetchrow(
                "SELECT run_id, step_id, token FROM signals WHERE id = $1", signal_id
            )
            if row is None or not same_secret(token, row[2]):
                return None
            locked = await conn.fetchrow(_LOCK_RUN_AND_STEP, row[0], row[1])
            if locked is None:
                return None
            run, step = self._split(locked)
            verdict = rules.signal_verdict(run, step, now)
            if verdict == SignalVerdict.DELIVER:
                await conn.execute(
                    "UPDATE steps SET status = 'completed', output = $1, updated_at = $2 "
                    "WHERE run_id = $3 AND step_id = $4",
                    output,
                    now,
                    row[0],
                    row[1],
                )
                after = rules.woken(run, now)
                await self._write_run(conn, after)
                woken.append(after)
            return verdict

        if _NUL in signal_id:
            return None
        woken: list[Run] = []
        verdict = await self._tx(op)
        for run in woken:
            self._changed(run)
        return verdict

    async def links(self, run_id: str) -> tuple[Link | None, list[Link]]:
        if _NUL in run_id:
            return None, []
        rows = await self._fetch(
            "SELECT child_id, parent_id, step_id FROM children "
            "WHERE child_id = $1 OR parent_id = $1 ORDER BY created_at",
            run_id,
        )
        found = [Link(*row) for row in rows]
        parent = next((link for link in found if link.child_id == run_id), None)
        return parent, [link for link in found if link.parent_id == run_id]

    async def retry_ended(self, run_id: str, now: float) -> Run | None:
        async def op(conn: Conn) -> Run | None:
            run = await self._read(conn, run_id)
            changed = None if run is None else retry_ended(run, now)
            if changed is not None:
                # A retried run starts its final steps afresh (step policies).
                await conn.execute(numbered(RESTART_FINAL_STEPS), now, run_id)
                await self._write_run(conn, changed)
            return changed

        changed = await self._tx(op)
        if changed is not None:
            self._changed(changed)
        return changed

    async def purge_ended(self, before: float) -> int:
        async def op(conn: Conn) -> int:
            status = await conn.execute(
                "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE ended_at IS NOT NULL "
                "AND ended_at < $1 LIMIT 5000)",
                before,
            )
            return int(status.split()[-1])

        return await self._tx(op)

    async def purge_events(self, before: float) -> int:
        async def op(conn: Conn) -> int:
            await conn.execute("DELETE FROM flow_buckets WHERE tat < $1", before)
            status = await conn.execute("DELETE FROM events WHERE ts < $1", before)
            return int(status.split()[-1])

        return await self._tx(op)
