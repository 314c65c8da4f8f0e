"""SQLite persistence of the local API: one transaction per call.

A dispatch row keeps the serialised protobuf ``DispatchData`` as the source of
truth plus the columns that List filters and sorts on; the targets go to a
side table so the target filter is an indexed SQL ``EXISTS``. Every method is
synchronous and short: the server calls them from its event loop, which makes
commit order and event order the same by construction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from frequenz.api.common.v1alpha8.types.interval_pb2 import Interval
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    SORT_FIELD_CREATE_TIME,
    SORT_FIELD_LAST_UPDATE_TIME,
    SORT_FIELD_START_TIME,
    SORT_FIELD_UNSPECIFIED,
    SORT_ORDER_ASCENDING,
    SORT_ORDER_DESCENDING,
    SORT_ORDER_UNSPECIFIED,
    Dispatch,
    DispatchData,
    DispatchFilter,
    DispatchMetadata,
    RecurrenceRule,
    SortOptions,
    TargetComponents,
)
from google.protobuf.timestamp_pb2 import Timestamp

from dispatchd.core.times import epoch_micros
from dispatchd.localapi import paging
from dispatchd.localapi.validation import (
    InvalidRequest,
    Prepared,
    to_datetime,
)
from dispatchd.store import SchemaTooNew

SCHEMA_VERSION = 1

_SCHEMA_V1 = """
CREATE TABLE dispatches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    microgrid_id INTEGER NOT NULL,
    type TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    end_time INTEGER,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    is_active INTEGER NOT NULL,
    is_dry_run INTEGER NOT NULL,
    is_recurring INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX dispatches_by_create ON dispatches (microgrid_id, create_time, id);
CREATE INDEX dispatches_by_start ON dispatches (microgrid_id, start_time, id);
CREATE INDEX dispatches_by_update ON dispatches (microgrid_id, update_time, id);
CREATE TABLE dispatch_targets (
    dispatch_id INTEGER NOT NULL REFERENCES dispatches (id) ON DELETE CASCADE,
    component_id INTEGER,
    category INTEGER,
    subtype INTEGER
);
CREATE INDEX dispatch_targets_by_dispatch ON dispatch_targets (dispatch_id);
"""

_SORT_COLUMNS = {
    SORT_FIELD_UNSPECIFIED: "create_time",
    SORT_FIELD_CREATE_TIME: "create_time",
    SORT_FIELD_START_TIME: "start_time",
    SORT_FIELD_LAST_UPDATE_TIME: "update_time",
}

MAX_SQL_INT = 2**63 - 1
"""SQLite's largest integer; larger ids cannot exist, so they never match."""

MAX_FILTER_ITEMS = 1000

_COLUMNS = "id, microgrid_id, create_time, update_time, end_time, data"

PAGE_BYTES = 3 * 1024 * 1024
"""A List page holds dispatches up to about this many bytes (and at least one),
well under gRPC's default 4 MiB receive limit of the clients."""

_ROW_OVERHEAD = 64
"""Bytes a dispatch adds to a page beyond its data: metadata, times, framing."""


