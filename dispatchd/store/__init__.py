"""The state store: one interface (``base.Store``), an SQLite and a PostgreSQL backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from dispatchd.store.sqlite import STATE_FILE, SqliteStore

if TYPE_CHECKING:
    from dispatchd.settings import Settings

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
    "open_store",
]


async def open_store(settings: Settings) -> Store:
    """The store ``state.url`` chooses: PostgreSQL when set, else SQLite in ``state.dir``.

    PostgreSQL's module (and asyncpg) is imported only when it is used.
    """
    if settings.state.url is None:
        return SqliteStore(settings.state.dir / STATE_FILE)
    from dispatchd import __version__
    from dispatchd.store.postgres import PostgresStore

    return await PostgresStore.open(
        settings.state.url.get_secret_value(),
        version=__version__,
    )
