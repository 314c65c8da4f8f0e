"""A restart waits for the first list before converging the downtime (``Engine.hold``)."""

from __future__ import annotations

from typing import Any

from dispatchd.core.engine import Engine
from dispatchd.core.messages import RunningMessage
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


def _restarted(engine: Engine, down_until: float) -> Engine:
    store: dict[Any, Any] = {}
    persist(engine, store)
    restored = reload(store)
    restored.hold(at(down_until))
    return restored


def test_changes_made_while_down_get_no_running_for_the_stale_occurrence() -> None:
    moved = make(1, start=100, duration=50)
    deleted = make(2, start=100, duration=50)
    deactivated = make(3, start=100, duration=50)
    extended = make(4, start=10, duration=50)
    engine, _ = engine_with(moved, deleted, deactivated, extended)
    run_until(engine, 20)  # 4 announced running [10, 60); the others not started yet

    restored = _restarted(engine, 120)
    assert run_until(restored, 121) == []
    listed = [
        bump(moved, 1, start_time=300),
        bump(deactivated, 1, active=False),
        bump(extended, 1, duration=500),
    ]
    assert summaries(restored.relist(MG, listed, at(122), initial=True).messages) == [
        ("L", 1, "updated", "PEAK"),
        ("L", 3, "updated", "PEAK"),
        ("L", 4, "updated", "PEAK"),
        ("R", 4, "running", "reconfigured", 10, 510, 510, 122, 122, 2, 10),
        ("L", 2, "deleted", "PEAK"),
    ]
    assert restored.held() == set()
    assert summaries(run_until(restored, 1000)) == [
        ("R", 1, "running", "started", 300, 350, 350, 300, 300, 1, None),
        ("R", 1, "stopped", "ended", 300, 350, None, 350, 350, 2, 300),
        ("R", 4, "stopped", "ended", 10, 510, None, 510, 510, 3, 122),
    ]


def test_while_held_later_boundaries_are_on_time_and_the_downtime_waits() -> None:
    long = make(1, start=10, duration=190)  # announced, ends at 200, after the restart
    short = make(2, start=10, duration=50)  # announced, ended at 60, in the downtime
    later = make(3, start=150, duration=10)  # starts while the list is awaited
    unseen = make(4, start=70, duration=100)  # started in the downtime, still running
    engine, _ = engine_with(long, short, later, unseen)
    run_until(engine, 20)

    restored = _restarted(engine, 100)
    assert restored.held() == {MG}
    assert summaries(run_until(restored, 250)) == [
        ("R", 3, "running", "started", 150, 160, 160, 150, 150, 1, None),
        ("R", 3, "stopped", "ended", 150, 160, None, 160, 160, 2, 150),
        ("R", 1, "stopped", "ended", 10, 200, None, 200, 200, 2, 10),
    ]
    resumed = restored.resume(at(260), MG).messages
    assert summaries(resumed) == [
        ("R", 2, "stopped", "ended", 10, 60, None, 60, 260, 2, 10),
    ]
    assert restored.held() == set()


def test_a_finished_dispatch_missing_from_the_first_list_is_stopped_then_forgotten() -> None:
    ended = make(1, start=10, duration=50)
    engine, _ = engine_with(ended)
    run_until(engine, 20)
    restored = _restarted(engine, 100)
    assert summaries(restored.relist(MG, [], at(101), initial=True).messages) == [
        ("R", 1, "stopped", "ended", 10, 60, None, 60, 101, 2, 10),
    ]
    assert restored.snapshot(MG) == []


def test_missed_runs_while_held_go_with_the_next_running_message() -> None:
    recurring = make(1, start=60, duration=10, every=60, count=10)
    engine, _ = engine_with(recurring)
    run_until(engine, 30)
    restored = _restarted(engine, 200)
    following = run_until(restored, 245)
    assert isinstance(following[0], RunningMessage)
    assert following[0].occurrence.start == at(240)
    assert following[0].missed_runs == (at(60), at(120), at(180))
    assert restored.relist(MG, [recurring], at(246), initial=True).messages == []


def test_relist_after_a_lost_stream_reports_runs_missed_by_a_dispatch_created_meanwhile() -> None:
    """Created while the stream was down (lost at 100): its runs at 120 and 180 began
    and ended unseen; the re-list at 200 keeps them for its next running message."""
    engine, _ = engine_with(make(1, start=1000, duration=10))
    created_meanwhile = make(2, start=120, duration=10, every=60, count=5, updated=110)
    listed = [make(1, start=1000, duration=10), created_meanwhile]
    assert summaries(
        engine.relist(MG, listed, at(200), initial=False, unseen_since=at(100)).messages
    ) == [
        ("L", 2, "created", "PEAK"),
    ]
    following = run_until(engine, 245)
    assert isinstance(following[0], RunningMessage)
    assert following[0].occurrence.start == at(240)
    assert following[0].missed_runs == (at(120), at(180))
