"""``dispatchd run``: wires the shell's parts together, starts and stops them.

Follow a dispatch from the gRPC stream to the AMQP message:

1. ``apisync.ApiSync`` (one per microgrid) puts ``Listed``/``Streamed`` items
   on the inbox of ``loop.Loop``.
2. ``loop.Loop`` hands each item, or the passage of time when the engine's
   next deadline arrives, to ``core.engine.Engine``, which returns one
   ``Step``: the messages due and the records that changed.
3. The loop encodes them (``core.wire``, ``core.records``) and writes them to
   ``store.Store`` in one SQLite transaction: outbox and records together.
4. ``publisher.Publisher`` publishes the committed outbox items with confirms
   and removes each from the outbox once the broker confirmed it.

This module restores the engine, starts the loop beside the API syncs, the
publisher, the snapshot RPC and the HTTP server, answers the health and
status questions, and stops everything in order.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog
from frequenz.client.dispatch import DispatchApiClient

from dispatchd import __version__, metrics, status
from dispatchd.apisync import OPENING_AT_ONCE, ApiSync, api_client, api_url
from dispatchd.config import Settings
from dispatchd.core import wire
from dispatchd.http import HttpServer, QueryParams
from dispatchd.localapi.server import LocalApiServer
from dispatchd.logs import configure_from_settings
from dispatchd.loop import Loop, restore_engine
from dispatchd.publisher import CLOSE_GRACE, ExchangeTypeMismatch, Publisher
from dispatchd.rpc import SnapshotRpc
from dispatchd.store import Store, StoreError

_log = structlog.get_logger(__name__)

STATE_FILE = "dispatchd.sqlite3"


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
    """Starts the API syncs, the loop, the publisher, RPC and HTTP; stops them in order."""

    def __init__(
        self, settings: Settings, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._started_at = clock()
        self._syncs: list[ApiSync] = []
        self.ready = asyncio.Event()
        """Set when every microgrid has finished its first sync (for tests and /readyz)."""
        self.api_url: str | None = None
        self.local_api_port: int | None = None
        self.http_port: int | None = None
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        self.loop: Loop | None = None
        """The loop that owns the engine, from start-up on."""

    # ------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, serve until ``stop`` is set, then stop gracefully."""
        settings = self._settings
        store = self.store = Store(settings.state.dir / STATE_FILE)
        try:
            engine = restore_engine(store)
        except BaseException:
            store.close()
            raise
        local_api = await self._start_local_api()
        publisher = self.publisher = Publisher(
            amqp_url=settings.amqp.url.get_secret_value(),
            exchange=settings.amqp.exchange,
            store=store,
        )
        loop = self.loop = Loop(
            settings, engine, store, publisher, clock=self._clock, ready=self.ready
        )
        rpc = SnapshotRpc(
            amqp_url=settings.amqp.url.get_secret_value(),
            exchange=settings.amqp.exchange,
            microgrid_ids=settings.microgrid_ids,
            snapshot=engine.snapshot,
            synced=lambda microgrid_id: microgrid_id in loop.synced,
        )
        http = HttpServer(
            settings.http.listen,
            self._missing_for_ready,
            self._refresh_metrics,
            status=self._status,
            schedule=self._schedule,
            unpublished=lambda: publisher.unconfirmed,
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
            engine.hold(self._clock())
            client = api_client(self._settings, self.local_api_port)
            opening = asyncio.Semaphore(OPENING_AT_ONCE)
            for microgrid_id in settings.microgrid_ids:
                sync = ApiSync(client, microgrid_id, loop.inbox.put, opening=opening)
                self._syncs.append(sync)
                tasks.append(asyncio.create_task(sync.run(), name=f"sync-{microgrid_id}"))
            tasks.append(asyncio.create_task(loop.run(), name="engine"))
            tasks.append(asyncio.create_task(loop.save_unsaved(), name="store-retry"))
            first_sync_due = asyncio.get_running_loop().call_later(
                settings.api.first_sync_timeout, loop.first_sync_due
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
            await self._shutdown(tasks, client, rpc, publisher, http, local_api, loop, store)

    async def _shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        client: DispatchApiClient | None,
        rpc: SnapshotRpc,
        publisher: Publisher,
        http: HttpServer,
        local_api: LocalApiServer | None,
        loop: Loop,
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
        loop.save_before_stop()
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

    # ----------------------------------------------------- health and metrics

    def _running(self) -> Loop:
        """The loop; the HTTP handlers that ask for it are served only once it exists."""
        assert self.loop is not None
        return self.loop

    def _missing_for_ready(self) -> list[str]:
        loop = self._running()
        timeout = self._settings.api.first_sync_timeout
        missing = [
            f"microgrid {microgrid_id}: first sync with the dispatch API not finished"
            + (f" after {timeout:g} s" if microgrid_id in loop.overdue else "")
            + ("; converged from the stored state" if loop.overdue.get(microgrid_id) else "")
            for microgrid_id in self._settings.microgrid_ids
            if microgrid_id not in loop.synced
        ]
        missing.extend(
            f"microgrid {sync.microgrid_id}: {sync.problem}"
            for sync in self._syncs
            if sync.problem is not None
        )
        if loop.store_problem is not None:
            missing.append(loop.store_problem)
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
        loop = self._running()
        counts = loop.engine.counts()
        microgrids = [
            status.microgrid_health(
                microgrid_id, loop.first_synced_at.get(microgrid_id), counts.get(microgrid_id, {})
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
            "recent_messages": loop.recent.newest_first(),
        }

    def _schedule(self, params: QueryParams) -> dict[str, Any]:
        """``/api/v1/schedule``: a microgrid's occurrences in a window (bounded)."""
        now = self._clock()
        query = status.parse_schedule_query(params, now, self._settings.microgrid_ids)
        engine = self._running().engine
        if query.type is None:  # the counts hold the same dispatches as the snapshot
            counts = engine.counts().get(query.microgrid_id, {})
            status.check_rows(sum(counts.values()), query)
        entries = engine.snapshot(query.microgrid_id, query.type)
        return status.schedule_document(entries, query, now)

    def _refresh_metrics(self) -> None:
        """Counted at scrape time, so an idle daemon spends no CPU on them."""
        for microgrid_id, counts in self._running().engine.counts().items():
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
