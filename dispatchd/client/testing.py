"""Test actors without a broker or a daemon: a fake ``Dispatcher`` and a clock you move.

``FakeDispatcher`` has the interface of ``dispatchd.client.Dispatcher``
(receivers, merge strategies, ``start_managing``...) and is fed by the test:
``create``/``update``/``delete`` dispatches, then ``advance`` the clock. The
running and lifecycle messages come from dispatchd's own scheduling engine,
at the instants dispatchd would send them, so what an actor sees in a unit
test is what it sees in production, in milliseconds::

    from datetime import timedelta
    from dispatchd.client.testing import FakeDispatcher

    async def test_battery_actor_follows_its_dispatch() -> None:
        async with FakeDispatcher(microgrid_id=1) as dispatcher:
            await dispatcher.start_managing("BATTERY", actor_factory=BatteryActor.new)
            dispatch = await dispatcher.create(
                "BATTERY", start_in=timedelta(minutes=5), duration=timedelta(hours=1)
            )
            await dispatcher.advance(timedelta(minutes=5))   # the actor is started
            await dispatcher.update(dispatch.id, payload={"power_w": 2000})  # reconfigured
            await dispatcher.advance(timedelta(hours=1))     # and stopped

Every feeding call returns once the SDK's receivers and managed actors have
taken what it caused (``settle()``); ``dispatch.started``, ``until`` and
``next_run`` read the fake clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self

from frequenz.channels import Receiver
from frequenz.client.dispatch.recurrence import RecurrenceRule

from dispatchd.client._actors import ActorDispatcher, Managing, Timer
from dispatchd.client._dispatch import Dispatch
from dispatchd.client._events import DispatchEvent
from dispatchd.client._fanout import DeliveryCounts, FanOut, ReceiverFetcher
from dispatchd.client._feed import Feed
from dispatchd.client._merge import MergeStrategy, RunningMerger
from dispatchd.core import engine, wire
from dispatchd.core.messages import LifecycleMessage, Message
from dispatchd.core.model import Dispatch as CoreDispatch
from dispatchd.core.model import Recurrence, TargetComponents, TargetIds

__all__ = ["FakeClock", "FakeDispatcher"]

DEFAULT_START: Final = datetime(2026, 1, 1, tzinfo=UTC)
"""Where a fake clock starts unless told otherwise (a fixed instant: tests repeat)."""

_SETTLE_ROUNDS: Final = 10_000
_QUIET_ROUNDS: Final = 5


class FakeClock:
    """A clock that moves only when told; sleepers wake when it passes their time."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        """Start at ``start`` (aware; naive means UTC)."""
        self._now = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        """The fake current time."""
        return self._now

    def __call__(self) -> datetime:
        """The fake current time (a clock for ``Dispatch``)."""
        return self._now

    async def sleep_until(self, moment: datetime) -> None:
        """Return once the clock has been moved to ``moment`` or later."""
        if moment <= self._now:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (moment, next(self._order), future))
        await future

    def next_wakeup(self) -> datetime | None:
        """The earliest time a sleeper waits for."""
        sleepers = self._sleepers
        while sleepers and sleepers[0][2].done():
            heapq.heappop(sleepers)
        return sleepers[0][0] if sleepers else None

    def set(self, moment: datetime) -> None:
        """Move to ``moment`` (never backwards) and wake the sleepers due."""
        self._now = max(self._now, moment)
        sleepers = self._sleepers
        while sleepers and sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(sleepers)
            if not future.done():
                future.set_result(None)


class FakeDispatcher(Managing):
    """``Dispatcher``'s interface fed by the test, through dispatchd's engine.

    ``create``, ``update``, ``delete`` and ``advance`` return once everything
    they caused was taken by the receivers and managed actors (``settle``).
    """

    def __init__(
        self,
        microgrid_id: int = 1,
        *,
        clock: FakeClock | None = None,
        start: datetime = DEFAULT_START,
    ) -> None:
        """A fake for one microgrid, on ``clock`` (a new ``FakeClock`` at ``start``)."""
        self.microgrid_id = int(microgrid_id)
        self.clock = clock if clock is not None else FakeClock(start)
        self.delivery_counts = DeliveryCounts()
        self._engine = engine.Engine()
        self._ids = itertools.count(1)
        self._lifecycle: FanOut[DispatchEvent] = FanOut(
            "lifecycle", hold=1000, counts=self.delivery_counts
        )
        self._main = self._feed("running:*", lifecycle=self._lifecycle)
        self._typed: dict[str, Feed] = {}
        self._managed: dict[str, ActorDispatcher] = {}
        self._started = False
        self._stopped = False

    # --- the Dispatcher interface -----------------------------------------------------

    async def start(self) -> None:
        """Deliver what runs now (as dispatchd's snapshot would), then follow changes."""
        if self._started:
            raise RuntimeError("the dispatcher is already started")
        self._started = True
        await self._main.apply_snapshot(self._snapshot(None))

    async def stop(self) -> None:
        """Stop every managed actor and end every receiver."""
        if self._stopped:
            return
        self._stopped = True
        await self._stop_managing_all()
        for feed in (self._main, *self._typed.values()):
            await feed.close()
        await self._lifecycle.close()

    async def __aenter__(self) -> Self:
        """``start()``."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """``stop()``."""
        await self.stop()

    @property
    def lifecycle_events(self) -> ReceiverFetcher[DispatchEvent]:
        """``Created``/``Updated``/``Deleted`` of every dispatch."""
        return ReceiverFetcher(self._lifecycle)

    def new_lifecycle_events_receiver(
        self, type: str, *, name: str | None = None, limit: int = 50
    ) -> Receiver[DispatchEvent]:
        """Lifecycle events of one type."""
        return self._lifecycle.new_receiver(name=name, limit=limit).filter(
            lambda event: event.dispatch.type == type
        )

    @property
    def running_status_change(self) -> ReceiverFetcher[Dispatch]:
        """Running-state changes of every type (starting with what runs now)."""
        return ReceiverFetcher(self._main.running)

    async def new_running_state_event_receiver(
        self,
        type: str,
        merge_strategy: MergeStrategy | None = None,
        *,
        name: str | None = None,
        limit: int = 50,
    ) -> Receiver[Dispatch]:
        """Running-state changes of one type (starting with what of it runs now)."""
        if not self._started or self._stopped:
            raise RuntimeError("start the dispatcher first")
        feed = self._typed.get(type)
        if feed is None:
            feed = self._typed[type] = self._feed(f"running:{type}", lifecycle=None)
            await feed.apply_snapshot(self._snapshot(type))
        merger = RunningMerger(merge_strategy, type) if merge_strategy is not None else None
        return feed.running.new_receiver(
            name=name, limit=limit, transform=merger.apply if merger is not None else None
        )

    @property
    def client(self) -> Any:
        """Not available: the fake is fed with ``create``/``update``/``delete``."""
        raise RuntimeError(
            "FakeDispatcher has no dispatch API client: feed it with "
            "create(), update() and delete()"
        )

    def _managing_timer(self) -> Timer:
        return self.clock

    # --- feeding ----------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        """The fake clock's time."""
        return self.clock.now()

    async def create(
        self,
        type: str,
        *,
        start_time: datetime | None = None,
        start_in: timedelta | None = None,
        duration: timedelta | None,
        target: TargetComponents | None = None,
        active: bool = True,
        dry_run: bool = False,
        payload: Mapping[str, Any] | None = None,
        recurrence: Recurrence | RecurrenceRule | None = None,
    ) -> Dispatch:
        """Create a dispatch, as the dispatch API would; it starts at ``start_time``
        (default: now) or ``start_in`` from now. Returns the created version."""
        now = self.now
        start = start_time if start_time is not None else now + (start_in or timedelta(0))
        created = CoreDispatch(
            id=next(self._ids),
            microgrid_id=self.microgrid_id,
            type=type,
            start_time=start,
            duration=duration,
            target=target if target is not None else TargetIds(),
            active=active,
            dry_run=dry_run,
            payload=dict(payload or {}),
            recurrence=_recurrence(recurrence),
            create_time=now,
            update_time=now,
        )
        await self._emit(self._engine.apply(engine.Created(created), now).messages)
        return Dispatch(created, clock=self.clock)

    async def update(self, dispatch_id: int, **fields: Any) -> Dispatch:
        """Change fields of a dispatch (``type``, ``start_time``, ``duration``,
        ``target``, ``active``, ``dry_run``, ``payload``, ``recurrence``)."""
        current = self._current(dispatch_id)
        if "recurrence" in fields:
            fields["recurrence"] = _recurrence(fields["recurrence"])
        if "payload" in fields:
            fields["payload"] = dict(fields["payload"])
        version = max(self.now, current.update_time + timedelta(microseconds=1))
        updated = replace(current, update_time=version, **fields)
        await self._emit(self._engine.apply(engine.Updated(updated), self.now).messages)
        return Dispatch(updated, clock=self.clock)

    async def delete(self, dispatch_id: int) -> None:
        """Delete a dispatch (a running one stops)."""
        current = self._current(dispatch_id)
        await self._emit(self._engine.apply(engine.Deleted(current), self.now).messages)

    async def advance(self, by: timedelta) -> None:
        """Move the clock by ``by``; see ``advance_to``."""
        await self.advance_to(self.now + by)

    async def advance_to(self, moment: datetime) -> None:
        """Move the clock to ``moment``, stopping at every instant something is due.

        At each such instant (a start or end of an occurrence, a retry of a
        failed actor start) the messages dispatchd would send are delivered
        and the actors settle before the clock moves on.
        """
        while True:
            due = [t for t in (self._engine.next_deadline(), self.clock.next_wakeup()) if t]
            instant = min(due, default=None)
            if instant is None or instant > moment:
                break
            self.clock.set(instant)
            await self._emit(self._engine.advance(instant).messages)
        self.clock.set(moment)
        await self._emit(self._engine.advance(moment).messages)

    async def settle(self) -> None:
        """Wait until the receivers and managed actors took everything delivered.

        Waits for the consumers that are waiting on a receiver (a task's
        ``async for``, a managed actor's update loop) to take what arrived and
        finish that step; messages for a receiver the test reads itself stay
        there. Raises ``RuntimeError`` when consumers never catch up.
        """
        quiet = 0
        for _ in range(_SETTLE_ROUNDS):
            await asyncio.sleep(0)
            quiet = quiet + 1 if self._settled() else 0
            if quiet >= _QUIET_ROUNDS:  # consumers also finished the step they took
                return
        raise RuntimeError("FakeDispatcher.settle: receivers or actors never caught up")

    # --- internals ----------------------------------------------------------------------

    def _feed(self, name: str, *, lifecycle: FanOut[DispatchEvent] | None) -> Feed:
        return Feed(
            name,
            lifecycle=lifecycle,
            hold_running=False,
            counts=self.delivery_counts,
            clock=self.clock,
        )

    def _snapshot(self, dispatch_type: str | None) -> wire.SnapshotReply:
        entries = self._engine.snapshot(self.microgrid_id, dispatch_type)
        return wire.SnapshotReply(
            microgrid_id=self.microgrid_id,
            as_of=self.now,
            synced=True,
            entries=tuple(entries),
        )

    def _current(self, dispatch_id: int) -> CoreDispatch:
        record = self._engine.export_record((self.microgrid_id, int(dispatch_id)))
        if record is None or record.tombstone:
            raise KeyError(f"no dispatch {dispatch_id} in the fake")
        return record.dispatch

    async def _emit(self, messages: list[Message]) -> None:
        """Deliver as the broker would: to the main queue and the typed queues."""
        if self._started and not self._stopped:
            for message in messages:
                await self._main.deliver(message)
                if not isinstance(message, LifecycleMessage):
                    typed = self._typed.get(message.dispatch.type)
                    if typed is not None:
                        await typed.deliver(message)
        await self.settle()

    def _settled(self) -> bool:
        running = [self._main.running, *(feed.running for feed in self._typed.values())]
        receivers_settled = all(r.settled for r in self._lifecycle.receivers()) and all(
            r.settled for fan_out in running for r in fan_out.receivers()
        )
        return receivers_settled and all(m.settled for m in self._managed.values())


def _recurrence(rule: Recurrence | RecurrenceRule | None) -> Recurrence | None:
    if isinstance(rule, RecurrenceRule):
        return Recurrence.from_client(rule)
    return rule
