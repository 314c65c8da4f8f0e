"""``dispatchd run``: the one place where the shell's parts meet.

Follow a dispatch from the gRPC stream to the AMQP message:

1. ``apisync.ApiSync`` (one per microgrid) puts ``Listed``/``Streamed`` items
   on the daemon's inbox.
2. ``Daemon._step`` hands each item, or the passage of time when the
   engine's next deadline arrives, to ``core.engine.Engine``, which returns
   the messages due.
3. ``Daemon._commit`` encodes them with ``core.wire`` and writes them to the
   outbox of ``store.Store`` in the same SQLite transaction as the engine's
   changed records.
4. ``publisher.Publisher`` publishes the committed outbox items with confirms
   and removes each from the outbox once the broker confirmed it.

Only this loop touches the engine, so the engine needs no locks; the RPC and
HTTP handlers only read it between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from frequenz.client.common.streaming import Event
from frequenz.client.dispatch import DispatchApiClient

from dispatchd import __version__, metrics, status
from dispatchd.apisync import (
    ApiSync,
    Backoff,
    Listed,
    Streamed,
    SyncItem,
    api_client,
    api_url,
    gc_paused,
)
from dispatchd.config import Settings
from dispatchd.core import wire
from dispatchd.core.engine import Change, Created, Deleted, DispatchRecord, Engine, Key, Updated
from dispatchd.core.messages import Message, Reason, RunningMessage
from dispatchd.core.model import Dispatch
from dispatchd.http import HttpServer, QueryParams
from dispatchd.localapi.server import LocalApiServer
from dispatchd.logs import configure_from_settings
from dispatchd.publisher import CLOSE_GRACE, ExchangeTypeMismatch, Publisher
from dispatchd.rpc import SnapshotRpc
from dispatchd.store import Store, StoreError, StoreWriteError

_log = structlog.get_logger(__name__)

STATE_FILE = "dispatchd.sqlite3"
FIRST_PART = 100
"""Messages in the first part of a burst committed in parts (see ``_commit_in_parts``)."""
HANDOFF_YIELDS = 3
"""Loop turns given to the publisher after each part: its sender starts the
publishes, they queue their frames, aiormq's writer puts them on the socket."""
PREPARE_LEAD = 0.5
"""Seconds before a deadline at which its dispatches are readied (see ``Engine.prepare``)."""
_SCHEDULED_REASONS = frozenset({Reason.STARTED, Reason.ENDED})
"""Running messages caused by a boundary of the schedule (their lateness is measured)."""
STORE_RETRY = Backoff(initial=0.5, maximum=5.0)
"""Backoff between attempts to write a step the state store refused (disk full...)."""
STORE_ERROR_EVERY = 60.0
"""Seconds between the ERROR lines repeated while the state store refuses writes."""


@dataclass(frozen=True, slots=True)
class _FirstSyncDue:
    """``api.first_sync_timeout`` has passed since start-up."""


InboxItem = SyncItem | _FirstSyncDue


@dataclass(slots=True)
class _Unsaved:
    """Steps the store refused, merged in order, waiting to be written."""

    records: dict[Key, str | None]
    meta: dict[str, Any] | None
    envelopes: list[wire.Envelope]

    def add(
        self,
        records: dict[Key, str | None],
        meta: dict[str, Any] | None,
        envelopes: list[wire.Envelope],
    ) -> None:
        self.records.update(records)
        if meta is not None:
            self.meta = meta
        self.envelopes.extend(envelopes)


def main(settings: Settings) -> int:
    """Entry point of ``dispatchd run``: run until SIGTERM/SIGINT."""
    configure_from_settings(settings)
    return asyncio.run(_run_until_signal(settings))


