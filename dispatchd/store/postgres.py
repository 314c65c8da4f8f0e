"""PostgreSQL store: the state of every replica of a cluster, with the leases that fence it.

Records, meta and outbox are keyed by microgrid like in SQLite. What only a
shared database needs lives here too: one lease row per microgrid (owner,
term, expiry) and one membership row per replica (heartbeat), all timed by
the database's clock (``now()``), never a replica's. Every commit given
``terms`` checks, inside its transaction and with the lease rows locked, that
this replica still holds each microgrid it writes with that term, so a
replica that lost a lease can never commit for that microgrid again
(docs/replicas.md explains the whole scheme).

The schema is created and migrated at start-up under an advisory lock held
by the migrating transaction, so replicas starting together cannot race.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import asyncpg

from dispatchd import metrics
from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope
from dispatchd.settings import mask_dsn
from dispatchd.store.base import (
    OUTBOX_COLUMNS,
    Fenced,
    Loaded,
    OutboxItem,
    SchemaTooNew,
    StoreError,
    StoreWriteError,
    headers_text,
    outbox_items_of,
    touched_microgrids,
)

_MIGRATION_LOCK = 0x64697370_61746368  # "dispatch": one advisory lock key per database
"""Held by the transaction that creates or migrates the schema."""

_V1 = (
    "CREATE TABLE records ("
    " microgrid_id bigint NOT NULL,"
    " dispatch_id bigint NOT NULL,"
    " data text NOT NULL,"
    " PRIMARY KEY (microgrid_id, dispatch_id))",
    "CREATE TABLE meta (microgrid_id bigint PRIMARY KEY, data text NOT NULL)",
    # A sequence never hands out a number twice, even after the newest row was removed.
    "CREATE TABLE outbox ("
    " seq bigint PRIMARY KEY,"
    " message_id text NOT NULL,"
    " routing_key text NOT NULL,"
    " type text NOT NULL,"
    " microgrid_id bigint NOT NULL,"
    " dispatch_id bigint NOT NULL,"
    " headers text NOT NULL,"
    " body bytea NOT NULL)",
    "CREATE SEQUENCE outbox_seq AS bigint",
    "CREATE INDEX outbox_by_microgrid ON outbox (microgrid_id, seq)",
    # owner NULL: free (released); previous_owner: who held the term before this one.
    "CREATE TABLE leases ("
    " microgrid_id bigint PRIMARY KEY,"
    " owner text,"
    " term bigint NOT NULL DEFAULT 0,"
    " expires_at timestamptz NOT NULL DEFAULT '-infinity',"
    " previous_owner text)",
    "CREATE INDEX leases_by_owner ON leases (owner)",
    "CREATE TABLE replicas ("
    " replica_id text PRIMARY KEY,"
    " heartbeat_at timestamptz NOT NULL,"
    " started_at timestamptz NOT NULL,"
    " lease_seconds double precision NOT NULL,"
    " version text NOT NULL)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)
"""``MIGRATIONS[n]`` takes the schema from version ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)

