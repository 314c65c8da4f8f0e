"""``ReceiverFetcher``: every receiver gets every message, none blocks another.

Each receiver is a ``frequenz.channels`` ``Receiver`` with a buffer of its
own (``limit`` messages), so it can be primed (the running dispatches a new
receiver starts with) and carry its own transform (a merge strategy), and a
slow receiver never blocks the others. What happens when a buffer is full
depends on the stream:

- Lifecycle events (no key): the OLDEST message is dropped and logged, as a
  ``frequenz.channels.Broadcast`` receiver does.
- Running states (keyed by dispatch id): messages are coalesced per
  dispatch. The oldest message that a newer message of the same dispatch
  supersedes is dropped, logged and counted; the newest message of every
  dispatch is never dropped, so a ``stopped`` is never lost. When more
  dispatches than ``limit`` have a message pending, the buffer grows past
  ``limit`` rather than lose one.

A fan-out can hold messages sent while no receiver exists (``hold``, with
the same overflow rule): they go to the next receiver created. The
lifecycle stream and the running streams of durable queues use it, so the
backlog a durable queue kept, consumed as soon as ``start()`` returns, is
not lost on an actor that creates its receiver a moment later.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from frequenz.channels import Receiver, ReceiverError, ReceiverStoppedError

__all__ = ["DeliveryCounts", "FanOut", "ReceiverFetcher"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

Transform = Callable[[T], Iterable[T]]
KeyFunc = Callable[[T], Hashable]


@dataclass(slots=True)
class DeliveryCounts:
    """What slow receivers lost, summed over the receivers of one dispatcher."""

    coalesced: int = 0
    """Running-state messages replaced by a newer message of the same dispatch."""

    dropped: int = 0
    """Lifecycle events dropped because a receiver's buffer was full."""


class ReceiverFetcher(Generic[T]):
    """Makes receivers of one stream (the ``frequenz.dispatch`` interface)."""

    def __init__(self, fan_out: FanOut[T]) -> None:
        """A fetcher for ``fan_out``'s stream."""
        self._fan_out = fan_out

    def new_receiver(self, *, name: str | None = None, limit: int = 50) -> Receiver[T]:
        """A new receiver; ``limit`` bounds its buffer (see the module doc for a full one)."""
        return self._fan_out.new_receiver(name=name, limit=limit)


class _Pending(Generic[T]):
    """A FIFO bounded by ``limit``: drops the oldest, or coalesces by ``key``."""

    def __init__(
        self, name: str, limit: int, key: KeyFunc[T] | None, counts: DeliveryCounts | None
    ) -> None:
        """``counts=None``: losses are not a receiver's (a hold), logged at DEBUG only."""
        self.name = name
        self._limit = max(1, limit)
        self._key_of = key
        self._counts = counts
        self._items: deque[T] = deque()
        self._per_key: Counter[Hashable] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def keys(self) -> set[Hashable]:
        return set(self._per_key)

    def push(self, item: T) -> None:
        if len(self._items) >= self._limit:
            self._make_room(item)
        self._items.append(item)
        if self._key_of is not None:
            self._per_key[self._key_of(item)] += 1

    def pop(self) -> T:
        item = self._items.popleft()
        if self._key_of is not None:
            self._forget(self._key_of(item))
        return item

    def clear(self) -> None:
        self._items.clear()
        self._per_key.clear()

    def _forget(self, key: Hashable) -> None:
        self._per_key[key] -= 1
        if self._per_key[key] <= 0:
            del self._per_key[key]

    def _make_room(self, incoming: T) -> None:
        key = self._key_of
        counts = self._counts
        level = logging.WARNING if counts is not None else logging.DEBUG
        if key is None:
            lost = self._items.popleft()
            if counts is not None:
                counts.dropped += 1
            _log.log(level, "%s: buffer full, dropped the oldest message %r", self.name, lost)
            return
        incoming_key = key(incoming)
        for index, item in enumerate(self._items):
            item_key = key(item)
            if item_key == incoming_key or self._per_key[item_key] > 1:
                del self._items[index]
                self._forget(item_key)
                if counts is not None:
                    counts.coalesced += 1
                _log.log(
                    level,
                    "%s: buffer full, coalesced %r into a newer message of the same dispatch",
                    self.name,
                    item,
                )
                return
        # Every pending message is the newest of its dispatch: keep them all.


