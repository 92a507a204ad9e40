"""The SQLite dialect: one file, one gateway, group commit.

Writes go through one connection that commits every write that queued up while the previous
commit was on its way to disk in a single transaction (group commit). Each write waits for the
commit that holds it, so an acknowledged write is always durable; concurrent writers share the
fsync instead of queueing behind one each. Each transaction body below reads the rows it decides
on and writes the result, and nothing can come between. The bodies run on the event loop's
thread, which holds the GIL for their Python anyway; only the COMMIT, whose fsync is the slow
part, goes to the writer thread. A write lock held by another process (a CLI, a backup) is never
waited for on the loop: that batch goes to the writer thread whole, which waits for the lock.

Reads go through aiosqlite on a second connection, one whole statement (execute and fetch) at a
time, so no read is left holding an old snapshot: WAL lets them run beside the writer and each
sees every write committed before it started.

The file is locked (`flock`) for as long as the gateway has it open: a second gateway on the
same file stops before it touches anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import aiosqlite
import structlog

from gateway import flow
from gateway.auth import same_secret
from gateway.config import Route
from gateway.errors import StoreError
from gateway.events import event_object
from gateway.lifecycle import AfterAttempt, claim, retry_ended
from gateway.lifecycle import cancel as cancel_run
from gateway.model import Attempt, Outcome, Run, RunStatus, Step, StepKind, StepStatus
from gateway.store import rules
from gateway.store.base import (
    AttemptRule,
    DuplicateIdempotencyKey,
    InterruptRule,
    Link,
    QueueFull,
    SignalRef,
    Store,
    StoreLocked,
    UnknownRun,
    authorize_callback,
)
from gateway.store.rows import (
    ANY_WAITING,
    BUCKET_TAT,
    FLOW_COUNTS,
    HEAD_COLUMNS,
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

log = structlog.get_logger("stepgate.store")

_RESERVE = 256 * 1024  # bytes kept free beside the store, released when the volume is full

# Each entry moves the schema one version up; PRAGMA user_version records how far a file is.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        route TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,          -- invocations started so far
        failures INTEGER NOT NULL DEFAULT 0,
        no_retry INTEGER NOT NULL DEFAULT 0,
        token TEXT NOT NULL,
        poll_token TEXT NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,              -- raw path and query, as received
        headers TEXT NOT NULL,             -- JSON [[name, value], ...] as forwarded upstream
        body BLOB NOT NULL,
        idem_key TEXT,
        request_hash TEXT,
        trace_id TEXT,
        due_at REAL,                       -- next timer: retry back-off, sleep or wait deadline
        resp_status INTEGER,
        resp_headers TEXT,
        resp_body BLOB,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE INDEX runs_due ON runs (due_at) WHERE due_at IS NOT NULL;
    CREATE UNIQUE INDEX runs_idem ON runs (route, idem_key) WHERE idem_key IS NOT NULL;
    CREATE INDEX runs_created ON runs (created_at, id);
    CREATE INDEX runs_open ON runs (status) WHERE ended_at IS NULL;
    CREATE INDEX runs_ended ON runs (ended_at) WHERE ended_at IS NOT NULL;

    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        seq INTEGER,
        kind TEXT NOT NULL,                -- run | sleep | wait
        status TEXT NOT NULL,              -- completed | failed | sleeping | waiting
        output TEXT,                       -- JSON
        error TEXT,                        -- JSON
        attempts INTEGER NOT NULL DEFAULT 0,
        wake_at REAL,                      -- sleep deadline or wait timeout
        event TEXT,
        match TEXT,                        -- JSON
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (run_id, step_id)
    ) WITHOUT ROWID;
    CREATE INDEX steps_waiting ON steps (event) WHERE status = 'waiting';

    CREATE TABLE attempts (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        outcome TEXT NOT NULL,             -- response | suspended | connect | timeout | interrupted
        status INTEGER,
        error TEXT,
        PRIMARY KEY (run_id, n)
    ) WITHOUT ROWID;

    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX events_name_ts ON events (name, ts);
    """,
    # wake_pending: a parked step completed while its run was running; re-invoke as soon as the
    # attempt parks. resp_reason: the upstream's reason phrase, replayed as it was sent.
    """
    ALTER TABLE runs ADD COLUMN wake_pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN resp_reason TEXT;
    """,
    # sealed: which of a run's values are sealed with the store key (_SEALED_*); meta: the key's
    # check value (gateway.store.sealing).
    """
    ALTER TABLE runs ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    """,
    # Flow control (gateway.flow): the key values a run counts under, when it joined the queue;
    # the throttles' token buckets.
    """
    ALTER TABLE runs ADD COLUMN slot_key TEXT;
    ALTER TABLE runs ADD COLUMN throttle_key TEXT;
    ALTER TABLE runs ADD COLUMN queued_at REAL;
    CREATE INDEX runs_flow ON runs (route, slot_key, status, due_at)
        WHERE status IN ('running', 'queued');
    CREATE INDEX runs_queue ON runs (route, slot_key, queued_at, id)
        WHERE status = 'queued' AND due_at IS NULL;
    CREATE INDEX runs_queued ON runs (route) WHERE status = 'queued';
    CREATE TABLE flow_buckets (name TEXT PRIMARY KEY, tat REAL NOT NULL) WITHOUT ROWID;
    """,
    # Step policies (protocol v1.1): a step's own retry policy (JSON), whether it has failed for
    # good, and the run attempt that recorded its last failure.
    """
    ALTER TABLE steps ADD COLUMN policy TEXT;
    ALTER TABLE steps ADD COLUMN final INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE steps ADD COLUMN failed_in INTEGER;
    """,
    # signals: a signal step's public id and its secret (the URL's token). children: the run an
    # invoke step started, so that the child's end completes the parent's step.
    """
    CREATE TABLE signals (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        token TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX signals_step ON signals (run_id, step_id);
    CREATE TABLE children (
        child_id TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
        parent_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX children_step ON children (parent_id, step_id);
    """,
)