_SMALL_COMMIT = (
    "WITH fence AS ("
    " SELECT l.microgrid_id FROM leases AS l"
    " JOIN unnest($1::bigint[], $2::bigint[]) AS t(microgrid_id, term)"
    " ON l.microgrid_id = t.microgrid_id AND l.term = t.term"
    " WHERE l.owner IS NOT NULL AND l.expires_at > now()"
    " ORDER BY l.microgrid_id FOR SHARE OF l),"
    " ok AS (SELECT count(*) = cardinality($1::bigint[]) AS fine FROM fence),"
    " removed AS (DELETE FROM records WHERE (SELECT fine FROM ok)"
    " AND (microgrid_id, dispatch_id) IN (SELECT * FROM unnest($3::bigint[], $4::bigint[]))),"
    " upserted AS (INSERT INTO records (microgrid_id, dispatch_id, data)"
    " SELECT * FROM unnest($5::bigint[], $6::bigint[], $7::text[]) WHERE (SELECT fine FROM ok)"
    " ON CONFLICT (microgrid_id, dispatch_id) DO UPDATE SET data = excluded.data),"
    " metas AS (INSERT INTO meta (microgrid_id, data)"
    " SELECT * FROM unnest($8::bigint[], $9::text[]) WHERE (SELECT fine FROM ok)"
    " ON CONFLICT (microgrid_id) DO UPDATE SET data = excluded.data),"
    # nextval in generate_series order: the seqs grow with the envelopes' order.
    " seqs AS (SELECT ord, nextval('outbox_seq') AS seq"
    " FROM generate_series(1, cardinality($10::text[])) AS ord WHERE (SELECT fine FROM ok)),"
    " appended AS (INSERT INTO outbox"
    " (seq, message_id, routing_key, type, microgrid_id, dispatch_id, headers, body)"
    " SELECT s.seq, m.message_id, m.routing_key, m.type, m.microgrid_id, m.dispatch_id,"
    " m.headers, m.body FROM unnest($10::text[], $11::text[], $12::text[], $13::bigint[],"
    " $14::bigint[], $15::text[], $16::bytea[]) WITH ORDINALITY"
    " AS m(message_id, routing_key, type, microgrid_id, dispatch_id, headers, body, ord)"
    " JOIN seqs AS s USING (ord) RETURNING seq)"
    " SELECT (SELECT fine FROM ok), (SELECT array_agg(microgrid_id) FROM fence),"
    " (SELECT array_agg(seq) FROM appended)"
)
"""One usual commit (fewer than ``BULK_ROWS`` rows) as one statement."""

BULK_ROWS = 500
"""From this many rows in one commit, records and outbox rows go in through COPY."""
_OUTBOX_COLUMNS = (
    "seq",
    "message_id",
    "routing_key",
    "type",
    "microgrid_id",
    "dispatch_id",
    "headers",
    "body",
)

_CLOSE_GRACE = 2.0
"""Seconds ``close`` waits for the server to acknowledge closing the connections."""

FORGET_REPLICAS_AFTER = 3600.0
"""Seconds after its last heartbeat a replica's membership row is removed."""

_CONNECTION_PROBLEMS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.ReadOnlySQLTransactionError,
    # A deadlock or serialization failure rolled the transaction back: try again.
    asyncpg.exceptions.TransactionRollbackError,
)
"""Errors that mean "the database cannot be written now", not "dispatchd is wrong"."""


CHANNEL = "dispatchd_leases"
"""Notified when a lease is released or a replica joins or leaves."""


class Listening(Protocol):
    """A connection that listens on :data:`CHANNEL`."""

    def is_closed(self) -> bool: ...

    async def close(self, *, timeout: float | None = None) -> None: ...  # noqa: ASYNC109


@dataclass(frozen=True, slots=True)
class Lease:
    """One microgrid's lease as the database sees it now."""

    microgrid_id: int
    owner: str | None
    term: int
    expires_in: float
    """Seconds until it expires by the database's clock (negative: expired)."""
    previous_owner: str | None


