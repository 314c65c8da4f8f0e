"""SQLite store: the engine's persisted state and the outbox, in one transaction per step.

Every message is appended to the outbox in the same transaction as the state
change that caused it, so a crash can never leave a change recorded without
its message (or a message without its change). A message leaves the outbox
only once the broker confirmed it (``remove_from_outbox``).

Durability: WAL with ``synchronous=FULL``. With ``NORMAL`` a WAL commit is
atomic but not durable: a power failure may roll back the last commits,
after the engine already believed their messages were queued and moved on,
and those messages would then never be sent. ``FULL`` fsyncs the WAL on every
commit, so a returned ``commit`` survives power loss; its cost is one fsync
per engine step, which is small next to the broker round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dispatchd import metrics
from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope
from dispatchd.store.base import (
    OUTBOX_COLUMNS,
    Loaded,
    OutboxItem,
    SchemaTooNew,
    StateDirError,
    StoreError,
    StoreWriteError,
    headers_text,
    outbox_items_of,
)

STATE_FILE = "dispatchd.sqlite3"
"""The state file's name in ``state.dir``."""

_TROUBLESHOOTING = "see docs/troubleshooting.md, 'State file'"

_WRITE_PROBLEMS = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_CANTOPEN: "cannot open",
    sqlite3.SQLITE_BUSY: "locked by another process",
}