async def _run_until_signal(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(settings)
    try:
        await daemon.run(stop)
    except ExchangeTypeMismatch as error:
        _log.error("cannot start", error=str(error))
        return 1
    except StoreError as error:
        _log.error("cannot start", error=str(error))
        return error.exit_code
    return 0


class Daemon:
    """Owns the engine and runs the sync -> engine -> store -> publisher loop."""

    def __init__(
        self, settings: Settings, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._inbox: asyncio.Queue[InboxItem] = asyncio.Queue()
        self._engine = Engine()
        self._synced: set[int] = set()
        self._first_synced_at: dict[int, datetime] = {}
        self._recent = status.RecentMessages()
        """The last messages queued for publishing, for the status page."""
        self._started_at = clock()
        self._prepared = _DispatchTexts()
        """Texts of the dispatches due by ``_prepared_until``, encoded ahead."""
        self._prepared_until = datetime.min.replace(tzinfo=UTC)
        self._syncs: list[ApiSync] = []
        self._overdue: dict[int, bool] = {}
        """Microgrids whose first list did not come within ``api.first_sync_timeout``,
        and whether they were then converged from the stored state."""
        self._unsaved: _Unsaved | None = None
        self._store_problem: str | None = None
        self._store_retry = asyncio.Event()
        self.ready = asyncio.Event()
        """Set when every microgrid has finished its first sync (for tests and /readyz)."""
        self.api_url: str | None = None
        self.local_api_port: int | None = None
        self.http_port: int | None = None
        self.store: Store | None = None
        self.publisher: Publisher | None = None

    # ------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, serve until ``stop`` is set, then stop gracefully."""
        settings = self._settings
        store = self.store = Store(settings.state.dir / STATE_FILE)
        try:
            self._engine = _restore(store)
        except BaseException:
            store.close()
            raise
        local_api = await self._start_local_api()
        rpc = SnapshotRpc(
            amqp_url=settings.amqp.url.get_secret_value(),
            exchange=settings.amqp.exchange,
            microgrid_ids=settings.microgrid_ids,
            snapshot=self._engine.snapshot,
            synced=lambda microgrid_id: microgrid_id in self._synced,
        )
        publisher = self.publisher = Publisher(
            amqp_url=settings.amqp.url.get_secret_value(),
            exchange=settings.amqp.exchange,
            store=store,
        )
        http = HttpServer(
            settings.http.listen,
            self._missing_for_ready,
            self._refresh_metrics,
            status=self._status,
            schedule=self._schedule,
        )
        tasks: list[asyncio.Task[None]] = []
        client: DispatchApiClient | None = None
        try:
            await publisher.start()
            # Its own connections: a reply can never cut the publisher's.
            await rpc.start(wait=publisher.connected)
            self.http_port = await http.start()
            metrics.BUILD_INFO.labels(version=__version__).set(1)
            # Restart order: load (above), republish the outbox (publisher.start),
            # re-list, then converge: the stored view is not announced before its
            # microgrid's first list, which may show it changed while we were down.
            self._engine.hold(self._clock())
            client = api_client(self._settings, self.local_api_port)
            for microgrid_id in settings.microgrid_ids:
                sync = ApiSync(client, microgrid_id, self._inbox.put)
                self._syncs.append(sync)
                tasks.append(asyncio.create_task(sync.run(), name=f"sync-{microgrid_id}"))
            tasks.append(asyncio.create_task(self._loop(), name="engine"))
            tasks.append(asyncio.create_task(self._save_unsaved(), name="store-retry"))
            first_sync_due = asyncio.get_running_loop().call_later(
                settings.api.first_sync_timeout, self._inbox.put_nowait, _FirstSyncDue()
            )
            tasks.append(asyncio.create_task(_cancel_on_exit(first_sync_due), name="first-sync"))
            fatal = asyncio.create_task(publisher.wait_fatal())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                {fatal, stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED
            )
            fatal.cancel()
            stopping.cancel()
            for task in done & set(tasks):
                task.result()  # an unexpected crash of a loop surfaces here
            if fatal in done:
                raise fatal.result()
        finally:
            await self._shutdown(tasks, client, rpc, publisher, http, local_api, store)

    async def _shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        client: DispatchApiClient | None,
        rpc: SnapshotRpc,
        publisher: Publisher,
        http: HttpServer,
        local_api: LocalApiServer | None,
        store: Store,
    ) -> None:
        """Stop intake first, then drain the publisher, then close the rest."""
        started = time.monotonic()
        budget = self._settings.shutdown_timeout

        def left() -> float:
            return max(0.0, budget - (time.monotonic() - started))

        _log.info("stopping", shutdown_timeout=budget)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=max(left(), _TASK_STOP_GRACE))
            if stuck:
                names = sorted(task.get_name() for task in stuck)
                _log.warning("tasks did not stop when cancelled", tasks=names)
        # A broker that stopped answering never sends Close-Ok: bound every close;
        # the outbox is durable, so giving up on one only risks a duplicate later.
        await _within(
            rpc.close(), min(left(), _RPC_CLOSE_GRACE), "closing the snapshot rpc channel"
        )
        if client is not None:
            await client.disconnect()
        # The publisher waits at most CLOSE_GRACE for its own Close-Ok: drain for the rest.
        drain = max(0.0, left() - CLOSE_GRACE)
        await _within(
            publisher.close(drain), drain + 2 * CLOSE_GRACE, "closing the broker connection"
        )
        await http.close()
        if local_api is not None:
            await local_api.stop(max(0.0, budget - (time.monotonic() - started)))
        if self._unsaved is not None and not self._write_unsaved():
            _log.warning(
                "state store still refuses writes: the next start converges what was not saved",
                messages=len(self._unsaved.envelopes),
                error=self._store_problem,
            )
        store.close()
        _log.info(
            "stopped",
            outbox_left=publisher.unconfirmed,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _start_local_api(self) -> LocalApiServer | None:
        """With ``api.url`` unset, serve the local API in-process and sync from it."""
        settings = self._settings
        if not settings.embedded_api:
            self.api_url = api_url(settings)
            return None
        server = LocalApiServer.from_config(settings.api.local)
        self.local_api_port = await server.start()
        self.api_url = api_url(settings, self.local_api_port)
        _log.info(
            "api.url is unset: started the embedded local dispatch API",
            url=self.api_url,
            database=str(settings.api.local.database),
        )
        return server

    # ------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        """Wait for the next API item or the engine's next deadline, whichever first.

        One timer (the ``asyncio.timeout`` around the inbox) and no polling:
        between deadlines and API events the daemon sleeps. The timer goes off twice per
        deadline: ``PREPARE_LEAD`` before it, to ready what is due (so a
        burst of starts costs less at its instant), and at the deadline.
        """
        while True:
            deadline = self._engine.next_deadline()
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
                    item = await self._inbox.get()
            if item is None and preparing:
                self._prepare()
            else:
                await self._step(item)

    def _prepare(self) -> None:
        """Build the schedules and encode the dispatches due within ``PREPARE_LEAD``."""
        until = self._clock() + timedelta(seconds=PREPARE_LEAD)
        self._prepared_until = until
        for dispatch in self._engine.prepare(until):
            self._prepared.body_text(dispatch)

    async def _step(self, item: InboxItem | None) -> None:
        now = self._clock()
        engine = self._engine
        match item:
            case _FirstSyncDue():
                messages = self._first_sync_due(now)
            case None:
                messages = engine.advance(now)
                await self._commit_in_parts(messages)
                if self._prepared and now >= self._prepared_until:
                    self._prepared = _DispatchTexts()  # its window has passed
            case Listed(microgrid_id, dispatches, initial, unseen_since):
                with gc_paused():
                    messages = engine.relist(
                        microgrid_id, dispatches, now, initial=initial, unseen_since=unseen_since
                    )
                    self._commit(messages)
                self._after_listed(item, now)
            case Streamed(_, event, dispatch):
                change = _CHANGES.get(event)
                if change is None:
                    _log.warning("ignored stream event", event=str(event), dispatch_id=dispatch.id)
                    return
                messages = engine.apply(change(dispatch), now)
                self._commit(messages)
        _log_messages(messages)
        self._recent.extend(messages)

    def _after_listed(self, item: Listed, now: datetime) -> None:
        """The first listing of a microgrid marks it synced; all synced is ready."""
        engine = self._engine
        if item.microgrid_id not in self._synced:
            self._synced.add(item.microgrid_id)
            self._first_synced_at[item.microgrid_id] = now
            counts = engine.counts(now).get(item.microgrid_id, {})
            _log.info(
                "first sync done",
                microgrid_id=item.microgrid_id,
                dispatches=len(item.dispatches),
                **counts,
            )
            if self._synced.issuperset(self._settings.microgrid_ids):
                self.ready.set()

    def _first_sync_due(self, now: datetime) -> list[Message]:
        """Converge, from what is known, each microgrid whose first list has not come."""
        messages: list[Message] = []
        held = self._engine.held()
        timeout = self._settings.api.first_sync_timeout
        for microgrid_id in sorted(held - set(self._settings.microgrid_ids)):
            part = self._engine.resume(now, microgrid_id)  # stored, no longer configured
            self._commit(part)
            messages.extend(part)
        for microgrid_id in self._settings.microgrid_ids:
            if microgrid_id in self._synced:
                continue
            converged = self._overdue[microgrid_id] = microgrid_id in held
            if converged:
                part = self._engine.resume(now, microgrid_id)
                self._commit(part)
                messages.extend(part)
            _log.warning(
                "first sync with the dispatch API not done in time"
                + ("; converged from the stored state" if converged else ""),
                microgrid_id=microgrid_id,
                first_sync_timeout=timeout,
            )
        return messages

    def _commit(
        self, messages: list[Message], keys: Iterable[Key] | None = None, *, meta: bool = True
    ) -> None:
        """One transaction for changed records and the messages they caused, then publish.

        ``keys``: the records to write (default: every one the engine changed);
        ``meta``: whether the engine-wide state goes with them.
        """
        engine = self._engine
        for (microgrid_id, dispatch_id), reason in engine.take_new_invalid():
            _log.warning(
                "invalid dispatch will never run",
                microgrid_id=microgrid_id,
                dispatch_id=dispatch_id,
                reason=reason,
            )
        texts = _DispatchTexts(self._prepared)
        records: dict[Key, str | None] = {}
        for key in engine.take_dirty() if keys is None else keys:
            record = engine.export_record(key)
            records[key] = None if record is None else _record_to_text(record, texts)
        if not records and not messages:
            return
        envelopes = [
            wire.encode(message, dispatch_text=texts.body_text(message.dispatch))
            for message in messages
        ]
        assert self.store is not None and self.publisher is not None
        meta_now = engine.export_meta() if meta else None
        if self._unsaved is not None:  # keep the order: after what is waiting
            self._unsaved.add(records, meta_now, envelopes)
            return
        try:
            items = self.store.commit(records=records, meta=meta_now, envelopes=envelopes)
        except StoreWriteError as error:
            self._unsaved = _Unsaved(records, meta_now, envelopes)
            self._store_problem = str(error)
            self._store_retry.set()
            return
        self.publisher.submit(items)

    async def _save_unsaved(self) -> None:
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
                        error=self._store_problem,
                        unsaved_messages=len(self._unsaved.envelopes),
                    )
                await asyncio.sleep(STORE_RETRY.delay(attempt, rng) + STORE_RETRY.initial / 2)
                attempt += 1
                if self._write_unsaved():
                    assert self.store is not None
                    _log.info("state store writable again", path=str(self.store.path))

    def _write_unsaved(self) -> bool:
        """One attempt to write the waiting steps; whether nothing waits any more."""
        unsaved = self._unsaved
        if unsaved is None:
            return True
        assert self.store is not None and self.publisher is not None
        try:
            items = self.store.commit(
                records=unsaved.records, meta=unsaved.meta, envelopes=unsaved.envelopes
            )
        except StoreWriteError as error:
            self._store_problem = str(error)
            return False
        self._unsaved = None
        self._store_problem = None
        self.publisher.submit(items)
        return True

    async def _commit_in_parts(self, messages: list[Message]) -> None:
        """Commit a burst of due transitions in growing parts, publishing each at once.

        Between parts the publisher runs, so the first messages of a burst
        are on the wire while the rest are encoded and committed. A part holds
        whole dispatches (all their messages of this step with their records),
        so a crash between parts is like a crash before the step for the
        dispatches of the later parts: the restart converges them.
        """
        dirty = self._engine.take_dirty()
        parts = _parts(messages, FIRST_PART)
        for index, part in enumerate(parts):
            if index == len(parts) - 1:
                self._commit(part, dirty)
                return
            keys = {_key(message) for message in part} & dirty
            dirty -= keys
            self._commit(part, keys, meta=False)
            for _ in range(HANDOFF_YIELDS):
                await asyncio.sleep(0)
        self._commit([], dirty)

    # ----------------------------------------------------- health and metrics

    def _missing_for_ready(self) -> list[str]:
        timeout = self._settings.api.first_sync_timeout
        missing = [
            f"microgrid {microgrid_id}: first sync with the dispatch API not finished"
            + (f" after {timeout:g} s" if microgrid_id in self._overdue else "")
            + ("; converged from the stored state" if self._overdue.get(microgrid_id) else "")
            for microgrid_id in self._settings.microgrid_ids
            if microgrid_id not in self._synced
        ]
        missing.extend(
            f"microgrid {sync.microgrid_id}: {sync.problem}"
            for sync in self._syncs
            if sync.problem is not None
        )
        if self._store_problem is not None:
            missing.append(self._store_problem)
        publisher = self.publisher
        if publisher is None or not publisher.connected:
            error = publisher.last_error if publisher is not None else None
            missing.append(f"broker: not connected ({error or 'connecting'})")
        return missing

    def _status(self) -> dict[str, Any]:
        """``/api/v1/status``: what the status page shows about the daemon's health."""
        now = self._clock()
        missing = self._missing_for_ready()
        publisher = self.publisher
        counts = self._engine.counts(now)
        microgrids = [
            status.microgrid_health(
                microgrid_id, self._first_synced_at.get(microgrid_id), counts.get(microgrid_id, {})
            )
            for microgrid_id in self._settings.microgrid_ids
        ]
        return {
            "version": __version__,
            "now": wire.format_time(now),
            "started_at": wire.format_time(self._started_at),
            "ready": not missing,
            "missing": missing,
            "api_url": self.api_url,
            "broker": {
                "connected": publisher is not None and publisher.connected,
                "error": publisher.last_error if publisher is not None else None,
                "exchange": self._settings.amqp.exchange,
            },
            "outbox": {"depth": publisher.unconfirmed if publisher is not None else 0},
            "microgrids": microgrids,
            "recent_messages": self._recent.newest_first(),
        }

    def _schedule(self, params: QueryParams) -> dict[str, Any]:
        """``/api/v1/schedule``: a microgrid's occurrences in a window (bounded)."""
        now = self._clock()
        query = status.parse_schedule_query(params, now, self._settings.microgrid_ids)
        if query.type is None:  # the counts hold the same dispatches as the snapshot
            counts = self._engine.counts(now).get(query.microgrid_id, {})
            status.check_rows(sum(counts.values()), query)
        entries = self._engine.snapshot(query.microgrid_id, query.type)
        return status.schedule_document(entries, query, now)

    def _refresh_metrics(self) -> None:
        """Counted at scrape time, so an idle daemon spends no CPU on them."""
        for microgrid_id, counts in self._engine.counts(self._clock()).items():
            for state, count in counts.items():
                metrics.DISPATCHES.labels(microgrid_id=str(microgrid_id), state=state).set(count)


_TASK_STOP_GRACE = 0.5
"""Seconds cancelled tasks get to finish even when the shutdown budget is spent."""
_RPC_CLOSE_GRACE = 0.5
"""Seconds to wait for the broker to acknowledge closing the snapshot RPC channel."""


async def _cancel_on_exit(timer: asyncio.TimerHandle) -> None:
    """Hold ``timer`` until this task is cancelled, then cancel it too."""
    try:
        await asyncio.Future()
    finally:
        timer.cancel()


async def _within(closing: Coroutine[Any, Any, None], seconds: float, what: str) -> None:
    """Await a close step for at most ``seconds``; a late one is abandoned and logged."""
    try:
        async with asyncio.timeout(seconds):
            await closing
    except TimeoutError:
        _log.warning("gave up waiting during shutdown", step=what, seconds=round(seconds, 3))


_CHANGES: dict[Event, Callable[..., Change]] = {
    Event.CREATED: Created,
    Event.UPDATED: Updated,
    Event.DELETED: Deleted,
}


def _restore(store: Store) -> Engine:
    loaded = store.load()
    records = [
        DispatchRecord.from_json(json.loads(text), functools.partial(_dispatch_from, microgrid_id))
        for (microgrid_id, _), text in loaded.records.items()
    ]
    if records or loaded.outbox:
        _log.info(
            "restored state",
            dispatches=len(records),
            outbox=len(loaded.outbox),
            last_seen=loaded.meta.get("last_seen"),
        )
    return Engine.restore(records, loaded.meta)


def _key(message: Message) -> Key:
    return message.dispatch.microgrid_id, message.dispatch.id


def _parts(messages: list[Message], first: int) -> list[list[Message]]:
    """Consecutive runs of ``messages``, the first about ``first`` long, each next twice as long.

    A cut is made only where no dispatch has messages on both sides of it.
    """
    last_of: dict[Key, int] = {_key(message): index for index, message in enumerate(messages)}
    parts: list[list[Message]] = []
    start, size, reach = 0, first, 0
    for index, message in enumerate(messages):
        reach = max(reach, last_of[_key(message)])
        if reach == index and index + 1 - start >= size:
            parts.append(messages[start : index + 1])
            start, size = index + 1, size * 2
    if start < len(messages):
        parts.append(messages[start:])
    return parts


def _dispatch_from(microgrid_id: int, obj: object) -> Dispatch:
    return wire.dispatch_from_json(obj, microgrid_id)


class _DispatchTexts:
    """The JSON text of each dispatch of one step, computed once for record and body.

    Keyed by identity: records and messages of a step share the engine's
    ``Dispatch`` objects, which are kept alive here so no id is reused.
    """

    def __init__(self, ahead: _DispatchTexts | None = None) -> None:
        self._texts: dict[int, tuple[Dispatch, str | None]] = {}
        self._ahead = ahead

    def __len__(self) -> int:
        return len(self._texts)

    def body_text(self, dispatch: Dispatch) -> str:
        text = self._get(dispatch)
        return wire.dispatch_json_text(dispatch) if text is None else text

    def record_text(self, dispatch: Dispatch) -> str | None:
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


def _record_to_text(record: DispatchRecord, texts: _DispatchTexts | None = None) -> str:
    """The record as compact JSON; the dispatch part reused from ``texts`` when possible."""
    dispatch_text = None if texts is None else texts.record_text(record.dispatch)
    if dispatch_text is None:
        return json.dumps(record.to_json(wire.dispatch_to_json), separators=(",", ":"))
    return record.to_json_text(dispatch_text)


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
