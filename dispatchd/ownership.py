"""Which microgrids this process may run, and the events that change it.

One process on the SQLite store owns every configured microgrid for its whole
life. Replicas on PostgreSQL hold them by leases: a microgrid is acquired with
a term, may be lost at once (no renewal within the lease) or handed over
gracefully (drain its outbox, then release). The daemon reacts to these events
per microgrid; the store checks the term inside every writing transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Acquired:
    """Start the microgrid: load its state, republish its outbox, converge, sync."""

    microgrid_id: int
    term: int
    previous_owner: str | None


@dataclass(frozen=True, slots=True)
class Lost:
    """Stop the microgrid at once: no write under ``term`` can commit any more."""

    microgrid_id: int
    term: int


@dataclass(frozen=True, slots=True)
class HandOver:
    """Stop intake, let the outbox drain, then call :meth:`Ownership.release`."""

    microgrid_id: int
    term: int


OwnershipEvent = Acquired | Lost | HandOver


class Ownership(Protocol):
    """The source of ownership events, and the way back to give a microgrid up."""

    def events(self) -> AsyncIterator[OwnershipEvent]:
        """Every change of what this process owns, in order, until closed."""
        ...

    def terms(self) -> dict[int, int]:
        """The microgrids held now, with their terms (what a commit is fenced by)."""
        ...

    async def release(self, microgrid_id: int, term: int) -> None:
        """Give the microgrid up so the next owner can start at once."""
        ...

    async def close(self) -> None:
        """Stop renewing and acquiring; held leases are left to :meth:`release`."""
        ...


class SoloOwnership:
    """The SQLite mode's ownership: every configured microgrid, term 0, for the whole run.

    One process per exchange is enforced elsewhere (the exclusive RPC
    consumer), so there is nothing to lease: each microgrid is acquired once
    at start and never lost.
    """

    def __init__(self, microgrid_ids: Iterable[int]) -> None:
        self._terms = dict.fromkeys(microgrid_ids, 0)
        self._closed = asyncio.Event()

    async def events(self) -> AsyncIterator[OwnershipEvent]:
        for microgrid_id in list(self._terms):
            yield Acquired(microgrid_id, 0, None)
        await self._closed.wait()

    def terms(self) -> dict[int, int]:
        return dict(self._terms)

    async def release(self, microgrid_id: int, term: int) -> None:
        self._terms.pop(microgrid_id, None)

    async def close(self) -> None:
        self._closed.set()
