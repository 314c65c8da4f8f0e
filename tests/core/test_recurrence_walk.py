"""The budgeted walk against dateutil, from any instant of a day, both ways.

The walk builds only the starts it yields (an every-minute rule has 1,440 a
day): the part of the first day before (or after) the query instant is
skipped by arithmetic, which these properties pin to dateutil's answer.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import islice

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dispatchd.core.model import Frequency, Recurrence
from dispatchd.core.recurrence.bounds import _off_the_grid
from dispatchd.core.recurrence.parts import _Parts
from dispatchd.core.recurrence.walk import EVALUATION_BUDGET, _Steps, _Walk
from tests.core.recurrence_helpers import by_part, starts

TAKE = 5


def _walk_and_rule(
    frequency: Frequency,
    interval: int,
    start: datetime,
    hours: tuple[int, ...],
    minutes: tuple[int, ...],
) -> tuple[_Walk, _Parts, datetime]:
    rule = Recurrence(frequency=frequency, interval=interval, byhours=hours, byminutes=minutes)
    dtstart = start.replace(microsecond=0)
    parts = _Parts.of(rule, dtstart)
    return _Walk(parts, dtstart, _Steps(EVALUATION_BUDGET)), parts, dtstart


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Frequency.MINUTELY, Frequency.HOURLY, Frequency.DAILY]),
    st.one_of(st.just(1), st.integers(2, 90)),
    starts,
    by_part(st.integers(0, 23)),
    by_part(st.integers(0, 59)),
    st.integers(0, 3 * 1440),
    st.integers(-2, 2),
    st.sampled_from([0, 1, 999_999]),
)
def test_forward_and_backward_from_any_instant_equal_dateutil(
    frequency: Frequency,
    interval: int,
    start: datetime,
    hours: tuple[int, ...],
    minutes: tuple[int, ...],
    offset_minutes: int,
    offset_seconds: int,
    microsecond: int,
) -> None:
    """From instants on, just before and just after a start's second."""
    walk, parts, dtstart = _walk_and_rule(frequency, interval, start, hours, minutes)
    assume(not _off_the_grid(parts, dtstart))  # dateutil walks those to the year 9999
    t = dtstart + timedelta(minutes=offset_minutes, seconds=offset_seconds)
    t = max(dtstart, t.replace(microsecond=microsecond))
    rule = parts.rrule(dtstart, None)
    expected_forward = list(islice(rule.xafter(t, count=TAKE, inc=True), TAKE))
    assert list(islice(walk.forward(t), TAKE)) == expected_forward
    behind = [moment for moment in rule.between(dtstart, t, inc=True) if moment <= t]
    assert list(islice(walk.backward(t), TAKE)) == behind[::-1][:TAKE]
