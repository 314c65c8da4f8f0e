"""The daemon's one loop: inbox or deadline -> engine step -> one commit -> publisher.

``Loop.run`` waits for the next ``apisync`` item or the engine's next
deadline, whichever comes first, and hands it to ``core.engine.Engine``. The
engine returns one ``Step``: the messages and the records and meta to store
with them. ``Loop._commit`` encodes the messages with ``core.wire`` and the
records with ``core.records`` and writes both in one transaction of
``store.Store``; the committed outbox items go to ``publisher.Publisher``.

Only this loop touches the engine, so the engine needs no locks; the RPC and
HTTP handlers only read it between steps. The fast paths live here too:
dispatches due soon are readied ahead (``PREPARE_LEAD``), a burst is
committed in parts, each dispatch is encoded once for its record and its
messages, and a step the store refuses (disk full) is kept and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from frequenz.client.common.streaming import Event as StreamEvent

from dispatchd import memory, metrics, status
from dispatchd.apisync import Backoff, Listed, Streamed, SyncItem, gc_paused
from dispatchd.core import wire
from dispatchd.core.engine import Change, Created, Deleted, Engine, Step, Updated
from dispatchd.core.messages import Event, Message, Reason, RunningMessage
from dispatchd.core.model import Dispatch
from dispatchd.core.records import (
    DispatchKey,
    DispatchRecord,
    last_seen_from_meta,
    record_from_text,
    record_to_text,
)
from dispatchd.core.times import EARLIEST
from dispatchd.publisher import Publisher
from dispatchd.settings import Settings
from dispatchd.store import Fenced, OutboxItem, Store, StoreWriteError

_log = structlog.get_logger(__name__)

FIRST_PART = 50
"""Messages in the first part of a burst committed in parts (see ``_commit_in_parts``).

Everything before the first part's write is on every message's lag: 50 put
the first messages on the wire about 4 ms sooner than 100 did, and the start
lag p99 of ``bench/bench_minutely.py`` fell by about 5 ms (with the cut before
the stops, ``_commit_in_parts``)."""
SLICE = 2000
"""Dispatches per transaction of a large step such as a first sync (see ``_commit``)."""
HANDOFF_YIELDS = 3
"""Loop turns given to the publisher after each part: its sender starts the
publishes, they queue their frames, aiormq's writer puts them on the socket."""
LISTED_BATCH = 200
"""Listings (of different microgrids, queued together) committed in one transaction."""
PREPARE_LEAD = 0.5
"""Seconds before a deadline at which its dispatches are readied (see ``Engine.prepare``)."""
_SCHEDULED_REASONS = frozenset({Reason.STARTED, Reason.ENDED})
"""Running messages caused by a boundary of the schedule (their lateness is measured)."""
STORE_RETRY = Backoff(initial=0.5, maximum=5.0)
"""Backoff between attempts to write a step the state store refused (disk full...)."""
STORE_ERROR_EVERY = 60.0
"""Seconds between the ERROR lines repeated while the state store refuses writes."""
META_REFRESH = 1.0
"""Seconds the stored meta (``last_seen``) of a microgrid no step touched may lag.

A commit writes the meta of the microgrids it has records or messages of,
and every ``META_REFRESH`` that of all: at 1,000 microgrids, writing all of
them with every commit cost 3 ms per commit. A lagging ``last_seen`` loses
nothing: a boundary that fell in the lag would have touched its microgrid."""


@dataclass(frozen=True, slots=True)
class _FirstSyncDue:
    """``api.first_sync_timeout`` has passed since the microgrid was started."""

    microgrid_id: int


@dataclass(frozen=True, slots=True)
class _Adopt:
    """Start running a microgrid from its stored records (it was acquired)."""

    microgrid_id: int
    records: list[DispatchRecord]
    last_seen: datetime | None
    done: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class _Forget:
    """Stop running a microgrid: no more messages or commits for it."""

    microgrid_id: int
    done: asyncio.Future[None]


InboxItem = SyncItem | _FirstSyncDue | _Adopt | _Forget


