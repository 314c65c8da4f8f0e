"""Fan-out of dispatch events to every open stream of a microgrid.

Each subscriber has its own bounded buffer. Publishing never waits: if a
subscriber's buffer is full, that subscriber is marked as overflowed and its
stream is ended with RESOURCE_EXHAUSTED (the official client reconnects and
the caller re-lists), so one slow reader costs at most ``buffer_size``
messages of memory and never delays the others.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

from frequenz.api.dispatch.v1.dispatch_pb2 import StreamMicrogridDispatchesResponse

DEFAULT_BUFFER_SIZE = 1024


class Overflowed(Exception):
    """The subscriber fell more than its buffer behind and was cut off."""


class Subscription:
    """One stream's view: the events published after it subscribed, in order."""

    def __init__(self, buffer_size: int) -> None:
        self._buffer: deque[StreamMicrogridDispatchesResponse] = deque()
        self._buffer_size = buffer_size
        self._ready = asyncio.Event()
        self._overflowed = False
        self._closed = False

    def offer(self, event: StreamMicrogridDispatchesResponse) -> None:
        """Queue an event without waiting; a full buffer marks the overflow."""
        if len(self._buffer) >= self._buffer_size:
            self._overflowed = True
        else:
            self._buffer.append(event)
        self._ready.set()

    def close(self) -> None:
        """End the subscription (server shutdown); ``next`` returns ``None``."""
        self._closed = True
        self._ready.set()

    async def next(self) -> StreamMicrogridDispatchesResponse | None:
        """The next event; ``None`` once closed; raises :class:`Overflowed`."""
        while True:
            if self._overflowed:
                raise Overflowed
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()


class Broadcaster:
    """Subscribers per microgrid; ``publish`` is synchronous and never blocks."""

    def __init__(self, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self._buffer_size = buffer_size
        self._subscribers: defaultdict[int, set[Subscription]] = defaultdict(set)
        self._waiters: list[asyncio.Future[None]] = []

    def subscribe(self, microgrid_id: int) -> Subscription:
        """Start receiving this microgrid's events."""
        subscription = Subscription(self._buffer_size)
        self._subscribers[microgrid_id].add(subscription)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        return subscription

    def unsubscribe(self, microgrid_id: int, subscription: Subscription) -> None:
        """Stop delivering to this subscription (idempotent)."""
        subscribers = self._subscribers.get(microgrid_id)
        if subscribers is None:
            return
        subscribers.discard(subscription)
        if not subscribers:
            del self._subscribers[microgrid_id]

    def publish(self, microgrid_id: int, event: StreamMicrogridDispatchesResponse) -> None:
        """Offer the event to every subscriber of the microgrid."""
        for subscription in self._subscribers.get(microgrid_id, ()):
            subscription.offer(event)

    def subscriber_count(self, microgrid_id: int) -> int:
        """How many streams are open for the microgrid."""
        return len(self._subscribers.get(microgrid_id, ()))

    async def wait_for_subscribers(self, microgrid_id: int, count: int) -> None:
        """Return once at least ``count`` streams of the microgrid are open.

        Events published before a stream subscribed are not delivered to it,
        so embedders and tests wait here before relying on a stream.
        """
        while self.subscriber_count(microgrid_id) < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def close_all(self) -> None:
        """End every subscription, so open streams finish on shutdown."""
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.close()
