"""Invalid rules are caught at build time with a reason; built schedules never raise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.core.model import Dispatch, Frequency, Recurrence, Weekday
from dispatchd.core.recurrence import Invalid, Schedule
from tests.core.recurrence_helpers import dispatch as recurrence_dispatch

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def dispatch(
    recurrence: Recurrence | None,
    duration: timedelta | None = timedelta(minutes=5),
    start: datetime = START,
) -> Dispatch:
    return recurrence_dispatch(start, duration, recurrence)


@pytest.mark.parametrize(
    ("recurrence", "duration", "field"),
    [
        (Recurrence(frequency=Frequency.DAILY, interval=0), timedelta(1), "interval"),
        (Recurrence(frequency=Frequency.DAILY, interval=-3), timedelta(1), "interval"),
        (Recurrence(frequency=Frequency.UNSPECIFIED, byhours=(1,)), timedelta(1), "frequency"),
        (
            Recurrence(frequency=Frequency.WEEKLY, byweekdays=(Weekday.UNSPECIFIED,)),
            timedelta(1),
            "byweekdays",
        ),
        (Recurrence(frequency=Frequency.HOURLY, byminutes=(60,)), timedelta(1), "byminutes"),
        (Recurrence(frequency=Frequency.HOURLY, byminutes=(-1,)), timedelta(1), "byminutes"),
        (Recurrence(frequency=Frequency.DAILY, byhours=(24,)), timedelta(1), "byhours"),
        (Recurrence(frequency=Frequency.MONTHLY, bymonthdays=(0,)), timedelta(1), "bymonthdays"),
        (Recurrence(frequency=Frequency.MONTHLY, bymonthdays=(32,)), timedelta(1), "bymonthdays"),
        (Recurrence(frequency=Frequency.MONTHLY, bymonthdays=(-32,)), timedelta(1), "bymonthdays"),
        (Recurrence(frequency=Frequency.YEARLY, bymonths=(13,)), timedelta(1), "bymonths"),
        (Recurrence(frequency=Frequency.YEARLY, bymonths=(0,)), timedelta(1), "bymonths"),
        (Recurrence(frequency=Frequency.DAILY, count=0), timedelta(1), "count"),
        (
            Recurrence(frequency=Frequency.DAILY, count=2, until=START + timedelta(days=3)),
            timedelta(1),
            "count",
        ),
        (
            Recurrence(frequency=Frequency.YEARLY, bymonths=(2,), bymonthdays=(30, 31)),
            timedelta(1),
            "bymonthdays",
        ),
        (None, timedelta(seconds=-1), "duration"),
        (Recurrence(frequency=Frequency.DAILY), timedelta(seconds=-1), "duration"),
    ],
)
def test_each_invalid_field_is_named_in_the_reason(
    recurrence: Recurrence | None, duration: timedelta, field: str
) -> None:
    result = Schedule.build(dispatch(recurrence, duration))
    assert isinstance(result, Invalid)
    assert field in result.reason


def test_combinations_rrule_cannot_evaluate_are_invalid() -> None:
    # HOURLY every 2 hours from 10:00 can never reach an odd hour.
    odd_hours = Recurrence(frequency=Frequency.HOURLY, interval=2, byhours=(11,))
    # MINUTELY every day at 10:00 can never be at 05:xx; dateutil raises only
    # when it steps past dtstart, deep inside iteration.
    wrong_hour = Recurrence(frequency=Frequency.MINUTELY, interval=1440, byhours=(5,))
    # Every 12 months from November never reaches March.
    wrong_month = Recurrence(frequency=Frequency.MONTHLY, interval=12, bymonths=(3,))
    for rule in (odd_hours, wrong_hour, wrong_month):
        result = Schedule.build(dispatch(rule))
        assert isinstance(result, Invalid), rule
        assert result.reason


def test_a_rule_that_ends_before_its_first_match_is_valid_and_empty() -> None:
    rule = Recurrence(
        frequency=Frequency.DAILY, byweekdays=(Weekday.SUNDAY,), until=START + timedelta(days=2)
    )
    schedule = Schedule.build(dispatch(rule))
    assert isinstance(schedule, Schedule)
    assert schedule.next_run_after(START - timedelta(days=1)) is None
    assert schedule.occurrence_at(START) is None
    assert schedule.is_finished(START - timedelta(days=1))
    assert schedule.last_end() is None


def test_unspecified_frequency_with_by_rules_reaches_the_schedule_as_invalid() -> None:
    """The model keeps a by-rule without a frequency; the schedule rejects it."""
    client = dispatch(None).to_client()
    client.recurrence.byhours = [3]
    converted = Dispatch.from_client(client, microgrid_id=1)
    assert converted.recurrence is not None
    schedule = Schedule.build(converted)
    assert isinstance(schedule, Invalid) and "frequency" in schedule.reason


# --- no query raises, whatever was built ------------------------------------------

EXTREMES = [
    datetime.min.replace(tzinfo=UTC),
    datetime(1, 1, 2, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 30, tzinfo=UTC),
    datetime.max.replace(tzinfo=UTC),
]
any_instant = st.one_of(
    st.sampled_from(EXTREMES),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1)),
)
any_values = st.lists(st.integers(-40, 70), max_size=3).map(tuple)


@st.composite
def anything(draw: st.DrawFn) -> Dispatch:
    """Fields in and out of range, instants anywhere, durations of any size."""
    frequency = draw(st.sampled_from(list(Frequency)))
    count = draw(st.none() | st.integers(-1, 200) | st.just(10**12))
    until = draw(st.none() | any_instant) if count is None else None
    rule = Recurrence(
        frequency=frequency,
        interval=draw(st.integers(-1, 5) | st.integers(6, 2**32)),
        count=count,
        until=until,
        byminutes=draw(any_values),
        byhours=draw(any_values),
        byweekdays=tuple(draw(st.lists(st.sampled_from(list(Weekday)), max_size=3))),
        bymonthdays=draw(any_values),
        bymonths=draw(any_values),
    )
    duration = draw(
        st.none()
        | st.sampled_from([timedelta(0), timedelta.max, timedelta(days=-1)])
        | st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=4000))
    )
    return dispatch(draw(st.none() | st.just(rule)), duration, draw(any_instant))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything(), st.lists(any_instant, min_size=1, max_size=4))
def test_no_query_raises(d: Dispatch, moments: list[datetime]) -> None:
    schedule = Schedule.build(d)
    if isinstance(schedule, Invalid):
        assert schedule.reason
        return
    schedule.last_end()
    for t in moments:
        schedule.occurrence_at(t)
        schedule.until(t)
        schedule.next_start_after(t)
        schedule.next_run_after(t)
        schedule.last_start_at_or_before(t)
        schedule.is_finished(t)
        later = t + timedelta(days=3) if t.year < 9999 else t
        list(zip(range(50), schedule.occurrences_between(t, later), strict=False))
        schedule.missed_runs(t, later)
