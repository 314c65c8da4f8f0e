"""Publisher: outbox to RabbitMQ with confirms, pipelined, per-dispatch order kept.

Messages are fired on one confirm channel without waiting for each confirm
(at most ``max_in_flight`` unconfirmed), so the broker sees them in outbox
order. Whatever the window lets go at once (a second's starts and stops) is
handed to the connection in one write (``batchpublish``), each message still
settled by its own confirm. Per dispatch, at most ``max_in_flight_per_dispatch`` (default 1) are
unconfirmed at a time: the broker may nack message k and accept k+1 (a full
queue with ``reject-publish`` does exactly that), and republishing k after
k+1 would break the per-dispatch order of docs/messages.md § 5. Dispatches produce
few messages each, so this costs nothing in practice while bursts over many
dispatches stay fully pipelined.

A nack (the broker refused one message, e.g. a full queue with
``overflow=reject-publish``) holds back only that message's dispatch: the
message is republished after a backoff of its own (``reconnect_interval``,
doubling per consecutive nack of the dispatch, up to ``max_backoff``) with
the dispatch's later messages behind it, while every other dispatch goes on.
Which message may go when is decided by the pure ``core.sendwindow.SendWindow``;
this module is the connection shell around it: connecting, sending,
confirms, timers and the outbox clean-up.

On any other failure (confirm timeout, channel or connection lost) the
publisher stops sending, lets the in-flight publishes settle, waits for the
robust channel to come back and republishes everything still unconfirmed in
seq order with the same ``message_id``: duplicates are possible, loss is not.

A broker that refuses dispatchd for a reason that cannot go away by itself
(a wrong password, an ``amq.*`` exchange name, TLS against a plain port) is
named in one ERROR line with the fix and retried only every ``REFUSED_RETRY``
seconds (see ``broker_refusal``).

A message leaves the outbox only when the broker confirmed it, or returned
it as unroutable (no queue bound: topic semantics, counted, never retried).

Bulk messages (the ``created`` announcements of a first sync, re-announcements
after a re-list) wait in a backlog of their own and enter the send window
only while it holds fewer than ``BULK_WINDOW`` messages; everything else goes
in at once. So a start or a live update is behind at most ``BULK_WINDOW``
bulk messages, not behind all 50,000 of a first sync. Per-dispatch order is
kept: a message of a dispatch whose bulk messages still wait takes them into
the window first, in seq order. The backlog keeps only seqs: the envelopes stay
in the store's outbox and the send loop reads them back a batch at a time
(docs/architecture.md, "Memory at scale"); so does a promotion, queued by
``submit`` for the send loop, which reads the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import structlog
import yarl
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, AbstractRobustExchange
from aio_pika.exceptions import (
    ChannelPreconditionFailed,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from aiormq.exceptions import ChannelAccessRefused

from dispatchd import batchpublish, broker, memory, metrics
from dispatchd.core.records import DispatchKey
from dispatchd.core.sendwindow import SendWindow
from dispatchd.core.wire import APP_ID, CONTENT_TYPE, Envelope
from dispatchd.store import OutboxItem, Store

log = structlog.get_logger(__name__)

CLOSE_GRACE = 1.0
"""Seconds ``close`` waits for the broker to acknowledge closing the connection."""

FLUSH_BATCH = 1000
"""Confirmed seqs that trigger a removal from the store while publishes are still in flight.

Below it the removal waits until nothing is in flight: a burst is then removed in one
commit after its last confirm instead of a thread competing with the sends for the GIL
and the store lock (the engine commits the next step under it).
"""

REFUSED_RETRY = 60.0
"""Seconds between attempts while the broker refuses dispatchd for a reason it cannot fix."""

NACK_LOG_INTERVAL = 10.0
"""At most one WARNING line about refused (nacked) messages per this many seconds."""

BULK_WINDOW = 16
"""Unconfirmed messages below which the bulk backlog feeds the send window: enough to
keep the broker's pipeline full, few enough that a live message behind them is not late."""

PUBLISH_BATCH = 500
"""Messages handed to the broker connection in one write at most (``batchpublish``)."""
PUBLISH_BATCH_BYTES = 1024 * 1024
"""Body bytes after which a write takes no further message: dispatches with large
payloads go out in several writes rather than one copy of them all in memory."""