@dataclass(frozen=True, slots=True)
class Replica:
    """One member of the cluster, by its last heartbeat."""

    replica_id: str
    heartbeat_age: float
    lease_seconds: float
    version: str

    @property
    def live(self) -> bool:
        return self.heartbeat_age < self.lease_seconds


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Every lease and every replica, read in one snapshot."""

    leases: list[Lease]
    replicas: list[Replica]

    def live_replicas(self) -> list[str]:
        return sorted(replica.replica_id for replica in self.replicas if replica.live)


@dataclass(frozen=True, slots=True)
class Taken:
    """A lease acquired: its new term and who held the term before."""

    term: int
    previous_owner: str | None


class PostgresStore:
    """The state of a cluster's replicas in one PostgreSQL database (see ``base.Store``)."""

    def __init__(self, pool: Any, dsn: str, *, version: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self._location = mask_dsn(dsn)
        self._version = version

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (each database call's bound, not the open's)
        max_connections: int = 4,
        version: str = "",
        migrate: bool = True,
    ) -> PostgresStore:
        """Connect, create or migrate the schema, or raise one ``StoreError`` line.

        Without ``migrate`` (a reader such as ``dispatchd cluster status``) the
        schema must exist already and must not be newer than this dispatchd.
        """
        location = mask_dsn(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_connections,
                timeout=timeout,
                command_timeout=timeout,
                # Statements are few and fixed; a cache per connection is enough.
                statement_cache_size=64,
            )
        except _CONNECTION_PROBLEMS as error:
            raise StoreError(
                f"state store {location}: cannot connect ({_db_problem(error)})"
            ) from None
        except asyncpg.PostgresError as error:
            raise StoreError(f"state store {location}: {_db_problem(error)}") from None
        store = cls(pool, dsn, version=version)
        try:
            await (store._migrate() if migrate else store._check_schema())
        except BaseException:
            await pool.close()
            raise
        return store

    @property
    def location(self) -> str:
        return self._location

    async def _migrate(self) -> None:
        try:
            async with self._pool.acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
                )
                found = await db.fetchval("SELECT max(version) FROM schema_version")
                version = 0 if found is None else int(found)
                if version > SCHEMA_VERSION:
                    raise SchemaTooNew(self._location, version, SCHEMA_VERSION)
                for step in MIGRATIONS[version:]:
                    for statement in step:
                        await db.execute(statement)
                await db.execute("DELETE FROM schema_version")
                await db.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)
        except _CONNECTION_PROBLEMS as error:
            raise StoreError(
                f"state store {self._location}: cannot connect ({_db_problem(error)})"
            ) from None
        except asyncpg.PostgresError as error:
            raise StoreError(f"state store {self._location}: {_db_problem(error)}") from None

    async def _check_schema(self) -> None:
        try:
            found = None
            if await self._pool.fetchval("SELECT to_regclass('schema_version')") is not None:
                found = await self._pool.fetchval("SELECT max(version) FROM schema_version")
        except _CONNECTION_PROBLEMS as error:
            raise StoreError(
                f"state store {self._location}: cannot connect ({_db_problem(error)})"
            ) from None
        if found is None:
            raise StoreError(
                f"state store {self._location}: no dispatchd tables yet "
                "(the first replica creates them when it starts)"
            )
        if int(found) > SCHEMA_VERSION:
            raise SchemaTooNew(self._location, int(found), SCHEMA_VERSION)

    async def schema_version(self) -> int:
        return int(await self._pool.fetchval("SELECT version FROM schema_version"))

    # ------------------------------------------------------------ the store

    async def microgrids(self) -> set[int]:
        rows = await self._call(
            self._pool.fetch,
            "SELECT microgrid_id FROM meta UNION SELECT DISTINCT microgrid_id FROM records"
            " UNION SELECT DISTINCT microgrid_id FROM outbox",
        )
        return {int(row[0]) for row in rows}

    async def load(self, microgrid_id: int) -> Loaded:
        async with (
            self._unreachable(),
            self._pool.acquire() as db,
            db.transaction(isolation="repeatable_read"),
        ):
            record_rows = await db.fetch(
                "SELECT dispatch_id, data FROM records WHERE microgrid_id = $1", microgrid_id
            )
            meta_text = await db.fetchval(
                "SELECT data FROM meta WHERE microgrid_id = $1", microgrid_id
            )
            outbox = await _read_outbox(db, [microgrid_id])
        return Loaded(
            records={(microgrid_id, int(did)): str(data) for did, data in record_rows},
            meta={} if meta_text is None else json.loads(meta_text),
            outbox=outbox,
        )

    async def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] | None = None,
        meta: Mapping[int, Mapping[str, Any]] | None = None,
        envelopes: Sequence[Envelope] = (),
        terms: Mapping[int, int] | None = None,
    ) -> list[OutboxItem]:
        """Apply one engine step atomically (``base.Store.commit``), fenced by ``terms``."""
        started = time.perf_counter()
        records = records or {}
        upserts = [(mg, did, data) for (mg, did), data in records.items() if data is not None]
        deletes = [(mg, did) for (mg, did), data in records.items() if data is None]
        metas = [(mg, json.dumps(dict(data), sort_keys=True)) for mg, data in (meta or {}).items()]
        headers = [headers_text(envelope.headers) for envelope in envelopes]
        touched = set() if terms is None else touched_microgrids(records, meta, envelopes)
        try:
            if len(upserts) < BULK_ROWS and len(envelopes) < BULK_ROWS:
                items = await self._commit_small(
                    touched, terms or {}, deletes, upserts, metas, envelopes, headers
                )
            else:
                async with self._pool.acquire() as db, db.transaction():
                    await self._check_terms(db, touched, terms or {})
                    if deletes:
                        await db.execute(
                            "DELETE FROM records WHERE (microgrid_id, dispatch_id) IN"
                            " (SELECT * FROM unnest($1::bigint[], $2::bigint[]))",
                            [mg for mg, _ in deletes],
                            [did for _, did in deletes],
                        )
                    if upserts:
                        await _upsert_records(db, upserts)
                    if metas:
                        await db.execute(
                            "INSERT INTO meta (microgrid_id, data)"
                            " SELECT * FROM unnest($1::bigint[], $2::text[])"
                            " ON CONFLICT (microgrid_id) DO UPDATE SET data = excluded.data",
                            [mg for mg, _ in metas],
                            [data for _, data in metas],
                        )
                    items = await self._append(db, envelopes, headers) if envelopes else []
        except _CONNECTION_PROBLEMS as error:
            raise StoreWriteError(f"state store {self._location}: {_db_problem(error)}") from error
        metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
        return items

    async def _commit_small(
        self,
        touched: set[int],
        terms: Mapping[int, int],
        deletes: list[tuple[int, int]],
        upserts: list[tuple[int, int, str]],
        metas: list[tuple[int, str]],
        envelopes: Sequence[Envelope],
        headers: list[str],
    ) -> list[OutboxItem]:
        """A usual step in one statement, so one round trip: its own transaction.

        The same as the bulk path (fence, records, meta, outbox): every write
        is guarded by the fencing check, whose ``FOR SHARE`` locks are taken
        before any of them and held to the end of the statement.
        """
        fenced = sorted(touched)
        row = await self._pool.fetchrow(
            _SMALL_COMMIT,
            fenced,
            [terms.get(microgrid_id, -1) for microgrid_id in fenced],
            [mg for mg, _ in deletes],
            [did for _, did in deletes],
            [mg for mg, _, _ in upserts],
            [did for _, did, _ in upserts],
            [data for _, _, data in upserts],
            [mg for mg, _ in metas],
            [data for _, data in metas],
            [envelope.message_id for envelope in envelopes],
            [envelope.routing_key for envelope in envelopes],
            [envelope.type for envelope in envelopes],
            [envelope.microgrid_id for envelope in envelopes],
            [envelope.dispatch_id for envelope in envelopes],
            headers,
            [envelope.body for envelope in envelopes],
        )
        fine, held, seqs = row[0], row[1] or [], row[2] or []
        if not fine:
            raise Fenced(touched - {int(microgrid_id) for microgrid_id in held})
        return [
            OutboxItem(seq=seq, envelope=envelope)
            for seq, envelope in zip(sorted(seqs), envelopes, strict=True)
        ]

    @staticmethod
    async def _check_terms(db: Any, touched: set[int], terms: Mapping[int, int]) -> None:
        """Lock the touched microgrids' leases and raise ``Fenced`` unless all are ours.

        A term names one tenure of one owner (it grows with every change of
        owner; a release clears the owner), so an unexpired lease with an
        owner and the same term is still ours. ``FOR SHARE`` makes a takeover
        (an UPDATE of the row) wait until this transaction ended, so what it
        commits is what the next owner loads.
        """
        if not touched:
            return
        wanted = sorted(touched)
        held = await db.fetch(
            "SELECT l.microgrid_id FROM leases AS l"
            " JOIN unnest($1::bigint[], $2::bigint[]) AS t(microgrid_id, term)"
            " ON l.microgrid_id = t.microgrid_id AND l.term = t.term"
            " WHERE l.owner IS NOT NULL AND l.expires_at > now()"
            " ORDER BY l.microgrid_id FOR SHARE OF l",
            wanted,
            [terms.get(mg, -1) for mg in wanted],
        )
        lost = touched - {int(row[0]) for row in held}
        if lost:
            raise Fenced(lost)

    @staticmethod
    async def _append(
        db: Any, envelopes: Sequence[Envelope], headers: list[str]
    ) -> list[OutboxItem]:
        # Numbers from one call of the sequence, in order: the outbox order of this commit.
        seqs = sorted(
            await db.fetchval(
                "SELECT array_agg(nextval('outbox_seq')) FROM generate_series(1, $1)",
                len(envelopes),
            )
        )
        rows = [
            (
                seq,
                envelope.message_id,
                envelope.routing_key,
                envelope.type,
                envelope.microgrid_id,
                envelope.dispatch_id,
                text,
                envelope.body,
            )
            for seq, envelope, text in zip(seqs, envelopes, headers, strict=True)
        ]
        if len(rows) >= BULK_ROWS:
            await db.copy_records_to_table("outbox", records=rows, columns=_OUTBOX_COLUMNS)
        else:
            await db.execute(
                f"INSERT INTO outbox ({', '.join(_OUTBOX_COLUMNS)}) SELECT * FROM"
                " unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[],"
                " $6::bigint[], $7::text[], $8::bytea[])",
                *(list(column) for column in zip(*rows, strict=True)),
            )
        return [
            OutboxItem(seq=seq, envelope=envelope)
            for seq, envelope in zip(seqs, envelopes, strict=True)
        ]

    async def outbox(self, microgrid_ids: Iterable[int] | None = None) -> list[OutboxItem]:
        async with self._unreachable(), self._pool.acquire() as db:
            return await _read_outbox(db, None if microgrid_ids is None else list(microgrid_ids))

    async def outbox_items(self, seqs: Sequence[int]) -> list[OutboxItem]:
        """The outbox items with these seqs that are still there, in seq order."""
        wanted = sorted(set(seqs))
        if not wanted:
            return []
        async with self._unreachable(), self._pool.acquire() as db:
            return await _read_outbox(db, None, wanted)

    async def release_memory(self) -> None:
        """Nothing to free here: the page cache is the database server's."""

    async def remove_from_outbox(self, seqs: Iterable[int]) -> None:
        wanted = sorted(set(seqs))
        if not wanted:
            return
        try:
            await self._pool.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])", wanted)
        except _CONNECTION_PROBLEMS as error:
            raise StoreWriteError(f"state store {self._location}: {_db_problem(error)}") from error

    async def outbox_size(self) -> int:
        return int(await self._call(self._pool.fetchval, "SELECT count(*) FROM outbox"))

    async def close(self) -> None:
        """Close the connections; ones a cut or silent database holds are dropped."""
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()

    # ------------------------------------------------------------- leases

    async def renew(
        self, replica_id: str, lease_seconds: float, microgrid_ids: Iterable[int]
    ) -> dict[int, int]:
        """Heartbeat, and renew the unexpired leases of ``microgrid_ids``, in one statement.

        Returns those still held by ``replica_id``, with their terms. An
        expired lease is not renewed, even when no other replica took it yet:
        its holder has already dropped it by its own clock.
        """
        rows = await self._call(
            self._pool.fetch,
            "WITH beat AS ("
            " INSERT INTO replicas (replica_id, heartbeat_at, started_at, lease_seconds, version)"
            " VALUES ($1, now(), now(), $2, $3)"
            " ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = now(),"
            " lease_seconds = excluded.lease_seconds, version = excluded.version"
            # xmax = 0: the row was inserted, a replica joins: the others rebalance at once.
            " RETURNING xmax = 0 AS joined),"
            " told AS (SELECT pg_notify($6, 'joined') FROM beat WHERE joined),"
            " forget AS (DELETE FROM replicas"
            " WHERE heartbeat_at < now() - make_interval(secs => $4) AND replica_id <> $1)"
            " UPDATE leases SET expires_at = now() + make_interval(secs => $2)"
            " WHERE owner = $1 AND microgrid_id = ANY($5::bigint[]) AND expires_at > now()"
            " AND (SELECT count(*) FROM told) >= 0"
            " RETURNING microgrid_id, term",
            replica_id,
            float(lease_seconds),
            self._version,
            FORGET_REPLICAS_AFTER,
            sorted(set(microgrid_ids)),
            CHANNEL,
        )
        return {int(row[0]): int(row[1]) for row in rows}

    async def acquire(
        self, replica_id: str, microgrid_ids: Iterable[int], lease_seconds: float
    ) -> dict[int, Taken]:
        """Take those of ``microgrid_ids`` that are free or expired, each with its term + 1."""
        wanted = sorted(set(microgrid_ids))
        if not wanted:
            return {}
        rows = await self._call(
            self._pool.fetch,
            "WITH new AS (INSERT INTO leases (microgrid_id, owner, term, expires_at)"
            " SELECT microgrid_id, $2, 1, now() + make_interval(secs => $3)"
            " FROM unnest($1::bigint[]) AS w(microgrid_id)"
            " ON CONFLICT (microgrid_id) DO NOTHING RETURNING microgrid_id, term, previous_owner),"
            " taken AS (UPDATE leases SET owner = $2, term = term + 1,"
            " expires_at = now() + make_interval(secs => $3),"
            " previous_owner = coalesce(owner, previous_owner)"
            " WHERE microgrid_id = ANY($1::bigint[]) AND (owner IS NULL OR expires_at <= now())"
            " RETURNING microgrid_id, term, previous_owner)"
            " SELECT * FROM new UNION ALL SELECT * FROM taken",
            wanted,
            replica_id,
            float(lease_seconds),
        )
        return {int(row[0]): Taken(int(row[1]), row[2]) for row in rows}

    async def release(self, replica_id: str, microgrid_id: int, term: int) -> bool:
        """Give a lease up so the next owner starts at once; False if it was not ours."""
        done = await self._call(
            self._pool.fetchval,
            "WITH released AS (UPDATE leases SET owner = NULL, previous_owner = owner,"
            " expires_at = now() WHERE microgrid_id = $1 AND owner = $2 AND term = $3"
            " RETURNING microgrid_id)"
            " SELECT count(*) FROM (SELECT pg_notify($4, 'released') FROM released) AS told",
            microgrid_id,
            replica_id,
            term,
            CHANNEL,
        )
        return bool(done)

    async def leave(self, replica_id: str) -> None:
        """Remove the membership row at a graceful stop: the others rebalance at once."""
        await self._call(
            self._pool.execute,
            "WITH gone AS (DELETE FROM replicas WHERE replica_id = $1 RETURNING 1)"
            " SELECT pg_notify($2, 'left') FROM gone",
            replica_id,
            CHANNEL,
        )

    async def listen(self, wake: Callable[[], None]) -> Listening:
        """Call ``wake`` whenever a lease is released or a replica joins or leaves.

        A connection of its own (``LISTEN`` holds it); the keeper rounds stay
        the fallback, this only makes a hand-over or a rebalance start at once.
        """
        try:
            connection = await asyncpg.connect(self._dsn, timeout=_CLOSE_GRACE)
            await connection.add_listener(CHANNEL, lambda *_: wake())
        except _CONNECTION_PROBLEMS as error:
            raise StoreWriteError(f"state store {self._location}: {_db_problem(error)}") from error
        return cast(Listening, connection)

    async def view(self) -> ClusterView:
        """Every lease and replica, timed by the database's clock, in one snapshot."""
        async with (
            self._unreachable(),
            self._pool.acquire() as db,
            db.transaction(isolation="repeatable_read"),
        ):
            lease_rows = await db.fetch(
                "SELECT microgrid_id, owner, term,"
                " extract(epoch FROM expires_at - now())::float8, previous_owner"
                " FROM leases ORDER BY microgrid_id"
            )
            replica_rows = await db.fetch(
                "SELECT replica_id, extract(epoch FROM now() - heartbeat_at)::float8,"
                " lease_seconds, version FROM replicas ORDER BY replica_id"
            )
        return ClusterView(
            leases=[
                Lease(int(mg), owner, int(term), _seconds(left), previous)
                for mg, owner, term, left, previous in lease_rows
            ],
            replicas=[
                Replica(str(replica_id), float(age), float(seconds), str(version))
                for replica_id, age, seconds, version in replica_rows
            ],
        )

    @contextlib.asynccontextmanager
    async def _unreachable(self) -> AsyncIterator[None]:
        """A database that cannot be reached is a ``StoreWriteError`` line."""
        try:
            yield
        except _CONNECTION_PROBLEMS as error:
            raise StoreWriteError(f"state store {self._location}: {_db_problem(error)}") from error

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """One statement; a database that cannot be reached is a ``StoreWriteError`` line."""
        try:
            return await method(*args)
        except _CONNECTION_PROBLEMS as error:
            raise StoreWriteError(f"state store {self._location}: {_db_problem(error)}") from error


