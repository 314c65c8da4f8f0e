"""Starts and stops each microgrid as this process gains and gives up ownership of it.

The events come from an ``ownership.Ownership``: in the SQLite mode every
configured microgrid is acquired once at start; in a cluster, leases decide
(docs/replicas.md). Per microgrid, without disturbing the others:

- ``Acquired``: load its records, meta and outbox from the store, republish
  the outbox (original ``message_id``s), hand the records to the engine
  (``Loop.adopt``: in a cluster converged at once; alone, held like after a
  restart until its first list or ``api.first_sync_timeout``), then start its
  API sync (stream first, then list).
- ``Lost`` (or a commit the store fenced): stop its sync, forget it in the
  engine, drop its messages from the publisher (they stay in the outbox for
  the next owner). No commit for it follows.
- ``HandOver`` (and every microgrid at SIGTERM): stop its sync, let its outbox
  drain (bounded by ``shutdown_timeout``), forget it, then release it so the
  next owner starts at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from dispatchd.apichannel import ClientPool
from dispatchd.apisync import OPENING_AT_ONCE, ApiSync
from dispatchd.core.records import last_seen_from_meta, record_from_text
from dispatchd.loop import Loop
from dispatchd.ownership import Acquired, HandOver, Lost, Ownership, SoloOwnership
from dispatchd.publisher import Publisher
from dispatchd.settings import Settings
from dispatchd.store import Store, StoreError

_log = structlog.get_logger(__name__)


@dataclass
class _Running:
    """One microgrid run here: its term, its API sync and its first-sync timer."""

    term: int
    sync: ApiSync | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Microgrids:
    """Follows the ownership events; every change of the engine goes through the loop."""

    def __init__(
        self,
        settings: Settings,
        ownership: Ownership,
        store: Store,
        loop: Loop,
        publisher: Publisher,
        clients: ClientPool,
        *,
        without_sync: Collection[int] = (),
    ) -> None:
        self._settings = settings
        self._ownership = ownership
        self._store = store
        self._loop = loop
        self._opening = asyncio.Semaphore(OPENING_AT_ONCE)
        """How many microgrids may open their stream and list at once (over all channels)."""
        self._publisher = publisher
        self._clients = clients
        self._without_sync = frozenset(without_sync)
        """Stored microgrids no longer configured: converged and published, never synced."""
        self.running: dict[int, _Running] = {}
        """The microgrids this process runs now."""
        self._changes: dict[int, asyncio.Task[None]] = {}
        """A hand-over or a stop in progress, per microgrid."""
        self._lock = asyncio.Lock()

    @property
    def syncs(self) -> list[ApiSync]:
        return [running.sync for running in self.running.values() if running.sync is not None]

    async def run(self) -> None:
        """Follow the ownership events until cancelled."""
        async for event in self._ownership.events():
            match event:
                case Acquired(microgrid_id, term, previous_owner):
                    await self._settled(microgrid_id)
                    try:
                        async with self._lock:
                            await self._start(microgrid_id, term, previous_owner)
                    except StoreError as error:  # e.g. the database went away meanwhile
                        if isinstance(self._ownership, SoloOwnership):
                            raise  # one process: its state file is broken, a start-up error
                        _log.warning(
                            "cannot load a microgrid; giving it up",
                            microgrid_id=microgrid_id,
                            term=term,
                            error=str(error),
                        )
                        await self._release(microgrid_id, term)
                case Lost(microgrid_id, term):
                    await self.lost({microgrid_id}, term)
                case HandOver(microgrid_id, term):
                    self._begin(microgrid_id, self._hand_over(microgrid_id, term))

    def fenced(self, microgrid_ids: frozenset[int]) -> None:
        """The store refused a commit for these microgrids: they are lost."""
        for microgrid_id in microgrid_ids:
            running = self.running.get(microgrid_id)
            if running is not None:
                self._begin(microgrid_id, self._stop(microgrid_id, running.term, "fenced"))

    async def lost(self, microgrid_ids: Collection[int], term: int | None = None) -> None:
        """Stop these microgrids at once (of ``term`` only, if given); returns when stopped.

        One that is being handed over already goes on with that: whatever it
        still commits is fenced, what it publishes carries the original ids.
        """
        for microgrid_id in microgrid_ids:
            running = self.running.get(microgrid_id)
            if running is None or (term is not None and running.term != term):
                continue
            self._begin(microgrid_id, self._stop(microgrid_id, running.term, "lost"))
            await self._settled(microgrid_id)

    async def hand_over_all(self, budget: float) -> None:
        """At SIGTERM: every microgrid handed over at once, in parallel, within ``budget``."""
        for microgrid_id, running in list(self.running.items()):
            if microgrid_id not in self._changes:
                self._begin(microgrid_id, self._hand_over(microgrid_id, running.term, budget))
        changes = list(self._changes.values())
        if changes:
            await asyncio.wait(changes)

    def stop_syncs(self) -> list[asyncio.Task[None]]:
        """At shutdown: cancel every API sync and first-sync timer; returns the tasks."""
        tasks: list[asyncio.Task[None]] = []
        for running in self.running.values():
            if running.timer is not None:
                running.timer.cancel()
            tasks.extend(running.tasks)
        for task in tasks:
            task.cancel()
        return tasks

    def skipped(self) -> dict[int, int]:
        """Per microgrid run here, the API's dispatches its sync could not convert."""
        return {
            microgrid_id: len(running.sync.skipped)
            for microgrid_id, running in self.running.items()
            if running.sync is not None and running.sync.skipped
        }

    # ------------------------------------------------------------- per microgrid

    def _begin(self, microgrid_id: int, change: Coroutine[Any, Any, None]) -> None:
        """Run a stop or hand-over of one microgrid in the background (one at a time)."""
        if microgrid_id in self._changes:
            change.close()
            return
        task = asyncio.create_task(change, name=f"microgrid-{microgrid_id}")
        self._changes[microgrid_id] = task
        task.add_done_callback(lambda _: self._changes.pop(microgrid_id, None))

    async def _settled(self, microgrid_id: int) -> None:
        change = self._changes.get(microgrid_id)
        if change is not None:
            await asyncio.wait([change])

    async def _start(self, microgrid_id: int, term: int, previous_owner: str | None) -> None:
        started = time.monotonic()
        loaded = await self._store.load(microgrid_id)
        records = [record_from_text(text, microgrid_id) for text in loaded.records.values()]
        # First what the previous owner committed and may not have published.
        self._publisher.submit(loaded.outbox)
        await self._loop.adopt(microgrid_id, records, last_seen_from_meta(loaded.meta))
        syncing = microgrid_id not in self._without_sync
        running = self.running[microgrid_id] = _Running(term, None)
        if syncing:
            self._loop.syncing.add(microgrid_id)
            running.sync = ApiSync(
                self._clients.client_for(microgrid_id),
                microgrid_id,
                self._loop.inbox.put,
                opening=self._opening,
            )
            running.tasks.append(
                asyncio.create_task(running.sync.run(), name=f"sync-{microgrid_id}")
            )
        running.timer = asyncio.get_running_loop().call_later(
            self._settings.api.first_sync_timeout, self._loop.first_sync_due, microgrid_id
        )
        if records or loaded.outbox:
            _log.info(
                "restored state",
                microgrid_id=microgrid_id,
                dispatches=len(records),
                outbox=len(loaded.outbox),
                last_seen=loaded.meta.get("last_seen"),
            )
        _log.debug(
            "microgrid started",
            microgrid_id=microgrid_id,
            term=term,
            previous_owner=previous_owner,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _stop_intake(self, microgrid_id: int) -> _Running | None:
        running = self.running.get(microgrid_id)
        if running is None:
            return None
        if running.timer is not None:
            running.timer.cancel()
        for task in running.tasks:
            task.cancel()
        if running.tasks:
            await asyncio.wait(running.tasks)
        self._clients.release(microgrid_id)
        self._loop.syncing.discard(microgrid_id)
        return running

    async def _stop(self, microgrid_id: int, term: int, why: str) -> None:
        """Lost: no draining, nothing more committed or published for it here."""
        async with self._lock:
            if await self._stop_intake(microgrid_id) is None:
                return
            await self._loop.forget(microgrid_id)
            dropped = self._publisher.drop(microgrid_id)
            self.running.pop(microgrid_id, None)
        if why == "fenced":  # the lease keeper still counts it as held: not any more
            await self._release(microgrid_id, term)
        _log.info(
            "microgrid stopped",
            microgrid_id=microgrid_id,
            term=term,
            why=why,
            unpublished_left_to_next_owner=dropped,
        )

    async def _hand_over(self, microgrid_id: int, term: int, budget: float | None = None) -> None:
        """Graceful: no more intake, the outbox drained, then released for the next owner."""
        budget = self._settings.shutdown_timeout if budget is None else budget
        async with self._lock:
            running = await self._stop_intake(microgrid_id)
        if running is None:
            return
        drained = await self._publisher.wait_drained(microgrid_id, budget)
        async with self._lock:
            await self._loop.forget(microgrid_id)
            dropped = self._publisher.drop(microgrid_id)
            self.running.pop(microgrid_id, None)
        await self._release(microgrid_id, term)
        _log.info(
            "microgrid handed over",
            microgrid_id=microgrid_id,
            term=term,
            drained=drained,
            unpublished_left_to_next_owner=dropped,
        )

    async def _release(self, microgrid_id: int, term: int) -> None:
        try:
            await self._ownership.release(microgrid_id, term)
        except Exception as exc:  # the lease then expires by itself
            _log.warning(
                "could not release a microgrid; the next owner waits for its lease to expire",
                microgrid_id=microgrid_id,
                term=term,
                error=f"{type(exc).__name__}: {exc}",
            )
