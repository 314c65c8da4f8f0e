"""Rules whose interval never lands on an allowed weekday, hour and minute.

dateutil checks ``until`` only on matches, so such a rule is walked to the
year 9999 (17 s for a MINUTELY one) before it is found empty. ``Schedule.build``
rules them out first with ``_off_the_grid``, checked here against a brute
force walk of one full cycle of the grid.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from math import lcm

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.core.model import Frequency, Recurrence, Weekday
from dispatchd.core.recurrence import Invalid, Schedule
from dispatchd.core.recurrence.bounds import _off_the_grid
from dispatchd.core.recurrence.parts import _Parts
from tests.core.recurrence_helpers import WEEKDAYS, by_part, dispatch, starts

_UNIT = {
    Frequency.MINUTELY: timedelta(minutes=1),
    Frequency.HOURLY: timedelta(hours=1),
    Frequency.DAILY: timedelta(days=1),
}
_PER_WEEK = {Frequency.MINUTELY: 10080, Frequency.HOURLY: 168, Frequency.DAILY: 7}
_DAY_INDEX = {day: index for index, day in enumerate(WEEKDAYS)}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(_UNIT)),
    st.integers(1, 200),
    starts,
    by_part(st.sampled_from(WEEKDAYS)),
    by_part(st.integers(0, 23)),
    by_part(st.integers(0, 59)),
)
def test_off_the_grid_exactly_when_no_point_of_the_grid_is_allowed(
    frequency: Frequency,
    interval: int,
    start: datetime,
    weekdays: tuple[Weekday, ...],
    hours: tuple[int, ...],
    minutes: tuple[int, ...],
) -> None:
    rule = Recurrence(
        frequency=frequency,
        interval=interval,
        byweekdays=weekdays,
        byhours=hours if frequency != Frequency.DAILY else (),
        byminutes=minutes if frequency == Frequency.MINUTELY else (),
    )
    dtstart = start.replace(microsecond=0)
    days = {_DAY_INDEX[d] for d in weekdays} or set(range(7))

    def allowed(moment: datetime) -> bool:
        return (
            moment.weekday() in days
            and (frequency == Frequency.DAILY or not hours or moment.hour in hours)
            and (frequency != Frequency.MINUTELY or not minutes or moment.minute in minutes)
        )

    cycle = lcm(interval, _PER_WEEK[frequency]) // interval  # then the grid repeats weekly
    step = _UNIT[frequency] * interval
    reachable = any(allowed(dtstart + step * k) for k in range(cycle))
    assert _off_the_grid(_Parts.of(rule, dtstart), dtstart) == (not reachable)


def test_a_rule_that_never_lands_is_judged_at_once() -> None:
    # Every 28 minutes from a Sunday 01:48:18 lands on 21:00:18 only on Tuesdays.
    start = datetime(2025, 8, 3, 1, 48, 18, tzinfo=UTC)
    rule = Recurrence(
        frequency=Frequency.MINUTELY,
        interval=28,
        byminutes=(0,),
        byhours=(21,),
        byweekdays=(Weekday.MONDAY,),
        bymonths=(1,),
    )
    began = time.perf_counter()
    endless = Schedule.build(dispatch(start, timedelta(minutes=5), rule))
    bounded = Schedule.build(dispatch(start, timedelta(minutes=5), replace(rule, until=start)))
    assert time.perf_counter() - began < 1.0  # was 17 s each (a bound, not a benchmark)
    assert isinstance(endless, Invalid) and isinstance(bounded, Invalid)
    assert "never lands" in endless.reason
    tuesdays = Schedule.build(
        dispatch(
            start,
            timedelta(minutes=5),
            replace(rule, byweekdays=(Weekday.TUESDAY,)),
        )
    )
    assert isinstance(tuesdays, Schedule)
    assert tuesdays.next_start_after(start) == datetime(2026, 1, 6, 21, 0, 18, tzinfo=UTC)
