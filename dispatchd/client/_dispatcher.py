"""``Dispatcher``: the ``frequenz.dispatch`` entry point, fed from RabbitMQ.

Start-up order, chosen so that nothing is lost between the state an actor
starts from and the first live message:

1. declare and bind the actor's queue (from now on the broker keeps every
   message for it); the declaration says how many messages a durable queue
   kept while the actor was down (its backlog);
2. ask the snapshot RPC for the current state;
3. without a backlog, deliver the dispatches running now, then consume; a
   live message the snapshot already covers has a sequence at or below the
   snapshot's and is dropped. With a backlog, consume and deliver the
   backlog first, in order, then apply the snapshot for the dispatches the
   backlog said nothing newer about (see ``_feed``).

After the robust connection recovers, aio-pika redeclares the queue, its
bindings and the consumer; a private queue lost whatever was published
meanwhile, so its subscription asks the snapshot again and delivers what
changed. A durable named queue kept those messages and needs no snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Final

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from frequenz.channels import Receiver
from frequenz.client.dispatch import DispatchApiClient

from dispatchd import broker
from dispatchd.client._actors import ActorDispatcher
from dispatchd.client._dispatch import Dispatch
from dispatchd.client._events import DispatchEvent
from dispatchd.client._fanout import DeliveryCounts, FanOut
from dispatchd.client._feed import Feed
from dispatchd.client._interface import DispatcherInterface
from dispatchd.client._merge import MergeStrategy
from dispatchd.client._snapshot import request_snapshot
from dispatchd.core import wire
from dispatchd.core.messages import Kind

__all__ = ["Dispatcher"]

_log = logging.getLogger(__name__)

_PREFETCH: Final = 200
_RESNAPSHOT_BACKOFF_MAX: Final = 10.0
_MAX_QUEUE_NAME: Final = 255
_LIFECYCLE_HOLD: Final = 1000
"""Lifecycle events kept for the first receiver while none exists (a durable backlog)."""


class _Subscription:
    """One queue, its bindings, its snapshot and what it delivered."""

    def __init__(
        self,
        *,
        owner: Dispatcher,
        queue_name: str | None,
        binding_keys: list[str],
        snapshot_type: str | None,
        lifecycle: FanOut[DispatchEvent] | None,
    ) -> None:
        self._owner = owner
        self.durable = queue_name is not None
        self._queue_name = queue_name or f"dispatchd.client.{uuid.uuid4().hex}"
        self._binding_keys = binding_keys
        self._snapshot_type = snapshot_type
        self.feed = Feed(
            f"running:{snapshot_type or '*'}",
            lifecycle=lifecycle,
            hold_running=self.durable,
            counts=owner.delivery_counts,
        )
        self.running: FanOut[Dispatch] = self.feed.running
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None

    @property
    def queue_name(self) -> str:
        return self._queue_name

    async def open(self, connection: AbstractRobustConnection) -> None:
        """Declare (counting a durable queue's backlog), bind, snapshot, consume.

        See the module doc; the snapshot is delivered after the backlog.
        """
        owner = self._owner
        channel = self._channel = await connection.channel()
        await channel.set_qos(prefetch_count=_PREFETCH)
        exchange = await channel.declare_exchange(
            owner.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        if self.durable:
            queue = await channel.declare_queue(
                self._queue_name, durable=True, arguments=dict(owner.queue_arguments)
            )
        else:
            queue = await channel.declare_queue(
                self._queue_name,
                exclusive=True,
                auto_delete=True,
                arguments=dict(owner.queue_arguments),
            )
        backlog = queue.declaration_result.message_count if self.durable else 0
        for key in self._binding_keys:
            await queue.bind(exchange, routing_key=key)
        self._queue = queue
        await self.feed.expect_backlog(backlog or 0, await self._snapshot(connection))
        await queue.consume(self._on_message)
        if self.feed.backlog_left:
            self._owner._run_in_background(self._watch_backlog())

    async def _watch_backlog(self) -> None:
        """Apply the snapshot anyway when the backlog stops coming before its end."""
        left = self.feed.backlog_left
        while left:
            await asyncio.sleep(self._owner.snapshot_timeout)
            if self.feed.backlog_left == left:
                _log.warning(
                    "queue %s: %d messages of its backlog never came (another consumer "
                    "took them, or they expired); delivering the snapshot now",
                    self._queue_name,
                    left,
                )
                await self.feed.end_backlog()
                return
            left = self.feed.backlog_left

    async def resnapshot(self, connection: AbstractRobustConnection) -> None:
        """Ask the snapshot and deliver what this subscription has not delivered yet."""
        await self.feed.apply_snapshot(await self._snapshot(connection))

    async def _snapshot(self, connection: AbstractRobustConnection) -> wire.SnapshotReply:
        owner = self._owner
        reply = await request_snapshot(
            connection,
            exchange=owner.exchange,
            microgrid_id=owner.microgrid_id,
            dispatch_type=self._snapshot_type,
            reply_timeout=owner.snapshot_timeout,
        )
        if not reply.synced:
            _log.warning(
                "dispatchd has not finished its first sync of microgrid %s: "
                "the snapshot may be incomplete",
                owner.microgrid_id,
            )
        return reply

    async def close(self) -> None:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            await channel.close()
        await self.feed.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Deliver one message; a malformed one is rejected (dead-lettered), not requeued."""
        try:
            decoded = wire.decode(message.body, message.headers)
        except wire.WireError as error:
            _log.error(
                "rejecting malformed message %s on queue %s (routing key %r): %s",
                message.message_id,
                self._queue_name,
                message.routing_key,
                error,
            )
            await self.feed.skipped()
            await message.reject(requeue=False)
            return
        await self.feed.deliver(decoded, message.message_id)
        await message.ack()


class Dispatcher(DispatcherInterface):
    """Lifecycle events and running-state changes of one microgrid, from dispatchd.

    ``queue=None`` declares a private queue (exclusive, auto-delete) that
    lives as long as the connection; a name declares a durable queue that
    keeps messages while the actor is down (typed receivers get their own
    durable queues named ``<queue>.running.<type>``). ``api_url`` (with
    ``auth_key`` and ``sign_secret``) makes ``client`` available for
    create/update/delete. ``snapshot_timeout`` bounds each snapshot RPC;
    ``queue_arguments`` are passed to every queue declaration (e.g.
    ``{"x-dead-letter-exchange": "dlx"}`` so rejected messages dead-letter).
    """

    def __init__(
        self,
        microgrid_id: int,
        amqp_url: str,
        *,
        exchange: str = "dispatch",
        queue: str | None = None,
        api_url: str | None = None,
        auth_key: str | None = None,
        sign_secret: str | None = None,
        snapshot_timeout: float = 10.0,
        queue_arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Nothing connects before ``start()``."""
        self.microgrid_id = int(microgrid_id)
        self.exchange = exchange
        self.snapshot_timeout = snapshot_timeout
        self.queue_arguments: Mapping[str, Any] = dict(queue_arguments or {})
        self._amqp_url = amqp_url
        self._queue = queue
        self._api_url = api_url
        self._auth_key = auth_key
        self._sign_secret = sign_secret
        self._client: DispatchApiClient | None = None
        self._connection: AbstractRobustConnection | None = None
        self.delivery_counts = DeliveryCounts()
        """What slow receivers lost: running messages coalesced, lifecycle events dropped."""
        self._lifecycle: FanOut[DispatchEvent] = FanOut(
            "lifecycle", hold=_LIFECYCLE_HOLD, counts=self.delivery_counts
        )
        self._managed: dict[str, ActorDispatcher] = {}
        self._main = _Subscription(
            owner=self,
            queue_name=queue,
            binding_keys=[
                wire.binding_key(self.microgrid_id, Kind.LIFECYCLE, None, None),
                wire.binding_key(self.microgrid_id, Kind.RUNNING, None, None),
            ],
            snapshot_type=None,
            lifecycle=self._lifecycle,
        )
        self._typed: dict[str, _Subscription] = {}
        self._typed_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._stopped = False

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Connect, bind, deliver the snapshot, then follow live messages.

        Raises ``SnapshotError`` when dispatchd does not answer or refuses.
        """
        if self._connection is not None:
            raise RuntimeError("the dispatcher is already started")
        connection = self._connection = await broker.connect_robust(self._amqp_url)
        try:
            await self._main.open(connection)
        except BaseException:
            await connection.close()
            self._connection = None
            raise
        connection.reconnect_callbacks.add(self._on_reconnect)

    async def stop(self) -> None:
        """Stop every managed actor, close the connection and end every receiver.

        Private queues vanish; durable ones keep collecting messages.
        """
        if self._stopped:
            return
        self._stopped = True
        await self._stop_managing_all()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        subscriptions = [self._main, *self._typed.values()]
        for subscription in subscriptions:
            await subscription.close()
        await self._lifecycle.close()
        if self._connection is not None:
            await self._connection.close()
        if self._client is not None:
            await self._client.disconnect()

    # --- the actor's interface --------------------------------------------------

    def _all_running(self) -> FanOut[Dispatch]:
        return self._main.running

    async def new_running_state_event_receiver(
        self,
        type: str,
        merge_strategy: MergeStrategy | None = None,
        *,
        name: str | None = None,
        limit: int = 50,
    ) -> Receiver[Dispatch]:
        """Running-state changes of one type, selected by a broker binding.

        The first call for a type declares and binds a queue for that type
        only and asks the snapshot for that type; later calls share it. The
        receiver starts with the dispatches of the type running now; with a
        ``merge_strategy`` the running intervals of one identity are merged
        (see ``dispatchd.client.MergeByType``).
        """
        connection = self._connection
        if connection is None or self._stopped:
            raise RuntimeError("start the dispatcher first")
        async with self._typed_lock:
            subscription = self._typed.get(type)
            if subscription is None:
                subscription = _Subscription(
                    owner=self,
                    queue_name=self._typed_queue_name(type),
                    binding_keys=[wire.binding_key(self.microgrid_id, Kind.RUNNING, None, type)],
                    snapshot_type=type,
                    lifecycle=None,
                )
                await subscription.open(connection)
                self._typed[type] = subscription
        return self._typed_receiver(subscription.running, type, merge_strategy, name, limit)

    @property
    def client(self) -> DispatchApiClient:
        """The ``frequenz-client-dispatch`` API client, for create/update/delete."""
        if self._api_url is None:
            raise RuntimeError(
                "Dispatcher.client needs the dispatch API: pass api_url= (and auth_key=, "
                "sign_secret= if the API requires them) to Dispatcher(...)"
            )
        if self._client is None:
            self._client = DispatchApiClient(
                server_url=self._api_url,
                auth_key=self._auth_key or "unauthenticated",
                sign_secret=self._sign_secret,
            )
        return self._client

    @property
    def queue_name(self) -> str:
        """The name of the main queue (generated for a private queue)."""
        return self._main.queue_name

    # --- internals --------------------------------------------------------------

    def _typed_queue_name(self, dispatch_type: str) -> str | None:
        if self._queue is None:
            return None
        name = f"{self._queue}.running.{wire.escape_type(dispatch_type)}"
        if len(name.encode()) <= _MAX_QUEUE_NAME:
            return name
        digest = hashlib.sha256(dispatch_type.encode()).hexdigest()[:16]
        return f"{self._queue[:200]}.running.~{digest}"

    def _on_reconnect(self, *_: Any) -> None:
        """Private queues lost what was published meanwhile: re-ask the snapshot."""
        private = [s for s in self._subscriptions() if not s.durable]
        if private and not self._stopped:
            self._run_in_background(self._resnapshot(private))

    def _run_in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """A task that ``stop()`` cancels."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _subscriptions(self) -> Iterable[_Subscription]:
        return [self._main, *self._typed.values()]

    async def _resnapshot(self, subscriptions: list[_Subscription]) -> None:
        """Retry with backoff until each subscription got a snapshot (or stop)."""
        connection = self._connection
        assert connection is not None
        for subscription in subscriptions:
            delay = 0.5
            while True:
                try:
                    await subscription.resnapshot(connection)
                    break
                except Exception as error:
                    _log.warning("snapshot after reconnect failed, retrying: %s", error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RESNAPSHOT_BACKOFF_MAX)