@dataclass(slots=True)
class _Unsaved:
    """Steps the store refused, merged in order, waiting to be written."""

    records: dict[DispatchKey, str | None]
    meta: dict[str, Any] | None
    envelopes: list[wire.Envelope]

    def add(
        self,
        records: dict[DispatchKey, str | None],
        meta: dict[str, Any] | None,
        envelopes: list[wire.Envelope],
    ) -> None:
        self.records.update(records)
        if meta is not None:
            self.meta = meta
        self.envelopes.extend(envelopes)


async def restore_engine(store: Store, microgrid_ids: Iterable[int] = ()) -> Engine:
    """The engine as the store left it (call ``Engine.hold`` before the first step).

    Loads every stored microgrid and ``microgrid_ids``; the engine's clock
    starts from the latest ``last_seen`` among them (one process wrote them all).
    """
    records: list[DispatchRecord] = []
    outbox = 0
    meta: dict[str, Any] = {}
    for microgrid_id in sorted(await store.microgrids() | set(microgrid_ids)):
        loaded = await store.load(microgrid_id)
        records.extend(
            record_from_text(text, microgrid_id) for (_, _), text in loaded.records.items()
        )
        outbox += len(loaded.outbox)
        if _last_seen(loaded.meta) >= _last_seen(meta):
            meta = loaded.meta
    if records or outbox:
        _log.info(
            "restored state",
            dispatches=len(records),
            outbox=outbox,
            last_seen=meta.get("last_seen"),
        )
    return Engine.restore(records, meta)


def _last_seen(meta: Mapping[str, Any]) -> datetime:
    """``last_seen`` for comparing (never seen: the earliest instant)."""
    return last_seen_from_meta(meta) or EARLIEST


