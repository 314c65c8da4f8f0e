"""One test per numbered consequence of docs/scheduling.md, with exact message sequences.

Running summaries are ``("R", id, event, reason, occurrence start, occurrence
end, until, scheduled_for, emitted_at, sequence, running_state_change_synced)``
in seconds after T0; lifecycle ones are ``("L", id, event, routing_type)``.
"""

from __future__ import annotations

from dispatchd.core.engine import Created, Deleted, Engine, Updated
from dispatchd.core.messages import RunningMessage
from dispatchd.core.model import TargetIds
from tests.core.engine_helpers import (
    at,
    bump,
    engine_with,
    make,
    run_until,
    summaries,
)


def test_consequence_01_one_shot_runs_then_stops() -> None:
    engine, created = engine_with(make(start=10, duration=20))
    assert summaries(created) == [("L", 1, "created", "PEAK")]
    assert engine.next_deadline() == at(10)
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "running", "started", 10, 30, 30, 10, 10, 1, None),
        ("R", 1, "stopped", "ended", 10, 30, None, 30, 30, 2, 10),
    ]
    assert engine.next_deadline() is None


def test_consequence_02_infinite_duration_never_stops() -> None:
    engine, _ = engine_with(make(start=10, duration=None, every=60, count=3))
    assert summaries(run_until(engine, 10_000)) == [
        ("R", 1, "running", "started", 10, None, None, 10, 10, 1, None),
    ]
    assert engine.next_deadline() is None


def test_consequence_03_recurring_count_and_inclusive_until() -> None:
    expected = [
        ("R", 1, "running", "started", 60, 70, 70, 60, 60, 1, None),
        ("R", 1, "stopped", "ended", 60, 70, None, 70, 70, 2, 60),
        ("R", 1, "running", "started", 120, 130, 130, 120, 120, 3, 70),
        ("R", 1, "stopped", "ended", 120, 130, None, 130, 130, 4, 120),
        ("R", 1, "running", "started", 180, 190, 190, 180, 180, 5, 130),
        ("R", 1, "stopped", "ended", 180, 190, None, 190, 190, 6, 180),
    ]
    by_count, _ = engine_with(make(start=60, duration=10, every=60, count=3))
    assert summaries(run_until(by_count, 1000)) == expected
    by_until, _ = engine_with(make(start=60, duration=10, every=60, until=180))
    assert summaries(run_until(by_until, 1000)) == expected


def test_consequence_04_overlap_restarts_without_stop_in_between() -> None:
    engine, _ = engine_with(make(start=60, duration=90, every=60, count=3))
    assert summaries(run_until(engine, 1000)) == [
        ("R", 1, "running", "started", 60, 150, 150, 60, 60, 1, None),
        ("R", 1, "running", "started", 120, 210, 210, 120, 120, 2, 60),
        ("R", 1, "running", "started", 180, 270, 270, 180, 180, 3, 120),
        ("R", 1, "stopped", "ended", 180, 270, None, 270, 270, 4, 180),
    ]


def test_consequence_05_back_to_back_stops_once_at_the_end() -> None:
    engine, _ = engine_with(make(start=60, duration=60, every=60, count=3))
    assert summaries(run_until(engine, 1000)) == [
        ("R", 1, "running", "started", 60, 120, 120, 60, 60, 1, None),
        ("R", 1, "running", "started", 120, 180, 180, 120, 120, 2, 60),
        ("R", 1, "running", "started", 180, 240, 240, 180, 180, 3, 120),
        ("R", 1, "stopped", "ended", 180, 240, None, 240, 240, 4, 180),
    ]


def test_consequence_06_duration_zero_pulses_running_then_stopped() -> None:
    engine, _ = engine_with(make(start=60, duration=0, every=60, count=2))
    assert summaries(run_until(engine, 1000)) == [
        ("R", 1, "running", "started", 60, 60, 60, 60, 60, 1, None),
        ("R", 1, "stopped", "ended", 60, 60, None, 60, 60, 2, 60),
        ("R", 1, "running", "started", 120, 120, 120, 120, 120, 3, 60),
        ("R", 1, "stopped", "ended", 120, 120, None, 120, 120, 4, 120),
    ]


def test_consequence_07_created_inside_an_occurrence_runs_at_once() -> None:
    engine, created = engine_with(make(start=10, duration=20), now=20)
    assert summaries(created) == [
        ("L", 1, "created", "PEAK"),
        ("R", 1, "running", "created", 10, 30, 30, 20, 20, 1, None),
    ]
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "stopped", "ended", 10, 30, None, 30, 30, 2, 20),
    ]


def test_consequence_08_created_in_the_past_is_lifecycle_only() -> None:
    engine, created = engine_with(make(start=10, duration=20), now=50)
    assert summaries(created) == [("L", 1, "created", "PEAK")]
    assert engine.next_deadline() is None
    assert run_until(engine, 1000) == []


