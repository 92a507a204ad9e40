"""A fresh PostgreSQL database for one harness run, dropped at its end.

The server is the one these machines run (127.0.0.1:5432, user postgres, trust), or the one
`STEPGATE_BENCH_PG` names, as for bench/replicas.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

PG_SERVER = os.environ.get("STEPGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


class PostgresUnavailable(Exception):
    """No server to create a database on; str() is the one-line reason."""


def database_name(stamp: str, pid: int) -> str:
    """`stepgate_bench_<stamp>_<pid>`: one per run, even for two runs started the same second."""
    cleaned = "".join(c if c.isalnum() else "_" for c in stamp)
    return f"stepgate_bench_{cleaned}_{pid}".lower()


async def _admin(sql: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
    try:
        version = str(await conn.fetchval("SHOW server_version"))
        if sql:
            await conn.execute(sql)
        return {"version": version}
    finally:
        await conn.close()


class Database:
    """`create()` makes the database and returns its URL; `drop()` is safe to call twice."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = f"{PG_SERVER}/{name}"
        self.created = False
        self.server: dict[str, Any] = {}

    def create(self) -> str:
        try:
            self.server = asyncio.run(_admin(f'CREATE DATABASE "{self.name}"'))
        except ImportError as exc:
            raise PostgresUnavailable(f"asyncpg is missing ({exc}): pip install asyncpg") from exc
        except Exception as exc:  # refused, timed out, auth: whatever it is, no database
            raise PostgresUnavailable(
                f"PostgreSQL is not reachable at {PG_SERVER} ({type(exc).__name__}: {exc}); "
                "start it or set STEPGATE_BENCH_PG"
            ) from exc
        self.created = True
        return self.url

    def drop(self) -> None:
        if self.created:
            # FORCE: a gateway killed mid-run may leave a connection behind for a moment.
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.created = False


def server_pids(database: str) -> list[int]:
    """The PostgreSQL server's processes that work for `database`: the postmaster, its
    auxiliaries (checkpointer, WAL writer, ...) and the backends connected to `database`,
    not backends of other databases (another engineer's tests). Linux /proc only."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != "postgres":
                continue
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # A backend's title names its client, "127.0.0.1(40000)" or "[local]", and database.
        backend = "(" in title or "[local]" in title
        if database in title or not backend:
            pids.append(int(entry))
    return pids