class Loop:
    """Owns the engine between start-up and shutdown; feeds it and stores what it decides."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: Store,
        publisher: Publisher,
        *,
        clock: Callable[[], datetime],
        ready: asyncio.Event,
        terms: Callable[[], Mapping[int, int]] = dict,
        on_fenced: Callable[[frozenset[int]], None] = lambda _: None,
        shared: bool = False,
    ) -> None:
        self._settings = settings
        self.engine = engine
        self._store = store
        self._terms = terms
        """The held microgrids' lease terms, which fence every commit."""
        self._on_fenced = on_fenced
        """Told of microgrids whose commit the store refused: another process owns them."""
        self._shared = shared
        """Other replicas read the store (PostgreSQL): they learn from it what is synced, and
        a microgrid acquired from one of them converges at once (see ``adopt``)."""
        self.active: set[int] = set()
        """Microgrids adopted and not forgotten: only their messages are committed."""
        self.syncing: set[int] = set()
        """Microgrids with an API sync; ready once all of them finished their first."""
        self._publisher = publisher
        self._clock = clock
        self._ready = ready
        self.inbox: asyncio.Queue[InboxItem] = asyncio.Queue()
        """Where each microgrid's ``ApiSync`` puts what it learnt."""
        self.synced: set[int] = set()
        self.first_synced_at: dict[int, datetime] = {}
        self.overdue: dict[int, bool] = {}
        """Microgrids whose first list did not come within ``api.first_sync_timeout``,
        and whether they were then converged from the stored state."""
        self.recent = status.RecentMessages()
        """The last messages queued for publishing, for the status page."""
        self.store_problem: str | None = None
        """Why the last write of the state store failed, while it fails."""
        self._prepared = DispatchTexts()
        """Texts of the dispatches due by ``_prepared_until``, encoded ahead."""
        self._prepared_until = EARLIEST
        self._unsaved: _Unsaved | None = None
        self._store_retry = asyncio.Event()
        self._release_due = False
        """A large step was written: give its memory back once it is done (see ``_commit``)."""
        self._meta_refresh_at = 0.0
        """When the next commit writes the meta of every microgrid (see ``META_REFRESH``)."""
        self._carried: InboxItem | None = None
        """An item taken from the inbox behind a batch of listings, handled next."""

    def first_sync_due(self, microgrid_id: int) -> None:
        """``api.first_sync_timeout`` has passed: converge the microgrid if still not listed."""
        self.inbox.put_nowait(_FirstSyncDue(microgrid_id))

    async def adopt(
        self, microgrid_id: int, records: list[DispatchRecord], last_seen: datetime | None
    ) -> None:
        """Run a microgrid from its stored state.

        Alone (SQLite), it is held until its first list, as after a restart:
        the stored view may be stale. In a cluster it converges at once from
        the stored state (``resumed``, ``missed_runs``), as a takeover must,
        API or no API (docs/replicas.md); its first list then reconciles.
        Returns once the engine has it, so its API sync may start.
        """
        done = asyncio.get_running_loop().create_future()
        self.inbox.put_nowait(_Adopt(microgrid_id, records, last_seen, done))
        await done

    async def forget(self, microgrid_id: int) -> None:
        """Stop running a microgrid; returns once nothing more is committed for it."""
        done = asyncio.get_running_loop().create_future()
        self.inbox.put_nowait(_Forget(microgrid_id, done))
        await done

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Wait for the next API item or the engine's next deadline, whichever first.

        One timer (the ``asyncio.timeout`` around the inbox) and no polling:
        between deadlines and API events the daemon sleeps. The timer goes off twice per
        deadline: ``PREPARE_LEAD`` before it, to ready what is due (so a
        burst of starts costs less at its instant), and at the deadline.
        """
        while True:
            if self._carried is not None:
                carried, self._carried = self._carried, None
                await self._step(carried)
                continue
            deadline = self.engine.next_deadline()
            timeout = None
            preparing = False
            if deadline is not None:
                left = (deadline - self._clock()).total_seconds()
                if deadline > self._prepared_until:
                    if left > PREPARE_LEAD:
                        left -= PREPARE_LEAD  # wake first to prepare
                        preparing = True
                    else:
                        self._prepare()
                timeout = max(0.0, left)
            item: InboxItem | None = None
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a
            # cancellation that arrives with an item, and a stop would then hang.
            # A get cancelled by the timeout leaves its item in the queue.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    item = await self.inbox.get()
            if item is None and preparing:
                self._prepare()
            else:
                await self._step(item)

    def _prepare(self) -> None:
        """Build the schedules and encode the dispatches due within ``PREPARE_LEAD``."""
        until = self._clock() + timedelta(seconds=PREPARE_LEAD)
        self._prepared_until = until
        for dispatch in self.engine.prepare(until):
            self._prepared.body_text(dispatch)

    async def _step(self, item: InboxItem | None) -> None:
        now = self._clock()
        engine = self.engine
        match item:
            case _FirstSyncDue(microgrid_id):
                messages = await self._first_sync_due(microgrid_id, now)
            case _Adopt(microgrid_id, records, last_seen, done):
                step = engine.adopt(microgrid_id, records, last_seen, now, converge=self._shared)
                self._reset(microgrid_id)
                self.active.add(microgrid_id)
                await self._commit(step)
                messages = step.messages
                if not done.done():
                    done.set_result(None)
            case _Forget(microgrid_id, done):
                engine.forget(microgrid_id)
                self.active.discard(microgrid_id)
                self._reset(microgrid_id)
                messages = []
                if not done.done():
                    done.set_result(None)
            case Listed() | Streamed() if item.microgrid_id not in self.active:
                return  # from a sync stopped with its microgrid
            case None:
                step = engine.advance(now)
                await self._commit_in_parts(step)
                messages = step.messages
                if self._prepared and now >= self._prepared_until:
                    self._prepared = DispatchTexts()  # its window has passed
            case Listed():
                listed = await self._relist(item, now)
                await self._release_memory()  # now that the step's objects are gone
                for x, meta in listed:
                    if self._after_listed(x, now):
                        await self._note_synced(x.microgrid_id, meta)
                return
            case Streamed(_, event, dispatch):
                change = _CHANGES.get(event)
                if change is None:
                    _log.warning("ignored stream event", event=str(event), dispatch_id=dispatch.id)
                    return
                step = engine.apply(change(dispatch), now)
                await self._commit(step)
                messages = step.messages
        _log_messages(messages)
        self.recent.extend(messages)
        await self._release_memory()

    async def _relist(self, first: Listed, now: datetime) -> list[tuple[Listed, dict[str, Any]]]:
        """Apply ``first`` and the listings queued behind it; returns them with their meta."""
        listed = self._more_listed(first)
        with gc_paused():
            steps = [
                self.engine.relist(
                    x.microgrid_id,
                    x.dispatches,
                    now,
                    initial=x.initial,
                    unseen_since=x.unseen_since,
                )
                for x in listed
            ]
            messages = await self._commit_together(steps)
        _log_messages(messages)
        self.recent.extend(messages)
        return [(x, step.meta) for x, step in zip(listed, steps, strict=True)]

    async def _release_memory(self) -> None:
        """After a large step: the store's cache and the heap's free pages go back."""
        if self._release_due:
            self._release_due = False
            await self._store.release_memory()
            memory.trim()

    async def _note_synced(self, microgrid_id: int, meta: dict[str, Any]) -> None:
        """Store that the microgrid finished its first sync in this term (its meta), so
        other replicas answer snapshots of it as synced; a failure waits for the next commit."""
        if not self._shared:
            return  # no other process reads this store
        with contextlib.suppress(StoreWriteError):
            await self._store_commit({}, meta, [], touched={microgrid_id})

    def _more_listed(self, first: Listed) -> list[Listed]:
        """``first`` and the listings queued right behind it (up to ``LISTED_BATCH``).

        A thousand microgrids list at once at start-up: one transaction (one
        fsync) for a batch instead of one per microgrid. The first other item
        met is handled right after the batch, so the inbox order is kept.
        """
        batch = [first]
        inbox = self.inbox
        while len(batch) < LISTED_BATCH and not inbox.empty():
            item = inbox.get_nowait()
            if not isinstance(item, Listed):
                self._carried = item
                break
            if item.microgrid_id in self.active:  # else from a sync stopped with its microgrid
                batch.append(item)
        return batch

    async def _commit_together(self, steps: list[Step]) -> list[Message]:
        """The steps' records and messages, in order, in one transaction (in slices when
        large, see ``_commit``); their messages."""
        if len(steps) == 1:
            await self._commit(steps[0], bulk=_announcement)
            return steps[0].messages
        messages: list[Message] = []
        records: dict[DispatchKey, DispatchRecord | None] = {}
        invalid: list[tuple[DispatchKey, str]] = []
        for step in steps:
            invalid.extend(step.invalid)
            messages.extend(step.messages)
            records.update(step.records)  # a later step's record of a key supersedes
        together = Step(messages=messages, records=records, invalid=invalid, meta=steps[-1].meta)
        await self._commit(together, bulk=_announcement)  # in slices when large
        return messages

    def _after_listed(self, item: Listed, now: datetime) -> bool:
        """The first listing of a microgrid marks it synced; all synced is ready.

        Returns whether this was the microgrid's first.
        """
        if item.microgrid_id in self.synced:
            return False
        self.synced.add(item.microgrid_id)
        self.first_synced_at[item.microgrid_id] = now
        counts = self.engine.counts().get(item.microgrid_id, {})
        _log.info(
            "first sync done",
            microgrid_id=item.microgrid_id,
            dispatches=len(item.dispatches),
            **counts,
        )
        if self.synced.issuperset(self.syncing):
            self._ready.set()
        return True

    def _reset(self, microgrid_id: int) -> None:
        """Forget how the microgrid's last run went (a new owner syncs it afresh)."""
        self.synced.discard(microgrid_id)
        self.first_synced_at.pop(microgrid_id, None)
        self.overdue.pop(microgrid_id, None)

    async def _first_sync_due(self, microgrid_id: int, now: datetime) -> list[Message]:
        """Converge the microgrid from what is known if its first list has not come."""
        if microgrid_id not in self.active or microgrid_id in self.synced:
            return []
        converged = microgrid_id in self.engine.held()
        messages: list[Message] = []
        if converged:
            step = self.engine.resume(now, microgrid_id)
            await self._commit(step)
            messages = step.messages
        if microgrid_id not in self.syncing:
            return messages  # stored, no longer configured: converged, nothing to wait for
        self.overdue[microgrid_id] = converged
        _log.warning(
            "first sync with the dispatch API not done in time"
            + ("; converged from the stored state" if converged else ""),
            microgrid_id=microgrid_id,
            first_sync_timeout=self._settings.api.first_sync_timeout,
        )
        return messages

    # ---------------------------------------------------------- committing

    async def _commit(self, step: Step, bulk: Callable[[OutboxItem], bool] | None = None) -> None:
        """One transaction for the step's records and the messages they caused, then publish.

        ``bulk`` picks the messages that may wait behind others (``Publisher.submit``).
        A large step (a first sync) is written in slices of about ``SLICE``
        dispatches, each its own (fenced) transaction, so only one slice's texts
        and envelopes are in memory at a time. A slice holds whole dispatches, as
        in ``_commit_in_parts``; the meta goes with the last one. A sliced
        step's ``records`` are emptied as they are written.
        """
        _log_invalid(step.invalid)
        if len(step.messages) <= SLICE and len(step.records) <= SLICE:
            await self._write(step.messages, step.records, step.meta, bulk)
            return
        records = step.records  # taken apart as the slices are written: a copy is megabytes
        parts = _parts(step.messages, SLICE, grow=1)
        for index, part in enumerate(parts):
            keys = {_dispatch_key(message) for message in part}
            taken = {key: records.pop(key) for key in keys if key in records}
            last = index == len(parts) - 1 and not records
            await self._write(part, taken, step.meta if last else None, bulk)
        rest = list(records.items())
        records.clear()
        for start in range(0, len(rest), SLICE):
            last = start + SLICE >= len(rest)
            await self._write([], dict(rest[start : start + SLICE]), step.meta if last else None)
        self._release_due = True

    async def _commit_in_parts(self, step: Step) -> None:
        """Commit a burst of due transitions in growing parts, publishing each at once.

        Between parts the publisher runs, so the first messages of a burst
        are on the wire while the rest are encoded and committed. Starts come
        before stops (docs/scheduling.md, rule 17), and a part ends where the stops
        begin, so the last starts are not held back while the stops of their
        part are encoded. A part holds whole dispatches (all their messages of
        this step with their records), so a crash between parts is like a
        crash before the step for the dispatches of the later parts: the
        restart converges them.
        """
        _log_invalid(step.invalid)
        records = dict(step.records)
        stops_from = next(
            (
                index
                for index, message in enumerate(step.messages)
                if isinstance(message, RunningMessage) and message.event is Event.STOPPED
            ),
            None,
        )
        parts = _parts(step.messages, FIRST_PART, cut_before=stops_from)
        for index, part in enumerate(parts):
            if index == len(parts) - 1:
                await self._write(part, records, step.meta)
                return
            keys = {_dispatch_key(message) for message in part}
            await self._write(part, {key: records.pop(key) for key in keys if key in records}, None)
            for _ in range(HANDOFF_YIELDS):
                await asyncio.sleep(0)
        await self._write([], records, step.meta)

    async def _write(
        self,
        messages: list[Message],
        records: Mapping[DispatchKey, DispatchRecord | None],
        meta: dict[str, Any] | None,
        bulk: Callable[[OutboxItem], bool] | None = None,
    ) -> None:
        """Encode and store ``messages`` with ``records`` (and ``meta``), then publish them."""
        texts = DispatchTexts(self._prepared)
        record_texts = {
            key: None if record is None else texts.record_text(record)
            for key, record in records.items()
        }
        if not record_texts and not messages:
            return
        envelopes = [
            wire.encode(message, dispatch_text=texts.body_text(message.dispatch))
            for message in messages
        ]
        if self._unsaved is not None:  # keep the order: after what is waiting
            self._unsaved.add(record_texts, meta, envelopes)
            return
        try:
            items = await self._store_commit(record_texts, meta, envelopes)
        except StoreWriteError as error:
            self._unsaved = _Unsaved(record_texts, meta, envelopes)
            self.store_problem = str(error)
            self._store_retry.set()
            return
        self._publisher.submit(items, bulk)

    async def _store_commit(
        self,
        records: Mapping[DispatchKey, str | None],
        meta: dict[str, Any] | None,
        envelopes: list[wire.Envelope],
        touched: set[int] | None = None,
    ) -> list[OutboxItem]:
        """One fenced transaction for what belongs to the microgrids still run here.

        ``touched``: the microgrids whose meta is written (see ``META_REFRESH``);
        by default those of ``records`` and ``envelopes``.

        A microgrid the store fences (its lease was lost) is dropped at once and
        the rest is committed without it: another process converges it from
        what was committed before.
        """
        while True:
            active = self.active
            records = {key: text for key, text in records.items() if key[0] in active}
            envelopes = [envelope for envelope in envelopes if envelope.microgrid_id in active]
            if not records and not envelopes and (meta is None or not active):
                return []
            terms = self._terms()
            if touched is None:
                touched = {key[0] for key in records}
                touched.update(envelope.microgrid_id for envelope in envelopes)
            try:
                return await self._store.commit(
                    records=records,
                    meta=self._meta(meta, terms, touched),
                    envelopes=envelopes,
                    terms=terms,
                )
            except Fenced as fenced:
                lost = fenced.microgrid_ids & active
                if not lost:
                    raise StoreWriteError(str(fenced)) from fenced
                self.active -= lost
                _log.warning("commit fenced: microgrids dropped", microgrid_ids=sorted(lost))
                self._on_fenced(frozenset(lost))

    def _meta(
        self, meta: dict[str, Any] | None, terms: Mapping[int, int], touched: set[int]
    ) -> dict[int, dict[str, Any]] | None:
        """The engine-wide meta for each microgrid run here, with the term it first synced in.

        Another replica answers the snapshot RPC for a microgrid from what is
        stored: ``synced_term`` tells it whether the owner of the current term
        has finished its first sync.
        """
        if meta is None:
            return None
        written: Iterable[int] = touched & self.active
        now = time.monotonic()
        if now >= self._meta_refresh_at:
            self._meta_refresh_at = now + META_REFRESH
            written = self.active
        return {
            microgrid_id: meta
            if microgrid_id not in self.synced or microgrid_id not in terms
            else {**meta, "synced_term": terms[microgrid_id]}
            for microgrid_id in written
        }

    async def save_unsaved(self) -> None:
        """Write what the store refused, with backoff; one ERROR line a minute meanwhile.

        The publisher keeps sending what was committed before; the refused
        steps' messages follow, late but in order, once a write succeeds.
        """
        rng = random.Random()
        while True:
            await self._store_retry.wait()
            self._store_retry.clear()
            attempt = 0
            logged_at: float | None = None
            while self._unsaved is not None:
                now = time.monotonic()
                if logged_at is None or now - logged_at >= STORE_ERROR_EVERY:
                    logged_at = now
                    _log.error(
                        "cannot write the state store; publishing what it holds, retrying",
                        error=self.store_problem,
                        unsaved_messages=len(self._unsaved.envelopes),
                    )
                await asyncio.sleep(STORE_RETRY.delay(attempt, rng) + STORE_RETRY.initial / 2)
                attempt += 1
                if await self._write_unsaved():
                    _log.info("state store writable again", path=self._store.location)

    async def save_before_stop(self) -> None:
        """At shutdown: a last attempt to write what the store refused."""
        if self._unsaved is not None and not await self._write_unsaved():
            _log.warning(
                "state store still refuses writes: the next start converges what was not saved",
                messages=len(self._unsaved.envelopes),
                error=self.store_problem,
            )

    async def _write_unsaved(self) -> bool:
        """One attempt to write the waiting steps; whether nothing waits any more."""
        unsaved = self._unsaved
        if unsaved is None:
            return True
        try:
            items = await self._store_commit(unsaved.records, unsaved.meta, unsaved.envelopes)
        except StoreWriteError as error:
            self.store_problem = str(error)
            return False
        self._unsaved = None
        self.store_problem = None
        self._publisher.submit(items)
        return True