READ_AHEAD = 500
"""Bulk messages read back from the outbox at a time (about 0.5 MB in memory)."""
TRIM_AFTER = 10_000
"""Confirmed messages after which a publisher that falls idle gives the heap memory
they used back to the operating system (``memory.trim``) and has the collector set
the long-lived objects aside (``memory.settle``), while nothing is waiting to go out."""

DeclareHook = Callable[[AbstractRobustConnection], Awaitable[None]]


class ExchangeTypeMismatch(Exception):
    """The exchange exists with another type or arguments: a start-up error, not a retry."""


def _kind(envelope: Envelope) -> str:
    """``dispatch.running`` -> ``running``: the ``kind`` label of the metrics."""
    return envelope.type.rpartition(".")[2]


def _dispatch_key(item: OutboxItem) -> DispatchKey:
    return (item.envelope.microgrid_id, item.envelope.dispatch_id)


OutboxWindow = SendWindow[OutboxItem, DispatchKey]


def _backlog_key(envelope: Envelope) -> int:
    """The dispatch as one int: the bulk backlog holds tens of thousands of them."""
    return envelope.microgrid_id << 64 | envelope.dispatch_id


def _microgrid_of_key(key: int) -> int:
    return key >> 64


def _seqs(held: int | tuple[int, ...]) -> tuple[int, ...]:
    """A dispatch's waiting bulk seqs (one is held as a bare int, the usual case)."""
    return (held,) if isinstance(held, int) else held


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _host_port(url: yarl.URL) -> str:
    return f"{url.host}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"


def _broker_address(amqp_url: str) -> str:
    """``user 'guest' at 127.0.0.1:5672, vhost '/'``: the URL without its password."""
    url = yarl.URL(amqp_url)
    vhost = url.path[1:] if len(url.path) > 1 else "/"
    return f"user {url.user or 'guest'!r} at {_host_port(url)}, vhost {vhost!r}"


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def broker_refusal(exc: BaseException, amqp_url: str = "", exchange: str = "") -> str | None:
    """What to tell the operator when ``exc`` cannot go away by retrying; None if it may.

    The text names the cause and the fix, never the password.
    """
    text = " ".join(str(exc).split())
    if isinstance(exc, ProbableAuthenticationError) or text.startswith("ACCESS_REFUSED - Login"):
        return (
            f"the broker refused the login (ACCESS_REFUSED) of {_broker_address(amqp_url)}: "
            "fix the user or password in amqp.url, or create the user on the broker"
        )
    if isinstance(exc, ChannelAccessRefused):
        if "reserved prefix" in text:
            return (
                f"the broker refuses to declare exchange {exchange!r}: names starting with "
                "'amq.' are reserved (ACCESS_REFUSED); set amqp.exchange to another name, "
                "e.g. 'dispatch'"
            )
        return (
            f"the broker refused access (broker: {text}): give {_broker_address(amqp_url)} "
            "configure, write and read permissions, or use another account in amqp.url"
        )
    ssl_error = _ssl_error(exc)
    if ssl_error is not None and "WRONG_VERSION_NUMBER" in str(ssl_error):
        return (
            "TLS handshake failed (WRONG_VERSION_NUMBER): the server at "
            f"{_host_port(yarl.URL(amqp_url))} does not speak TLS; use amqp:// instead of "
            "amqps:// in amqp.url, or the broker's TLS port (usually 5671)"
        )
    return None


