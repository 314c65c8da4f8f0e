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

import contextlib
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer dispatchd, or not one at all)."""

    exit_code = 1


class SchemaTooNew(StoreError):
    """A SQLite file written by a newer dispatchd; both SQLite stores refuse it."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            f"{path}: schema version {found} is newer than this dispatchd understands ({supported})"
        )


class StateDirError(StoreError):
    """``state.dir`` cannot hold the state: a configuration problem (exit 2)."""

    exit_code = 2


class StoreWriteError(StoreError):
    """A write failed for a reason outside dispatchd (disk full, read-only, I/O error).

    ``str()`` is the one line an operator sees: ``state store <path>: disk full``.
    """


_TROUBLESHOOTING = "see docs/troubleshooting.md, 'State file'"

_WRITE_PROBLEMS = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_CANTOPEN: "cannot open",
    sqlite3.SQLITE_BUSY: "locked by another process",
}


def _write_error(path: Path, error: sqlite3.Error) -> StoreWriteError:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    what = _WRITE_PROBLEMS.get(code, str(error))
    return StoreWriteError(f"state store {path}: {what}")


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A committed, not yet confirmed message; ``seq`` orders the outbox."""

    seq: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Loaded:
    """Everything the store holds, as read at start-up."""

    records: dict[DispatchKey, str]
    meta: dict[str, Any]
    outbox: list[OutboxItem]


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


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_v1,)
"""``MIGRATIONS[n]`` takes the schema from version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)

_CACHE_KIB = 8 * 1024
"""Upper bound of SQLite's page cache: a transaction of the daemon writes at most a
slice of a large step (``loop.SLICE`` dispatches, a few MB), which fits in it."""
WAL_LIMIT = 4 * 1024 * 1024
"""Bytes the WAL file may keep: a larger one is checkpointed and truncated after the
commit that grew it (a first sync of 50k dispatches writes tens of MB at once)."""
_AUTOCHECKPOINT_PAGES = 256
"""SQLite checkpoints on its own every this many pages (1 MiB at 4 KiB pages)."""

_EMPTY_RECORDS: Mapping[DispatchKey, str | None] = {}


