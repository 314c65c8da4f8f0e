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
from typing import TYPE_CHECKING, Any

import structlog

from dispatchd import __version__, metrics, status
from dispatchd.apichannel import ClientPool
from dispatchd.apisync import ApiSync, api_clients, api_url
from dispatchd.core import wire
from dispatchd.core.engine import Engine, SnapshotEntry, stored_snapshot
from dispatchd.core.records import record_from_text
from dispatchd.http import HttpServer, QueryParams
from dispatchd.localapi.server import LocalApiServer
from dispatchd.logs import configure_from_settings
from dispatchd.loop import Loop
from dispatchd.microgrids import Microgrids
from dispatchd.ownership import Ownership, SoloOwnership
from dispatchd.publisher import CLOSE_GRACE, ExchangeTypeMismatch, Publisher
from dispatchd.rpc import ExchangeTaken, SnapshotRpc
from dispatchd.settings import Settings, default_replica_id
from dispatchd.store import Store, StoreError, open_store
from dispatchd.store.sqlite import STATE_FILE

if TYPE_CHECKING:  # asyncpg is imported only by a replica on PostgreSQL
    from dispatchd.leases import LeaseKeeper
    from dispatchd.store.postgres import PostgresStore

_log = structlog.get_logger(__name__)

__all__ = ["STATE_FILE", "Daemon", "main"]


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
    except (ExchangeTypeMismatch, ExchangeTaken) as error:
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
        self.microgrids: Microgrids | None = None
        """Starts and stops each microgrid as ownership changes."""
        self.ownership: Ownership | None = None
        self.replica_id: str | None = None
        """This replica's name in the lease tables (cluster mode only)."""
        self._lease_table: PostgresStore | None = None
        self._keeper: LeaseKeeper | None = None
        self._exported: set[tuple[str, str]] = set()
        """The (microgrid, state) series of dispatchd_dispatches exported at the last scrape."""
        self.ready = asyncio.Event()
        """Set when every microgrid has finished its first sync (for tests and /readyz)."""
        self.api_url: str | None = None
        self.local_api_port: int | None = None
        self.http_port: int | None = None
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        self.loop: Loop | None = None
        """The loop that owns the engine, from start-up on."""

    @property
    def _syncs(self) -> list[ApiSync]:
        """The API syncs running now, one per microgrid this process runs."""
        return self.microgrids.syncs if self.microgrids is not None else []

    # ------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, serve until ``stop`` is set, then stop gracefully."""
        settings = self._settings
        store = self.store = await open_store(settings)
        keeper: LeaseKeeper | None = None
        try:
            if self.clustered:
                keeper = await self._lease_keeper()
                ownership: Ownership = keeper
                unconfigured: set[int] = set()
            else:
                # Stored and no longer configured: converged from the stored state and
                # published (e.g. their stops), never synced.
                unconfigured = await store.microgrids() - set(settings.microgrid_ids)
                ownership = SoloOwnership([*settings.microgrid_ids, *sorted(unconfigured)])
                # Alone, it owns every configured microgrid, as a cluster's replicas do together.
                metrics.MICROGRIDS_OWNED.set(len(settings.microgrid_ids))
            metrics.MICROGRIDS_CONFIGURED.set(len(settings.microgrid_ids))
        except BaseException:
            await store.close()
            raise
        self.ownership = ownership
        engine = Engine()
        local_api = await self._start_local_api()
        rpc = SnapshotRpc(
            amqp_url=settings.amqp.url.get_secret_value(),
            exchange=settings.amqp.exchange,
            microgrid_ids=settings.microgrid_ids,
            snapshot=engine.snapshot,
            synced=lambda microgrid_id: microgrid_id in loop.synced,
            # Replicas share the queue; one process on SQLite holds it alone.
            exclusive=not self.clustered,
            owned=(lambda microgrid_id: microgrid_id in loop.active) if self.clustered else None,
            standby=self._stored_snapshot if self.clustered else None,
        )
        publisher = self.publisher = Publisher(
            amqp_url=settings.amqp.url.get_secret_value(),
            exchange=settings.amqp.exchange,
            store=store,
            may_send=rpc.consuming,
        )
        loop = self.loop = Loop(
            settings,
            engine,
            store,
            publisher,
            clock=self._clock,
            ready=self.ready,
            terms=ownership.terms,
            on_fenced=self._fenced,
            shared=self.clustered,
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
        clients: ClientPool | None = None
        microgrids: Microgrids | None = None
        try:
            # Each microgrid's outbox is republished when it is started (microgrids.py).
            await publisher.start(submit_outbox=False)
            # Its own connections: a reply can never cut the publisher's. Holding its
            # consumer is what lets the publisher send (one writer per exchange): a
            # second dispatchd on the exchange stops here, before any sync or publish.
            await rpc.start(wait=publisher.connected)
            self.http_port = await http.start()
            metrics.BUILD_INFO.labels(version=__version__).set(1)
            clients = api_clients(self._settings, self.local_api_port)
            # Restart order per microgrid: load, republish its outbox, re-list, then
            # converge: the stored view is not announced before the microgrid's first
            # list, which may show it changed while it ran nowhere.
            microgrids = self.microgrids = Microgrids(
                settings, ownership, store, loop, publisher, clients, without_sync=unconfigured
            )
            tasks.append(asyncio.create_task(loop.run(), name="engine"))
            tasks.append(asyncio.create_task(loop.save_unsaved(), name="store-retry"))
            tasks.append(asyncio.create_task(microgrids.run(), name="microgrids"))
            if keeper is not None:
                keeper.start()
            fatal = asyncio.create_task(publisher.wait_fatal())
            taken = asyncio.create_task(rpc.wait_fatal())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                {fatal, taken, stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED
            )
            fatal.cancel()
            taken.cancel()
            stopping.cancel()
            for task in done & set(tasks):
                task.result()  # an unexpected crash of a loop surfaces here
            if fatal in done:
                raise fatal.result()
            if taken in done:
                raise taken.result()
        finally:
            await self._shutdown(
                tasks, microgrids, clients, rpc, publisher, http, local_api, loop, store, keeper
            )

    async def _shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        microgrids: Microgrids | None,
        clients: ClientPool | None,
        rpc: SnapshotRpc,
        publisher: Publisher,
        http: HttpServer,
        local_api: LocalApiServer | None,
        loop: Loop,
        store: Store,
        keeper: LeaseKeeper | None,
    ) -> None:
        """Stop intake first, then drain the publisher, then close the rest.

        A replica hands every microgrid over first (stop its sync, drain its
        outbox, release it) so the others take them at once.
        """
        started = time.monotonic()
        budget = self._settings.shutdown_timeout

        def left() -> float:
            return max(0.0, budget - (time.monotonic() - started))

        _log.info("stopping", shutdown_timeout=budget)
        if keeper is not None and microgrids is not None:
            keeper.stop_acquiring()
            await microgrids.hand_over_all(left())
        if microgrids is not None:
            tasks = [*microgrids.stop_syncs(), *tasks]
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
        if clients is not None:
            await clients.disconnect()
        # The publisher waits at most CLOSE_GRACE for its own Close-Ok: drain for the rest.
        drain = max(0.0, left() - CLOSE_GRACE)
        await _within(
            publisher.close(drain), drain + 2 * CLOSE_GRACE, "closing the broker connection"
        )
        await http.close()
        if local_api is not None:
            await local_api.stop(max(0.0, budget - (time.monotonic() - started)))
        await loop.save_before_stop()
        if keeper is not None:
            await keeper.close()
            await self._lease_table_close()
        await store.close()
        _log.info(
            "stopped",
            outbox_left=publisher.unconfirmed,
            seconds=round(time.monotonic() - started, 3),
        )

    @property
    def clustered(self) -> bool:
        """A replica sharing the microgrids through PostgreSQL (``state.url`` set)."""
        return self._settings.state.url is not None

    async def _lease_keeper(self) -> LeaseKeeper:
        """Leases on a pool of their own: a renewal never waits behind a big commit."""
        from dispatchd.leases import LeaseKeeper
        from dispatchd.store.postgres import PostgresStore

        settings = self._settings
        assert settings.state.url is not None
        lease_seconds = settings.cluster.lease_seconds
        table = self._lease_table = await PostgresStore.open(
            settings.state.url.get_secret_value(),
            timeout=lease_seconds / 3,
            max_connections=2,
            version=__version__,
            migrate=False,
        )
        self.replica_id = settings.cluster.replica_id or default_replica_id()
        _log.info(
            "cluster replica",
            replica_id=self.replica_id,
            lease_seconds=lease_seconds,
            state=table.location,
        )
        keeper = self._keeper = LeaseKeeper(
            table,
            replica_id=self.replica_id,
            microgrid_ids=settings.microgrid_ids,
            lease_seconds=lease_seconds,
        )
        return keeper

    async def _lease_table_close(self) -> None:
        if self._lease_table is not None:
            await self._lease_table.close()

    async def _stored_snapshot(
        self, microgrid_id: int, type: str | None
    ) -> tuple[list[SnapshotEntry], bool]:
        """A microgrid another replica runs: its committed records, and whether the
        owner of its current term has finished its first sync."""
        assert self.store is not None and self._lease_table is not None
        loaded = await self.store.load(microgrid_id)
        records = [record_from_text(text, microgrid_id) for text in loaded.records.values()]
        view = await self._lease_table.view()
        lease = next((lease for lease in view.leases if lease.microgrid_id == microgrid_id), None)
        synced = (
            lease is not None
            and lease.owner is not None
            and lease.expires_in > 0
            and loaded.meta.get("synced_term") == lease.term
        )
        return stored_snapshot(records, type), synced

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

    def _fenced(self, microgrid_ids: frozenset[int]) -> None:
        if self.microgrids is not None:
            self.microgrids.fenced(microgrid_ids)

    def _owned(self) -> list[int]:
        """The configured microgrids this process runs (all of them with the SQLite store)."""
        held = self.ownership.terms() if self.ownership is not None else {}
        return [
            microgrid_id for microgrid_id in self._settings.microgrid_ids if microgrid_id in held
        ]

    def _missing_for_ready(self) -> list[str]:
        loop = self._running()
        timeout = self._settings.api.first_sync_timeout
        missing = [
            f"microgrid {microgrid_id}: first sync with the dispatch API not finished"
            + (f" after {timeout:g} s" if microgrid_id in loop.overdue else "")
            + ("; converged from the stored state" if loop.overdue.get(microgrid_id) else "")
            for microgrid_id in self._owned()
            if microgrid_id not in loop.synced
        ]
        missing.extend(
            f"microgrid {sync.microgrid_id}: {sync.problem}"
            for sync in self._syncs
            if sync.problem is not None
        )
        if loop.store_problem is not None:
            missing.append(loop.store_problem)
        keeper = self._keeper
        if keeper is not None and keeper.problem is not None:
            missing.append(f"state store: cannot renew leases ({keeper.problem})")
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
            for microgrid_id in self._owned()
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
            "cluster": self._cluster_status(),
            "recent_messages": loop.recent.newest_first(),
        }

    def _cluster_status(self) -> dict[str, Any] | None:
        """A replica's name and share (``None`` with the SQLite store: it runs them all)."""
        if not self.clustered:
            return None
        return {
            "replica_id": self.replica_id,
            "lease_seconds": self._settings.cluster.lease_seconds,
            "owned": self._owned(),
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
        """Counted at scrape time, so an idle daemon spends no CPU on them.

        A microgrid another replica runs now is no longer exported here.
        """
        exported = self._exported
        self._exported = set()
        all_counts = self._running().engine.counts()
        if self.microgrids is not None:  # what the API sends and dispatchd cannot convert
            for microgrid_id, skipped in self.microgrids.skipped().items():
                counts = all_counts[microgrid_id] = dict(all_counts.get(microgrid_id, {}))
                counts["invalid"] = counts.get("invalid", 0) + skipped
        for microgrid_id, counts in all_counts.items():
            for state, count in counts.items():
                metrics.DISPATCHES.labels(microgrid_id=str(microgrid_id), state=state).set(count)
                self._exported.add((str(microgrid_id), state))
        for labels in exported - self._exported:
            metrics.DISPATCHES.remove(*labels)


_TASK_STOP_GRACE = 0.5
"""Seconds cancelled tasks get to finish even when the shutdown budget is spent."""
_RPC_CLOSE_GRACE = 0.5
"""Seconds to wait for the broker to acknowledge closing the snapshot RPC channel."""


async def _within(closing: Coroutine[Any, Any, None], seconds: float, what: str) -> None:
    """Await a close step for at most ``seconds``; a late one is abandoned and logged."""
    try:
        async with asyncio.timeout(seconds):
            await closing
    except TimeoutError:
        _log.warning("gave up waiting during shutdown", step=what, seconds=round(seconds, 3))