def _is_corrupt(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


def _corrupt_text(path: Path, error: sqlite3.Error) -> str:
    """The one line for a damaged file, at open or found later by a read or a write."""
    return (
        f"state store {path}: not a usable dispatchd state file ({error}); "
        f"stop dispatchd, move it aside and start again: it re-lists from the "
        f"API ({_TROUBLESHOOTING})"
    )


def _write_error(path: Path, error: sqlite3.Error) -> StoreWriteError:
    if _is_corrupt(error):
        return StoreWriteError(_corrupt_text(path, error))
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    what = _WRITE_PROBLEMS.get(code, str(error))
    return StoreWriteError(f"state store {path}: {what}")


def _read_error(path: Path, error: sqlite3.Error) -> StoreError:
    """A read that failed: the same one line as at open, naming the file and the fix."""
    if _is_corrupt(error):
        return StoreError(_corrupt_text(path, error))
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return StoreError(
        f"state store {path}: {_WRITE_PROBLEMS.get(code, str(error))} ({_TROUBLESHOOTING})"
    )


def _create_v1(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE records ("
        " microgrid_id INTEGER NOT NULL,"
        " dispatch_id INTEGER NOT NULL,"
        " data TEXT NOT NULL,"
        " PRIMARY KEY (microgrid_id, dispatch_id)"
        ") WITHOUT ROWID"
    )
    db.execute("CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), data TEXT NOT NULL)")
    # AUTOINCREMENT: a seq is never reused, even after the newest row was removed.
    db.execute(
        "CREATE TABLE outbox ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " message_id TEXT NOT NULL,"
        " routing_key TEXT NOT NULL,"
        " type TEXT NOT NULL,"
        " microgrid_id INTEGER NOT NULL,"
        " dispatch_id INTEGER NOT NULL,"
        " headers TEXT NOT NULL,"
        " body BLOB NOT NULL"
        ")"
    )


def _create_v2(db: sqlite3.Connection) -> None:
    """Meta by microgrid. The v1 row (``meta``, one for the whole file) is kept as
    the meta of every microgrid that has no row of its own yet, so a state file
    written before keeps loading as it was saved."""
    db.execute("CREATE TABLE microgrid_meta (microgrid_id INTEGER PRIMARY KEY, data TEXT NOT NULL)")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_v1, _create_v2)
"""``MIGRATIONS[n]`` takes the schema from version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)

_CACHE_KIB = 8 * 1024
"""Upper bound of SQLite's page cache: a transaction of the daemon writes at most a
slice of a large step (``loop.SLICE`` dispatches, a few MB), which fits in it."""
WAL_LIMIT = 4 * 1024 * 1024
"""Bytes the WAL file may keep: a larger one is checkpointed and truncated after the
commit that grew it (a first sync of 50k dispatches writes tens of MB at once)."""
CHECKPOINT_PAGES = 256
"""WAL pages (1 MiB at 4 KiB) after which SQLite checkpoints, at the end of a removal.

SQLite's automatic checkpoint runs inside whichever commit crosses it: in a
burst of starts, often one of the commits the starts wait for. So it is
off for commits and on only for removals of confirmed messages, which run
once the broker answered the whole burst, off the event loop: a burst's last
start is committed about 2 ms sooner (``bench/bench_store_burst.py``)."""

_EMPTY_RECORDS: Mapping[DispatchKey, str | None] = {}


class SqliteStore:
    """The state of one dispatchd process in one SQLite file (see ``base.Store``).

    A commit runs inline on the event loop: it is one short local transaction
    (one fsync), cheaper than a hop to a thread. Removing confirmed messages
    runs in a worker thread, off the publisher's way; calls are serialised by
    a lock.
    """

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StateDirError(
                f"state.dir {path.parent}: cannot be used ({error.strerror or error}); "
                "set state.dir to a writable directory"
            ) from None
        self._path = path
        self._wal = Path(f"{path}-wal")
        self._lock = threading.Lock()
        self._unremoved: set[int] = set()
        """Confirmed seqs whose delete failed (disk full); retried with the next write."""
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StateDirError(
                f"state store {path}: cannot be opened ({error}); "
                "check that state.dir is a writable directory"
            ) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # see CHECKPOINT_PAGES
            # With the default 2 MB page cache SQLite would spill and re-read pages
            # in the middle of a slice of a first sync.
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            self._migrate()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise _read_error(path, error) from None
        except BaseException:
            self._db.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    @property
    def location(self) -> str:
        return str(self._path)

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(self._path, version, SCHEMA_VERSION)
            for step in MIGRATIONS[version:]:
                step(db)
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    def _transaction(self, *, checkpoint_pages: int = 0) -> _Transaction:
        return _Transaction(self._db, self._lock, checkpoint_pages=checkpoint_pages)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A file damaged after it was opened (``database disk image is malformed``)
        shows up on a read: the same one line as at open, naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            raise _read_error(self._path, error) from None

    async def microgrids(self) -> set[int]:
        with self._reading(), self._transaction() as db:
            rows = db.execute(
                "SELECT microgrid_id FROM records UNION SELECT microgrid_id FROM outbox"
                " UNION SELECT microgrid_id FROM microgrid_meta"
            ).fetchall()
        return {int(microgrid_id) for (microgrid_id,) in rows}

    async def load(self, microgrid_id: int) -> Loaded:
        with self._reading(), self._transaction() as db:
            records = {
                (microgrid_id, int(did)): str(data)
                for did, data in db.execute(
                    "SELECT dispatch_id, data FROM records WHERE microgrid_id = ?",
                    (microgrid_id,),
                )
            }
            meta_row = db.execute(
                "SELECT data FROM microgrid_meta WHERE microgrid_id = ?", (microgrid_id,)
            ).fetchone()
            if meta_row is None:  # the file-wide meta of a v1 file
                meta_row = db.execute("SELECT data FROM meta WHERE id = 1").fetchone()
            meta: dict[str, Any] = {} if meta_row is None else json.loads(meta_row[0])
            outbox = self._read_outbox(db, [microgrid_id])
        return Loaded(records=records, meta=meta, outbox=outbox)

    async def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] = _EMPTY_RECORDS,
        meta: Mapping[int, Mapping[str, Any]] | None = None,
        envelopes: Sequence[Envelope] = (),
        terms: Mapping[int, int] | None = None,
    ) -> list[OutboxItem]:
        """Apply one engine step atomically (``base.Store.commit``).

        ``terms`` is ignored: one process owns every microgrid of the file.
        """
        started = time.perf_counter()
        removing = set(self._unremoved)
        try:
            items = self._commit(records, meta, envelopes, removing)
        except sqlite3.DatabaseError as error:  # OperationalError, and a damaged file
            raise _write_error(self._path, error) from error
        self._unremoved -= removing
        self._bound_wal()
        metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
        return items

    def _commit(
        self,
        records: Mapping[DispatchKey, str | None],
        meta: Mapping[int, Mapping[str, Any]] | None,
        envelopes: Sequence[Envelope],
        removing: set[int],
    ) -> list[OutboxItem]:
        upserts = [(mg, did, data) for (mg, did), data in records.items() if data is not None]
        deletes = [(mg, did) for (mg, did), data in records.items() if data is None]
        with self._transaction() as db:
            if removing:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in removing])
            if deletes:
                db.executemany(
                    "DELETE FROM records WHERE microgrid_id = ? AND dispatch_id = ?", deletes
                )
            if upserts:
                db.executemany(
                    "INSERT INTO records (microgrid_id, dispatch_id, data) VALUES (?, ?, ?)"
                    " ON CONFLICT (microgrid_id, dispatch_id)"
                    " DO UPDATE SET data = excluded.data",
                    upserts,
                )
            if meta:
                db.executemany(
                    "INSERT INTO microgrid_meta (microgrid_id, data) VALUES (?, ?)"
                    " ON CONFLICT (microgrid_id) DO UPDATE SET data = excluded.data",
                    [
                        (microgrid_id, json.dumps(dict(data), sort_keys=True))
                        for microgrid_id, data in meta.items()
                    ],
                )
            if not envelopes:
                return []
            # Explicit seqs so one executemany can insert them all: inside the
            # transaction nobody else writes, and AUTOINCREMENT would have handed
            # out exactly these (above every seq ever used, in order).
            first = _next_outbox_seq(db)
            db.executemany(
                "INSERT INTO outbox (seq, message_id, routing_key, type, microgrid_id,"
                " dispatch_id, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        first + offset,
                        envelope.message_id,
                        envelope.routing_key,
                        envelope.type,
                        envelope.microgrid_id,
                        envelope.dispatch_id,
                        headers_text(envelope.headers),
                        envelope.body,
                    )
                    for offset, envelope in enumerate(envelopes)
                ],
            )
        return [
            OutboxItem(seq=first + offset, envelope=envelope)
            for offset, envelope in enumerate(envelopes)
        ]

    async def remove_from_outbox(self, seqs: Iterable[int]) -> None:
        """Forget messages the broker confirmed (in a worker thread: each delete is an fsync).

        A delete that cannot be written (disk full) is kept and retried with
        the next write; until then those rows are hidden from :meth:`outbox`.
        """
        pending = self._unremoved | set(seqs)
        if pending:
            await asyncio.to_thread(self._remove, pending)

    def _remove(self, pending: set[int]) -> None:
        try:
            with self._transaction(checkpoint_pages=CHECKPOINT_PAGES) as db:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in pending])
        except sqlite3.DatabaseError:  # disk full, or a damaged file the next commit names
            self._unremoved = pending
            return
        self._unremoved = set()
        self._bound_wal()

    def _bound_wal(self) -> None:
        """Checkpoint and truncate a WAL that grew past ``WAL_LIMIT``."""
        if self.wal_size() <= WAL_LIMIT:
            return
        # On failure it is retried after the next commit; the WAL stays valid meanwhile.
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def wal_size(self) -> int:
        """Bytes of the WAL file now (0 when there is none)."""
        try:
            return os.stat(self._wal).st_size
        except OSError:
            return 0

    async def outbox(self, microgrid_ids: Iterable[int] | None = None) -> list[OutboxItem]:
        """The unconfirmed messages (of ``microgrid_ids``, or all), in seq order."""
        with self._reading(), self._transaction() as db:
            items = self._read_outbox(db, microgrid_ids)
        if self._unremoved:
            items = [item for item in items if item.seq not in self._unremoved]
        return items

    async def outbox_items(self, seqs: Sequence[int]) -> list[OutboxItem]:
        """The outbox items with these seqs that are still there, in seq order."""
        wanted = sorted(set(seqs) - self._unremoved)
        if not wanted:
            return []
        marks = ", ".join("?" * len(wanted))
        with self._reading(), self._transaction() as db:
            return outbox_items_of(
                db.execute(
                    f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE seq IN ({marks}) ORDER BY seq",
                    wanted,
                )
            )

    async def release_memory(self) -> None:
        """Free SQLite's page cache (after a large step filled it; it refills on demand)."""
        with self._lock:
            self._db.execute("PRAGMA shrink_memory")

    async def outbox_size(self) -> int:
        return self.count_outbox()

    def count_outbox(self) -> int:
        """``outbox_size`` for synchronous callers (tests polling the outbox)."""
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close from synchronous code (start-up failures, tests)."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _read_outbox(
        db: sqlite3.Connection, microgrid_ids: Iterable[int] | None = None
    ) -> list[OutboxItem]:
        if microgrid_ids is None:
            cursor = db.execute(f"SELECT {OUTBOX_COLUMNS} FROM outbox ORDER BY seq")
        else:
            wanted = sorted(set(microgrid_ids))
            marks = ", ".join("?" * len(wanted))
            cursor = db.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE microgrid_id IN ({marks}) ORDER BY seq",
                wanted,
            )
        return outbox_items_of(cursor)


def _next_outbox_seq(db: sqlite3.Connection) -> int:
    """The seq AUTOINCREMENT would give the next outbox row."""
    row = db.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
        " coalesce((SELECT max(seq) FROM outbox), 0))"
    ).fetchone()
    return int(row[0]) + 1


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception, under the store lock.

    With ``checkpoint_pages``, SQLite checkpoints at its ``COMMIT`` if the WAL
    holds that many pages (``CHECKPOINT_PAGES``); other commits never do.
    """

    def __init__(
        self, db: sqlite3.Connection, lock: threading.Lock, *, checkpoint_pages: int = 0
    ) -> None:
        self._db = db
        self._lock = lock
        self._checkpoint_pages = checkpoint_pages

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            if self._checkpoint_pages:
                self._db.execute(f"PRAGMA wal_autocheckpoint={self._checkpoint_pages:d}")
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    # A COMMIT that failed (disk full) can leave the transaction open.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            elif self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                self._db.execute("ROLLBACK")
        finally:
            try:
                if self._checkpoint_pages:
                    self._db.execute("PRAGMA wal_autocheckpoint=0")
            finally:
                self._lock.release()