_CHANGES: dict[StreamEvent, Callable[..., Change]] = {
    StreamEvent.CREATED: Created,
    StreamEvent.UPDATED: Updated,
    StreamEvent.DELETED: Deleted,
}


def _announcement(item: OutboxItem) -> bool:
    """A lifecycle message of a listing: the bulk that may wait behind transitions and
    live changes (docs/architecture.md, "Ready, and what is still being published")."""
    return item.envelope.type == wire.TYPE_LIFECYCLE


def _dispatch_key(message: Message) -> DispatchKey:
    return message.dispatch.microgrid_id, message.dispatch.id


def _parts(
    messages: list[Message], first: int, grow: int = 2, cut_before: int | None = None
) -> list[list[Message]]:
    """Consecutive runs of ``messages``, the first about ``first`` long, each next ``grow``
    times as long; and a cut before index ``cut_before`` too, if one may be made there.

    A cut is made only where no dispatch has messages on both sides of it.
    """
    last_of: dict[DispatchKey, int] = {
        _dispatch_key(message): index for index, message in enumerate(messages)
    }
    parts: list[list[Message]] = []
    start, size, reach = 0, first, 0
    for index, message in enumerate(messages):
        reach = max(reach, last_of[_dispatch_key(message)])
        if reach == index and (index + 1 - start >= size or index + 1 == cut_before):
            parts.append(messages[start : index + 1])
            start, size = index + 1, size * grow
    if start < len(messages):
        parts.append(messages[start:])
    return parts


