"""Lifecycle rules, re-lists, restarts, persistence and queries of the engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from dispatchd.core.engine import Created, Deleted, Engine, Updated
from dispatchd.core.messages import Message, RunningMessage
from dispatchd.core.model import Dispatch, Frequency, Recurrence
from tests.core.engine_helpers import (
    MG,
    at,
    bump,
    engine_with,
    make,
    persist,
    reload,
    run_until,
    summaries,
)

# --- stale events and tombstones ----------------------------------------------


def test_stale_events_are_ignored_without_a_message() -> None:
    original = make(start=10, duration=20, updated=5)
    engine, _ = engine_with(original)
    same_time = bump(original, 5, payload={"power": 9})
    older = bump(original, 4, payload={"power": 9})
    assert engine.apply(Updated(same_time), at(1)).messages == []
    assert engine.apply(Created(older), at(2)).messages == []
    assert engine.snapshot(MG)[0].dispatch == original
    assert engine.relist(MG, [older], at(3), initial=False).messages == []


def test_deleted_ids_stay_deleted() -> None:
    original = make(start=10, duration=20, updated=1)
    engine, _ = engine_with(original)
    assert summaries(engine.apply(Deleted(original), at(2)).messages) == [
        ("L", 1, "deleted", "PEAK")
    ]
    newer = bump(original, 9, payload={"power": 2})
    assert engine.apply(Updated(newer), at(3)).messages == []
    assert engine.apply(Created(newer), at(4)).messages == []
    assert engine.apply(Deleted(newer), at(5)).messages == []
    assert engine.relist(MG, [newer], at(6), initial=False).messages == []
    assert engine.snapshot(MG) == []
    assert run_until(engine, 100) == []


def test_delete_carrying_a_missed_type_change_reaches_both_types() -> None:
    original = make(start=10, duration=20, type="OLD")
    engine, _ = engine_with(original)
    run_until(engine, 12)
    last = bump(original, 3, type="NEW")
    messages = engine.apply(Deleted(last), at(15)).messages
    assert summaries(messages) == [
        ("L", 1, "deleted", "OLD"),
        ("L", 1, "deleted", "NEW"),
        ("R", 1, "stopped", "deleted", 10, 30, None, 15, 15, 2, 10),
    ]
    assert messages[2].routing_type == "OLD"
    assert all(m.dispatch == last for m in messages[:2])


def test_delete_of_an_unknown_id_is_silent_but_final() -> None:
    engine = Engine()
    ghost = make(3, start=10, duration=20)
    assert engine.apply(Deleted(ghost), at(0)).messages == []
    assert engine.apply(Created(ghost), at(1)).messages == []
    assert engine.snapshot(MG) == []


def test_updated_event_for_an_unknown_id_is_its_creation() -> None:
    engine = Engine()
    assert summaries(engine.apply(Updated(make(start=10)), at(0)).messages) == [
        ("L", 1, "created", "PEAK")
    ]


def test_type_change_while_idle_is_updated_under_both_types_only() -> None:
    original = make(start=100, duration=20, type="A")
    engine, _ = engine_with(original)
    assert summaries(engine.apply(Updated(bump(original, 1, type="B")), at(5)).messages) == [
        ("L", 1, "updated", "A"),
        ("L", 1, "updated", "B"),
    ]
    assert [m.dispatch.type for m in run_until(engine, 200)] == ["B", "B"]


# --- re-lists -------------------------------------------------------------------


def test_relist_diffs_created_updated_deleted_and_forgets_finished() -> None:
    kept = make(1, start=10, duration=20)
    changed = make(2, start=100, duration=20)
    vanished = make(3, start=200, duration=20)
    finished = make(4, start=0, duration=5)
    engine = Engine()
    assert summaries(
        engine.relist(MG, [kept, changed, vanished, finished], at(1), initial=True).messages
    ) == [
        ("L", 1, "created", "PEAK"),
        ("L", 2, "created", "PEAK"),
        ("L", 3, "created", "PEAK"),
        ("L", 4, "created", "PEAK"),
        ("R", 4, "running", "created", 0, 5, 5, 1, 1, 1, None),
    ]
    run_until(engine, 15)
    newcomer = make(5, start=12, duration=20)
    step = engine.relist(
        MG, [kept, bump(changed, 1, dry_run=True), newcomer], at(15), initial=False
    )
    messages = step.messages
    assert summaries(messages) == [
        ("L", 2, "updated", "PEAK"),
        ("L", 5, "created", "PEAK"),
        ("R", 5, "running", "created", 12, 32, 32, 15, 15, 1, None),
        ("L", 3, "deleted", "PEAK"),
    ]
    assert [entry.dispatch.id for entry in engine.snapshot(MG)] == [1, 2, 5]
    assert (MG, 4) in step.records
    ghost = engine.export_record((MG, 4))
    assert ghost is not None and ghost.forgotten and not ghost.tombstone
    assert engine.counts()[MG]["finished"] == 0
    tombstone = engine.export_record((MG, 3))
    assert tombstone is not None and tombstone.tombstone


def test_forgotten_dispatch_that_comes_back_continues_its_sequence() -> None:
    finished = make(1, start=0, duration=5)
    engine = Engine()
    engine.relist(MG, [finished], at(1), initial=True)
    run_until(engine, 10)
    assert engine.relist(MG, [], at(10), initial=False).messages == []
    assert engine.snapshot(MG) == []
    assert engine.apply(Updated(finished), at(11)).messages == []
    revived = bump(finished, 1, start_time=20)
    assert summaries(engine.apply(Updated(revived), at(12)).messages) == [
        ("L", 1, "updated", "PEAK")
    ]
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "running", "started", 20, 25, 25, 20, 20, 3, 5),
        ("R", 1, "stopped", "ended", 20, 25, None, 25, 25, 4, 20),
    ]


def test_relist_deletes_a_running_dispatch_with_a_stop() -> None:
    running = make(1, start=10, duration=20)
    engine, _ = engine_with(running)
    run_until(engine, 12)
    assert summaries(engine.relist(MG, [], at(13), initial=False).messages) == [
        ("L", 1, "deleted", "PEAK"),
        ("R", 1, "stopped", "deleted", 10, 30, None, 13, 13, 2, 10),
    ]


def test_relist_change_learnt_late_is_resumed() -> None:
    original = make(start=100, duration=20)
    engine, _ = engine_with(original)
    moved = bump(original, 1, start_time=10)
    assert summaries(engine.relist(MG, [moved], at(15), initial=False).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "resumed", 10, 30, 30, 15, 15, 1, None),
    ]


def test_relist_of_one_microgrid_leaves_the_others_alone() -> None:
    engine = Engine()
    engine.apply(Created(make(1, microgrid_id=1)), at(0))
    engine.apply(Created(make(1, microgrid_id=2)), at(0))
    assert summaries(engine.relist(1, [], at(1), initial=False).messages) == [
        ("L", 1, "deleted", "PEAK")
    ]
    assert len(engine.snapshot(2)) == 1


def test_relist_rejects_a_dispatch_of_another_microgrid() -> None:
    engine = Engine()
    try:
        engine.relist(1, [make(microgrid_id=2)], at(0), initial=True)
    except ValueError as error:
        assert "microgrid" in str(error)
    else:
        raise AssertionError("accepted a foreign dispatch")


# --- invalid dispatches -----------------------------------------------------------


def test_invalid_dispatch_never_runs_and_is_reported_once() -> None:
    broken = make(start=10, duration=20, interval=0)
    engine = Engine()
    step = engine.apply(Created(broken), at(0))
    created = step.messages
    assert summaries(created) == [("L", 1, "created", "PEAK")]
    reason = engine.invalid_reason((MG, 1))
    assert reason
    assert step.invalid == [((MG, 1), reason)]
    updated = engine.apply(Updated(bump(broken, 1, payload={"x": 1})), at(15))
    assert summaries(updated.messages) == [("L", 1, "updated", "PEAK")]
    assert updated.invalid == []
    assert run_until(engine, 1000) == []
    assert engine.counts()[MG]["invalid"] == 1


def test_by_rules_without_a_frequency_never_run_like_interval_0() -> None:
    """As the API sends it (protobuf, frequency UNSPECIFIED, byhours=[8]): invalid, not one-off."""
    malformed = replace(
        make(start=10, duration=20),
        recurrence=Recurrence(frequency=Frequency.UNSPECIFIED, byhours=(8,)),
    )
    received = Dispatch.from_protobuf(malformed.to_protobuf(), MG)
    engine = Engine()
    step = engine.apply(Created(received), at(0))
    created = step.messages
    assert summaries(created) == [("L", 1, "created", "PEAK")]
    reason = engine.invalid_reason((MG, 1))
    assert reason is not None and "frequency" in reason
    assert step.invalid == [((MG, 1), reason)]
    assert run_until(engine, 1000) == []
    assert engine.counts()[MG]["invalid"] == 1


def test_running_dispatch_made_invalid_stops() -> None:
    original = make(start=10, duration=20, every=60, count=3)
    engine, _ = engine_with(original)
    run_until(engine, 15)
    broken = bump(original, 1, recurrence=make(interval=0).recurrence)
    assert summaries(engine.apply(Updated(broken), at(16)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "stopped", "ended", 10, 30, None, 16, 16, 2, 10),
    ]
    assert engine.invalid_reason((MG, 1)) is not None
    assert run_until(engine, 1000) == []


# --- restart ----------------------------------------------------------------------


def test_restore_then_relist_publishes_only_real_changes() -> None:
    a = make(1, start=10, duration=20)
    b = make(2, start=100, duration=20)
    c = make(3, start=200, duration=20)
    engine = Engine()
    engine.relist(MG, [a, b, c], at(0), initial=True)
    run_until(engine, 15)
    store: dict[Any, Any] = {}
    persist(engine, store)

    restored = reload(store)
    assert restored.resume(at(16)).messages == []
    assert restored.relist(MG, [a, b, c], at(16), initial=True).messages == []
    assert summaries(
        restored.relist(MG, [a, bump(b, 1, payload={"x": 2})], at(17), initial=True).messages
    ) == [
        ("L", 2, "updated", "PEAK"),
        ("L", 3, "deleted", "PEAK"),
    ]
    assert summaries(run_until(restored, 1000)) == [
        ("R", 1, "stopped", "ended", 10, 30, None, 30, 30, 2, 10),
        ("R", 2, "running", "started", 100, 120, 120, 100, 100, 1, None),
        ("R", 2, "stopped", "ended", 100, 120, None, 120, 120, 2, 100),
    ]


def test_resume_dates_missed_boundaries_and_reports_missed_runs() -> None:
    recurring = make(1, start=60, duration=10, every=60, count=5)
    ended = make(2, start=10, duration=100)
    still = make(3, start=10, duration=1000)
    idle = make(4, start=90, duration=10, every=60, count=5, updated=1)
    engine, _ = engine_with(recurring, ended, still)
    engine.apply(Created(bump(idle, 0, active=False)), at(0))
    run_until(engine, 65)
    engine.apply(Updated(idle), at(65))
    store: dict[Any, Any] = {}
    persist(engine, store)

    restored = reload(store)
    resumed = restored.resume(at(185)).messages
    assert summaries(resumed) == [
        ("R", 1, "running", "resumed", 180, 190, 190, 180, 185, 2, 60),
        ("R", 2, "stopped", "ended", 10, 110, None, 110, 185, 2, 10),
    ]
    first = resumed[0]
    assert isinstance(first, RunningMessage)
    assert first.missed_runs == (at(120),)
    # Dispatch 4 was idle and missed its runs: they go with its next running message.
    later = [m for m in run_until(restored, 1000) if m.dispatch.id == 4]
    assert isinstance(later[0], RunningMessage)
    assert later[0].occurrence.start == at(210)
    assert later[0].missed_runs == (at(90), at(150))
    assert all(not m.missed_runs for m in later[1:] if isinstance(m, RunningMessage))


def test_resume_inside_the_announced_occurrence_says_nothing() -> None:
    engine, _ = engine_with(make(start=10, duration=1000))
    run_until(engine, 20)
    store: dict[Any, Any] = {}
    persist(engine, store)
    restored = reload(store)
    assert restored.resume(at(500)).messages == []
    assert summaries(run_until(restored, 2000)) == [
        ("R", 1, "stopped", "ended", 10, 1010, None, 1010, 1010, 2, 10),
    ]


def test_initial_relist_after_restart_reports_missed_runs_of_changed_dispatches() -> None:
    original = make(1, start=1000, duration=10, every=60, count=5)
    engine, _ = engine_with(original)
    store: dict[Any, Any] = {}
    persist(engine, store)
    restored = reload(store)
    assert restored.resume(at(200)).messages == []
    moved = bump(original, 1, start_time=60)
    assert summaries(restored.relist(MG, [moved], at(200), initial=True).messages) == [
        ("L", 1, "updated", "PEAK"),
    ]
    following = run_until(restored, 250)
    assert isinstance(following[0], RunningMessage)
    assert following[0].missed_runs == (at(60), at(120), at(180))


def test_export_restore_round_trip_mid_run_gives_the_same_future() -> None:
    dispatches = [
        make(1, start=10, duration=20),
        make(2, start=60, duration=90, every=60, count=4),
        make(3, start=30, duration=0, every=60, count=3),
        make(4, start=5, duration=None),
        make(5, start=50, duration=30, every=120),
    ]
    engine = Engine()
    engine.relist(MG, dispatches, at(0), initial=True)
    run_until(engine, 130)
    store: dict[Any, Any] = {}
    persist(engine, store)
    restored = reload(store)
    assert restored.resume(at(130)).messages == []

    def future(e: Engine) -> list[Message]:
        out = run_until(e, 200)
        out += e.apply(Updated(bump(dispatches[1], 1, payload={"p": 3})), at(200)).messages
        out += e.apply(Deleted(dispatches[4]), at(210)).messages
        out += run_until(e, 1000)
        return out

    expected = future(engine)
    assert expected
    assert future(restored) == expected
    assert restored.snapshot(MG) == engine.snapshot(MG)


# --- persistence and queries -------------------------------------------------------


def test_each_step_carries_only_the_records_it_changed() -> None:
    engine = Engine()
    changed: set[tuple[int, int]] = set()
    for dispatch in (make(1, start=10), make(2, start=100), make(3, start=200)):
        changed |= engine.apply(Created(dispatch), at(0)).records.keys()
    assert changed == {(MG, 1), (MG, 2), (MG, 3)}
    assert set(engine.advance(at(0)).records) == set()
    step = engine.apply(Updated(bump(make(2, start=100), 1, payload={"a": 1})), at(1))
    assert set(step.records) == {(MG, 2)}
    changed = set()
    while (deadline := engine.next_deadline()) is not None and deadline <= at(15):
        changed |= engine.advance(deadline).records.keys()
    changed |= engine.advance(at(15)).records.keys()
    assert changed == {(MG, 1)}


def test_snapshot_and_counts() -> None:
    engine, _ = engine_with(
        make(1, start=10, duration=20, type="A"),
        make(2, start=100, duration=20, type="B"),
        make(3, start=0, duration=1, type="A"),
        make(4, start=10, duration=20, active=False),
        make(5, start=10, duration=20, interval=0),
        make(6, start=0, duration=None),
    )
    run_until(engine, 15)
    running = engine.snapshot(MG, "A")
    assert [(e.dispatch.id, e.running, e.until, e.sequence) for e in running] == [
        (1, True, at(30), 1),
        (3, False, None, 2),
    ]
    assert engine.snapshot(MG, "B")[0].running is False
    assert engine.snapshot(99) == []
    assert engine.counts() == {
        MG: {"scheduled": 1, "running": 2, "finished": 1, "inactive": 1, "invalid": 1}
    }


def test_clock_stepping_back_does_not_replay() -> None:
    engine, _ = engine_with(make(start=10, duration=20))
    assert len(run_until(engine, 15)) == 1
    assert engine.advance(at(5)).messages == []
    assert engine.advance(at(14)).messages == []


def test_heap_stays_compact_under_many_updates() -> None:
    original = make(1, start=10_000, duration=20)
    engine, _ = engine_with(original)
    for step in range(1, 5000):
        engine.apply(Updated(bump(original, step, start_time=10_000 + step)), at(1))
    assert len(engine._heap) < 2 * 1 + 1024 + 2
    assert engine.next_deadline() == at(10_000 + 4999)


def _dispatch_times(messages: list[Message]) -> list[datetime]:
    return [m.emitted_at for m in messages]


def test_advance_catches_up_in_order_with_lateness_visible() -> None:
    engine, _ = engine_with(make(1, start=10, duration=20), make(2, start=20, duration=5))
    late = engine.advance(at(100)).messages
    assert summaries(late) == [
        ("R", 1, "running", "started", 10, 30, 30, 10, 100, 1, None),
        ("R", 2, "running", "started", 20, 25, 25, 20, 100, 1, None),
        ("R", 2, "stopped", "ended", 20, 25, None, 25, 100, 2, 100),
        ("R", 1, "stopped", "ended", 10, 30, None, 30, 100, 2, 100),
    ]
    assert set(_dispatch_times(late)) == {at(100)}


def test_tombstones_and_forgotten_dispatches_survive_a_restart() -> None:
    deleted = make(1, start=10, duration=20)
    finished = make(2, start=0, duration=5)
    engine = Engine()
    engine.relist(MG, [deleted, finished], at(1), initial=True)
    engine.apply(Deleted(deleted), at(2))
    run_until(engine, 10)
    engine.relist(MG, [], at(10), initial=False)
    store: dict[Any, Any] = {}
    persist(engine, store)

    restored = reload(store)
    resumed = restored.resume(at(11))
    assert resumed.messages == []
    assert resumed.invalid == []
    assert restored.apply(Created(bump(deleted, 5)), at(12)).messages == []
    assert restored.apply(Updated(finished), at(12)).messages == []
    assert summaries(
        restored.apply(Updated(bump(finished, 5, start_time=20)), at(13)).messages
    ) == [("L", 2, "updated", "PEAK")]
    assert summaries(run_until(restored, 22)) == [
        ("R", 2, "running", "started", 20, 25, 25, 20, 20, 3, 5),
    ]


def test_missed_runs_of_two_downtimes_accumulate_across_restarts() -> None:
    recurring = make(1, start=60, duration=10, every=60, count=10)
    engine, _ = engine_with(recurring)
    store: dict[Any, Any] = {}
    persist(engine, store)
    first = reload(store)
    assert first.resume(at(135)).messages == []  # down (0, 135]: 60 and 120 missed
    persist(first, store)
    second = reload(store)
    assert second.resume(at(200)).messages == []  # down again (135, 200]: 180 missed
    persist(second, store)
    third = reload(store)
    assert third.resume(at(201)).messages == []
    following = run_until(third, 245)
    assert summaries(following)[0][:5] == ("R", 1, "running", "started", 240)
    assert isinstance(following[0], RunningMessage)
    assert following[0].missed_runs == (at(60), at(120), at(180))


def test_a_pulse_is_not_repeated_after_a_restart_at_the_same_instant() -> None:
    pulse = make(1, start=30, duration=0)
    engine, _ = engine_with(pulse)
    assert len(run_until(engine, 30)) == 2
    store: dict[Any, Any] = {}
    persist(engine, store)
    restored = reload(store)
    assert restored.resume(at(30)).messages == []
    assert summaries(restored.apply(Updated(bump(pulse, 1)), at(30)).messages) == [
        ("L", 1, "updated", "PEAK")
    ]
