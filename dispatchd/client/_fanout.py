"""``ReceiverFetcher``: every receiver gets every message, none blocks another.

Each receiver has its own one-receiver ``frequenz.channels.Broadcast``
channel, so it can be primed (the running dispatches a new receiver starts
with) and can carry its own transform (a merge strategy). A Broadcast
receiver whose buffer (``limit``) is full drops its OLDEST message (the
channel logs a warning) instead of blocking the sender: a slow receiver
loses old messages, the others are unaffected.

A fan-out can hold messages sent while no receiver exists (``hold``): they
go to the next receiver created. The lifecycle stream uses it so that the
backlog of a durable queue, consumed as soon as ``start()`` returns, is not
lost on an actor that creates its receiver a moment later.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from frequenz.channels import Broadcast, Receiver, Sender

__all__ = ["FanOut", "ReceiverFetcher"]

T = TypeVar("T")

Transform = Callable[[T], Iterable[T]]


class ReceiverFetcher(Generic[T]):
    """Makes receivers of one stream (the ``frequenz.dispatch`` interface)."""

    def __init__(self, fan_out: FanOut[T]) -> None:
        """A fetcher for ``fan_out``'s stream."""
        self._fan_out = fan_out

    def new_receiver(self, *, name: str | None = None, limit: int = 50) -> Receiver[T]:
        """A new receiver; ``limit`` bounds its buffer (the oldest is dropped when full)."""
        return self._fan_out.new_receiver(name=name, limit=limit)


@dataclass(slots=True)
class _Outlet(Generic[T]):
    channel: Broadcast[T]
    sender: Sender[T]
    receiver: weakref.ref[Receiver[T]]
    transform: Transform[T] | None


class FanOut(Generic[T]):
    """Sends each message to every live receiver, through its transform if any."""

    def __init__(
        self, name: str, prime: Callable[[], Iterable[T]] = tuple, *, hold: int = 0
    ) -> None:
        """``prime`` gives what a new receiver gets first (before live messages);
        up to ``hold`` messages sent while nobody listens wait for the next receiver."""
        self._name = name
        self._prime = prime
        self._outlets: list[_Outlet[T]] = []
        self._held: deque[T] = deque(maxlen=hold)
        self._closed = False

    def new_receiver(
        self, *, name: str | None = None, limit: int = 50, transform: Transform[T] | None = None
    ) -> Receiver[T]:
        """A receiver primed now; it then gets every message sent."""
        if self._closed:
            raise RuntimeError(f"{self._name}: the dispatcher is stopped")
        channel = Broadcast[T](name=name or self._name)
        receiver = channel.new_receiver(name=name, limit=limit)
        outlet = _Outlet(channel, channel.new_sender(), weakref.ref(receiver), transform)
        for item in self._prime():
            _send_now(outlet, item)
        while self._held:
            _send_now(outlet, self._held.popleft())
        self._outlets.append(outlet)
        return receiver

    async def send(self, item: T) -> None:
        """Deliver to every receiver still referenced; forget collected ones."""
        alive = [outlet for outlet in self._outlets if outlet.receiver() is not None]
        self._outlets = alive
        if not alive and self._held.maxlen:
            self._held.append(item)
        for outlet in alive:
            _send_now(outlet, item)

    async def close(self) -> None:
        """End every receiver (their ``async for`` loops finish)."""
        self._closed = True
        outlets, self._outlets = self._outlets, []
        for outlet in outlets:
            await outlet.channel.aclose()


def _send_now(outlet: _Outlet[T], item: T) -> None:
    """Broadcast senders never wait: a full receiver drops its oldest message."""
    items = outlet.transform(item) if outlet.transform is not None else (item,)
    for each in items:
        # BroadcastSender.send only appends to deques; it never awaits, so
        # driving it synchronously keeps priming atomic with registration.
        coroutine = outlet.sender.send(each)
        try:
            coroutine.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - would mean the channel started awaiting
            coroutine.close()
            raise RuntimeError("Broadcast.send unexpectedly suspended")