async def _upsert_records(db: Any, upserts: list[tuple[int, int, str]]) -> None:
    """Insert or replace records; a big batch (a first sync) goes through COPY, 3x faster."""
    if len(upserts) < BULK_ROWS:
        await db.execute(
            "INSERT INTO records (microgrid_id, dispatch_id, data)"
            " SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])"
            " ON CONFLICT (microgrid_id, dispatch_id) DO UPDATE SET data = excluded.data",
            [mg for mg, _, _ in upserts],
            [did for _, did, _ in upserts],
            [data for _, _, data in upserts],
        )
        return
    await db.execute("CREATE TEMP TABLE records_in (LIKE records) ON COMMIT DROP")
    await db.copy_records_to_table("records_in", records=upserts)
    await db.execute(
        "INSERT INTO records SELECT * FROM records_in"
        " ON CONFLICT (microgrid_id, dispatch_id) DO UPDATE SET data = excluded.data"
    )


def _seconds(value: object) -> float:
    """An interval in seconds; ``-infinity`` (never held) is very expired."""
    number = float(cast(float, value))
    return number if number == number else float("-inf")


async def _read_outbox(
    db: Any, microgrid_ids: list[int] | None, seqs: list[int] | None = None
) -> list[OutboxItem]:
    columns = OUTBOX_COLUMNS
    if seqs is not None:
        rows = await db.fetch(
            f"SELECT {columns} FROM outbox WHERE seq = ANY($1::bigint[]) ORDER BY seq", seqs
        )
    elif microgrid_ids is None:
        rows = await db.fetch(f"SELECT {columns} FROM outbox ORDER BY seq")
    else:
        rows = await db.fetch(
            f"SELECT {columns} FROM outbox WHERE microgrid_id = ANY($1::bigint[]) ORDER BY seq",
            microgrid_ids,
        )
    return outbox_items_of(rows)


def _db_problem(error: BaseException) -> str:
    """One line about a database error (never the DSN: asyncpg does not put it in)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