class DispatchTexts:
    """The JSON text of each dispatch of one step, computed once for record and body.

    Keyed by identity: records and messages of a step share the engine's
    ``Dispatch`` objects, which are kept alive here so no id is reused.
    """

    def __init__(self, ahead: DispatchTexts | None = None) -> None:
        self._texts: dict[int, tuple[Dispatch, str | None]] = {}
        self._ahead = ahead

    def __len__(self) -> int:
        return len(self._texts)

    def body_text(self, dispatch: Dispatch) -> str:
        text = self._get(dispatch)
        return wire.dispatch_json_text(dispatch) if text is None else text

    def record_text(self, record: DispatchRecord) -> str:
        """The record as stored, around the body's dispatch text when that is also the record's."""
        return record_to_text(record, self._record_dispatch_text(record.dispatch))

    def _record_dispatch_text(self, dispatch: Dispatch) -> str | None:
        """The body's text when it is also the record's (ASCII without DEL: both escape alike)."""
        text = self._get(dispatch)
        return text if text is not None and text.isascii() and "\x7f" not in text else None

    def _get(self, dispatch: Dispatch) -> str | None:
        cached = self._texts.get(id(dispatch))
        if cached is None and self._ahead is not None:
            cached = self._ahead._texts.get(id(dispatch))
        if cached is not None:
            return cached[1]
        try:
            text: str | None = wire.dispatch_json_text(dispatch)
        except wire.WireError:
            text = None  # not valid in a body; the record has its own, laxer encoding
        self._texts[id(dispatch)] = (dispatch, text)
        return text