class _BufferedReceiver(Receiver[T]):
    """A receiver fed synchronously by its fan-out; never blocks the sender."""

    def __init__(self, pending: _Pending[T]) -> None:
        self._pending = pending
        self._wakeup = asyncio.Event()
        self._closed = False
        self._waiting = 0

    def push(self, item: T) -> None:
        if self._closed:
            return
        self._pending.push(item)
        self._wakeup.set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def settled(self) -> bool:
        """No consumer is about to wake for a message (for the testing fake)."""
        return not (self._pending and self._waiting)

    async def ready(self) -> bool:
        """Wait for a message; ``False`` once closed and drained."""
        while not self._pending:
            if self._closed:
                return False
            self._wakeup.clear()
            self._waiting += 1
            try:
                await self._wakeup.wait()
            finally:
                self._waiting -= 1
        return True

    def consume(self) -> T:
        """The oldest pending message."""
        if not self._pending:
            if self._closed:
                raise ReceiverStoppedError(self)
            raise ReceiverError("consume() called before ready()", self)
        return self._pending.pop()

    def close(self) -> None:
        """No more messages; what is buffered can still be read."""
        self._closed = True
        self._wakeup.set()

    def __str__(self) -> str:
        return self._pending.name

    def __repr__(self) -> str:
        return f"<receiver {self._pending.name!r}: {len(self._pending)} pending>"


@dataclass(slots=True)
class _Outlet(Generic[T]):
    receiver: weakref.ref[_BufferedReceiver[T]]
    transform: Transform[T] | None

    def push(self, item: T) -> None:
        receiver = self.receiver()
        if receiver is None:
            return
        items = self.transform(item) if self.transform is not None else (item,)
        for each in items:
            receiver.push(each)


class FanOut(Generic[T]):
    """Sends each message to every live receiver, through its transform if any."""

    def __init__(
        self,
        name: str,
        prime: Callable[[], Iterable[T]] = tuple,
        *,
        hold: int = 0,
        key: KeyFunc[T] | None = None,
        counts: DeliveryCounts | None = None,
    ) -> None:
        """``prime`` gives what a new receiver gets first (before live messages);
        up to ``hold`` messages sent while nobody listens wait for the next
        receiver; ``key`` (the dispatch id) makes full buffers coalesce."""
        self._name = name
        self._prime = prime
        self._key_of = key
        self._counts = counts if counts is not None else DeliveryCounts()
        self._outlets: list[_Outlet[T]] = []
        self._held: _Pending[T] | None = (
            _Pending(f"{name} (held)", hold, key, None) if hold > 0 else None
        )
        self._closed = False

    def new_receiver(
        self,
        *,
        name: str | None = None,
        limit: int = 50,
        transform: Transform[T] | None = None,
        key: KeyFunc[T] | None = None,
    ) -> Receiver[T]:
        """A receiver primed now; it then gets every message sent.

        It first gets the primed messages, except those of dispatches the
        held messages say something newer about, then the held messages.
        ``key`` replaces the fan-out's key for what coalesces in this
        receiver's buffer (the messages after ``transform``).
        """
        if self._closed:
            raise RuntimeError(f"{self._name}: the dispatcher is stopped")
        pending_key = key if key is not None and self._key_of is not None else self._key_of
        pending = _Pending(name or self._name, limit, pending_key, self._counts)
        receiver = _BufferedReceiver(pending)
        outlet = _Outlet(weakref.ref(receiver), transform)
        held: list[T] = []
        superseded: set[Hashable] = set()
        if self._held is not None:
            held = list(self._held)
            superseded = self._held.keys()
            self._held.clear()
        key = self._key_of
        for item in self._prime():
            if key is None or key(item) not in superseded:
                outlet.push(item)
        for item in held:
            outlet.push(item)
        self._outlets.append(outlet)
        return receiver

    async def send(self, item: T) -> None:
        """Deliver to every receiver still referenced; forget collected ones.

        Never suspends, so messages are delivered in the order they are sent.
        """
        alive: list[_Outlet[T]] = []
        for outlet in self._outlets:
            receiver = outlet.receiver()
            if receiver is not None and not receiver.closed:
                alive.append(outlet)
        self._outlets = alive
        if not alive and self._held is not None:
            self._held.push(item)
        for outlet in alive:
            outlet.push(item)

    def receivers(self) -> list[_BufferedReceiver[T]]:
        """The live receivers (for the testing fake's ``settle``)."""
        live = (outlet.receiver() for outlet in self._outlets)
        return [receiver for receiver in live if receiver is not None]

    async def close(self) -> None:
        """End every receiver (their ``async for`` loops finish)."""
        self._closed = True
        outlets, self._outlets = self._outlets, []
        for outlet in outlets:
            receiver = outlet.receiver()
            if receiver is not None:
                receiver.close()
