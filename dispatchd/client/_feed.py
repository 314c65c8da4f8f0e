"""What one subscription delivers, whatever brings the messages.

A ``Feed`` turns decoded messages and snapshot replies into what the
receivers get: duplicates dropped, running states fanned out (coalesced per
dispatch when a receiver is slow), lifecycle events to the lifecycle stream.
The AMQP subscription drives one per queue; the testing fake drives them
straight from the core engine.

A durable queue's backlog (what the broker kept while the actor was down)
is delivered before the start-up snapshot is applied: every kept message in
order, with its own ``announced.scheduled_for``, so the actor sees the runs
it missed. The snapshot then fills in only the dispatches the backlog says
nothing newer about.
"""

from __future__ import annotations

from typing import Final

from dispatchd.client._dispatch import Clock, Dispatch, system_now
from dispatchd.client._events import DispatchEvent
from dispatchd.client._fanout import DeliveryCounts, FanOut
from dispatchd.client._state import LifecycleFilter, RunningTracker
from dispatchd.core import wire
from dispatchd.core.messages import LifecycleMessage, Message

__all__ = ["Feed"]

RUNNING_HOLD: Final = 1000
"""Running messages of a durable subscription kept for its first receiver
(coalesced per dispatch beyond this)."""


def _dispatch_id(dispatch: Dispatch) -> int:
    return dispatch.id


class Feed:
    """Duplicate filters, the backlog gate and the fan-outs of one subscription."""

    def __init__(
        self,
        name: str,
        *,
        lifecycle: FanOut[DispatchEvent] | None,
        hold_running: bool,
        counts: DeliveryCounts,
        clock: Clock = system_now,
    ) -> None:
        """``hold_running``: keep running messages for the first receiver (durable queues)."""
        self.tracker = RunningTracker(clock)
        self.running: FanOut[Dispatch] = FanOut(
            name,
            prime=self.tracker.running_now,
            hold=RUNNING_HOLD if hold_running else 0,
            key=_dispatch_id,
            counts=counts,
        )
        self._lifecycle = lifecycle
        self._lifecycle_filter = LifecycleFilter(clock=clock)
        self._backlog = 0
        self._after_backlog: wire.SnapshotReply | None = None

    async def expect_backlog(self, count: int, snapshot: wire.SnapshotReply) -> None:
        """The next ``count`` messages are a backlog: apply ``snapshot`` after them."""
        if count <= 0:
            await self.apply_snapshot(snapshot)
            return
        self._backlog = count
        self._after_backlog = snapshot

    async def apply_snapshot(self, reply: wire.SnapshotReply) -> None:
        """Deliver what the snapshot says that was not delivered yet."""
        for dispatch in self.tracker.apply_snapshot(reply):
            await self.running.send(dispatch)

    async def deliver(self, message: Message, message_id: str | None = None) -> None:
        """One decoded message (``message_id`` as the broker gave it, if any)."""
        if isinstance(message, LifecycleMessage):
            if self._lifecycle is not None:
                event = self._lifecycle_filter.accept(
                    message, message_id or wire.message_id(message)
                )
                if event is not None:
                    await self._lifecycle.send(event)
        else:
            dispatch = self.tracker.accept(message)
            if dispatch is not None:
                await self.running.send(dispatch)
        await self.skipped()

    @property
    def backlog_left(self) -> int:
        """Backlog messages not consumed yet (0 once the snapshot was applied)."""
        return self._backlog

    async def end_backlog(self) -> None:
        """Apply the held snapshot now: the rest of the backlog will not come
        (another consumer of the queue took it, or it expired)."""
        self._backlog = 0
        if self._after_backlog is not None:
            snapshot, self._after_backlog = self._after_backlog, None
            await self.apply_snapshot(snapshot)

    async def skipped(self) -> None:
        """A message was consumed without delivery (rejected): it still counts as backlog."""
        if self._backlog <= 0:
            return
        self._backlog -= 1
        if self._backlog == 0:
            await self.end_backlog()

    async def close(self) -> None:
        """End the running receivers."""
        await self.running.close()