class Publisher:
    """Publishes committed outbox items to the topic exchange, in order, at least once."""

    def __init__(
        self,
        *,
        amqp_url: str,
        exchange: str,
        store: Store,
        publish_timeout: float = 10.0,
        max_in_flight: int = 1000,
        max_in_flight_per_dispatch: int = 1,
        reconnect_interval: float = 1.0,
        max_backoff: float = 30.0,
        connect_timeout: float = 10.0,
        refused_retry: float = REFUSED_RETRY,
        on_declare: DeclareHook | None = None,
        may_send: asyncio.Event | None = None,
    ) -> None:
        self._window = OutboxWindow(
            dispatch_of=_dispatch_key,
            max_in_flight=max_in_flight,
            max_per_dispatch=max_in_flight_per_dispatch,
            retry_interval=reconnect_interval,
            max_retry_interval=max_backoff,
        )
        self._url = amqp_url
        self._exchange_name = exchange
        self._store = store
        self._publish_timeout = publish_timeout
        self._reconnect_interval = reconnect_interval
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._refused_retry = refused_retry
        self.on_declare = on_declare
        # The daemon's RPC consumer: a second dispatchd on the exchange must be refused
        # before it publishes anything (docs/replicas.md, "One writer per exchange").
        self._may_send = may_send

        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        # Kept so the robust channel re-declares it after every reconnect.
        self._exchange: AbstractRobustExchange | None = None
        self._last_error: str | None = None
        self._fatal: ExchangeTypeMismatch | None = None
        self._fatal_event = asyncio.Event()
        self._ever_connected = asyncio.Event()
        self._closing = False
        self._refusal_logged: str | None = None
        self.retry_in: float | None = None
        """Seconds until the next connection attempt while not connected (None once connected)."""

        self._in_flight: set[asyncio.Task[None]] = set()
        # Seqs of bulk messages not yet in the window, in seq order; per dispatch the same
        # ones (a promoted one stays in the deque and is skipped: not at its dispatch's
        # head). Only seqs: the envelopes stay in the store's outbox until they go (a
        # first sync's 50,000 would hold about 55 MB, docs/architecture.md).
        self._backlog: collections.deque[int] = collections.deque()
        self._read_ahead: collections.deque[OutboxItem] = collections.deque()
        """The next bulk messages, read back from the outbox (see ``_feed_bulk``)."""
        self._backlog_of: dict[int, int | tuple[int, ...]] = {}
        # Per dispatch, what goes into the window once the send loop has read the
        # seqs back from the store: its bulk seqs taken along by a live message, the
        # live message, and whatever of the dispatch came after them (in order).
        self._promoting: dict[int, list[int | OutboxItem]] = {}
        self._backlog_count = 0
        """Bulk seqs waiting plus entries being promoted: submitted, not in the window."""
        self._since_trim = 0
        """Messages confirmed since the heap was last trimmed (see ``TRIM_AFTER``)."""
        # Wakes the sender when the earliest dispatch waiting after a nack may go again.
        self._retry_timer: asyncio.TimerHandle | None = None
        self._nacks_unlogged = 0
        self._nack_logged_at = -NACK_LOG_INTERVAL
        self._round_failed = False
        self._round_confirmed = 0
        self._wake = asyncio.Event()

        # Confirmed (or returned) and not yet removed from the store.
        self._done: list[int] = []
        self._done_set: set[int] = set()
        # Per microgrid: submitted and neither removed from the store nor dropped.
        self._unsettled: collections.Counter[int] = collections.Counter()
        self._microgrid_of_done: dict[int, int] = {}
        self._drained: dict[int, asyncio.Event] = {}
        # This instance's share of the process-wide outbox gauge (submitted, not removed).
        self._counted = 0
        self._flush_wake = asyncio.Event()
        self._published_counters: dict[tuple[str, str], Any] = {}
        self._idle = asyncio.Event()
        self._idle.set()

        self._tasks: list[asyncio.Task[None]] = []
        self._flusher_task: asyncio.Task[None] | None = None
        metrics.BROKER_UP.set(0)

    # --- state for /readyz -------------------------------------------------

    @property
    def connected(self) -> bool:
        connection, channel = self._connection, self._channel
        return (
            connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def fatal_error(self) -> ExchangeTypeMismatch | None:
        """Set when a connection made in the background found the exchange mismatched."""
        return self._fatal

    @property
    def window(self) -> OutboxWindow:
        """What is unconfirmed and may be sent; its counters (rounds, peak in flight, nacks)."""
        return self._window

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The robust connection, for modules that open their own channel (RPC)."""
        return self._connection

    async def wait_fatal(self) -> ExchangeTypeMismatch:
        await self._fatal_event.wait()
        assert self._fatal is not None
        return self._fatal

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109 (answers False on timeout)
        """True once connected, False if not within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._ever_connected.wait()
                while not self.connected:
                    assert self._channel is not None
                    await self._channel.ready()
                    if not self.connected:  # ready, but the loss is not noticed yet
                        await asyncio.sleep(0.01)
        except TimeoutError:
            return False
        return True

    # --- lifecycle ---------------------------------------------------------

    async def start(self, *, submit_outbox: bool = True) -> None:
        """Connect and declare the exchange, or keep trying in the background if unreachable.

        Submits whatever the store's outbox still holds (left by a previous
        run) so it is republished first. Raises ExchangeTypeMismatch when the
        exchange exists with another type.
        """
        if submit_outbox:
            self.submit(await self._store.outbox())
        self._flusher_task = asyncio.create_task(self._flusher(), name="publisher-flusher")
        try:
            await self._connect()
        except ExchangeTypeMismatch:
            self._closing = True
            self._flush_wake.set()
            await self._flusher_task
            raise
        except Exception as exc:
            retry_in = self._note_failure(exc, self._reconnect_interval)
            self._tasks.append(
                asyncio.create_task(self._connect_loop(retry_in), name="publisher-connect")
            )
            return
        self._tasks.append(asyncio.create_task(self._sender(), name="publisher-sender"))

    async def _connect(self) -> None:
        connection = await broker.connect_robust(
            self._url,
            timeout=self._connect_timeout,
            reconnect_interval=self._reconnect_interval,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            assert isinstance(channel, AbstractRobustChannel)
            try:
                exchange = await channel.declare_exchange(
                    self._exchange_name,
                    aio_pika.ExchangeType.TOPIC,
                    durable=True,
                    timeout=self._connect_timeout,
                )
            except ChannelPreconditionFailed as exc:
                raise ExchangeTypeMismatch(
                    f"exchange {self._exchange_name!r} exists with another type or arguments "
                    f"(broker: {' '.join(str(exc).split())}); delete it or configure another "
                    "amqp.exchange"
                ) from None
            if self.on_declare is not None:
                await self.on_declare(connection)
        except BaseException:
            await connection.close()
            raise
        assert isinstance(exchange, AbstractRobustExchange)
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connection, self._channel, self._exchange = connection, channel, exchange
        self._last_error = None
        self._refusal_logged = None
        self.retry_in = None
        self._ever_connected.set()
        metrics.BROKER_UP.set(1)
        log.info("broker connected", exchange=self._exchange_name)

    def _note_failure(self, exc: BaseException, backoff: float) -> float:
        """Say why the broker cannot be used; returns the seconds until the next attempt.

        A refusal that retrying cannot fix is one ERROR line (again only when its
        cause changes) and a slow retry; anything else may pass by itself: a
        WARNING and the fast backoff.
        """
        metrics.BROKER_UP.set(0)
        refusal = broker_refusal(exc, self._url, self._exchange_name)
        if refusal is None:
            self._last_error = f"broker unreachable: {describe_error(exc)}"
            self.retry_in = backoff
            log.warning(
                "broker unreachable, retrying", error=describe_error(exc), retry_in_seconds=backoff
            )
            return backoff
        self.retry_in = self._refused_retry
        self._last_error = f"{refusal} (retrying every {self._refused_retry:g} s)"
        if refusal != self._refusal_logged:
            self._refusal_logged = refusal
            log.error("broker refuses dispatchd", error=refusal, retry_in_seconds=self.retry_in)
        else:
            log.debug("broker still refuses dispatchd", retry_in_seconds=self.retry_in)
        return self._refused_retry

    async def _connect_loop(self, retry_in: float) -> None:
        """Retry the first connection until it works: exponential backoff, or slow if refused."""
        backoff = self._reconnect_interval
        while not self._closing:
            await asyncio.sleep(retry_in)
            backoff = min(backoff * 2, self._max_backoff)
            try:
                await self._connect()
            except ExchangeTypeMismatch as exc:
                self._fatal = exc
                self._last_error = str(exc)
                self._fatal_event.set()
                log.error("cannot publish", error=str(exc))
                return
            except Exception as exc:
                retry_in = self._note_failure(exc, backoff)
                continue
            self._tasks.append(asyncio.create_task(self._sender(), name="publisher-sender"))
            return

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        metrics.BROKER_UP.set(0)
        self._last_error = f"broker connection lost: {describe_error(exc) if exc else 'closed'}"
        log.warning("broker connection lost, reconnecting", error=self._last_error)
        self._fail_round(self._last_error)

    def _on_reconnected(self, _sender: object) -> None:
        metrics.BROKER_UP.set(1)
        self._last_error = None
        log.info("broker reconnected", exchange=self._exchange_name)

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 (drain budget; close always finishes)
        """Stop taking work, drain queued and in-flight messages within ``timeout``, close.

        What is not confirmed by then stays in the outbox for the next start.
        """
        if self._connection is not None and not self._closing and self._sending_allowed:
            await self.wait_idle(timeout)
        self._closing = True
        await self._stop_tasks()
        self._flush_wake.set()
        if self._flusher_task is not None:
            await self._flusher_task
        # Hand back this instance's share: the next publisher on the same store (a restart
        # in the same process) counts what is left in again when it submits it.
        metrics.OUTBOX_MESSAGES.dec(self._counted)
        self._counted = 0
        if self._connection is not None:
            # A broker that stopped answering never sends close-ok: don't wait for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._connection.close()
        metrics.BROKER_UP.set(0)
        if self.unconfirmed:
            log.info("publisher closed, unconfirmed kept in the outbox", count=self.unconfirmed)

    async def _stop_tasks(self) -> None:
        """Cancel sending and connecting; the flusher is left to finish its last batch."""
        self._cancel_retry_timer()
        tasks = self._tasks + list(self._in_flight)
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- submitting and waiting --------------------------------------------

    def submit(
        self, items: Sequence[OutboxItem], bulk: Callable[[OutboxItem], bool] | None = None
    ) -> None:
        """Queue already-committed outbox items (in seq order); returns at once.

        Items for which ``bulk`` is true wait in the bulk backlog (see the module).
        """
        if self._closing:
            return  # they are in the outbox: the next start publishes them
        added = 0
        window, promoting = self._window, self._promoting
        for item in items:
            if item.seq in self._done_set or item.seq in window:
                continue
            key = _backlog_key(item.envelope)
            queued = promoting.get(key)
            if queued is not None:  # behind its dispatch's promotion, bulk or not
                queued.append(item if bulk is None or not bulk(item) else item.seq)
            elif bulk is not None and bulk(item):
                self._backlog.append(item.seq)
                held = self._backlog_of.get(key)
                self._backlog_of[key] = item.seq if held is None else (*_seqs(held), item.seq)
            else:
                waiting = self._backlog_of.pop(key, None)
                if waiting is None:
                    if window.add(item):
                        added += 1
                        self._unsettled[item.envelope.microgrid_id] += 1
                    continue
                # Its dispatch's earlier bulk messages go first: the send loop reads them.
                promoting[key] = [*_seqs(waiting), item]
                self._backlog_count -= len(_seqs(waiting))
                self._backlog_count += len(promoting[key])
                added += 1
                self._unsettled[item.envelope.microgrid_id] += 1
                continue
            self._backlog_count += 1
            self._unsettled[item.envelope.microgrid_id] += 1
            added += 1
        if added:
            self._idle.clear()
            self._counted += added
            metrics.OUTBOX_MESSAGES.inc(added)
            self._wake.set()

    def drop(self, microgrid_id: int) -> int:
        """Stop publishing a microgrid's messages; they stay in the store's outbox.

        For a microgrid another process runs now: it republishes them (with the
        same ``message_id``s). Returns how many were dropped.
        """
        dropped = len(self._window.drop(lambda item: item.envelope.microgrid_id == microgrid_id))
        dropped += self._drop_backlog(microgrid_id)
        if dropped:
            self._counted -= dropped
            metrics.OUTBOX_MESSAGES.dec(dropped)
            self._settle_microgrid(microgrid_id, dropped)
            self._update_idle()
        return dropped

    async def wait_drained(self, microgrid_id: int, timeout: float) -> bool:  # noqa: ASYNC109 (answers False on timeout)
        """True once every submitted message of the microgrid left the outbox."""
        if not self._unsettled[microgrid_id]:
            return True
        drained = self._drained.setdefault(microgrid_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await drained.wait()
        except TimeoutError:
            return False
        return True

    def _settle_microgrid(self, microgrid_id: int, count: int) -> None:
        left = self._unsettled[microgrid_id] - count
        if left > 0:
            self._unsettled[microgrid_id] = left
            return
        del self._unsettled[microgrid_id]
        drained = self._drained.pop(microgrid_id, None)
        if drained is not None:
            drained.set()

    def _drop_backlog(self, microgrid_id: int) -> int:
        """Take the microgrid's waiting bulk seqs and promotions out; how many there were."""
        dropped = 0
        promoting = [key for key in self._promoting if _microgrid_of_key(key) == microgrid_id]
        for key in promoting:
            dropped += len(self._promoting.pop(key))
        keys = [key for key in self._backlog_of if _microgrid_of_key(key) == microgrid_id]
        seqs = {seq for key in keys for seq in _seqs(self._backlog_of.pop(key))}
        dropped += len(seqs)
        if seqs:
            self._backlog = collections.deque(seq for seq in self._backlog if seq not in seqs)
            self._read_ahead = collections.deque(
                item for item in self._read_ahead if item.seq not in seqs
            )
        self._backlog_count -= dropped
        return dropped

    def _forget_missing(self, key: int, count: int) -> None:
        """Waiting messages no longer in the outbox (removed by the microgrid's new
        owner before this process dropped it): nothing is left to send or wait for."""
        self._backlog_count -= count
        self._counted -= count
        metrics.OUTBOX_MESSAGES.dec(count)
        self._settle_microgrid(_microgrid_of_key(key), count)

    async def _promote(self) -> None:
        """Move the queued promotions into the window, their bulk seqs read from the store.

        Entries that arrive for a dispatch while its seqs are read stay queued
        behind it and are moved on the next call.
        """
        taken = [(key, entries, len(entries)) for key, entries in self._promoting.items()]
        wanted = [entry for _, entries, _ in taken for entry in entries if isinstance(entry, int)]
        read = {item.seq: item for item in await self._store.outbox_items(wanted)}
        for key, entries, count in taken:
            if self._promoting.get(key) is not entries:
                continue  # dropped with its microgrid meanwhile
            missing = 0
            for entry in entries[:count]:
                item = read.get(entry) if isinstance(entry, int) else entry
                if item is None:
                    missing += 1
                else:
                    self._window.add(item)
            self._backlog_count -= count - missing
            if missing:
                self._forget_missing(key, missing)
            del entries[:count]
            if not entries:
                del self._promoting[key]

    async def _feed_bulk(self) -> bool:
        """Move bulk messages into the window while it is short; whether any moved.

        They are read back from the store's outbox ``READ_AHEAD`` at a time, so
        the reads (each waits for the store, which a commit may hold through its
        fsync, or a round trip to PostgreSQL) are few next to the publishes. What
        was promoted or dropped meanwhile is skipped: not at its dispatch's head.
        """
        window, fed = self._window, False
        while len(window) < BULK_WINDOW:
            if not self._read_ahead:
                backlog = self._backlog
                if not backlog:
                    break
                seqs = [backlog.popleft() for _ in range(min(READ_AHEAD, len(backlog)))]
                try:
                    items = await self._store.outbox_items(seqs)
                except BaseException:
                    if backlog is self._backlog:  # not rebuilt by a drop meanwhile
                        backlog.extendleft(reversed(seqs))
                    raise
                if len(items) < len(seqs):
                    self._forget_unread(set(seqs).difference(item.seq for item in items))
                self._read_ahead.extend(items)  # (a drop meanwhile made a new deque)
                continue
            item = self._read_ahead.popleft()
            key = _backlog_key(item.envelope)
            waiting = self._backlog_of.get(key)
            if waiting is None or _seqs(waiting)[0] != item.seq:
                continue  # promoted with a live message of its dispatch, or dropped
            self._pop_head(key, waiting)
            self._backlog_count -= 1
            window.add(item)
            fed = True
        return fed

    def _pop_head(self, key: int, waiting: int | tuple[int, ...]) -> None:
        rest = _seqs(waiting)[1:]
        if rest:
            self._backlog_of[key] = rest[0] if len(rest) == 1 else rest
            return
        del self._backlog_of[key]
        if not self._backlog_of:
            self._backlog_of = {}  # a dict keeps its largest size: 2.5 MB at 50k

    def _forget_unread(self, unread: set[int]) -> None:
        """Seqs asked for and not in the outbox any more (a rare path: it scans)."""
        for key, waiting in list(self._backlog_of.items()):
            gone = [seq for seq in _seqs(waiting) if seq in unread]
            if not gone:
                continue
            rest = tuple(seq for seq in _seqs(waiting) if seq not in unread)
            if rest:
                self._backlog_of[key] = rest[0] if len(rest) == 1 else rest
            else:
                del self._backlog_of[key]
            self._forget_missing(key, len(gone))

    @property
    def backlog(self) -> int:
        """Bulk messages not yet handed to the send window."""
        return self._backlog_count

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 (answers False on timeout)
        """True once every submitted item is confirmed and removed from the outbox."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @property
    def unconfirmed(self) -> int:
        return len(self._window) + self._backlog_count

    def _update_idle(self) -> None:
        if not self.unconfirmed and not self._done:
            self._idle.set()

    async def _release_memory(self) -> None:
        """Once a drained backlog of ``TRIM_AFTER`` or more is removed: its memory goes back.

        The store's page cache first (reading the backlog back and deleting it
        filled it), then the heap's free pages.
        """
        if self.unconfirmed or self._done or self._since_trim < TRIM_AFTER:
            return
        self._since_trim = 0
        await self._store.release_memory()
        memory.settle()
        memory.trim()

    # --- the send loop -----------------------------------------------------

    @property
    def _sending_allowed(self) -> bool:
        return self._may_send is None or self._may_send.is_set()

    async def _sender(self) -> None:
        if self._may_send is not None:
            await self._may_send.wait()
        backoff = self._reconnect_interval
        while True:
            assert self._channel is not None
            await self._channel.ready()
            await self._send_round()
            if self._round_confirmed:
                backoff = self._reconnect_interval
            log.warning(
                "republishing unconfirmed messages",
                count=len(self._window),
                error=self._last_error,
                retry_in_seconds=backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _send_round(self) -> None:
        """Send everything pending in seq order, then whatever is submitted, until a failure."""
        window = self._window
        window.start_round()
        self._cancel_retry_timer()
        self._round_failed = False
        self._round_confirmed = 0
        assert self._channel is not None
        try:
            # Once per round, not per publish: a replaced channel (reconnect) closes this
            # one, its publishes fail and the next round takes the new one.
            channel = await self._channel.get_underlay_channel()
        except Exception as exc:
            self._fail_round(f"channel not open: {describe_error(exc)}")
            return
        assert isinstance(channel, aiormq.Channel)
        loop = asyncio.get_running_loop()
        while not self._round_failed:
            now = loop.time()
            batch: list[OutboxItem] = []
            size = 0
            while (
                len(batch) < PUBLISH_BATCH
                and size < PUBLISH_BATCH_BYTES
                and (item := window.take(now)) is not None
            ):
                batch.append(item)
                size += len(item.envelope.body)
            if batch:
                task = asyncio.create_task(self._publish(batch, channel))
                self._in_flight.add(task)
                continue
            try:
                if self._promoting:
                    await self._promote()
                    continue
                if await self._feed_bulk():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail_round(f"cannot read the outbox: {describe_error(exc)}")
                break
            self._arm_retry_timer()
            self._wake.clear()
            await self._wake.wait()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    # --- a nack holds back its own dispatch only ----------------------------

    def _on_nacked(self, item: OutboxItem, exc: DeliveryError) -> None:
        """Put the message back in front of its dispatch, which waits out its own backoff."""
        delay = self._window.nack(item, asyncio.get_running_loop().time())
        metrics.PUBLISH_NACKED.labels(kind=_kind(item.envelope)).inc()
        self._last_error = f"broker refused a message: {describe_error(exc)}"
        self._nacks_unlogged += 1
        now = time.monotonic()
        if now - self._nack_logged_at >= NACK_LOG_INTERVAL:
            log.warning(
                "broker refused messages (a queue with overflow reject-publish is full?); "
                "only their dispatches wait and retry",
                refused=self._nacks_unlogged,
                dispatches_waiting=self._window.waiting_dispatches,
                microgrid_id=item.envelope.microgrid_id,
                dispatch_id=item.envelope.dispatch_id,
                routing_key=item.envelope.routing_key,
                retry_in_seconds=delay,
            )
            self._nack_logged_at = now
            self._nacks_unlogged = 0

    def _arm_retry_timer(self) -> None:
        """Wake the sender when the earliest waiting dispatch may go (one timer for all)."""
        retry_at = self._window.next_retry_at
        if retry_at is None:
            return
        timer = self._retry_timer
        if timer is not None and timer.when() <= retry_at:
            return
        if timer is not None:
            timer.cancel()
        self._retry_timer = asyncio.get_running_loop().call_at(retry_at, self._on_retry_timer)

    def _on_retry_timer(self) -> None:
        self._retry_timer = None
        self._wake.set()

    def _cancel_retry_timer(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    async def _publish(self, items: list[OutboxItem], channel: aiormq.Channel) -> None:
        """Publish ``items`` in one write and settle each by its own confirm.

        The timeout covers the channel lock, the hand-over and every confirm.
        """
        task = asyncio.current_task()
        unanswered = {item.seq: item for item in items}
        try:
            async with asyncio.timeout(self._publish_timeout):
                confirms = await batchpublish.publish_batch(
                    channel,
                    self._exchange_name,
                    [outgoing(item.envelope) for item in items],
                    mandatory=True,
                )
            pending = dict(zip(confirms, items, strict=True))
            done, late = await asyncio.wait(pending, timeout=self._publish_timeout)
            for confirm, item in pending.items():  # in seq order
                if confirm in done:
                    del unanswered[item.seq]
                    self._settle(item, confirm)
            if late:
                for confirm in late:
                    confirm.cancel()
                self._fail_round(f"no confirm within {self._publish_timeout}s")
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise
            self._fail_round("publish cancelled by a closing channel")
        except TimeoutError:
            self._fail_round(f"no confirm within {self._publish_timeout}s")
        except Exception as exc:
            self._fail_round(f"publish failed: {describe_error(exc)}")
        finally:
            if task is not None:
                self._in_flight.discard(task)
            for item in unanswered.values():
                self._window.abandon(item)
            self._wake.set()
            if self._done and (not self._in_flight or len(self._done) >= FLUSH_BATCH):
                self._flush_wake.set()

    def _settle(self, item: OutboxItem, confirm: asyncio.Future[object]) -> None:
        """What the broker answered for one message: confirmed, returned or refused."""
        if confirm.cancelled():
            self._window.abandon(item)
            self._fail_round("publish cancelled by a closing channel")
            return
        exc = confirm.exception()
        if exc is None:
            self._count_published(item.envelope)
            self._mark_confirmed(item)
        elif isinstance(exc, PublishError):
            metrics.MESSAGES_UNROUTABLE.labels(kind=_kind(item.envelope)).inc()
            self._mark_confirmed(item)
        elif isinstance(exc, DeliveryError):
            self._on_nacked(item, exc)
        else:
            self._window.abandon(item)
            self._fail_round(f"publish failed: {describe_error(exc)}")

    def _count_published(self, envelope: Envelope) -> None:
        """Labelled children cached: ``labels()`` takes a lock and builds a key per call."""
        labels = (_kind(envelope), str(envelope.headers.get("event", "")))
        counter = self._published_counters.get(labels)
        if counter is None:
            counter = metrics.MESSAGES_PUBLISHED.labels(kind=labels[0], event=labels[1])
            self._published_counters[labels] = counter
        counter.inc()

    def _mark_confirmed(self, item: OutboxItem) -> None:
        """The broker confirmed ``item``: count it and let the outbox drop it."""
        if not self._window.confirm(item):
            return
        self._round_confirmed += 1
        self._since_trim += 1
        self._done.append(item.seq)
        self._done_set.add(item.seq)
        self._microgrid_of_done[item.seq] = item.envelope.microgrid_id

    def _fail_round(self, reason: str) -> None:
        if not self._round_failed:
            self._last_error = reason
        self._round_failed = True
        self._wake.set()

    # --- removing confirmed items from the store ---------------------------

    async def _flusher(self) -> None:
        """Remove confirmed seqs in batches, off the event loop (each commit is an fsync).

        Ends once the publisher is closing and nothing is left to remove.
        """
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            batch = self._done
            self._done = []
            if batch:
                try:
                    await self._remove(batch)
                except Exception as exc:
                    log.error(
                        "cannot remove confirmed messages from the outbox",
                        error=describe_error(exc),
                    )
                    self._done = batch + self._done
                    if self._closing:
                        return  # they stay in the outbox: republished (duplicates) at next start
                    await asyncio.sleep(self._reconnect_interval)
                    self._flush_wake.set()
                    continue
                self._done_set.difference_update(batch)
                self._update_idle()
                await self._release_memory()
            if self._closing and not self._done:
                return

    async def _remove(self, seqs: list[int]) -> None:
        await self._store.remove_from_outbox(seqs)
        # Every row was counted in by submit(); a count(*) here would scan the
        # whole outbox per batch (quadratic over a 50k burst) under the store lock.
        self._counted -= len(seqs)
        metrics.OUTBOX_MESSAGES.dec(len(seqs))
        removed = collections.Counter(self._microgrid_of_done.pop(seq) for seq in seqs)
        for microgrid_id, count in removed.items():
            self._settle_microgrid(microgrid_id, count)


def outgoing(envelope: Envelope) -> batchpublish.Outgoing:
    """The AMQP message for an envelope, stamped now (docs/messages.md § 3)."""
    return batchpublish.Outgoing(
        envelope.routing_key,
        envelope.body,
        aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
            message_id=envelope.message_id,
            timestamp=datetime.now(UTC),
            message_type=envelope.type,
            app_id=APP_ID,
            headers=dict[str, Any](envelope.headers),
        ),
    )
