"""Which outbox messages may go to the broker now, keeping per-dispatch order.

The publisher's connection shell asks ``take(now)`` for the next message to
send and reports back how each publish ended: ``confirm`` (confirmed, or
returned as unroutable: it leaves the window), ``nack`` (the broker refused
it: it goes back in front of its dispatch, which waits until its retry time)
or ``abandon`` (no answer: the channel or connection failed; the shell starts
a new round with ``start_round``, which sends everything unconfirmed again in
seq order).

At most ``max_in_flight`` messages are unconfirmed at once, and at most
``max_per_dispatch`` of one dispatch. With the default of one per dispatch a
message is only sent once every earlier message of its dispatch is
confirmed, so the broker sees each dispatch's messages in order even when it
nacks one and accepts the next (a full queue with ``reject-publish`` does).
Later messages of a busy or waiting dispatch are held back in seq order;
every other dispatch goes on.

Pure: no asyncio, no I/O; the current (monotonic) time is an argument.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar


class Sequenced(Protocol):
    """A message with its outbox position."""

    @property
    def seq(self) -> int: ...


T = TypeVar("T", bound=Sequenced)
K = TypeVar("K", bound=Hashable)


class SendWindow(Generic[T, K]):
    """Unconfirmed messages by seq, and which of them may be sent now."""

    def __init__(
        self,
        *,
        dispatch_of: Callable[[T], K],
        max_in_flight: int = 1000,
        max_per_dispatch: int = 1,
        retry_interval: float = 1.0,
        max_retry_interval: float = 30.0,
    ) -> None:
        if max_in_flight < 1 or max_per_dispatch < 1:
            raise ValueError("max_in_flight and max_in_flight_per_dispatch must be at least 1")
        self._dispatch_of = dispatch_of
        self._max_in_flight = max_in_flight
        self._max_per_dispatch = max_per_dispatch
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval

        # Added and not yet confirmed, keyed by seq; the queue is in seq order per round.
        self._pending: dict[int, T] = {}
        self._queue: collections.deque[int] = collections.deque()
        # Per dispatch: unconfirmed count, and seqs held back behind them (in seq order).
        self._busy: dict[K, int] = {}
        self._held: dict[K, collections.deque[int]] = {}
        # Held seqs let go by a settled publish or an ended wait: sent before the queue.
        self._ready: collections.deque[int] = collections.deque()
        # Per dispatch: consecutive nacks, and when its wait after the last one ends.
        self._nacks: dict[K, int] = {}
        self._retry_at: dict[K, float] = {}
        self._next_retry_at: float | None = None

        self.in_flight = 0
        """Taken and not yet confirmed, nacked or abandoned."""
        self.peak_in_flight = 0
        """The most messages ever in flight at once."""
        self.rounds = 0
        """Send rounds started: 1 + the rounds that republished after a failure."""
        self.nacked = 0
        """Messages the broker refused (each is sent again by its dispatch)."""

    def __len__(self) -> int:
        """Messages added and not yet confirmed."""
        return len(self._pending)

    def __contains__(self, seq: object) -> bool:
        return seq in self._pending

    @property
    def waiting_dispatches(self) -> int:
        """Dispatches waiting out their retry time after a nack."""
        return len(self._retry_at)

    @property
    def next_retry_at(self) -> float | None:
        """When the earliest waiting dispatch may send again (None if none waits)."""
        return self._next_retry_at

    def add(self, item: T) -> bool:
        """Queue a message behind everything added before; False if it is already here."""
        seq = item.seq
        if seq in self._pending:
            return False
        self._pending[seq] = item
        self._queue.append(seq)
        return True

    def drop(self, dropped: Callable[[T], bool]) -> list[T]:
        """Take the unconfirmed messages ``dropped`` picks out of the window; returns them.

        For messages another process publishes now (their microgrid moved).
        One in flight may still be confirmed; ``confirm`` then answers False.
        """
        gone = [item for item in self._pending.values() if dropped(item)]
        for item in gone:
            del self._pending[item.seq]  # queued, held or ready seqs are skipped when taken
        return gone

    def start_round(self) -> None:
        """Forget what was sent: everything unconfirmed goes again, in seq order.

        Only once nothing is in flight (the shell lets a failed round settle first).
        """
        self._queue = collections.deque(sorted(self._pending))
        self._busy.clear()
        self._held.clear()
        self._ready.clear()
        self._retry_at.clear()  # a new round sends the nacked ones in seq order too
        self._next_retry_at = None
        self.rounds += 1

    def take(self, now: float) -> T | None:
        """The next message that may be sent now, counted as in flight; None if none may."""
        if self.in_flight >= self._max_in_flight:
            return None
        if self._next_retry_at is not None and now >= self._next_retry_at:
            self._end_waits(now)
        while self._ready or self._queue:
            released = bool(self._ready)
            seq = self._ready.popleft() if released else self._queue.popleft()
            item = self._pending.get(seq)
            if item is None:
                continue
            key = self._dispatch_of(item)
            if not released and (
                key in self._held or self._busy.get(key, 0) >= self._max_per_dispatch
            ):
                self._held.setdefault(key, collections.deque()).append(seq)
                continue
            self._busy[key] = self._busy.get(key, 0) + 1
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
            return item
        return None

    def confirm(self, item: T) -> bool:
        """A taken message was confirmed (or returned): it leaves; False if it had left already."""
        key = self._dispatch_of(item)
        self._nacks.pop(key, None)
        self._settle(key)
        return self._pending.pop(item.seq, None) is not None

    def nack(self, item: T, now: float) -> float:
        """The broker refused a taken message: back in front of its dispatch, which waits.

        Returns the wait in seconds: ``retry_interval``, doubling per consecutive
        nack of the dispatch, up to ``max_retry_interval``.
        """
        key = self._dispatch_of(item)
        nacks = self._nacks.get(key, 0) + 1
        self._nacks[key] = nacks
        held = self._held.get(key)
        seq = item.seq
        self._held[key] = collections.deque(sorted([seq, *held]) if held else [seq])
        doubled: float = self._retry_interval * 2 ** min(nacks - 1, 16)
        delay = min(doubled, self._max_retry_interval)
        if key not in self._retry_at:
            retry_at = now + delay
            self._retry_at[key] = retry_at
            if self._next_retry_at is None or retry_at < self._next_retry_at:
                self._next_retry_at = retry_at
        self.nacked += 1
        self._settle(key)
        return delay

    def abandon(self, item: T) -> None:
        """A taken message got no answer (the round failed): it stays unconfirmed."""
        self._settle(self._dispatch_of(item))

    def _settle(self, key: K) -> None:
        """A publish of this dispatch ended: let its next held message go (unless it waits)."""
        self.in_flight -= 1
        count = self._busy.get(key, 0) - 1
        if count > 0:
            self._busy[key] = count
        else:
            self._busy.pop(key, None)
        if key not in self._retry_at:
            self._release_held(key)

    def _end_waits(self, now: float) -> None:
        ended = sorted(
            (retry_at, n, key)
            for n, (key, retry_at) in enumerate(self._retry_at.items())
            if retry_at <= now
        )
        for _, _, key in ended:
            del self._retry_at[key]
            if self._busy.get(key, 0) < self._max_per_dispatch:
                self._release_held(key)
        self._next_retry_at = min(self._retry_at.values(), default=None)

    def _release_held(self, key: K) -> None:
        held = self._held.get(key)
        if held:
            self._ready.append(held.popleft())
            if not held:
                del self._held[key]