_INSERT_RUN = (
    f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({', '.join('?' * (RUN_COLUMNS.count(',') + 1))})"
)


_SELECT_HEAD = f"SELECT {HEAD_COLUMNS} FROM runs WHERE id = ?"


class _Rows(Rows):
    """Rows read and written on the writer's connection."""

    def read(self, conn: sqlite3.Connection, run_id: str) -> Run | None:
        row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self.run(row) if row else None

    def write(self, conn: sqlite3.Connection, run: Run) -> None:
        conn.execute(UPDATE_RUN, self.update(run))


def _write_attempt(conn: sqlite3.Connection, run_id: str, attempt: Attempt) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO attempts (run_id, n, started_at, ended_at, outcome, status, "
        "error) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            attempt.n,
            attempt.started_at,
            attempt.ended_at,
            attempt.outcome,
            attempt.status,
            attempt.error,
        ),
    )


def _parked_steps(conn: sqlite3.Connection, run_id: str, attempt: int) -> list[Step]:
    """The steps the end of an attempt is decided on: the parked ones, and those that failed
    under a step policy in that attempt."""
    rows = conn.execute(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND (status IN ('sleeping', "
        "'waiting') OR (status = 'failed' AND policy IS NOT NULL AND failed_in = ?))",
        (run_id, attempt),
    ).fetchall()
    return [step_from_row(r) for r in rows]


def _read_step(conn: sqlite3.Connection, run_id: str, step_id: str) -> Step | None:
    row = conn.execute(
        f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND step_id = ?", (run_id, step_id)
    ).fetchone()
    return step_from_row(row) if row else None


def _write_step(conn: sqlite3.Connection, step: Step) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO steps ({STEP_COLUMNS}) VALUES ({', '.join('?' * STEP_WIDTH)})",
        step_values(step),
    )


_Queued = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
# Another process (a CLI, a backup) may hold the write lock for a moment: the writer thread
# waits this long for it instead of failing. Longer locks fail the write, which its caller
# retries or answers 503. The loop's thread never waits (busy_timeout 0).
BUSY_TIMEOUT_MS = 5000


def _apply(conn: sqlite3.Connection, batch: list[_Queued]) -> list[tuple[bool, Any]]:
    """Each write of an open transaction, under a savepoint of its own, so that one failing
    write (a duplicate key) is undone alone."""
    results: list[tuple[bool, Any]] = []
    for op, _ in batch:
        conn.execute("SAVEPOINT op")
        try:
            results.append((True, op(conn)))
            conn.execute("RELEASE op")
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            results.append((False, _translate(exc)))
    return results


def _failed(
    conn: sqlite3.Connection, batch: list[_Queued], exc: sqlite3.Error
) -> list[tuple[bool, Any]]:
    """The transaction is lost: roll back what is left of it, and fail every write."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite rolled back already (a full disk does that)
    error = StoreError(f"commit failed: {exc}")
    error.__cause__ = exc
    return [(False, error) for _ in batch]


class _Writer:
    """One connection, one thread for its commits, group commit (see the module docstring).

    No task sits between a write and its commit: `submit` applies a batch and hands its COMMIT
    to the thread at once when none is in flight, and the thread, when it has committed, hands
    the results back with `call_soon_threadsafe` and the loop starts the next batch from what
    queued up meanwhile.
    """

    def __init__(self, path: str, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stepgate-store")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[_Queued] = []
        self._bulk_queued = False
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        # WAL: readers never block the writer and a commit is one sequential append.
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL at every commit (power-loss safe); NORMAL only at checkpoints, which
        # still survives a process crash. This is the `durability` setting.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        # Steps and attempts are deleted with their run (retention).
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # After a checkpoint the WAL is cut back to this size instead of keeping its peak, so a
        # burst does not keep a small volume full.
        conn.execute("PRAGMA journal_size_limit=4194304")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store {self._path} has schema version {version}, newer than this "
                f"gateway understands ({len(MIGRATIONS)})"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        # From here on the wait is set around each BEGIN in the writer thread (`_commit`) only.
        conn.execute("PRAGMA busy_timeout=0")

    async def submit(self, op: Callable[[sqlite3.Connection], T], *, bulk: bool = False) -> T:
        """Queue `op` for the next commit and wait for it. A `bulk` op (one that may touch
        thousands of rows) runs in the writer thread, with its whole batch, not on the loop."""
        if self._closing or self._loop is None:
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.append((op, future))
        self._bulk_queued = self._bulk_queued or bulk
        if not self._busy:
            self._dispatch()
        return await future

    def _dispatch(self) -> None:
        batch, self._queue = self._queue, []
        bulk, self._bulk_queued = self._bulk_queued, False
        self._busy = True
        self._idle.clear()
        try:
            results = None if bulk else self._apply_here(batch)
        except sqlite3.Error as exc:  # the statements could not run at all (disk I/O)
            assert self._conn is not None and self._loop is not None
            self._loop.call_soon(self._committed, batch, _failed(self._conn, batch, exc))
            return
        if results is None:
            self._executor.submit(self._commit_and_report, batch)
        else:
            self._executor.submit(self._commit_applied, batch, results)

    def _apply_here(self, batch: list[_Queued]) -> list[tuple[bool, Any]] | None:
        """The batch's statements, on the loop's thread; None when the write lock is taken
        (another process holds it), and the writer thread must wait for it instead."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")  # busy_timeout is 0 here: never blocks the loop
        except sqlite3.Error:  # locked, or worse: the writer thread tries, and reports it
            return None
        return _apply(conn, batch)

    def _commit_applied(self, batch: list[_Queued], results: list[tuple[bool, Any]]) -> None:
        """Runs in the writer thread: only the COMMIT, whose fsync is the slow part."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            results = _failed(conn, batch, exc)
        except BaseException as exc:  # never leave a writer waiting forever
            results = [(False, StoreError(f"commit failed: {exc}")) for _ in batch]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._committed, batch, results)

    def _commit_and_report(self, batch: list[_Queued]) -> None:
        """Runs in the writer thread."""
        try:
            results = self._commit(batch)
        except BaseException as exc:  # never leave a writer waiting forever
            error = StoreError(f"commit failed: {exc}")
            results = [(False, error) for _ in batch]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._committed, batch, results)

    def _committed(self, batch: list[_Queued], results: list[tuple[bool, Any]]) -> None:
        for (_, future), (ok, value) in zip(batch, results, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._busy = False
        if self._queue:
            self._dispatch()
        else:
            self._idle.set()

    def _commit(self, batch: list[_Queued]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.execute("PRAGMA busy_timeout=0")
            results = _apply(conn, batch)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            return _failed(conn, batch, exc)
        return results

    async def close(self) -> None:
        self._closing = True
        await self._idle.wait()  # what was submitted before is committed and answered
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


def _translate(exc: Exception) -> Exception:
    """Foreign errors become ours, once, here; the store's own refusals pass as they are."""
    if isinstance(exc, sqlite3.IntegrityError) and "idem_key" in str(exc):
        error: Exception = DuplicateIdempotencyKey("idempotency key in use")
    elif isinstance(exc, sqlite3.Error):
        error = StoreError(str(exc))
    elif isinstance(exc, OverflowError | ValueError) and not isinstance(exc, UnicodeError):
        error = StoreError(f"a value cannot be stored: {exc}")
    elif isinstance(exc, UnicodeError):
        error = StoreError(f"a text cannot be stored: {exc}")
    else:
        return exc
    error.__cause__ = exc
    return error


