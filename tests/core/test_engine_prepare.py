"""``Engine.prepare`` readies the dispatches due soon and changes no answer."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.core.engine import Change, Engine, Step
from dispatchd.core.model import Dispatch
from tests.core.engine_helpers import MG, at, make
from tests.core.test_engine_properties import Harness, Lockstep, operations


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
