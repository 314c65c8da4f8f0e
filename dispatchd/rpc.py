"""Snapshot RPC (docs/messages.md § 6): late-joining actors ask for the current state.

Requests arrive on the ``<exchange>.rpc`` queue; each gets at most one reply
on its ``reply_to`` with its ``correlation_id``: the snapshot, or an error
body. Nothing a client sends can stop the consumer or touch publishing:

- the RPC has connections of its own, one that consumes and one that
  replies: a ``reply_to`` the broker chokes on (a forged direct reply-to
  name makes RabbitMQ close the replying connection) costs one reply and a
  reconnect of the reply connection, never the publisher's link;
- a request is acked before it is answered and a redelivered one is dropped
  unanswered, so no request can come back to do its harm again;
- every failure to read a request becomes an error reply (or, with no
  ``reply_to`` to answer on, a log line), never a traceback;
- requests are answered one at a time with at most ``PREFETCH`` handed over
  by the broker, so a burst waits in the queue instead of in the event loop.

The consumer also guards the exchange (docs/replicas.md, "One writer
per exchange"): with the SQLite store it consumes exclusively, so a second
dispatchd on the same exchange cannot take it and stops (``ExchangeTaken``)
before it has published anything; cluster replicas consume non-exclusively,
which the broker refuses beside an exclusive consumer too. ``consuming`` is
set once the consumer is held: the publisher sends nothing before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Final

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aiormq.exceptions import ChannelAccessRefused

from dispatchd import broker, metrics
from dispatchd.core import wire
from dispatchd.core.engine import SnapshotEntry
from dispatchd.core.records import DispatchKey
from dispatchd.publisher import CLOSE_GRACE, REFUSED_RETRY, broker_refusal, describe_error

_log = structlog.get_logger(__name__)

_REQUEST_TTL_MS: Final = 30_000
"""Requests older than this are dropped by the broker: their asker has given up."""

PREFETCH: Final = 16
"""Unacknowledged requests the broker hands over at once (the rest wait in the queue)."""

REPLY_TIMEOUT: Final = 5.0
"""Seconds to wait for the broker to confirm one reply (or to open the reply connection)."""

STALE_ENCODINGS: Final = 1000
"""Encoded entries of dispatches no longer asked for that are kept before a clean-up."""

_SHOWN_CHARS: Final = 120
"""How much of a client-chosen string (``reply_to``, an id) goes into a log line."""

Snapshot = Callable[[int, str | None], list[SnapshotEntry]]
Synced = Callable[[int], bool]
Standby = Callable[[int, str | None], Awaitable[tuple[list[SnapshotEntry], bool]]]
"""A microgrid's entries and ``synced`` from the store, for one another process runs."""


def rpc_queue_name(exchange: str) -> str:
    return f"{exchange}.rpc"


class ExchangeTaken(Exception):
    """Another dispatchd serves the exchange in a way this one cannot share it with."""


def _taken(exc: BaseException | None) -> bool:
    """The broker's answer to a consumer beside an exclusive one (or an exclusive one
    beside any): ``ACCESS_REFUSED - queue '...' in exclusive use``."""
    return isinstance(exc, ChannelAccessRefused) and "exclusive use" in str(exc)


def taken_message(exchange: str, *, exclusive: bool) -> str:
    """The one line that names the exchange, the clash and the way out."""
    queue = rpc_queue_name(exchange)
    if exclusive:
        return (
            f"exchange {exchange!r} is already served by another dispatchd (its snapshot "
            f"RPC queue {queue!r} has a consumer): with the SQLite store only one process "
            "may run per exchange; stop the other one, or set another amqp.exchange"
        )
    return (
        f"exchange {exchange!r} is served by a dispatchd on the SQLite store (it consumes "
        f"{queue!r} exclusively): a cluster replica cannot run beside it; stop it, or set "
        "another amqp.exchange"
    )


def _shown(text: str | None) -> str | None:
    if text is None or len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[:_SHOWN_CHARS]}… ({len(text)} chars)"