def test_consequence_09_runtime_change_while_running_reconfigures() -> None:
    original = make(start=10, duration=20)
    engine, _ = engine_with(original)
    run_until(engine, 12)
    payload = bump(original, 1, payload={"power": 2})
    target = bump(payload, 2, target=TargetIds(9))
    duration = bump(target, 3, duration=25)
    dry_run = bump(duration, 4, dry_run=True)
    assert summaries(engine.apply(Updated(payload), at(13)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "reconfigured", 10, 30, 30, 13, 13, 2, 10),
    ]
    assert summaries(engine.apply(Updated(target), at(14)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "reconfigured", 10, 30, 30, 14, 14, 3, 13),
    ]
    assert summaries(engine.apply(Updated(duration), at(15)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "reconfigured", 10, 35, 35, 15, 15, 4, 14),
    ]
    reconfigured = engine.apply(Updated(dry_run), at(16)).messages
    assert summaries(reconfigured) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "reconfigured", 10, 35, 35, 16, 16, 5, 15),
    ]
    message = reconfigured[1]
    assert isinstance(message, RunningMessage)
    assert message.dispatch == dry_run
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "stopped", "ended", 10, 35, None, 35, 35, 6, 16),
    ]


def test_consequence_10_duration_shortened_into_the_past_stops_now() -> None:
    original = make(start=10, duration=20)
    engine, _ = engine_with(original)
    run_until(engine, 20)
    assert summaries(engine.apply(Updated(bump(original, 1, duration=5)), at(20)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "stopped", "ended", 10, 30, None, 20, 20, 2, 10),
    ]
    assert run_until(engine, 100) == []


def test_consequence_11_start_moved_later_stops_now_and_runs_later() -> None:
    original = make(start=10, duration=20)
    engine, _ = engine_with(original)
    run_until(engine, 15)
    assert summaries(engine.apply(Updated(bump(original, 1, start_time=40)), at(15)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "stopped", "ended", 10, 30, None, 15, 15, 2, 10),
    ]
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "running", "started", 40, 60, 60, 40, 40, 3, 15),
        ("R", 1, "stopped", "ended", 40, 60, None, 60, 60, 4, 40),
    ]


def test_consequence_12_start_moved_earlier_runs_now() -> None:
    original = make(start=20, duration=20)
    engine, _ = engine_with(original)
    run_until(engine, 5)
    assert summaries(engine.apply(Updated(bump(original, 1, start_time=0)), at(5)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "started", 0, 20, 20, 5, 5, 1, None),
    ]
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "stopped", "ended", 0, 20, None, 20, 20, 2, 5),
    ]


def test_consequence_13_deactivate_stops_and_reactivate_starts() -> None:
    original = make(start=10, duration=20)
    engine, _ = engine_with(original)
    run_until(engine, 12)
    inactive = bump(original, 1, active=False)
    assert summaries(engine.apply(Updated(inactive), at(15)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "stopped", "deactivated", 10, 30, None, 15, 15, 2, 10),
    ]
    assert engine.next_deadline() is None
    assert summaries(engine.apply(Updated(bump(inactive, 2, active=True)), at(20)).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "started", 10, 30, 30, 20, 20, 3, 15),
    ]
    assert summaries(run_until(engine, 100)) == [
        ("R", 1, "stopped", "ended", 10, 30, None, 30, 30, 4, 20),
    ]


def test_consequence_14_deleted_while_running_or_idle() -> None:
    running = make(1, start=10, duration=20)
    idle = make(2, start=50, duration=20)
    engine, _ = engine_with(running, idle)
    run_until(engine, 15)
    assert summaries(engine.apply(Deleted(running), at(15)).messages) == [
        ("L", 1, "deleted", "PEAK"),
        ("R", 1, "stopped", "deleted", 10, 30, None, 15, 15, 2, 10),
    ]
    assert summaries(engine.apply(Deleted(idle), at(16)).messages) == [("L", 2, "deleted", "PEAK")]
    assert engine.next_deadline() is None
    assert run_until(engine, 1000) == []


def test_consequence_15_type_change_while_running_stops_old_type_first() -> None:
    original = make(start=10, duration=20, type="OLD", payload={"power": 1})
    engine, _ = engine_with(original)
    run_until(engine, 12)
    renamed = bump(original, 1, type="NEW", payload={"power": 2})
    messages = engine.apply(Updated(renamed), at(15)).messages
    assert summaries(messages) == [
        ("L", 1, "updated", "OLD"),
        ("L", 1, "updated", "NEW"),
        ("R", 1, "stopped", "type_changed", 10, 30, None, 15, 15, 2, 10),
        ("R", 1, "running", "reconfigured", 10, 30, 30, 15, 15, 3, 15),
    ]
    stopped, running = messages[2], messages[3]
    assert isinstance(stopped, RunningMessage) and isinstance(running, RunningMessage)
    assert stopped.dispatch == original and stopped.routing_type == "OLD"
    assert running.dispatch == renamed and running.routing_type == "NEW"
    assert all(m.dispatch == renamed for m in messages[:2])


