"""Duplicate filters, pure: running by (dispatch id, sequence), lifecycle by message id."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.client import Created, Deleted, Updated
from dispatchd.client._state import LifecycleFilter, RunningTracker
from dispatchd.core.messages import Event, LifecycleMessage, Reason
from tests.client.helpers import at, core, running_message, snapshot


def test_start_up_snapshot_delivers_the_running_ones_then_live_duplicates_drop() -> None:
    tracker = RunningTracker()
    delivered = tracker.apply_snapshot(snapshot((1, True, 3), (2, False, 2), (3, False, 0)))
    assert [(d.id, d.running("T").name) for d in delivered] == [(1, "RUNNING")]
    first = delivered[0].announced
    assert first is not None and first.from_snapshot and first.sequence == 3
    assert delivered[0].until == at(40)
    # A live message the snapshot already covered (queued before it) drops.
    assert tracker.accept(running_message(core(1), 3)) is None
    assert tracker.accept(running_message(core(1), 2)) is None
    stopped = tracker.accept(running_message(core(1), 4, event=Event.STOPPED, reason=Reason.ENDED))
    assert stopped is not None and stopped.running("T").name == "STOPPED"
    assert tracker.accept(running_message(core(2), 3)) is not None
    assert [d.id for d in tracker.running_now()] == [2]


def test_a_stopped_entry_sets_no_floor_so_a_run_during_the_snapshot_arrives() -> None:
    # A duration-0 dispatch ran while the snapshot was taken: the snapshot
    # says stopped (sequence 2), the queue still holds running 1, stopped 2.
    tracker = RunningTracker()
    assert tracker.apply_snapshot(snapshot((1, False, 2))) == []
    ran = tracker.accept(running_message(core(1, duration=0), 1))
    stopped = tracker.accept(
        running_message(core(1, duration=0), 2, event=Event.STOPPED, reason=Reason.ENDED)
    )
    assert ran is not None and ran.running("T").name == "RUNNING"
    assert stopped is not None and stopped.running("T").name == "STOPPED"
    assert tracker.accept(running_message(core(1, duration=0), 2)) is None


def test_a_snapshot_older_than_live_messages_changes_nothing() -> None:
    tracker = RunningTracker()
    assert tracker.accept(running_message(core(1), 5)) is not None
    assert tracker.apply_snapshot(snapshot((1, False, 4))) == []
    assert tracker.apply_snapshot(snapshot((1, True, 5))) == []
    assert [d.id for d in tracker.running_now()] == [1]


def test_re_snapshot_delivers_what_changed_while_messages_were_lost() -> None:
    tracker = RunningTracker()
    tracker.apply_snapshot(snapshot((1, True, 1), (2, True, 1), (3, True, 1)))
    # Meanwhile: 1 stopped, 2 unchanged, 3 deleted (gone from the list), 4 started.
    changed = tracker.apply_snapshot(snapshot((1, False, 2), (2, True, 1), (4, True, 1)))
    assert [(d.id, d.running("T").name, d.deleted) for d in changed] == [
        (1, "STOPPED", False),
        (4, "RUNNING", False),
        (3, "STOPPED", True),
    ]
    assert [d.id for d in tracker.running_now()] == [2, 4]


def test_deleted_reason_marks_the_dispatch_deleted() -> None:
    tracker = RunningTracker()
    message = running_message(core(1), 2, event=Event.STOPPED, reason=Reason.DELETED)
    dispatch = tracker.accept(message)
    assert dispatch is not None and dispatch.deleted


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 12), max_size=40), st.integers(0, 12))
def test_each_sequence_is_delivered_at_most_once_and_in_increasing_order(
    arrivals: list[int], snapshot_sequence: int
) -> None:
    # Any arrival order with duplicates (republished, redelivered) and a
    # snapshot: what is delivered is strictly increasing, above what the
    # snapshot delivered (a stopped entry delivers nothing, so it sets no floor).
    tracker = RunningTracker()
    tracker.apply_snapshot(snapshot((1, snapshot_sequence % 2 == 1, snapshot_sequence)))
    floor = snapshot_sequence if snapshot_sequence % 2 == 1 else 0
    delivered = []
    for sequence in arrivals:
        event = Event.RUNNING if sequence % 2 else Event.STOPPED
        dispatch = tracker.accept(running_message(core(1), sequence, event=event))
        if dispatch is not None:
            assert dispatch.announced is not None
            delivered.append(dispatch.announced.sequence)
    assert delivered == sorted(set(delivered))
    assert all(sequence > floor for sequence in delivered)
    expected_max = max([s for s in arrivals if s > floor], default=None)
    assert (delivered[-1] if delivered else None) == expected_max
    running = [d.id for d in tracker.running_now()]
    last = max([floor, *arrivals])
    assert running == ([1] if last % 2 == 1 else [])


def lifecycle(
    event: Event, dispatch_id: int = 1, update: float = 0, type: str = "T"
) -> LifecycleMessage:
    return LifecycleMessage(
        event=event,
        dispatch=core(dispatch_id, update_time=at(update)),
        routing_type=type,
        emitted_at=at(update),
    )


def test_lifecycle_duplicates_drop_by_message_id() -> None:
    events = LifecycleFilter()
    created = lifecycle(Event.CREATED)
    first = events.accept(created, "m1")
    assert isinstance(first, Created) and first.dispatch.id == 1
    assert events.accept(created, "m1") is None
    updated = events.accept(lifecycle(Event.UPDATED, update=5), "m2")
    assert isinstance(updated, Updated)
    deleted = events.accept(lifecycle(Event.DELETED, update=5), "m3")
    assert isinstance(deleted, Deleted) and deleted.dispatch.deleted


def test_the_old_type_copy_of_a_type_change_update_is_a_duplicate() -> None:
    events = LifecycleFilter()
    assert events.accept(lifecycle(Event.UPDATED, update=5, type="OLD"), "a") is not None
    assert events.accept(lifecycle(Event.UPDATED, update=5, type="NEW"), "b") is None


def test_lifecycle_memory_is_bounded() -> None:
    events = LifecycleFilter(memory=4)
    messages = [lifecycle(Event.UPDATED, update=i) for i in range(3)]
    for index, message in enumerate(messages):
        assert events.accept(message, f"id{index}") is not None
    # Each message takes two keys (id and version): the first ones are forgotten.
    assert events.accept(messages[0], "id0") is not None
    assert events.accept(messages[2], "id2") is None