@dataclass(frozen=True, slots=True)
class StoredDispatch:
    """One dispatch as stored: the client's data plus server-owned metadata.

    Times are microseconds since the epoch, as stored, so listing converts
    them straight to protobuf timestamps without ``datetime`` round trips.
    """

    id: int
    microgrid_id: int
    data: DispatchData
    create_micros: int
    update_micros: int
    end_micros: int | None

    def to_protobuf(self) -> Dispatch:
        """The API's message."""
        return Dispatch(
            metadata=DispatchMetadata(
                dispatch_id=self.id,
                create_time=_timestamp(self.create_micros),
                update_time=_timestamp(self.update_micros),
                end_time=_timestamp(self.end_micros) if self.end_micros is not None else None,
            ),
            data=self.data,
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing and how to continue it."""

    dispatches: list[StoredDispatch]
    total_items: int
    next_page_token: str | None


class Storage:
    """The dispatch database (WAL mode, versioned schema)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite)."""
        self._db.close()

    @contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN (IMMEDIATE for writes) … COMMIT, rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        """Create or upgrade the schema; later versions add steps here."""
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(self._path, version, SCHEMA_VERSION)
            if version < 1:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (1)")

    def create(self, microgrid_id: int, prepared: Prepared, now: datetime) -> StoredDispatch:
        """Insert a validated dispatch; the id is assigned here (never reused)."""
        data, end_time = prepared.data, prepared.end_time
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO dispatches (microgrid_id, type, start_time, end_time, create_time,"
                " update_time, is_active, is_dry_run, is_recurring, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    microgrid_id,
                    data.type,
                    epoch_micros(to_datetime(data.start_time)),
                    _micros(end_time),
                    epoch_micros(now),
                    epoch_micros(now),
                    data.is_active,
                    data.is_dry_run,
                    _is_recurring(data),
                    data.SerializeToString(),
                ),
            )
            dispatch_id = cursor.lastrowid
            assert dispatch_id is not None
            _write_targets(db, dispatch_id, data.target)
        return StoredDispatch(
            dispatch_id, microgrid_id, data, epoch_micros(now), epoch_micros(now), _micros(end_time)
        )

    def get(self, microgrid_id: int, dispatch_id: int) -> StoredDispatch | None:
        """The dispatch, or ``None`` if unknown or of another microgrid."""
        return _select(self._db, microgrid_id, dispatch_id)

    def update(
        self,
        microgrid_id: int,
        dispatch_id: int,
        change: Callable[[DispatchData], Prepared],
        now: datetime,
    ) -> StoredDispatch | None:
        """Read, change (may raise to abort) and write back in one transaction."""
        with self._transaction() as db:
            old = _select(db, microgrid_id, dispatch_id)
            if old is None:
                return None
            prepared = change(old.data)
            data, end_time = prepared.data, prepared.end_time
            db.execute(
                "UPDATE dispatches SET type = ?, start_time = ?, end_time = ?, update_time = ?,"
                " is_active = ?, is_dry_run = ?, is_recurring = ?, data = ? WHERE id = ?",
                (
                    data.type,
                    epoch_micros(to_datetime(data.start_time)),
                    _micros(end_time),
                    epoch_micros(now),
                    data.is_active,
                    data.is_dry_run,
                    _is_recurring(data),
                    data.SerializeToString(),
                    dispatch_id,
                ),
            )
            db.execute("DELETE FROM dispatch_targets WHERE dispatch_id = ?", (dispatch_id,))
            _write_targets(db, dispatch_id, data.target)
        return StoredDispatch(
            dispatch_id, microgrid_id, data, old.create_micros, epoch_micros(now), _micros(end_time)
        )

    def delete(self, microgrid_id: int, dispatch_id: int) -> StoredDispatch | None:
        """Remove and return the dispatch, or ``None`` if there was none."""
        with self._transaction() as db:
            deleted = _select(db, microgrid_id, dispatch_id)
            if deleted is not None:
                db.execute("DELETE FROM dispatches WHERE id = ?", (dispatch_id,))
        return deleted

    def list(
        self,
        microgrid_id: int,
        filter_: DispatchFilter,
        sort: SortOptions,
        page_size: int,
        page_token: str,
    ) -> Page:
        """One page of the filtered, sorted listing (keyset pagination)."""
        where, params = _filter_sql(microgrid_id, filter_)
        column = _SORT_COLUMNS.get(sort.sort_field)
        if column is None:
            raise InvalidRequest("sort_options.sort_field", f"unknown value {sort.sort_field}")
        if sort.sort_order not in (
            SORT_ORDER_UNSPECIFIED,
            SORT_ORDER_ASCENDING,
            SORT_ORDER_DESCENDING,
        ):
            raise InvalidRequest("sort_options.sort_order", f"unknown value {sort.sort_order}")
        descending = sort.sort_order != SORT_ORDER_ASCENDING
        mark = paging.fingerprint(microgrid_id, filter_, sort)
        size = paging.page_size_of(page_size)
        page_where = list(where)
        page_params = list(params)
        if page_token:
            token = paging.decode(page_token, mark)
            size = token.page_size
            page_where.append(f"({column}, id) {'<' if descending else '>'} (?, ?)")
            page_params += [token.last_key, token.last_id]
        direction = "DESC" if descending else "ASC"
        with self._transaction(write=False) as db:
            total = db.execute(
                f"SELECT COUNT(*) FROM dispatches d WHERE {' AND '.join(where)}", params
            ).fetchone()[0]
            rows = db.execute(
                f"SELECT {_COLUMNS}, {column} FROM dispatches d WHERE {' AND '.join(page_where)}"
                f" ORDER BY {column} {direction}, id {direction} LIMIT ?",
                [*page_params, size + 1],
            ).fetchall()
        more = len(rows) > size
        rows = rows[:size]
        fitting = _rows_within(rows, PAGE_BYTES)
        more = more or fitting < len(rows)
        rows = rows[:fitting]
        next_token = None
        if more:
            last = rows[-1]
            next_token = paging.encode(paging.PageToken(last[-1], last[0], size, mark))
        return Page([_from_row(row[:-1]) for row in rows], total, next_token)


def _rows_within(rows: Sequence[Sequence[Any]], budget: int) -> int:
    """How many leading rows fit in ``budget`` bytes of response (at least one)."""
    used = 0
    for count, row in enumerate(rows):
        used += len(row[5]) + _ROW_OVERHEAD
        if used > budget and count > 0:
            return count
    return len(rows)


def _is_recurring(data: DispatchData) -> bool:
    return data.recurrence.freq != RecurrenceRule.FREQUENCY_UNSPECIFIED


def _select(db: sqlite3.Connection, microgrid_id: int, dispatch_id: int) -> StoredDispatch | None:
    """The dispatch with this id in this microgrid, or ``None``."""
    row = db.execute(
        f"SELECT {_COLUMNS} FROM dispatches WHERE id = ? AND microgrid_id = ?",
        (dispatch_id, microgrid_id),
    ).fetchone()
    return _from_row(row) if row else None


def _from_row(row: Sequence[Any]) -> StoredDispatch:
    dispatch_id, microgrid_id, create_time, update_time, end_time, blob = row
    data = DispatchData()
    data.ParseFromString(blob)
    return StoredDispatch(dispatch_id, microgrid_id, data, create_time, update_time, end_time)


def _micros(moment: datetime | None) -> int | None:
    return epoch_micros(moment) if moment is not None else None


def _timestamp(micros: int) -> Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def _target_rows(target: TargetComponents) -> list[tuple[int | None, int | None, int | None]]:
    """(component_id, category, subtype) rows for the side table."""
    match target.WhichOneof("components"):
        case "component_ids":
            return [(component, None, None) for component in target.component_ids.ids]
        case "component_categories":
            return [(None, category, None) for category in target.component_categories.categories]
        case "component_categories_types":
            return [
                (None, pair.category, _subtype(pair))
                for pair in target.component_categories_types.categories
            ]
    return []


def _subtype(pair: TargetComponents.CategoryAndType) -> int | None:
    """The battery/inverter/EV charger type; unspecified (0) counts as none."""
    kind = pair.WhichOneof("type")
    value = int(getattr(pair, kind)) if kind else 0
    return value or None


def _write_targets(db: sqlite3.Connection, dispatch_id: int, target: TargetComponents) -> None:
    db.executemany(
        "INSERT INTO dispatch_targets (dispatch_id, component_id, category, subtype)"
        " VALUES (?, ?, ?, ?)",
        [(dispatch_id, *row) for row in _target_rows(target)],
    )


def _filter_sql(microgrid_id: int, filter_: DispatchFilter) -> tuple[list[str], list[Any]]:
    """WHERE clauses (ANDed) and their parameters for every set filter field."""
    where = ["d.microgrid_id = ?"]
    params: list[Any] = [microgrid_id]
    if filter_.HasField("is_active"):
        where.append("d.is_active = ?")
        params.append(filter_.is_active)
    if filter_.HasField("is_dry_run"):
        where.append("d.is_dry_run = ?")
        params.append(filter_.is_dry_run)
    if filter_.WhichOneof("recurrence") == "is_recurring":
        where.append("d.is_recurring = ?")
        params.append(filter_.is_recurring)
    if filter_.HasField("start_time_interval"):
        _interval_sql(filter_.start_time_interval, "start_time", where, params)
    if filter_.HasField("end_time_interval"):
        _interval_sql(filter_.end_time_interval, "end_time", where, params)
    if filter_.HasField("update_time_interval"):
        _interval_sql(filter_.update_time_interval, "update_time", where, params)
    for field in ("dispatch_ids", "targets", "queries"):
        if len(getattr(filter_, field)) > MAX_FILTER_ITEMS:
            raise InvalidRequest(f"filter.{field}", f"more than {MAX_FILTER_ITEMS} items")
    if filter_.dispatch_ids:
        ids = [min(value, MAX_SQL_INT) for value in filter_.dispatch_ids]
        where.append(f"d.id IN ({', '.join('?' * len(ids))})")
        params += ids
    if filter_.targets:
        _targets_sql(filter_, where, params)
    if filter_.queries:
        _queries_sql(list(filter_.queries), where, params)
    return where, params


def _interval_sql(interval: Interval, column: str, where: list[str], params: list[Any]) -> None:
    """``[start, end)``; an open side is unbounded.

    A NULL ``end_time`` is a dispatch that never ends (a recurrence without
    count or until): later than any instant, so it matches a lower bound and
    never an upper one. frequenz-dispatch lists with ``end_from`` = now - 5 s
    and would not see such a dispatch otherwise.
    """
    field = f"filter.{column}_interval"
    endless = column == "end_time"
    if interval.HasField("start_time"):
        at_least = f"d.{column} >= ?"
        where.append(f"(d.{column} IS NULL OR {at_least})" if endless else at_least)
        params.append(epoch_micros(to_datetime(interval.start_time, field)))
    if interval.HasField("end_time"):
        where.append(f"d.{column} < ?")
        params.append(epoch_micros(to_datetime(interval.end_time, field)))


def _targets_sql(filter_: DispatchFilter, where: list[str], params: list[Any]) -> None:
    """A dispatch matches if it shares a component id or a category with any filter target.

    A category without a type in the filter matches every type of it. The
    alternatives are flat ``IN`` lists: an ``OR`` per item would exceed
    SQLite's expression depth (1000) near the item limit.
    """
    components: list[int] = []
    categories: list[int] = []
    pairs: list[tuple[int, int]] = []
    for index, target in enumerate(filter_.targets):
        rows = _target_rows(target)
        if not rows:
            raise InvalidRequest(f"filter.targets[{index}]", "names no component or category")
        for component, category, subtype in rows:
            if component is not None:
                if component > MAX_SQL_INT:
                    raise InvalidRequest(f"filter.targets[{index}]", "component id out of range")
                components.append(component)
            elif subtype is None:
                assert category is not None
                categories.append(category)
            else:
                assert category is not None
                pairs.append((category, subtype))
    alternatives: list[str] = []
    if components:
        alternatives.append(f"t.component_id IN ({', '.join('?' * len(components))})")
        params += components
    if categories:
        alternatives.append(f"t.category IN ({', '.join('?' * len(categories))})")
        params += categories
    if pairs:
        alternatives.append(
            f"(t.category, t.subtype) IN (VALUES {', '.join(['(?, ?)'] * len(pairs))})"
        )
        params += [value for pair in pairs for value in pair]
    where.append(
        "EXISTS (SELECT 1 FROM dispatch_targets t WHERE t.dispatch_id = d.id AND "
        f"({' OR '.join(alternatives)}))"
    )


def _queries_sql(queries: list[str], where: list[str], params: list[Any]) -> None:
    """``#<n>`` matches id n; anything else is a case-insensitive substring of the type.

    Flat ``IN`` and ``VALUES`` lists, not one ``OR`` per query (SQLite's
    expression depth is 1000).
    """
    ids: list[int] = []
    words: list[str] = []
    for query in queries:
        digits = query[1:]
        if query.startswith("#") and digits.isascii() and digits.isdigit() and len(digits) < 19:
            ids.append(int(digits))
        else:
            words.append(query)
    alternatives: list[str] = []
    if ids:
        alternatives.append(f"d.id IN ({', '.join('?' * len(ids))})")
        params += ids
    if words:
        alternatives.append(
            f"EXISTS (SELECT 1 FROM (VALUES {', '.join(['(?)'] * len(words))}) q"
            " WHERE instr(lower(d.type), lower(q.column1)) > 0)"
        )
        params += words
    where.append(f"({' OR '.join(alternatives)})")
