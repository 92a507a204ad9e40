"""The run store: the only module that speaks SQL.

Writes go through one writer thread that owns its own SQLite connection and commits every write
that queued up while the previous commit was on its way to disk in a single transaction (group
commit). Each write still waits for the commit that holds it, so an acknowledged write is always
durable; concurrent writers share the fsync instead of queueing behind one each.

Reads go through aiosqlite on a second connection; WAL lets them run beside the writer and they
always see every committed write.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiosqlite

from gateway import runs
from gateway.errors import StoreError
from gateway.events import event_object, matches_text

T = TypeVar("T")


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
)

Headers = list[tuple[str, str]]


@dataclass(slots=True)
class Run:
    """A run as stored. The engine keeps the record of a live run in memory and mutates it."""

    id: str
    route: str
    status: str
    attempt: int
    token: str
    poll_token: str
    method: str
    target: str
    headers: Headers
    body: bytes
    created_at: float
    updated_at: float
    failures: int = 0
    no_retry: bool = False
    idem_key: str | None = None
    request_hash: str | None = None
    trace_id: str | None = None
    due_at: float | None = None
    resp_status: int | None = None
    resp_headers: Headers | None = None
    resp_body: bytes | None = None
    error: str | None = None
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in runs.ENDED


@dataclass(frozen=True, slots=True)
class Step:
    run_id: str
    id: str
    seq: int | None
    kind: str
    status: str
    output: str | None  # JSON text, passed through untouched
    error: str | None  # JSON text
    attempts: int
    wake_at: float | None
    event: str | None
    match: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    n: int
    started_at: float
    ended_at: float | None
    outcome: str
    status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class StepWrite:
    """What a step PUT stored: whether this call created the record, and the record after it."""

    created: bool
    step: Step


@dataclass(slots=True)
class RunPage:
    runs: list[Run] = field(default_factory=list)
    next_cursor: str | None = None


class DuplicateIdempotencyKey(StoreError):
    """A run with this (route, Idempotency-Key) exists already."""


_RUN_COLUMNS = (
    "id, route, status, attempt, token, poll_token, method, target, headers, body, created_at, "
    "updated_at, failures, no_retry, idem_key, request_hash, trace_id, due_at, resp_status, "
    "resp_headers, resp_body, error, ended_at"
)
_STEP_COLUMNS = (
    "run_id, step_id, seq, kind, status, output, error, attempts, wake_at, event, match, "
    "created_at, updated_at"
)


def _run_from_row(row: Sequence[Any]) -> Run:
    return Run(
        id=row[0], route=row[1], status=row[2], attempt=row[3], token=row[4], poll_token=row[5],
        method=row[6], target=row[7], headers=[tuple(h) for h in json.loads(row[8])],
        body=bytes(row[9]), created_at=row[10], updated_at=row[11], failures=row[12],
        no_retry=bool(row[13]), idem_key=row[14], request_hash=row[15], trace_id=row[16],
        due_at=row[17], resp_status=row[18],
        resp_headers=[tuple(h) for h in json.loads(row[19])] if row[19] else None,
        resp_body=bytes(row[20]) if row[20] is not None else None, error=row[21], ended_at=row[22],
    )


def _step_from_row(row: Sequence[Any]) -> Step:
    return Step(*row)


def _insert_step(conn: sqlite3.Connection, step: Step) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO steps ({_STEP_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (step.run_id, step.id, step.seq, step.kind, step.status, step.output, step.error,
         step.attempts, step.wake_at, step.event, step.match, step.created_at, step.updated_at),
    )


def _dump_headers(headers: Headers | None) -> str | None:
    return None if headers is None else json.dumps(headers, separators=(",", ":"))


class _Writer:
    """One thread, one connection, group commit (see the module docstring).

    No task sits between a write and its commit: `submit` hands a batch to the thread at once
    when none is in flight, and the thread, when it has committed, hands the results back with
    `call_soon_threadsafe` and the loop starts the next batch from what queued up meanwhile.
    """

    def __init__(self, path: str, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stepgate-store")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
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
        # WAL: readers never block the writer and a commit is one sequential append.
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL at every commit (power-loss safe); NORMAL only at checkpoints, which
        # still survives a process crash. This is the `durability` setting.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        # Steps and attempts are deleted with their run (retention).
        conn.execute("PRAGMA foreign_keys=ON")
        # Another process (a CLI, a backup) may hold a lock for a moment; wait instead of failing.
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store {self._path} has schema version {version}, newer than this "
                f"gateway understands ({len(MIGRATIONS)})"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        self._conn = conn

    async def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._closing or self._loop is None:
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.append((op, future))
        if not self._busy:
            self._dispatch()
        return await future

    def _dispatch(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        self._idle.clear()
        self._executor.submit(self._commit_and_report, batch)

    def _commit_and_report(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
    ) -> None:
        """Runs in the writer thread."""
        try:
            results = self._commit(batch)
        except BaseException as exc:  # never leave a writer waiting forever
            error = StoreError(f"commit failed: {exc}")
            results = [(False, error) for _ in batch]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._committed, batch, results)

    def _committed(
        self,
        batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
        results: list[tuple[bool, Any]],
    ) -> None:
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

    def _commit(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
    ) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in batch:
                # A savepoint per write: one failing write (a duplicate key) is undone alone.
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, _translate(exc)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"commit failed: {exc}")
            error.__cause__ = exc
            return [(False, error) for _ in batch]
        return results

    async def close(self) -> None:
        self._closing = True
        await self._idle.wait()  # what was submitted before is committed and answered
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError) and "idem_key" in str(exc):
        error: Exception = DuplicateIdempotencyKey("idempotency key in use")
    elif isinstance(exc, sqlite3.Error):
        error = StoreError(str(exc))
    else:
        return exc
    error.__cause__ = exc
    return error


class Store:
    """SQLite store. `open()` migrates the file; every method is safe to call concurrently."""

    def __init__(self, path: str, *, durability: str = "full") -> None:
        self.path = path
        self._writer = _Writer(path, "FULL" if durability == "full" else "NORMAL")
        self._reader: aiosqlite.Connection | None = None
        self.write_observer: Callable[[float], None] | None = None

    async def open(self) -> None:
        try:
            await self._writer.open()
            self._reader = await aiosqlite.connect(self.path)
            await self._reader.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc

    async def close(self) -> None:
        await self._writer.close()
        if self._reader is not None:
            await self._reader.close()

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        started = time.perf_counter()
        try:
            return await self._writer.submit(op)
        finally:
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        assert self._reader is not None, "store not open"
        try:
            async with self._reader.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def ping(self) -> None:
        await self._fetchall("SELECT 1")

    # -- runs --------------------------------------------------------------------------------

    async def create_run(self, run: Run) -> None:
        params = (
            run.id, run.route, run.status, run.attempt, run.token, run.poll_token, run.method,
            run.target, _dump_headers(run.headers), run.body, run.created_at, run.updated_at,
            run.failures, int(run.no_retry), run.idem_key, run.request_hash, run.trace_id,
            run.due_at, run.resp_status, _dump_headers(run.resp_headers), run.resp_body, run.error,
            run.ended_at,
        )
        sql = f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES ({', '.join('?' * 23)})"
        await self.write(lambda conn: conn.execute(sql, params))

    async def get_run(self, run_id: str) -> Run | None:
        rows = await self._fetchall(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        return _run_from_row(rows[0]) if rows else None

    async def find_idempotent(self, route: str, key: str) -> Run | None:
        rows = await self._fetchall(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE route = ? AND idem_key = ?", (route, key)
        )
        return _run_from_row(rows[0]) if rows else None

    async def open_runs(self) -> list[Run]:
        rows = await self._fetchall(f"SELECT {_RUN_COLUMNS} FROM runs WHERE ended_at IS NULL")
        return [_run_from_row(r) for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, count(*) FROM runs GROUP BY status")
        return {status: n for status, n in rows}

    async def due(self, before: float, limit: int) -> list[tuple[float, str]]:
        rows = await self._fetchall(
            "SELECT due_at, id FROM runs WHERE due_at IS NOT NULL AND due_at <= ? "
            "ORDER BY due_at LIMIT ?",
            (before, limit),
        )
        return [(due, run_id) for due, run_id in rows]

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
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        found = [_run_from_row(r) for r in await self._fetchall(sql, params)]
        page = RunPage(runs=found[:limit])
        if len(found) > limit:
            last = found[limit - 1]
            page.next_cursor = f"{last.created_at!r}~{last.id}"
        return page

    async def save_run(
        self, run: Run, *, attempt: Attempt | None = None, expect: str | None = None
    ) -> bool:
        """Write the mutable part of a run (and, optionally, the attempt that just ended).

        With `expect`, write only if the stored status is still that one (compare-and-set), so
        two copies of a run can't overwrite each other's transitions; returns whether it wrote.
        """
        run_params = (
            run.status, run.attempt, run.failures, int(run.no_retry), run.due_at,
            run.resp_status, _dump_headers(run.resp_headers), run.resp_body, run.error,
            run.updated_at, run.ended_at, run.id, expect, expect,
        )

        def op(conn: sqlite3.Connection) -> bool:
            written = conn.execute(
                "UPDATE runs SET status = ?, attempt = ?, failures = ?, no_retry = ?, due_at = ?, "
                "resp_status = ?, resp_headers = ?, resp_body = ?, error = ?, updated_at = ?, "
                "ended_at = ? WHERE id = ? AND (? IS NULL OR status = ?)",
                run_params,
            ).rowcount
            if not written:
                return False
            if attempt is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO attempts (run_id, n, started_at, ended_at, outcome, "
                    "status, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run.id, attempt.n, attempt.started_at, attempt.ended_at, attempt.outcome,
                     attempt.status, attempt.error),
                )
            return True

        return await self.write(op)

    async def purge_ended(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE ended_at IS NOT NULL "
                "AND ended_at < ? LIMIT 5000)",
                (before,),
            )
            return cursor.rowcount

        return await self.write(op)

    # -- steps -------------------------------------------------------------------------------

    async def steps(self, run_id: str) -> list[Step]:
        rows = await self._fetchall(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? "
            "ORDER BY seq IS NULL, seq, created_at",
            (run_id,),
        )
        return [_step_from_row(r) for r in rows]

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

    async def put_step(
        self,
        run_id: str,
        step_id: str,
        *,
        seq: int | None,
        kind: str,
        status: str,
        output: str | None = None,
        error: str | None = None,
        wake_at: float | None = None,
        event: str | None = None,
        match: str | None = None,
        no_retry: bool = False,
        now: float,
    ) -> StepWrite:
        """Record a step. First write wins: a completed record is never changed, and a parked
        (sleeping/waiting) record is only changed by completing it. `no_retry` marks the run to
        end after this invocation (a step failed with retriable: false), in the same commit."""

        def op(conn: sqlite3.Connection) -> StepWrite:
            row = conn.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? AND step_id = ?",
                (run_id, step_id),
            ).fetchone()
            current = _step_from_row(row) if row else None
            if current is not None and current.status in ("completed", "sleeping", "waiting"):
                return StepWrite(created=False, step=current)
            if no_retry:
                conn.execute("UPDATE runs SET no_retry = 1 WHERE id = ?", (run_id,))
            attempts = (current.attempts if current else 0) + (1 if kind == "run" else 0)
            # A step that succeeds after failing keeps its last error, for the timeline.
            last_error = error if error is not None or current is None else current.error
            new = Step(
                run_id, step_id, seq if current is None or seq is not None else current.seq,
                kind, status, output, last_error, attempts, wake_at, event, match,
                current.created_at if current else now, now,
            )
            _insert_step(conn, new)
            return StepWrite(created=True, step=new)

        return await self.write(op)

    async def complete_due_steps(self, run_id: str, now: float) -> int:
        """Sleeps whose deadline passed complete with null; so do waits whose timeout passed."""

        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE steps SET status = 'completed', output = 'null', updated_at = ? "
                "WHERE run_id = ? AND status IN ('sleeping', 'waiting') AND wake_at <= ?",
                (now, run_id, now),
            )
            return cursor.rowcount

        return await self.write(op)

    async def parked_steps(self, run_id: str) -> list[Step]:
        rows = await self._fetchall(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? "
            "AND status IN ('sleeping', 'waiting')",
            (run_id,),
        )
        return [_step_from_row(r) for r in rows]

    # -- events ------------------------------------------------------------------------------

    async def register_wait(
        self,
        run_id: str,
        step_id: str,
        *,
        seq: int | None,
        event: str,
        match: str,
        timeout_at: float,
        lookback_since: float,
        now: float,
    ) -> StepWrite:
        """Record a wait, completed at once by the first matching event received since
        `lookback_since`. Done in one transaction with event delivery, so none slips between."""

        def op(conn: sqlite3.Connection) -> StepWrite:
            row = conn.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? AND step_id = ?",
                (run_id, step_id),
            ).fetchone()
            if row is not None and row[4] != "failed":
                return StepWrite(created=False, step=_step_from_row(row))
            status, output = "waiting", None
            # An event completes at most one wait of a run: a loop of waits for the same
            # event name must not get the same early event twice from the look-back.
            taken = {
                json.loads(done)["id"]
                for (done,) in conn.execute(
                    "SELECT output FROM steps WHERE run_id = ? AND kind = 'wait' "
                    "AND status = 'completed' AND output != 'null'",
                    (run_id,),
                )
            }
            for event_id, data, ts in conn.execute(
                "SELECT id, data, ts FROM events WHERE name = ? AND ts >= ? ORDER BY ts",
                (event, lookback_since),
            ):
                if event_id in taken:
                    continue
                candidate = event_object(event_id, event, json.loads(data), ts)
                if matches_text(match, candidate):
                    status, output = "completed", json.dumps(candidate, separators=(",", ":"))
                    break
            step = Step(run_id, step_id, seq, "wait", status, output, None, 0, timeout_at, event,
                        match, now, now)
            _insert_step(conn, step)
            return StepWrite(created=True, step=step)

        return await self.write(op)

    async def deliver_event(
        self, event_id: str, name: str, data: str, ts: float
    ) -> list[str] | None:
        """Store an event and complete every wait it matches; the woken runs fall due at once.

        Returns the ids of the woken runs, or None when this event id was stored before."""

        def op(conn: sqlite3.Connection) -> list[str] | None:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO events (id, name, data, ts) VALUES (?, ?, ?, ?)",
                (event_id, name, data, ts),
            ).rowcount
            if not inserted:
                return None
            obj = event_object(event_id, name, json.loads(data), ts)
            output = json.dumps(obj, separators=(",", ":"))
            woken: list[str] = []
            waiting = conn.execute(
                "SELECT s.run_id, s.step_id, s.match FROM steps s JOIN runs r ON r.id = s.run_id "
                "WHERE s.status = 'waiting' AND s.event = ? AND r.ended_at IS NULL",
                (name,),
            ).fetchall()
            for run_id, step_id, match in waiting:
                if not matches_text(match, obj):
                    continue
                conn.execute(
                    "UPDATE steps SET status = 'completed', output = ?, updated_at = ? "
                    "WHERE run_id = ? AND step_id = ?",
                    (output, ts, run_id, step_id),
                )
                conn.execute(
                    "UPDATE runs SET due_at = ? WHERE id = ? AND status IN ('sleeping', 'waiting')",
                    (ts, run_id),
                )
                if run_id not in woken:
                    woken.append(run_id)
            return woken

        return await self.write(op)

    async def purge_events(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM events WHERE ts < ?", (before,)).rowcount

        return await self.write(op)
