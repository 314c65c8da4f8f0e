"""What every state store offers: the engine's records, meta and the outbox, per microgrid.

Two backends implement :class:`Store`: SQLite (one process, the default) and
PostgreSQL (replicas sharing the microgrids by leases, docs/replicas.md).
Every method is async so a networked database fits; the SQLite store answers
inline, as before, since one commit is one short local transaction.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer dispatchd, or not one at all)."""

    exit_code = 1


class SchemaTooNew(StoreError):
    """A database written by a newer dispatchd; every store refuses it with this one line."""

    def __init__(self, where: Path | str, found: int, supported: int) -> None:
        super().__init__(
            f"{where}: schema version {found} is newer than this dispatchd "
            f"understands ({supported})"
        )


class StateDirError(StoreError):
    """``state.dir`` cannot hold the state: a configuration problem (exit 2)."""

    exit_code = 2


class StoreWriteError(StoreError):
    """A write failed for a reason outside dispatchd (disk full, read-only, I/O error,
    the database unreachable); the step is kept and retried.

    ``str()`` is the one line an operator sees: ``state store <path>: disk full``.
    """


class Fenced(StoreError):
    """A commit touched microgrids this replica no longer holds with the given term.

    Nothing of the commit was written. The caller drops ``microgrid_ids`` at
    once: another replica owns them now (or will soon).
    """

    def __init__(self, microgrid_ids: Iterable[int]) -> None:
        self.microgrid_ids = frozenset(microgrid_ids)
        listed = ", ".join(str(microgrid_id) for microgrid_id in sorted(self.microgrid_ids))
        super().__init__(f"lease lost for microgrid {listed}: the commit was rolled back")


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A committed, not yet confirmed message; ``seq`` orders the outbox."""

    seq: int
    envelope: Envelope


OUTBOX_COLUMNS = "seq, message_id, routing_key, type, microgrid_id, dispatch_id, headers, body"
"""The outbox columns that ``outbox_items_of`` reads, in its order (both stores)."""


def outbox_items_of(rows: Iterable[Sequence[Any]]) -> list[OutboxItem]:
    """Outbox rows (``OUTBOX_COLUMNS``) as items: both stores keep them alike."""
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
        for seq, message_id, routing_key, type_, microgrid_id, dispatch_id, headers, body in rows
    ]


@dataclass(frozen=True, slots=True)
class Loaded:
    """One microgrid's stored state, as read when its owner starts it."""

    records: dict[DispatchKey, str]
    meta: dict[str, Any]
    outbox: list[OutboxItem]


class Store(Protocol):
    """The durable state of dispatchd: engine records, meta and the outbox, by microgrid.

    Every message is appended to the outbox in the same transaction as the
    state change that caused it, so a crash can never leave a change recorded
    without its message (or a message without its change). A message leaves
    the outbox only once the broker confirmed it (``remove_from_outbox``).
    """

    @property
    def location(self) -> str:
        """Where the state lives, for log lines (a path, or a DSN without its password)."""
        ...

    async def microgrids(self) -> set[int]:
        """Microgrids with stored records, meta or outbox items."""
        ...

    async def load(self, microgrid_id: int) -> Loaded:
        """One microgrid's records, meta and outbox (in seq order)."""
        ...

    async def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] = ...,
        meta: Mapping[int, Mapping[str, Any]] | None = None,
        envelopes: Sequence[Envelope] = (),
        terms: Mapping[int, int] | None = None,
    ) -> list[OutboxItem]:
        """Apply one engine step atomically and return its new outbox items.

        ``records`` upserts (texts of ``core.records``: JSON, so never a NUL,
        which PostgreSQL's text cannot hold), or deletes where the value is ``None``; ``meta``
        replaces each given microgrid's meta dict; ``envelopes`` are appended
        to the outbox in order. With ``terms`` the store checks, in the same
        transaction, that this replica still holds every microgrid the commit
        touches with that term, and raises :class:`Fenced` (nothing written)
        if not. A store without leases (SQLite) ignores ``terms``.
        """
        ...

    async def outbox(self, microgrid_ids: Iterable[int] | None = None) -> list[OutboxItem]:
        """The unconfirmed messages (of ``microgrid_ids``, or all), in seq order."""
        ...

    async def outbox_items(self, seqs: Sequence[int]) -> list[OutboxItem]:
        """The outbox items with these seqs that are still there, in seq order.

        The publisher reads its bulk backlog back with this, a batch at a time
        (docs/architecture.md, "Memory at scale").
        """
        ...

    async def release_memory(self) -> None:
        """Give back what a large step made the store cache in this process."""
        ...

    async def remove_from_outbox(self, seqs: Iterable[int]) -> None:
        """Forget messages the broker confirmed (or returned as unroutable)."""
        ...

    async def outbox_size(self) -> int:
        """How many messages the outbox holds."""
        ...

    async def close(self) -> None: ...


def touched_microgrids(
    records: Iterable[DispatchKey],
    meta: Mapping[int, Any] | None,
    envelopes: Iterable[Envelope],
) -> set[int]:
    """The microgrids a commit writes to (what its fencing check covers)."""
    touched = {microgrid_id for microgrid_id, _ in records}
    if meta:
        touched.update(meta)
    touched.update(envelope.microgrid_id for envelope in envelopes)
    return touched


_HEADERS_ENCODER = json.JSONEncoder(sort_keys=True)
"""What ``json.dumps(headers, sort_keys=True)`` does, without its per-call setup."""
_WIRE_HEADERS = ("dispatch_id", "dispatch_type", "event", "microgrid_id", "schema")


def headers_text(headers: Mapping[str, int | str]) -> str:
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
