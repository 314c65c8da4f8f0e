"""The state store: one interface (``base.Store``), an SQLite and a PostgreSQL backend."""

from dispatchd.store.base import (
    Fenced,
    Loaded,
    OutboxItem,
    SchemaTooNew,
    StateDirError,
    Store,
    StoreError,
    StoreWriteError,
)
from dispatchd.store.sqlite import SqliteStore

__all__ = [
    "Fenced",
    "Loaded",
    "OutboxItem",
    "SchemaTooNew",
    "SqliteStore",
    "StateDirError",
    "Store",
    "StoreError",
    "StoreWriteError",
]
