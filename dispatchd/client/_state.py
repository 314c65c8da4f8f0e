"""What one subscription has delivered so far: duplicate filters (pure).

Running messages are deduplicated by ``(dispatch id, sequence)``: the daemon
numbers every running message of a dispatch, so anything at or below the
last sequence delivered (a republished message, a live message the snapshot
already covered, a snapshot older than a live message) is dropped. A
snapshot entry that is not delivered (a stopped dispatch the actor never saw
running) is not remembered either, so the messages of a run that happened
while the snapshot was being taken still arrive. Lifecycle messages are
deduplicated by ``message_id`` in a bounded LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from dispatchd.client._dispatch import Announcement, Clock, Dispatch, system_now
from dispatchd.client._events import Created, Deleted, DispatchEvent, Updated
from dispatchd.core.messages import Event, LifecycleMessage, Reason, RunningMessage
from dispatchd.core.wire import SnapshotReply

__all__ = ["LifecycleFilter", "RunningTracker"]

DEFAULT_LIFECYCLE_MEMORY = 10_000
"""How many lifecycle message ids are remembered; a duplicate arriving later
than this many other lifecycle messages is delivered again."""


def dispatch_of(message: RunningMessage, clock: Clock = system_now) -> Dispatch:
    """The actor's view of a running message."""
    return Dispatch(
        message.dispatch,
        deleted=message.reason is Reason.DELETED,
        announced=Announcement(
            event=message.event,
            reason=message.reason,
            sequence=message.sequence,
            scheduled_for=message.scheduled_for,
            until=message.until,
            occurrence=message.occurrence,
        ),
        running_state_change_synced=message.running_state_change_synced,
        missed_runs=message.missed_runs,
        clock=clock,
    )


class RunningTracker:
    """Drops running duplicates and remembers which dispatches run (for new receivers)."""

    def __init__(self, clock: Clock = system_now) -> None:
        """Nothing seen yet; ``clock`` is what the dispatches' time questions read."""
        self._clock = clock
        self._sequences: dict[int, int] = {}
        self._running: dict[int, Dispatch] = {}

    def accept(self, message: RunningMessage) -> Dispatch | None:
        """The dispatch to deliver, or ``None`` for a duplicate or older message."""
        dispatch_id = message.dispatch.id
        last = self._sequences.get(dispatch_id)
        if last is not None and message.sequence <= last:
            return None
        self._sequences[dispatch_id] = message.sequence
        dispatch = dispatch_of(message, self._clock)
        self._remember(dispatch)
        return dispatch

    def apply_snapshot(self, reply: SnapshotReply) -> list[Dispatch]:
        """What the snapshot tells that was not delivered yet, by dispatch id.

        At start-up that is every running dispatch. After a reconnect it is
        each dispatch whose state moved on while messages were lost: running
        ones (again, with their current data) and ones that stopped. A
        dispatch delivered as running that the snapshot no longer lists was
        deleted (or forgotten) meanwhile: it is delivered stopped and deleted.
        """
        delivered: list[Dispatch] = []
        listed: set[int] = set()
        for entry in reply.entries:
            dispatch_id = entry.dispatch.id
            listed.add(dispatch_id)
            last = self._sequences.get(dispatch_id)
            if last is not None and entry.sequence <= last:
                continue
            if not entry.running and dispatch_id not in self._running:
                continue
            self._sequences[dispatch_id] = entry.sequence
            dispatch = Dispatch(
                entry.dispatch,
                announced=Announcement(
                    event=Event.RUNNING if entry.running else Event.STOPPED,
                    reason=None,
                    sequence=entry.sequence,
                    scheduled_for=None,
                    until=entry.until,
                    from_snapshot=True,
                ),
                clock=self._clock,
            )
            self._remember(dispatch)
            delivered.append(dispatch)
        for dispatch_id in sorted(self._running.keys() - listed):
            previous = self._running.pop(dispatch_id)
            announced = previous.announced
            delivered.append(
                Dispatch(
                    previous.core,
                    deleted=True,
                    announced=Announcement(
                        event=Event.STOPPED,
                        reason=Reason.DELETED,
                        sequence=announced.sequence if announced is not None else 0,
                        scheduled_for=None,
                        until=None,
                        from_snapshot=True,
                    ),
                    clock=self._clock,
                )
            )
        return delivered

    def running_now(self) -> list[Dispatch]:
        """The last delivered running version of every running dispatch, by id."""
        return [self._running[dispatch_id] for dispatch_id in sorted(self._running)]

    def _remember(self, dispatch: Dispatch) -> None:
        announced = dispatch.announced
        if announced is not None and announced.running and not dispatch.deleted:
            self._running[dispatch.id] = dispatch
        else:
            self._running.pop(dispatch.id, None)


_EVENTS: dict[Event, Callable[[Dispatch], DispatchEvent]] = {
    Event.CREATED: Created,
    Event.UPDATED: Updated,
    Event.DELETED: Deleted,
}


class LifecycleFilter:
    """Drops lifecycle duplicates by message id, remembering a bounded number."""

    def __init__(self, memory: int = DEFAULT_LIFECYCLE_MEMORY, clock: Clock = system_now) -> None:
        """``memory``: how many recent keys to remember."""
        self._memory = memory
        self._clock = clock
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def accept(self, message: LifecycleMessage, message_id: str) -> DispatchEvent | None:
        """The event to deliver, or ``None`` for a duplicate.

        Besides the message id, the copy of an ``updated`` that a type change
        sends under the old type (same dispatch, event and update time, other
        id) is a duplicate for a subscriber that receives both types.
        """
        dispatch = message.dispatch
        version = (dispatch.id, message.event, dispatch.update_time)
        if self._seen_before(message_id) | self._seen_before(version):
            return None
        return _EVENTS[message.event](
            Dispatch(dispatch, deleted=message.event is Event.DELETED, clock=self._clock)
        )

    def _seen_before(self, key: Hashable) -> bool:
        seen = self._seen
        if key in seen:
            seen.move_to_end(key)
            return True
        seen[key] = None
        if len(seen) > self._memory:
            seen.popitem(last=False)
        return False