class SnapshotRpc:
    """Answers snapshot requests from the engine's announced state."""

    def __init__(
        self,
        *,
        amqp_url: str,
        exchange: str,
        microgrid_ids: Collection[int],
        snapshot: Snapshot,
        synced: Synced,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        reconnect_interval: float = 1.0,
        max_backoff: float = 30.0,
        connect_timeout: float = 10.0,
        exclusive: bool = True,
        owned: Synced | None = None,
        standby: Standby | None = None,
    ) -> None:
        self._url = amqp_url
        self._exchange = exchange
        self._queue_name = rpc_queue_name(exchange)
        self._exclusive = exclusive
        self._owned = owned
        self._standby = standby
        self._microgrid_ids = frozenset(microgrid_ids)
        self._snapshot = snapshot
        self._synced = synced
        self._clock = clock
        self._reconnect_interval = reconnect_interval
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._turn = asyncio.Lock()
        self._replies = _Replies(amqp_url, connect_timeout)
        # Per (microgrid_id, dispatch_id): the entry last encoded and its encoding.
        self._encoded: dict[DispatchKey, tuple[SnapshotEntry, bytes]] = {}
        self.consuming = asyncio.Event()
        """Set once this process holds its consumer on the RPC queue (never cleared)."""
        self._fatal: ExchangeTaken | None = None
        self._fatal_event = asyncio.Event()

    async def wait_fatal(self) -> ExchangeTaken:
        """Returns once the broker refused the consumer because another dispatchd holds it."""
        await self._fatal_event.wait()
        assert self._fatal is not None
        return self._fatal

    def _refused(self) -> ExchangeTaken:
        error = ExchangeTaken(taken_message(self._exchange, exclusive=self._exclusive))
        if self._fatal is None:
            self._fatal = error
            self._fatal_event.set()
        return error

    async def start(self, *, wait: bool = True) -> None:
        """Declare the queue and consume, or keep trying in the background if that fails.

        ``wait=False`` goes to the background at once (when the broker is known to be
        unreachable, a second connect timeout would only delay the start). Raises
        ``ExchangeTaken`` when another dispatchd holds the consumer; found in the
        background, the same error comes out of ``wait_fatal``.
        """
        retry_in = 0.0
        if wait:
            try:
                await self._consume()
            except ExchangeTaken:
                raise
            except Exception as exc:
                retry_in = self._note_failure(exc, self._reconnect_interval)
            else:
                return
        self._task = asyncio.create_task(self._connect_loop(retry_in), name="snapshot-rpc")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        connection, self._connection = self._connection, None
        closing = [self._replies.close()]
        if connection is not None and not connection.is_closed:
            closing.append(connection.close())
        await asyncio.gather(*closing)

    async def _connect_loop(self, retry_in: float) -> None:
        """Until the consumer is up; the robust connection then restores it after losses."""
        backoff = self._reconnect_interval
        while True:
            await asyncio.sleep(retry_in)
            backoff = min(backoff * 2, self._max_backoff)
            try:
                await self._consume()
            except ExchangeTaken:
                return
            except Exception as exc:
                retry_in = self._note_failure(exc, backoff)
                continue
            return

    def _note_failure(self, exc: BaseException, backoff: float) -> float:
        """Logged at DEBUG: the publisher, on its own connection to the same broker,
        already says why the broker cannot be used."""
        retry_in = REFUSED_RETRY if broker_refusal(exc) is not None else backoff
        _log.debug(
            "snapshot rpc cannot connect, retrying",
            error=describe_error(exc),
            retry_in_seconds=retry_in,
        )
        return retry_in

    async def _consume(self) -> None:
        connection = await broker.connect_robust(
            self._url,
            timeout=self._connect_timeout,
            reconnect_interval=self._reconnect_interval,
            client_properties={"connection_name": "dispatchd snapshot rpc"},
        )
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            queue = await channel.declare_queue(
                self._queue_name, durable=True, arguments={"x-message-ttl": _REQUEST_TTL_MS}
            )
            await queue.consume(self._on_request, exclusive=self._exclusive)
        except BaseException as exc:
            await connection.close()
            if _taken(exc):
                raise self._refused() from None
            raise
        # After a reconnect the robust connection consumes again; if another process
        # took the queue meanwhile, the broker refuses that and closes with the reason.
        connection.close_callbacks.add(self._on_closed)
        self._connection = connection
        self.consuming.set()
        _log.info(
            "snapshot rpc serving",
            queue=self._queue_name,
            prefetch=PREFETCH,
            exclusive=self._exclusive,
        )

    def _on_closed(self, _sender: object, exc: BaseException | None = None) -> None:
        if _taken(exc):
            self._refused()

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        # One request at a time, in arrival order; every await in between gives
        # the engine's loop its turn.
        async with self._turn:
            await self._handle(message)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        if message.redelivered:
            # Delivered before and not acked: it may have been answered, or be what
            # broke the connection that carried it. Either way: not again.
            await _settle(message, ack=False)
            metrics.RPC_REQUESTS.labels(method="unknown", outcome="redelivered").inc()
            _log.warning(
                "redelivered snapshot request dropped unanswered",
                correlation_id=_shown(message.correlation_id),
                reply_to=_shown(message.reply_to),
            )
            return
        await _settle(message, ack=True)
        body, method, outcome = await self._answer_anywhere(message.body)
        metrics.RPC_REQUESTS.labels(method=method, outcome=outcome).inc()
        if not message.reply_to:
            _log.warning(
                "snapshot request without reply_to dropped",
                message_id=_shown(message.message_id),
                outcome=outcome,
            )
            return
        await self._replies.send(message.reply_to, message.correlation_id, body)

    async def _answer_anywhere(self, request: bytes) -> tuple[bytes, str, str]:
        """From the engine, or from the store for a microgrid another replica runs."""
        standby, owned = self._standby, self._owned
        if standby is None or owned is None:
            return self.answer(request)
        try:
            parsed = wire.decode_snapshot_request(request)
        except wire.WireError:
            return self.answer(request)  # the same error reply
        microgrid_id = parsed.microgrid_id
        if microgrid_id not in self._microgrid_ids or owned(microgrid_id):
            return self.answer(request)
        try:
            entries, synced = await standby(microgrid_id, parsed.type)
            body = wire.encode_snapshot_reply(
                microgrid_id,
                self._clock(),
                synced,
                (
                    wire.SnapshotEntry(
                        dispatch=entry.dispatch,
                        running=entry.running,
                        until=entry.until,
                        sequence=entry.sequence,
                    )
                    for entry in entries
                ),
            )
        except Exception as exc:
            _log.warning("snapshot from the state store failed", error=describe_error(exc))
            reply = wire.encode_error_reply(
                "unavailable", "the state store cannot be read now; ask again"
            )
            return reply, "snapshot", "unavailable"
        return body, "snapshot", "ok"

    def answer(self, request: bytes) -> tuple[bytes, str, str]:
        """The reply body, the method label and the outcome label for one request."""
        try:
            return self._answer(request)
        except Exception as exc:  # a bug, but a request must never go unanswered
            _log.error("snapshot request failed", error=describe_error(exc))
            reply = wire.encode_error_reply("internal", "dispatchd could not answer; see its log")
            return reply, "snapshot", "internal"

    def _answer(self, request: bytes) -> tuple[bytes, str, str]:
        try:
            parsed = wire.decode_snapshot_request(request)
        except wire.WireError as error:
            method = "snapshot" if error.code != "unknown_method" else "unknown"
            return wire.encode_error_reply(error.code, str(error)), method, error.code
        if parsed.microgrid_id not in self._microgrid_ids:
            message = (
                f"microgrid {_shown(str(parsed.microgrid_id))} is not synced by this dispatchd "
                f"(it syncs {sorted(self._microgrid_ids)})"
            )
            return wire.encode_error_reply("unknown_microgrid", message), "snapshot", "error"
        body = wire.snapshot_reply_around(
            parsed.microgrid_id,
            self._clock(),
            self._synced(parsed.microgrid_id),
            self._encoded_entries(parsed.microgrid_id, parsed.type),
        )
        return body, "snapshot", "ok"

    def _encoded_entries(self, microgrid_id: int, type: str | None) -> bytes:
        """The encoded dispatches; each entry is encoded again only once it changed.

        Encoding is most of a reply's cost (5 of 5.5 ms for 200 dispatches), and
        between two requests at most a few dispatches change: a burst of requests
        would otherwise keep the loop busy encoding the same texts.
        """
        entries = self._snapshot(microgrid_id, type)
        cache = self._encoded
        parts = []
        for entry in entries:
            key = (microgrid_id, entry.dispatch.id)
            cached = cache.get(key)
            if cached is not None and _unchanged(cached[0], entry):
                parts.append(cached[1])
                continue
            encoded = wire.encode_snapshot_entry(entry)
            cache[key] = (entry, encoded)
            parts.append(encoded)
        if len(cache) > len(entries) + STALE_ENCODINGS:  # deleted dispatches, other microgrids
            self._encoded = {
                (microgrid_id, e.dispatch.id): cache[(microgrid_id, e.dispatch.id)] for e in entries
            }
        return b"[" + b",".join(parts) + b"]"


