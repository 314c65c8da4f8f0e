"""``Engine.prepare`` readies the dispatches due soon and changes no answer; which
idle dispatches keep their schedules."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.core.engine import Change, Engine, Step
from dispatchd.core.engine.convergence import KEEP_SCHEDULE
from dispatchd.core.model import Dispatch
from dispatchd.core.recurrence import Invalid, Schedule
from tests.core.engine_harness import Harness, Lockstep, operations
from tests.core.engine_helpers import MG, at, engine_with, make, run_until


class Preparing(Engine):
    """Prepares ahead before every step, as the daemon does before a deadline.

    Checks on each call that ``prepare`` returned exactly the dispatches with a
    boundary due by ``until`` (the pruned heap walk against a full scan).
    """

    lead = timedelta(seconds=45)

    def _ahead(self, now: datetime) -> None:
        until = now + self.lead
        prepared = self.prepare(until)
        expected = [
            record.dispatch
            for records in self._microgrids.values()
            for record in records.values()
            if record.deadline is not None and record.deadline <= until
        ]
        assert sorted(d.id for d in prepared) == sorted(d.id for d in expected)
        assert all(any(p is e for e in expected) for p in prepared)

    def advance(self, now: datetime) -> Step:
        self._ahead(now)
        return super().advance(now)

    def apply(self, change: Change, now: datetime) -> Step:
        self._ahead(now)
        return super().apply(change, now)

    def relist(
        self, microgrid_id: int, dispatches: list[Dispatch], now: datetime, *, initial: bool
    ) -> Step:
        self._ahead(now)
        return super().relist(microgrid_id, dispatches, now, initial=initial)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, min_size=8, max_size=40))
def test_preparing_ahead_changes_no_message(ops: list[tuple[Any, ...]]) -> None:
    harness = Harness()
    harness.engine = Lockstep(Preparing(), Engine())  # type: ignore[assignment]
    for operation in ops:
        harness.step(operation)


def test_prepare_returns_only_what_is_due_by_until() -> None:
    engine = Engine()
    dispatches = [make(i, start=10 * i, duration=5) for i in range(1, 40)]
    engine.relist(MG, dispatches, at(0), initial=True)
    assert [d.id for d in engine.prepare(at(5))] == []
    assert sorted(d.id for d in engine.prepare(at(100))) == list(range(1, 11))
    engine.advance(at(100))
    # started ones are now due at their ends, the next starts after them
    assert sorted(d.id for d in engine.prepare(at(115))) == [10, 11]


def test_prepare_on_an_empty_engine() -> None:
    assert Engine().prepare(at(0)) == []


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many schedules are built from now on, by dispatch id."""
    built: list[int] = []
    original = Schedule.build

    def counting(dispatch: Dispatch) -> Schedule | Invalid:
        built.append(dispatch.id)
        return original(dispatch)

    monkeypatch.setattr(Schedule, "build", staticmethod(counting))
    return built


def test_a_dispatch_starting_again_soon_keeps_its_schedule_while_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = _count_builds(monkeypatch)
    every_minute = make(1, start=10, duration=30, every=60)
    engine, _ = engine_with(every_minute)
    messages = run_until(engine, 10 * 60)

    assert sum(1 for m in messages if m.event.value == "running") == 10
    assert built == [1]  # once, not again at each of its ten starts


def test_a_dispatch_idle_for_long_gives_its_schedule_back_until_its_next_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = _count_builds(monkeypatch)
    idle_long = KEEP_SCHEDULE.total_seconds() + 60
    every_few_minutes = make(1, start=10, duration=30, every=int(idle_long // 60 + 1) * 60)
    engine, _ = engine_with(every_few_minutes)
    messages = run_until(engine, 3 * idle_long + 60)

    starts = sum(1 for m in messages if m.event.value == "running")
    assert starts == 3
    # Built when created (kept: its first start is 10 s away), rebuilt at each later start.
    assert built == [1] * starts
