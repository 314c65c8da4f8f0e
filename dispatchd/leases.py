"""The lease keeper: this replica's share of the microgrids, held by leases in PostgreSQL.

Implements ``ownership.Ownership`` for the PostgreSQL store. Every
``lease_seconds / 3`` it heartbeats and renews its leases in one statement,
reads every lease and live replica, and follows ``core.leases.plan``: it
acquires free or expired leases up to its fair share (``Acquired``) and asks
the daemon to hand surplus microgrids over (``HandOver``; the daemon drains
and calls :meth:`LeaseKeeper.release`). If no renewal succeeded for
``lease_seconds`` by its own monotonic clock it drops every microgrid at once
(``Lost``): by then the database may let another replica take them, and the
fencing check refuses this replica's commits anyway (docs/replicas.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

import structlog

from dispatchd import metrics
from dispatchd.core.leases import LeaseRow, plan
from dispatchd.ownership import Acquired, HandOver, Lost, OwnershipEvent
from dispatchd.store.base import StoreError
from dispatchd.store.postgres import ClusterView, Listening, Taken

_log = structlog.get_logger(__name__)


class LeaseTable(Protocol):
    """What the keeper needs of the database (``store.postgres.PostgresStore``)."""

    async def renew(
        self, replica_id: str, lease_seconds: float, microgrid_ids: Iterable[int]
    ) -> dict[int, int]: ...

    async def acquire(
        self, replica_id: str, microgrid_ids: Iterable[int], lease_seconds: float
    ) -> dict[int, Taken]: ...

    async def release(self, replica_id: str, microgrid_id: int, term: int) -> bool: ...

    async def leave(self, replica_id: str) -> None: ...

    async def view(self) -> ClusterView: ...

    async def listen(self, wake: Callable[[], None]) -> Listening: ...


_STALE = "\x00stale"
"""Owner shown to the policy for a lease the database gives this replica but it does not
hold (an acquire whose answer was lost): not free, not counted as ours; it expires."""


class LeaseKeeper:
    """Renews, acquires and hands over this replica's leases; emits ownership events."""

    def __init__(
        self,
        table: LeaseTable,
        *,
        replica_id: str,
        microgrid_ids: Iterable[int],
        lease_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self.replica_id = replica_id
        self._microgrids = sorted(set(microgrid_ids))
        self._lease_seconds = lease_seconds
        self._interval = lease_seconds / 3
        self._clock = clock
        self._held: dict[int, int] = {}
        self._previous: dict[int, str | None] = {}
        self._handing: set[int] = set()
        self._acquiring = True
        self._renewed_at: float | None = None
        """Monotonic instant the last successful renewal was sent (its lease runs from then)."""
        self._changed = asyncio.Event()
        """Set on every renewal and acquisition: the expiry watch looks again."""
        self._events: asyncio.Queue[OwnershipEvent | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._problem: str | None = None
        self._wake = asyncio.Event()
        """Set when the database tells of a release, a join or a leave: a round at once."""
        self._listening: Listening | None = None
        self.rounds = 0
        """Completed rounds (renew, read, plan), for tests that wait for one."""
        self._round_done = asyncio.Event()

    # ------------------------------------------------------- Ownership

    async def events(self) -> AsyncIterator[OwnershipEvent]:
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    def terms(self) -> dict[int, int]:
        return dict(self._held)

    @property
    def problem(self) -> str | None:
        """Why the last renewal failed, while renewals fail (for /readyz)."""
        return self._problem

    async def release(self, microgrid_id: int, term: int) -> None:
        """Release after a hand-over (or after a fenced commit): the lease is no longer ours."""
        if self._held.get(microgrid_id) != term:
            return
        del self._held[microgrid_id]
        self._handing.discard(microgrid_id)
        previous = self._previous.pop(microgrid_id, None)
        try:
            released = await self._table.release(self.replica_id, microgrid_id, term)
        except StoreError as error:
            released = False
            _log.warning(
                "cannot release lease; it expires instead",
                microgrid_id=microgrid_id,
                term=term,
                error=str(error),
            )
        if released:
            metrics.LEASE_RELEASED.inc()
            _log.info(
                "lease released", microgrid_id=microgrid_id, term=term, previous_owner=previous
            )
        else:
            metrics.LEASE_LOST.inc()
            _log.warning(
                "lease lost",
                microgrid_id=microgrid_id,
                term=term,
                previous_owner=previous,
                reason="no longer ours when released",
            )
        metrics.MICROGRIDS_OWNED.set(len(self._held))

    async def close(self) -> None:
        """Stop renewing and acquiring, leave the membership, end :meth:`events`."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._listening is not None:
            with contextlib.suppress(Exception):
                await self._listening.close(timeout=self._interval)
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._table.leave(self.replica_id)
        self._events.put_nowait(None)

    # ------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Begin the rounds and the expiry watch (call once, on the running loop)."""
        self._tasks = [
            asyncio.create_task(self._rounds(), name="lease-rounds"),
            asyncio.create_task(self._watch(), name="lease-watch"),
        ]

    def stop_acquiring(self) -> None:
        """At shutdown: take no new microgrid while the held ones are handed over."""
        self._acquiring = False

    async def wait_round(self, after: int) -> None:
        """Wait until more than ``after`` rounds completed (for tests)."""
        while self.rounds <= after:
            self._round_done.clear()
            await self._round_done.wait()

    # ------------------------------------------------------- the rounds

    async def _rounds(self) -> None:
        while True:
            started = self._clock()
            self._wake.clear()
            try:
                async with asyncio.timeout(self._interval):
                    await self._round(started)
                if self._problem is not None:
                    _log.info("lease database reachable again")
                    self._problem = None
            except Exception as error:  # a round that fails must not end the rounds
                problem = _problem(error)
                if problem != self._problem:
                    _log.warning("cannot renew leases", error=problem, held=len(self._held))
                self._problem = problem
            self.rounds += 1
            self._round_done.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, started + self._interval - self._clock())):
                    await self._wake.wait()

    async def _keep_listening(self) -> None:
        """(Re)open the notification connection; without it the rounds still do it all."""
        if self._listening is not None and not self._listening.is_closed():
            return
        try:
            self._listening = await self._table.listen(self._wake.set)
        except StoreError as error:
            _log.debug("cannot listen for lease changes", error=str(error))

    async def _round(self, started: float) -> None:
        asked = dict(self._held)
        renewed = await self._table.renew(self.replica_id, self._lease_seconds, asked)
        self._renewed_at = started
        self._changed.set()
        for microgrid_id, term in asked.items():
            if renewed.get(microgrid_id) != term and self._held.get(microgrid_id) == term:
                self._lose(microgrid_id, "not renewed: expired or taken over")
        # Listening before reading: a release or a join after the read wakes the next round.
        await self._keep_listening()
        view = await self._table.view()
        live = view.live_replicas()
        metrics.CLUSTER_REPLICAS.set(len(set(live) | {self.replica_id}))
        rows = {
            lease.microgrid_id: LeaseRow(
                lease.owner
                if lease.owner != self.replica_id or lease.microgrid_id in self._held
                else _STALE,
                lease.expires_in,
            )
            for lease in view.leases
        }
        for microgrid_id in self._held:  # ours by the renewal just made, whatever the read says
            rows[microgrid_id] = LeaseRow(self.replica_id, self._lease_seconds)
        chosen = plan(self.replica_id, self._microgrids, live, rows, handing_over=self._handing)
        if chosen.acquire and self._acquiring:
            taken = await self._table.acquire(self.replica_id, chosen.acquire, self._lease_seconds)
            for microgrid_id in chosen.acquire:
                if microgrid_id in taken:
                    self._acquired(microgrid_id, taken[microgrid_id])
        for microgrid_id in chosen.hand_over:
            self._handing.add(microgrid_id)
            _log.info(
                "handing lease over", microgrid_id=microgrid_id, term=self._held[microgrid_id]
            )
            self._events.put_nowait(HandOver(microgrid_id, self._held[microgrid_id]))

    def _acquired(self, microgrid_id: int, taken: Taken) -> None:
        self._held[microgrid_id] = taken.term
        self._previous[microgrid_id] = taken.previous_owner
        self._changed.set()
        metrics.LEASE_ACQUIRED.inc()
        metrics.MICROGRIDS_OWNED.set(len(self._held))
        _log.info(
            "lease acquired",
            microgrid_id=microgrid_id,
            term=taken.term,
            previous_owner=taken.previous_owner,
        )
        self._events.put_nowait(Acquired(microgrid_id, taken.term, taken.previous_owner))

    def _lose(self, microgrid_id: int, reason: str) -> None:
        term = self._held.pop(microgrid_id)
        self._handing.discard(microgrid_id)
        metrics.LEASE_LOST.inc()
        metrics.MICROGRIDS_OWNED.set(len(self._held))
        _log.warning(
            "lease lost",
            microgrid_id=microgrid_id,
            term=term,
            previous_owner=self._previous.pop(microgrid_id, None),
            reason=reason,
        )
        self._events.put_nowait(Lost(microgrid_id, term))

    async def _watch(self) -> None:
        """Drop every microgrid at once when no renewal succeeded for ``lease_seconds``."""
        while True:
            self._changed.clear()
            if not self._held or self._renewed_at is None:
                await self._changed.wait()
                continue
            left = self._renewed_at + self._lease_seconds - self._clock()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._changed.wait()
                continue
            for microgrid_id in sorted(self._held):
                self._lose(microgrid_id, f"not renewed for {self._lease_seconds:g} s")


def _problem(error: Exception) -> str:
    """One line about a failed round."""
    if isinstance(error, TimeoutError):
        return "no answer within a third of cluster.lease_seconds"
    if isinstance(error, StoreError):
        return str(error)
    return f"{type(error).__name__}: {error}"