def _unchanged(old: SnapshotEntry, new: SnapshotEntry) -> bool:
    """Dispatches are immutable and a change replaces them, so identity is enough.

    The cached entry keeps its dispatch alive: its id cannot be reused meanwhile.
    """
    return (
        old.dispatch is new.dispatch
        and old.running == new.running
        and old.until == new.until
        and old.sequence == new.sequence
    )


async def _settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
    """Ack (or drop) a request; a channel lost meanwhile means the broker redelivers it."""
    try:
        if ack:
            await message.ack()
        else:
            await message.reject(requeue=False)
    except Exception as exc:
        _log.debug("could not settle a snapshot request", error=describe_error(exc))


class _Replies:
    """Publishes replies on a connection of their own, each confirmed by the broker.

    Confirms tell a reply the broker refused apart from the next one, and a
    connection the broker closed (what a forged direct reply-to name does) is
    replaced on the next reply instead of being waited for.
    """

    def __init__(self, amqp_url: str, connect_timeout: float) -> None:
        self._url = amqp_url
        self._connect_timeout = connect_timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def send(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                channel = await self._open_channel()
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        content_type=wire.CONTENT_TYPE,
                        correlation_id=correlation_id,
                        app_id=wire.APP_ID,
                    ),
                    routing_key=reply_to,
                )
        except Exception as exc:
            _log.warning(
                "snapshot reply not delivered",
                reply_to=_shown(reply_to),
                correlation_id=_shown(correlation_id),
                error=describe_error(exc),
            )
            await self.close()  # the next reply opens a fresh connection

    async def _open_channel(self) -> AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        await self.close()
        connection = await aio_pika.connect(
            self._url,
            timeout=self._connect_timeout,
            client_properties={"connection_name": "dispatchd snapshot rpc replies"},
        )
        self._connection = connection
        self._channel = await connection.channel(publisher_confirms=True)
        return self._channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            # A broker that stopped answering never sends close-ok: don't wait for it.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_GRACE):
                    await connection.close()