class Store:
    """The durable state of dispatchd: engine records, meta and the outbox.

    Synchronous on purpose: one commit is one short transaction, and callers
    on an event loop may call it directly or from a worker thread (calls are
    serialised by a lock).
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
            self._db.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            # With the default 2 MB page cache SQLite would spill and re-read pages
            # in the middle of a slice of a first sync.
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            self._migrate()
        except sqlite3.DatabaseError as error:
            self._db.close()
            code = getattr(error, "sqlite_errorcode", 0) & 0xFF
            if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                raise StoreError(
                    f"state store {path}: not a usable dispatchd state file ({error}); "
                    f"stop dispatchd, move it aside and start again: it re-lists from the "
                    f"API ({_TROUBLESHOOTING})"
                ) from None
            raise StoreError(
                f"state store {path}: {_WRITE_PROBLEMS.get(code, str(error))} ({_TROUBLESHOOTING})"
            ) from None
        except BaseException:
            self._db.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

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

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def load(self) -> Loaded:
        """Read everything; called once at start-up."""
        with self._transaction() as db:
            records = {
                (int(mg), int(did)): str(data)
                for mg, did, data in db.execute(
                    "SELECT microgrid_id, dispatch_id, data FROM records"
                )
            }
            meta_row = db.execute("SELECT data FROM meta WHERE id = 1").fetchone()
            meta: dict[str, Any] = {} if meta_row is None else json.loads(meta_row[0])
            outbox = self._read_outbox(db)
        return Loaded(records=records, meta=meta, outbox=outbox)

    def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] = _EMPTY_RECORDS,
        meta: Mapping[str, Any] | None = None,
        envelopes: Sequence[Envelope] = (),
    ) -> list[OutboxItem]:
        """Apply one engine step atomically and return its new outbox items.

        ``records`` upserts, or deletes where the value is ``None``; ``meta``
        replaces the whole meta dict when given; ``envelopes`` are appended to
        the outbox in order.
        """
        removing = set(self._unremoved)
        try:
            items = self._commit(records, meta, envelopes, removing)
        except sqlite3.OperationalError as error:
            raise _write_error(self._path, error) from error
        self._unremoved -= removing
        self._bound_wal()
        return items

    def _commit(
        self,
        records: Mapping[DispatchKey, str | None],
        meta: Mapping[str, Any] | None,
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
            if meta is not None:
                db.execute(
                    "INSERT INTO meta (id, data) VALUES (1, ?)"
                    " ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                    (json.dumps(dict(meta), sort_keys=True),),
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
                        _headers_text(envelope.headers),
                        envelope.body,
                    )
                    for offset, envelope in enumerate(envelopes)
                ],
            )
        return [
            OutboxItem(seq=first + offset, envelope=envelope)
            for offset, envelope in enumerate(envelopes)
        ]

    def remove_from_outbox(self, seqs: Iterable[int]) -> None:
        """Forget messages the broker confirmed (or returned as unroutable).

        A delete that cannot be written (disk full) is kept and retried with
        the next write; until then those rows are hidden from :meth:`outbox`.
        """
        pending = self._unremoved | set(seqs)
        if not pending:
            return
        try:
            with self._transaction() as db:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in pending])
        except sqlite3.OperationalError:
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

    def outbox(self) -> list[OutboxItem]:
        """The unconfirmed messages, in seq order."""
        with self._transaction() as db:
            items = self._read_outbox(db)
        if self._unremoved:
            items = [item for item in items if item.seq not in self._unremoved]
        return items

    def release_memory(self) -> None:
        """Free SQLite's page cache (after a large step filled it; it refills on demand)."""
        with self._lock:
            self._db.execute("PRAGMA shrink_memory")

    def outbox_items(self, seqs: Sequence[int]) -> list[OutboxItem]:
        """The outbox items with these seqs that are still there, in seq order.

        The publisher reads its bulk backlog back with this, a batch at a time.
        """
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))
        with self._lock:
            cursor = self._db.execute(f"{_OUTBOX_SELECT} WHERE seq IN ({marks}) ORDER BY seq", seqs)
            return _outbox_items(cursor)

    def outbox_size(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _read_outbox(db: sqlite3.Connection) -> list[OutboxItem]:
        return _outbox_items(db.execute(f"{_OUTBOX_SELECT} ORDER BY seq"))


_OUTBOX_SELECT = (
    "SELECT seq, message_id, routing_key, type, microgrid_id, dispatch_id, headers, body"
    " FROM outbox"
)


def _outbox_items(cursor: sqlite3.Cursor) -> list[OutboxItem]:
    return [
        OutboxItem(
            seq=int(seq),
            envelope=Envelope(
                message_id=str(message_id),
                routing_key=str(routing_key),
                body=bytes(body),
                headers=json.loads(headers),
                type=str(type_),
                microgrid_id=int(microgrid_id),
                dispatch_id=int(dispatch_id),
            ),
        )
        for seq, message_id, routing_key, type_, microgrid_id, dispatch_id, headers, body in (
            cursor
        )
    ]


_HEADERS_ENCODER = json.JSONEncoder(sort_keys=True)
"""What ``json.dumps(headers, sort_keys=True)`` does, without its per-call setup."""
_WIRE_HEADERS = ("dispatch_id", "dispatch_type", "event", "microgrid_id", "schema")


def _headers_text(headers: Mapping[str, int | str]) -> str:
    """The headers as JSON; the five of docs/messages.md § 3 (the usual case) written directly."""
    if tuple(sorted(headers)) != _WIRE_HEADERS:
        return _HEADERS_ENCODER.encode(headers)
    dispatch_id, microgrid_id = headers["dispatch_id"], headers["microgrid_id"]
    if type(dispatch_id) is not int or type(microgrid_id) is not int:
        return _HEADERS_ENCODER.encode(headers)
    return (
        f'{{"dispatch_id":{dispatch_id},"dispatch_type":{_json_str(headers["dispatch_type"])},'
        f'"event":{_json_str(headers["event"])},"microgrid_id":{microgrid_id},'
        f'"schema":{_json_str(headers["schema"])}}}'
    )


@functools.lru_cache(maxsize=4096)
def _json_str(value: object) -> str:
    """A header value as JSON (types, events and the schema repeat a lot)."""
    return _HEADERS_ENCODER.encode(value)


def _next_outbox_seq(db: sqlite3.Connection) -> int:
    """The seq AUTOINCREMENT would give the next outbox row."""
    row = db.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
        " coalesce((SELECT max(seq) FROM outbox), 0))"
    ).fetchone()
    return int(row[0]) + 1


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception, under the store lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
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
            self._lock.release()