def test_consequence_15_type_change_that_also_stops_is_heard_by_the_old_type() -> None:
    original = make(start=10, duration=20, type="OLD")
    engine, _ = engine_with(original)
    run_until(engine, 12)
    moved = bump(original, 1, type="NEW", start_time=100)
    messages = engine.apply(Updated(moved), at(15)).messages
    assert summaries(messages) == [
        ("L", 1, "updated", "OLD"),
        ("L", 1, "updated", "NEW"),
        ("R", 1, "stopped", "type_changed", 10, 30, None, 15, 15, 2, 10),
    ]
    assert messages[2].routing_type == "OLD"
    assert summaries(run_until(engine, 1000)) == [
        ("R", 1, "running", "started", 100, 120, 120, 100, 100, 3, 15),
        ("R", 1, "stopped", "ended", 100, 120, None, 120, 120, 4, 100),
    ]


def test_consequence_16_update_at_a_boundary_loses_nothing_either_order() -> None:
    original = make(start=10, duration=20, payload={"power": 1})
    at_start = bump(original, 1, payload={"power": 2})
    expected_start = [
        ("R", 1, "running", "started", 10, 30, 30, 10, 10, 1, None),
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "reconfigured", 10, 30, 30, 10, 10, 2, 10),
    ]
    timer_first, _ = engine_with(original)
    race = run_until(timer_first, 10) + timer_first.apply(Updated(at_start), at(10)).messages
    assert summaries(race) == expected_start
    update_first, _ = engine_with(original)
    race = update_first.apply(Updated(at_start), at(10)).messages + run_until(update_first, 10)
    assert summaries(race) == expected_start

    at_end = bump(original, 1, duration=40)
    expected_end = [
        ("R", 1, "stopped", "ended", 10, 30, None, 30, 30, 2, 10),
        ("L", 1, "updated", "PEAK"),
        ("R", 1, "running", "started", 10, 50, 50, 30, 30, 3, 30),
    ]
    timer_first, _ = engine_with(original)
    run_until(timer_first, 20)
    race = run_until(timer_first, 30) + timer_first.apply(Updated(at_end), at(30)).messages
    assert summaries(race) == expected_end
    update_first, _ = engine_with(original)
    run_until(update_first, 20)
    race = update_first.apply(Updated(at_end), at(30)).messages + run_until(update_first, 30)
    assert summaries(race) == expected_end


def test_consequence_17_same_instant_starts_before_stops_by_id() -> None:
    engine, _ = engine_with(
        make(5, start=10, duration=20),
        make(4, start=10, duration=20),
        make(3, start=30, duration=20),
        make(2, start=30, duration=0),
        make(1, start=30, duration=20),
    )
    run_until(engine, 20)
    assert summaries(run_until(engine, 30)) == [
        ("R", 1, "running", "started", 30, 50, 50, 30, 30, 1, None),
        ("R", 2, "running", "started", 30, 30, 30, 30, 30, 1, None),
        ("R", 3, "running", "started", 30, 50, 50, 30, 30, 1, None),
        ("R", 2, "stopped", "ended", 30, 30, None, 30, 30, 2, 30),
        ("R", 4, "stopped", "ended", 10, 30, None, 30, 30, 2, 10),
        ("R", 5, "stopped", "ended", 10, 30, None, 30, 30, 2, 10),
    ]


def test_consequence_18_change_invisible_to_the_actor_is_lifecycle_only() -> None:
    original = make(start=60, duration=10, every=60, count=3)
    engine, _ = engine_with(original)
    run_until(engine, 65)
    longer = bump(original, 1, recurrence=make(every=60, count=5).recurrence)
    assert summaries(engine.apply(Updated(longer), at(65)).messages) == [
        ("L", 1, "updated", "PEAK")
    ]
    assert summaries(engine.apply(Updated(bump(longer, 2)), at(66)).messages) == [
        ("L", 1, "updated", "PEAK")
    ]
    starts = [m for m in run_until(engine, 1000) if m.event.value == "running"]
    assert [m.occurrence.start for m in starts if isinstance(m, RunningMessage)] == [
        at(120),
        at(180),
        at(240),
        at(300),
    ]


def test_idle_payload_change_sends_no_stop() -> None:
    """The library's spurious stop for an idle dispatch is gone (table, last row)."""
    original = make(start=100, duration=20)
    engine, _ = engine_with(original)
    assert summaries(
        engine.apply(Updated(bump(original, 1, payload={"x": 1})), at(5)).messages
    ) == [("L", 1, "updated", "PEAK")]


def test_engine_is_reusable_across_microgrids() -> None:
    engine = Engine()
    engine.apply(Created(make(1, microgrid_id=1)), at(0))
    engine.apply(Created(make(1, microgrid_id=2, start=20)), at(0))
    messages = run_until(engine, 25)
    assert [(m.dispatch.microgrid_id, m.event.value) for m in messages] == [
        (1, "running"),
        (2, "running"),
    ]