class SQLiteStore(Store):
    """`open()` locks and migrates the file."""

    def __init__(
        self,
        path: str,
        *,
        durability: str = "full",
        key: bytes | None = None,
        key_source: str = "store_key",
    ) -> None:
        super().__init__()
        self.path = path
        self._rows = _Rows(Sealer(key) if key is not None else None)
        self._key_source = key_source
        self._writer = _Writer(path, "FULL" if durability == "full" else "NORMAL")
        self._reader: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self.write_observer: Callable[[float], None] | None = None
        self.last_write_failed: float | None = None

    # -- lifetime ------------------------------------------------------------------------------

    def _lock(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:  # a read-only file still gets its lock; its writes will fail and say so
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise StoreError(f"cannot open the store {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreLocked(
                f"the store {self.path} is in use by another gateway process; "
                "one gateway serves one SQLite file (use PostgreSQL for several)"
            ) from exc
        self._lock_fd = fd

    def _reserve(self) -> None:
        """Keep a little room on the volume: SQLite needs some to open a WAL database at all
        (its -shm file), so a gateway stopped on a full volume could not start again."""
        reserve = self.path + ".reserve"
        if os.path.exists(reserve):
            return
        try:
            with open(reserve, "wb") as out:
                out.write(b"\0" * _RESERVE)
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(reserve)

    def _release_reserve(self) -> bool:
        try:
            os.unlink(self.path + ".reserve")
        except OSError:
            return False
        log.warning(
            "store.reserve_released",
            path=self.path,
            why="the volume is full; writes will fail until there is room",
        )
        return True

    async def open(self) -> None:
        self._lock()
        try:
            try:
                await self._writer.open()
            except sqlite3.OperationalError:
                if not self._release_reserve():
                    raise
                await self._writer.open()
            await self._check_key()
            self._reserve()
            self._reader = await aiosqlite.connect(self.path)
            await self._reader.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            await self._unlock()
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        except BaseException:
            await self._unlock()
            raise

    async def _check_key(self) -> None:
        """The store key must be the one the store's runs were sealed with (its check value is
        kept in `meta`), and a store that holds sealed runs needs it: a gateway that could not
        read its runs stops here, before it serves anything."""
        sealer, source = self._rows.sealer, self._key_source

        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT value FROM meta WHERE name = ?", (KEY_CHECK,)).fetchone()
            if sealer is not None and row is not None:
                if not sealer.matches(bytes(row[0])):
                    raise StoreKeyError(
                        f"the store_key ({source}) does not open the store "
                        f"{self.path}: it was sealed with another key"
                    )
                return
            (count,) = conn.execute("SELECT count(*) FROM runs WHERE sealed != 0").fetchone()
            if count:
                raise StoreKeyError(
                    f"the store {self.path} holds {count} run(s) sealed with a store_key"
                    + (
                        " but no check value for it"
                        if sealer is not None
                        else "; set store_key to the key they were sealed with"
                    )
                )
            if sealer is not None:
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    (KEY_CHECK, sealer.check_value()),
                )
            elif row is not None:  # no sealed run is left: the key is no longer needed
                conn.execute("DELETE FROM meta WHERE name = ?", (KEY_CHECK,))

        try:
            await self._writer.submit(op)
        except StoreKeyError:
            await self._writer.close()
            raise

    async def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    async def close(self) -> None:
        try:
            await self._writer.close()
            if self._reader is not None:
                await self._reader.close()
        finally:
            await self._unlock()

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, bulk: bool = False) -> T:
        started = time.perf_counter()
        try:
            result = await self._writer.submit(op, bulk=bulk)
        except StoreError:
            self.last_write_failed = time.monotonic()
            raise
        finally:
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)
        self.last_write_failed = None
        return result

    async def writable(self) -> bool:
        try:
            await self._writer.submit(lambda conn: None)  # an empty BEGIN IMMEDIATE … COMMIT
        except StoreError:
            return False
        return self.last_write_failed is None

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        assert self._reader is not None, "store not open"
        try:
            # One call into aiosqlite's thread: execute and fetch with nothing in between, so no
            # other read can run while this one holds its snapshot.
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    # -- reads ---------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run | None:
        rows = await self._fetchall(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        return self._rows.run(rows[0]) if rows else None

    async def find_idempotent(self, route: str, key: str) -> Run | None:
        rows = await self._fetchall(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE route = ? AND idem_key = ?", (route, key)
        )
        return self._rows.run(rows[0]) if rows else None

    async def count_queued(self) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT route, count(*) FROM runs WHERE status = 'queued' GROUP BY route"
        )
        return {route: n for route, n in rows}

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, count(*) FROM runs GROUP BY status")
        return {status: n for status, n in rows}

    async def due(
        self, before: float, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[float, str]]:
        start, start_id = after if after is not None else (-math.inf, "")
        rows = await self._fetchall(
            "SELECT due_at, id FROM runs WHERE due_at IS NOT NULL AND due_at <= ? "
            "AND (due_at, id) > (?, ?) ORDER BY due_at, id LIMIT ?",
            (before, start, start_id, limit),
        )
        return [(due, run_id) for due, run_id in rows]

    async def _select_runs(self, sql: str, params: Sequence[Any]) -> list[Run]:
        return [self._rows.run(r) for r in await self._fetchall(sql, params)]

    async def steps(self, run_id: str) -> list[Step]:
        rows = await self._fetchall(
            f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? "
            "ORDER BY seq IS NULL, seq, created_at",
            (run_id,),
        )
        return [step_from_row(r) for r in rows]

    async def count_steps(self, run_id: str) -> int:
        rows = await self._fetchall("SELECT count(*) FROM steps WHERE run_id = ?", (run_id,))
        return int(rows[0][0])

    async def attempts(self, run_id: str) -> list[Attempt]:
        rows = await self._fetchall(
            "SELECT n, started_at, ended_at, outcome, status, error FROM attempts "
            "WHERE run_id = ? ORDER BY n",
            (run_id,),
        )
        return [Attempt(*r) for r in rows]

    # -- transactions --------------------------------------------------------------------------

    async def create_run(self, run: Run) -> Run:
        route = self.route_of(run.route)
        if route is None or not route.flow_controlled:
            params = self._rows.insert(run)
            await self._write(lambda conn: conn.execute(_INSERT_RUN, params))
            self._changed(run)
            return run

        def op(conn: sqlite3.Connection) -> Run:
            admitted = self._admit(conn, run, route, run.created_at)
            if admitted.status == RunStatus.QUEUED:
                (queued,) = conn.execute(QUEUED_ON_ROUTE, (run.route,)).fetchone()
                if queued >= route.queue_limit:
                    raise QueueFull(run.route)
            conn.execute(_INSERT_RUN, self._rows.insert(admitted))
            return admitted

        recorded = await self._write(op)
        self._changed(recorded)
        return recorded

    # -- flow control (gateway.flow) -----------------------------------------------------------

    def _admit(self, conn: sqlite3.Connection, run: Run, route: Route, now: float) -> Run:
        """The run due to be invoked as it starts now, or queued (its throttle turn taken)."""
        held = waiting = 0
        if route.concurrency is not None:
            held, waiting = conn.execute(FLOW_COUNTS, (run.route, run.slot_key or "")).fetchone()
        seen = flow.Seen(held, waiting, self._tat(conn, run, route))
        admission = flow.admit(run, route, seen, now)
        self._set_tat(conn, run, admission.tat)
        return admission.run

    @staticmethod
    def _tat(conn: sqlite3.Connection, run: Run, route: Route) -> float | None:
        if route.throttle is None:
            return None
        row = conn.execute(
            BUCKET_TAT, (flow.bucket("throttle", run.route, run.throttle_key or ""),)
        ).fetchone()
        return None if row is None else float(row[0])

    @staticmethod
    def _set_tat(conn: sqlite3.Connection, run: Run, tat: float | None) -> None:
        if tat is not None:
            name = flow.bucket("throttle", run.route, run.throttle_key or "")
            conn.execute(SET_BUCKET_TAT, (name, tat))

    def _release(
        self, conn: sqlite3.Connection, route_name: str, slot_key: str | None, now: float
    ) -> list[Run]:
        """A slot of the flow may be free: give it to the runs waiting longest for one."""
        route = self.route_of(route_name)
        if route is None or route.concurrency is None:
            return self._release_all(conn, route, route_name, slot_key, now)
        if conn.execute(ANY_WAITING, (route_name, slot_key or "")).fetchone() is None:
            return []  # most often: nobody waits (the writer has no other writer to race)
        held, waiting = conn.execute(FLOW_COUNTS, (route_name, slot_key or "")).fetchone()
        free = min(route.concurrency.limit - held, waiting)
        if free <= 0:
            return []
        rows = conn.execute(OLDEST_WAITING, (route_name, slot_key or "", free)).fetchall()
        return [self._give_slot(conn, self._rows.run(row), route, now) for row in rows]

    def _release_all(
        self,
        conn: sqlite3.Connection,
        route: Route | None,
        route_name: str,
        slot_key: str | None,
        now: float,
    ) -> list[Run]:
        """A route that no longer limits concurrency (or is gone) lets its queue go at once:
        each run takes its throttle turn, or fails at its invocation if the route is gone."""
        if slot_key is None:
            return []
        rows = conn.execute(OLDEST_WAITING, (route_name, slot_key, -1)).fetchall()
        given = []
        for row in rows:
            run = self._rows.run(row)
            if route is None:
                given.append(flow.queued(run, now, due=now))
                self._rows.write(conn, given[-1])
            else:
                given.append(self._give_slot(conn, run, route, now))
        return given

    def _give_slot(self, conn: sqlite3.Connection, run: Run, route: Route, now: float) -> Run:
        tat = self._tat(conn, run, route)
        admission = flow.given_slot(run, route, tat, now, start=self.start_promoted)
        self._set_tat(conn, run, admission.tat)
        self._rows.write(conn, admission.run)
        return admission.run

    async def promote_waiting(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> list[Run]:
            given: list[Run] = []
            for route, slot_key in conn.execute(WAITING_FLOWS).fetchall():
                given += self._release(conn, route, slot_key, now)
            return given

        given = await self._write(op, bulk=True)
        self._given(given)
        return len(given)

    async def recover(self, rule: InterruptRule, *, before: float) -> list[AfterAttempt]:
        def op(conn: sqlite3.Connection) -> tuple[list[AfterAttempt], list[Run]]:
            rows = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE status = 'running' AND updated_at < ?",
                (before,),
            ).fetchall()
            done = []
            for row in rows:
                after = rule(self._rows.run(row))
                self._rows.write(conn, after.run)
                _write_attempt(conn, after.run.id, after.attempt)
                if after.run.ended:
                    self._settle_parent(conn, after.run, woken)
                done.append(after)
            flows = {(after.run.route, after.run.slot_key) for after in done}
            given = [
                run
                for route, slot_key in sorted(flows, key=str)
                for run in self._release(conn, route, slot_key, time.time())
            ]
            return done, given

        woken: list[Run] = []
        recovered, given = await self._write(op, bulk=True)
        for after in recovered:
            self._changed(after.run)
        for parent in woken:
            self._changed(parent)
        self._given(given)
        return recovered

    async def claim(self, run_id: str, now: float) -> Run | None:
        def op(conn: sqlite3.Connection) -> Run | None:
            run = self._rows.read(conn, run_id)
            claimed = None if run is None else claim(run, now)
            if claimed is None or run is None:
                return None
            if run.status in (RunStatus.SLEEPING, RunStatus.WAITING):
                # Sleeps whose deadline passed complete with null; so do timed-out waits.
                conn.execute(
                    "UPDATE steps SET status = 'completed', output = 'null', updated_at = ? "
                    "WHERE run_id = ? AND status IN ('sleeping', 'waiting') AND wake_at <= ?",
                    (now, run_id, now),
                )
            route = self.route_of(run.route)
            if run.status != RunStatus.QUEUED and route is not None and route.flow_controlled:
                claimed = self._admit(conn, run, route, now)  # a queued one has its turn
            self._rows.write(conn, claimed)
            return claimed

        claimed = await self._write(op)
        if claimed is None:
            return None
        self._changed(claimed)
        return claimed if claimed.status == RunStatus.RUNNING else None

    async def finish_attempt(
        self, run_id: str, outcome: Outcome, rule: AttemptRule
    ) -> AfterAttempt:
        def op(conn: sqlite3.Connection) -> tuple[AfterAttempt, list[Run]]:
            run = self._rows.read(conn, run_id)
            if run is None:
                raise UnknownRun(run_id)
            after = rule(run, _parked_steps(conn, run_id, run.attempt))
            given: list[Run] = []
            if after.decision is not None:
                self._rows.write(conn, after.run)
                if after.run.ended:
                    self._settle_parent(conn, after.run, woken)
                if run.slot_key is not None:
                    given = self._release(conn, run.route, run.slot_key, after.run.updated_at)
            _write_attempt(conn, run_id, after.attempt)
            return after, given

        woken: list[Run] = []
        after, given = await self._write(op)
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
        def op(conn: sqlite3.Connection) -> StepWrite:
            found = conn.execute(_SELECT_HEAD, (run_id,)).fetchone()
            head = head_from_row(found) if found is not None else None
            run, attempt = authorize_callback(head, run_id, token)
            current = _read_step(conn, run_id, step_id)
            if call.kind == StepKind.WAIT and (
                current is None or current.status == StepStatus.FAILED
            ):
                call_now = self._lookback(conn, run_id, call, lookback_since)
            else:
                call_now = call
            write = rules.merge_step(current, call_now, run_id, step_id, now, attempt)
            if write.created:
                if call.no_retry:
                    conn.execute("UPDATE runs SET no_retry = 1 WHERE id = ?", (run_id,))
                _write_step(conn, write.step)
            return self._linked(conn, StepWrite(write.created, write.step, run.route), call, now)

        write = await self._write(op)
        if write.started is not None:
            self._changed(write.started)
        return write

    def _linked(
        self, conn: sqlite3.Connection, write: StepWrite, call: StepCall, now: float
    ) -> StepWrite:
        """A signal step's id and secret, an invoke step's child run: kept when the step is
        created (the child run too, in the same commit: once, however often it is asked for),
        read back when it was recorded before."""
        step = write.step
        if step.kind == StepKind.SIGNAL:
            if write.created and call.signal_id is not None and call.signal_token is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO signals (id, run_id, step_id, token, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (call.signal_id, step.run_id, step.id, call.signal_token, now),
                )
            row = conn.execute(
                "SELECT id, token FROM signals WHERE run_id = ? AND step_id = ?",
                (step.run_id, step.id),
            ).fetchone()
            return replace(write, signal=(row[0], row[1]) if row else None)
        if step.kind == StepKind.INVOKE:
            started = None
            if write.created and call.child is not None:
                child = call.child
                route = self.route_of(child.route)
                if route is not None and route.flow_controlled:  # it waits its turn, too
                    child = self._admit(conn, child, route, now)
                conn.execute(_INSERT_RUN, self._rows.insert(child))
                conn.execute(  # replaces the link to a failed child after an admin retry
                    "INSERT OR REPLACE INTO children (child_id, parent_id, step_id, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (child.id, step.run_id, step.id, now),
                )
                started = child if child.status == RunStatus.RUNNING else None
            row = conn.execute(
                "SELECT child_id FROM children WHERE parent_id = ? AND step_id = ?",
                (step.run_id, step.id),
            ).fetchone()
            return replace(write, child_id=row[0] if row else None, started=started)
        return write

    def _settle_parent(self, conn: sqlite3.Connection, child: Run, woken: list[Run]) -> None:
        """A run has ended: if it is a child run, its parent's invoke step completes (or fails
        for good) in the same commit, and the parent is woken."""
        row = conn.execute(
            "SELECT parent_id, step_id FROM children WHERE child_id = ?", (child.id,)
        ).fetchone()
        if row is None:
            return
        step = _read_step(conn, row[0], row[1])
        parent = self._rows.read(conn, row[0])
        if step is None or step.status != StepStatus.WAITING or parent is None or parent.ended:
            return
        now = child.ended_at or time.time()
        status, output, error = rules.child_result(child)
        conn.execute(  # a failed child fails the step for good: a replay raises StepFailed
            "UPDATE steps SET status = ?, output = ?, error = ?, final = ?, updated_at = ? "
            "WHERE run_id = ? AND step_id = ?",
            (str(status), output, error, int(error is not None), now, step.run_id, step.id),
        )
        after = rules.woken(parent, now)
        self._rows.write(conn, after)
        woken.append(after)

    @staticmethod
    def _lookback(conn: sqlite3.Connection, run_id: str, call: StepCall, since: float) -> StepCall:
        """A new wait, completed at once by an early event if one matches (same transaction as
        event delivery, so none slips between)."""
        assert call.event is not None
        taken = rules.taken_event_ids(
            output
            for (output,) in conn.execute(
                "SELECT output FROM steps WHERE run_id = ? AND kind = 'wait' "
                "AND status = 'completed' AND output != 'null'",
                (run_id,),
            )
        )
        events = conn.execute(
            "SELECT id, data, ts FROM events WHERE name = ? AND ts >= ? ORDER BY ts",
            (call.event, since),
        )
        output = rules.lookback_match(call.event, call.match or "{}", events, taken)
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
        def op(conn: sqlite3.Connection) -> list[Run] | None:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO events (id, name, data, ts) VALUES (?, ?, ?, ?)",
                (event_id, name, data, ts),
            ).rowcount
            if not inserted:
                return None
            obj = event_object(event_id, name, json.loads(data), ts)
            output = rules.dump(obj)
            woken: dict[str, Run] = {}
            waiting = conn.execute(
                f"SELECT {', '.join('s.' + c.strip() for c in STEP_COLUMNS.split(','))} "
                "FROM steps s JOIN runs r ON r.id = s.run_id "
                "WHERE s.status = 'waiting' AND s.event = ? AND r.ended_at IS NULL",
                (name,),
            ).fetchall()
            for row in waiting:
                step = step_from_row(row)
                if not rules.wait_is_completed_by(step, obj):
                    continue
                conn.execute(
                    "UPDATE steps SET status = 'completed', output = ?, updated_at = ? "
                    "WHERE run_id = ? AND step_id = ?",
                    (output, ts, step.run_id, step.id),
                )
                if step.run_id not in woken:
                    run = self._rows.read(conn, step.run_id)
                    assert run is not None
                    after = rules.woken(run, ts)
                    self._rows.write(conn, after)
                    woken[step.run_id] = after
            return list(woken.values())

        woken = await self._write(op)
        if woken is None:
            return None
        for run in woken:
            self._changed(run)
        return [run.id for run in woken]

    async def _transition(self, run_id: str, rule: Callable[[Run], Run | None]) -> Run | None:
        def op(conn: sqlite3.Connection) -> tuple[Run | None, list[Run]]:
            run = self._rows.read(conn, run_id)
            changed = None if run is None else rule(run)
            given: list[Run] = []
            if changed is not None and run is not None:
                self._rows.write(conn, changed)
                if flow.holds_slot(run) and not flow.holds_slot(changed):
                    given = self._release(conn, run.route, run.slot_key, changed.updated_at)
            return changed, given

        changed, given = await self._write(op)
        if changed is not None:
            self._changed(changed)
        self._given(given)
        return changed

    async def cancel(self, run_id: str, now: float) -> Run | None:
        def op(conn: sqlite3.Connection) -> Run | None:
            run = self._rows.read(conn, run_id)
            cancelled = None if run is None else cancel_run(run, now)
            if cancelled is None:
                return None
            self._rows.write(conn, cancelled)
            self._settle_parent(conn, cancelled, changed)
            assert run is not None
            freed = [run] if flow.holds_slot(run) else []
            # The children it started go with it, and theirs.
            parents = [run_id]
            while parents:
                below = conn.execute(
                    f"SELECT child_id FROM children WHERE parent_id IN "
                    f"({', '.join('?' * len(parents))})",
                    parents,
                ).fetchall()
                parents = []
                for (child_id,) in below:
                    child = self._rows.read(conn, child_id)
                    ended = None if child is None else cancel_run(child, now)
                    if ended is not None and child is not None:
                        self._rows.write(conn, ended)
                        changed.append(ended)
                        parents.append(child_id)
                        if flow.holds_slot(child):
                            freed.append(child)
            flows = {(held.route, held.slot_key) for held in freed if held.slot_key is not None}
            for route, slot_key in sorted(flows, key=str):  # their slots go to those waiting
                given.extend(self._release(conn, route, slot_key, now))
            return cancelled

        changed: list[Run] = []
        given: list[Run] = []
        cancelled = await self._write(op)
        if cancelled is not None:
            self._changed(cancelled)
        for run in changed:
            self._changed(run)
        self._given(given)
        return cancelled

    # -- signals and child runs ----------------------------------------------------------------

    async def find_signal(self, signal_id: str) -> SignalRef | None:
        rows = await self._fetchall(
            "SELECT id, run_id, step_id, token FROM signals WHERE id = ?", (signal_id,)
        )
        return SignalRef(*rows[0]) if rows else None

    async def signals(self, run_id: str) -> dict[str, SignalRef]:
        rows = await self._fetchall(
            "SELECT id, run_id, step_id, token FROM signals WHERE run_id = ?", (run_id,)
        )
        return {row[2]: SignalRef(*row) for row in rows}

    async def deliver_signal(
        self, signal_id: str, token: str, output: str, now: float
    ) -> SignalVerdict | None:
        def op(conn: sqlite3.Connection) -> SignalVerdict | None:
            row = conn.execute(
                "SELECT run_id, step_id, token FROM signals WHERE id = ?", (signal_id,)
            ).fetchone()
            if row is None or not same_secret(token, row[2]):
                return None
            run = self._rows.read(conn, row[0])
            if run is None:
                return None
            step = _read_step(conn, row[0], row[1])
            verdict = rules.signal_verdict(run, step, now)
            if verdict == rules.SignalVerdict.DELIVER:
                conn.execute(
                    "UPDATE steps SET status = 'completed', output = ?, updated_at = ? "
                    "WHERE run_id = ? AND step_id = ?",
                    (output, now, row[0], row[1]),
                )
                after = rules.woken(run, now)
                self._rows.write(conn, after)
                woken.append(after)
            return verdict

        woken: list[Run] = []
        verdict = await self._write(op)
        for run in woken:
            self._changed(run)
        return verdict

    async def links(self, run_id: str) -> tuple[Link | None, list[Link]]:
        rows = await self._fetchall(
            "SELECT child_id, parent_id, step_id FROM children "
            "WHERE child_id = ? OR parent_id = ? ORDER BY created_at",
            (run_id, run_id),
        )
        found = [Link(*row) for row in rows]
        parent = next((link for link in found if link.child_id == run_id), None)
        return parent, [link for link in found if link.parent_id == run_id]

    async def retry_ended(self, run_id: str, now: float) -> Run | None:
        def op(conn: sqlite3.Connection) -> Run | None:
            run = self._rows.read(conn, run_id)
            changed = None if run is None else retry_ended(run, now)
            if changed is not None:
                # A retried run starts its final steps afresh (step policies).
                conn.execute(RESTART_FINAL_STEPS, (now, run_id))
                self._rows.write(conn, changed)
            return changed

        changed = await self._write(op)
        if changed is not None:
            self._changed(changed)
        return changed

    async def purge_ended(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE ended_at IS NOT NULL "
                "AND ended_at < ? LIMIT 5000)",
                (before,),
            )
            return cursor.rowcount

        return await self._write(op, bulk=True)

    async def purge_events(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM flow_buckets WHERE tat < ?", (before,))
            return conn.execute("DELETE FROM events WHERE ts < ?", (before,)).rowcount

        return await self._write(op, bulk=True)

    async def checkpoint(self) -> None:
        """Fold the WAL back into the database and truncate it (housekeeping). A checkpoint
        can't run inside the writer's transaction, so it goes through the reader's connection."""
        await self._fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
