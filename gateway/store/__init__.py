"""The run store: the only package that speaks SQL.

`base` is the interface (named transactions, notifications, the store's errors), `rules` the
domain rules every dialect applies inside its transactions, `rows` a run as a row, `sqlite` the
embedded dialect and `postgres` the shared one, for several replicas.
`open_store` picks the dialect from the configured URL.
"""

from __future__ import annotations

import secrets
import socket

from gateway.config import Settings
from gateway.store.base import (
    AttemptFenced,
    Change,
    DuplicateIdempotencyKey,
    Link,
    QueueFull,
    Refused,
    Replica,
    RunPage,
    SignalRef,
    Store,
    StoreLocked,
    UnknownRun,
    WrongToken,
)
from gateway.store.rules import SignalVerdict, StepCall, StepWrite
from gateway.store.sealing import StoreKeyError
from gateway.store.sqlite import SQLiteStore

__all__ = [
    "AttemptFenced",
    "Change",
    "DuplicateIdempotencyKey",
    "Link",
    "QueueFull",
    "Refused",
    "Replica",
    "RunPage",
    "SQLiteStore",
    "SignalRef",
    "SignalVerdict",
    "StepCall",
    "StepWrite",
    "Store",
    "StoreKeyError",
    "StoreLocked",
    "UnknownRun",
    "WrongToken",
    "open_store",
]


def default_replica_id() -> str:
    """The host's name and a random suffix: unique per process, readable in a listing."""
    return f"{socket.gethostname()[:60] or 'gateway'}-{secrets.token_hex(3)}"


def open_store(settings: Settings) -> Store:
    """The store the settings name (not yet opened)."""
    key = settings.store_key
    secret, source = (key.secret, key.source) if key else (None, "store_key")
    if settings.postgres:
        from gateway.store.postgres import PostgresStore  # asyncpg only where it is used

        return PostgresStore(
            settings.store,
            replica_id=settings.replica_id or default_replica_id(),
            lease=settings.lease,
            durability=settings.durability,
            key=secret,
            key_source=source,
        )
    store = SQLiteStore(
        settings.store_path, durability=settings.durability, key=secret, key_source=source
    )
    if settings.replica_id:
        store.replica_id = settings.replica_id
    return store
