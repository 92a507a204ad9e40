"""The run store: the only package that speaks SQL.

`base` is the interface (named transactions, notifications, the store's errors), `rules` the
domain rules every dialect applies inside its transactions, `sqlite` the embedded dialect.
`open_store` picks the dialect from the configured URL.
"""

from __future__ import annotations

from gateway.config import Settings
from gateway.store.base import (
    AttemptFenced,
    DuplicateIdempotencyKey,
    Refused,
    RunPage,
    Store,
    StoreLocked,
    UnknownRun,
    WrongToken,
)
from gateway.store.rules import StepCall, StepWrite
from gateway.store.sealing import StoreKeyError
from gateway.store.sqlite import SQLiteStore

__all__ = [
    "AttemptFenced",
    "DuplicateIdempotencyKey",
    "Refused",
    "RunPage",
    "SQLiteStore",
    "StepCall",
    "StepWrite",
    "Store",
    "StoreKeyError",
    "StoreLocked",
    "UnknownRun",
    "WrongToken",
    "open_store",
]


def open_store(settings: Settings) -> SQLiteStore:
    """The store the settings name (not yet opened)."""
    key = settings.store_key
    return SQLiteStore(settings.store_path, durability=settings.durability,
                       key=key.secret if key else None,
                       key_source=key.source if key else "store_key")