def _log_invalid(invalid: list[tuple[DispatchKey, str]]) -> None:
    for (microgrid_id, dispatch_id), reason in invalid:
        _log.warning(
            "invalid dispatch will never run",
            microgrid_id=microgrid_id,
            dispatch_id=dispatch_id,
            reason=reason,
        )


_BATCH_LOG_THRESHOLD = 20
"""Above this many messages in one step (a large sync), log counts, not each message."""


def _log_messages(messages: list[Message]) -> None:
    for message in messages:
        if isinstance(message, RunningMessage) and message.reason in _SCHEDULED_REASONS:
            lateness = (message.emitted_at - message.scheduled_for).total_seconds()
            metrics.TRANSITION_LATENESS.labels(kind="running").observe(lateness)
    if len(messages) > _BATCH_LOG_THRESHOLD:
        counts: dict[str, int] = {}
        for message in messages:
            name = f"{message.kind}.{message.event}"
            counts[name] = counts.get(name, 0) + 1
        _log.info("messages", total=len(messages), **counts)
        return
    for message in messages:
        _log_message(message)


def _log_message(message: Message) -> None:
    dispatch = message.dispatch
    fields: dict[str, object] = {
        "microgrid_id": dispatch.microgrid_id,
        "dispatch_id": dispatch.id,
        "type": message.routing_type,
        "message": f"{message.kind}.{message.event}",
    }
    if isinstance(message, RunningMessage):
        lateness = (message.emitted_at - message.scheduled_for).total_seconds()
        fields.update(reason=str(message.reason), sequence=message.sequence, lateness=lateness)
    _log.info("queued for publishing", **fields)
