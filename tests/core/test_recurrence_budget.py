"""Rule evaluation has a step budget: sparse rules are refused at once, and
the budgeted walk gives exactly dateutil's starts for every rule within it."""

from __future__ import annotations

import dataclasses
import sys
from datetime import UTC, datetime, timedelta
from itertools import islice
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from dispatchd.core.model import Dispatch, Frequency, Recurrence, Weekday
from dispatchd.core.recurrence import EVALUATION_BUDGET, Invalid, OverBudget, Schedule
from dispatchd.core.recurrence.parts import _Parts
from dispatchd.core.recurrence.walk import _Steps, _Walk
from tests.core.recurrence_helpers import dispatch

CALL_BOUND = 4 * EVALUATION_BUDGET
"""Python function calls one build may make: three budgeted searches of at
most ``EVALUATION_BUDGET`` steps (about one call per step) plus setup. Before
the budget, the rule below made 2.8 million (dateutil walked to 9999)."""

SPARSE = Recurrence(
    frequency=Frequency.MINUTELY,
    interval=61,
    byminutes=(53, 40),
    byhours=(5,),
    byweekdays=(Weekday.TUESDAY,),
    bymonthdays=(1,),
    count=4096,
)
START = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
WEEKDAYS = [
    Weekday.MONDAY,
    Weekday.TUESDAY,
    Weekday.WEDNESDAY,
    Weekday.THURSDAY,
    Weekday.FRIDAY,
    Weekday.SATURDAY,
    Weekday.SUNDAY,
]
FREQUENCIES = [
    Frequency.MINUTELY,
    Frequency.HOURLY,
    Frequency.DAILY,
    Frequency.WEEKLY,
    Frequency.MONTHLY,
    Frequency.YEARLY,
]


def build_counting_calls(d: Dispatch) -> tuple[Schedule | Invalid, int]:
    """Build the schedule and count the Python function calls it made: a
    deterministic measure of work (unlike wall time on a loaded machine)."""
    calls = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        built = Schedule.build(d)
    finally:
        sys.setprofile(None)
    return built, calls


def test_the_sparse_rule_from_the_report_is_refused_within_the_budget() -> None:
    built, calls = build_counting_calls(dispatch(START, timedelta(minutes=5), SPARSE))
    assert isinstance(built, Invalid)
    assert "too sparse" in built.reason and str(EVALUATION_BUDGET) in built.reason
    assert calls <= CALL_BOUND


def test_the_same_rule_with_a_few_starts_is_valid_and_cheap() -> None:
    few = dataclasses.replace(SPARSE, count=3)
    built, calls = build_counting_calls(dispatch(START, timedelta(minutes=5), few))
    assert isinstance(built, Schedule)
    expected = list(few.to_client()._as_rrule(START))
    until_end = datetime(9999, 1, 1, tzinfo=UTC)
    assert [o.start for o in built.occurrences_between(START, until_end)] == expected
    assert calls <= CALL_BOUND


def by_list(values: st.SearchStrategy[Any], most: int = 3) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(values, max_size=most, unique=True).map(lambda items: tuple(sorted(items)))


@st.composite
def rules(draw: st.DrawFn, *, sparse: bool) -> Recurrence:
    frequency = draw(st.sampled_from(FREQUENCIES[:3] if sparse else FREQUENCIES))
    end = draw(
        st.sampled_from(["none", "count", "until"])
        if sparse
        else st.sampled_from(["none", "count"])
    )
    # Sparse: day filters that rarely meet the interval, and counts that must be walked.
    day_filter = st.lists(
        st.integers(-31, 31).filter(bool), min_size=1 if sparse else 0, max_size=3
    )
    return Recurrence(
        frequency=frequency,
        interval=draw(st.integers(1, 10_000) if sparse else st.integers(1, 40)),
        count=draw(st.integers(1000 if sparse else 1, 4096)) if end == "count" else None,
        until=(
            draw(st.datetimes(datetime(2030, 1, 1), datetime(9999, 1, 1))).replace(tzinfo=UTC)
            if end == "until"
            else None
        ),
        byminutes=draw(by_list(st.integers(0, 59))),
        byhours=draw(by_list(st.integers(0, 23))),
        byweekdays=tuple(draw(st.lists(st.sampled_from(WEEKDAYS), max_size=3, unique=True))),
        bymonthdays=tuple(sorted(set(draw(day_filter)))),
        bymonths=draw(by_list(st.integers(1, 12))),
    )


starts = st.datetimes(datetime(2000, 1, 1), datetime(2040, 1, 1)).map(
    lambda moment: moment.replace(tzinfo=UTC)
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(rules(sparse=True), starts)
def test_no_rule_costs_more_than_the_budget(rule: Recurrence, start: datetime) -> None:
    _, calls = build_counting_calls(dispatch(start, timedelta(minutes=5), rule))
    target(float(calls))  # steer the search towards the most expensive rules
    assert calls <= CALL_BOUND


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(rules(sparse=False), starts, st.integers(0, 5000))
def test_the_walk_gives_exactly_dateutils_starts(
    rule: Recurrence, start: datetime, hours_later: int
) -> None:
    dtstart = start.replace(microsecond=0)
    parts = _Parts.of(rule, dtstart)
    horizon = dtstart.replace(year=dtstart.year + 30, day=min(dtstart.day, 28))
    walk = _Walk(parts, dtstart, _Steps(10 * EVALUATION_BUDGET))
    try:
        found = list(islice(walk.forward(dtstart, horizon), 60))
        # dateutil checks ``until`` only on a match: without one soon after the
        # horizon it would walk to the year 9999, so such rules are not compared.
        assume(next(walk.forward(horizon, horizon.replace(year=horizon.year + 5)), None))
        t = dtstart + timedelta(hours=hours_later * 7)
        after = next(walk.forward(t, horizon), None)
        before = next(walk.backward(min(t, horizon)), None)
    except OverBudget:
        return
    try:
        reference = parts.rrule(dtstart, horizon)
        expected = list(islice(reference, 60))
    except ValueError:  # dateutil refuses some never-matching rules mid-iteration
        return
    assert found == expected
    assert after == reference.after(t, inc=True)
    assert before == reference.before(min(t, horizon), inc=True)
