"""Where a recurring rule starts and ends: emptiness on the interval's grid, the count-th start."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from itertools import islice, takewhile
from math import gcd
from typing import TYPE_CHECKING, Final

from dispatchd.core.model import Frequency
from dispatchd.core.recurrence.parts import _UNIT, _month_add, _Parts
from dispatchd.core.recurrence.walk import EVALUATION_BUDGET, _Steps, _Walk
from dispatchd.core.times import LATEST

if TYPE_CHECKING:
    from dispatchd.core.recurrence.schedule import Schedule

_PROBE_YEARS: Final = 100
"""A rule with no occurrence this long after its start is reported invalid:
its by-rules can (practically) never match, and searching further is slow."""


_GRID: Final[dict[Frequency, tuple[int, int, int]]] = {
    # frequency: (steps per day, steps per hour position, steps per week)
    Frequency.MINUTELY: (1440, 60, 10080),
    Frequency.HOURLY: (24, 1, 168),
    Frequency.DAILY: (1, 1, 7),
}


def _off_the_grid(parts: _Parts, dtstart: datetime) -> bool:
    """True when the interval's grid never lands on an allowed weekday, hour and minute.

    From dtstart, a rule steps ``interval`` minutes (hours, days); modulo one
    week it visits exactly the positions congruent to dtstart's modulo
    ``gcd(interval, week)``. If none of those is an allowed (weekday, hour,
    minute), there is no occurrence ever. Month and month-day limits are not
    considered: True is certain, False is not a promise of a match.
    """
    grid = _GRID.get(parts.freq)
    if grid is None:
        return False
    per_day, per_hour, per_week = grid
    step = gcd(parts.interval, per_week)
    if step == 1:
        return False
    days = parts.byweekday if parts.byweekday is not None else range(7)
    if parts.freq == Frequency.DAILY:
        hours: Sequence[int] = (0,)
    else:
        hours = parts.byhour if parts.byhour is not None else range(24)
    if parts.freq == Frequency.MINUTELY:
        minutes: Sequence[int] = parts.byminute if parts.byminute is not None else range(60)
    else:
        minutes = (0,)  # hourly: minutes expand within the hour; daily: ignored here
    own = (
        dtstart.weekday() * per_day
        + (dtstart.hour * per_hour if per_day > 1 else 0)
        + (dtstart.minute if parts.freq == Frequency.MINUTELY else 0)
    ) % step
    return not any(
        (day * per_day + hour * per_hour + minute) % step == own
        for day in days
        for hour in hours
        for minute in minutes
    )


def _probe_horizon(dtstart: datetime) -> datetime:
    """``_PROBE_YEARS`` after dtstart, or the end of time."""
    try:
        return dtstart.replace(year=dtstart.year + _PROBE_YEARS, day=min(dtstart.day, 28))
    except ValueError:
        return LATEST


def _count_last(schedule: Schedule, first: datetime, count: int) -> datetime | None:
    """The count-th start (or the last one, if fewer exist; None: past year 9999).

    Arithmetic when every period holds exactly one start; by periodicity when
    the by-parts repeat weekly (no month or month-day parts); else a budgeted walk.
    """
    parts, base = schedule._parts, schedule._rule
    assert parts is not None and base is not None
    if parts.plain:
        unit = _UNIT.get(parts.freq)
        try:
            if unit is not None:
                return first + unit * (parts.interval * (count - 1))
            per_step = 12 if parts.freq == Frequency.YEARLY else 1
            return _month_add(first, parts.interval * (count - 1) * per_step)
        except (OverflowError, ValueError):
            return None
    periodic = _weekly_periodic(schedule, first, count)
    if periodic is not None:
        return periodic[0]
    last = first
    walk = _Walk(parts, schedule._dtstart or first, _Steps(EVALUATION_BUDGET))
    for last in islice(walk.forward(first), count):  # noqa: B007 - walks to the count-th start
        pass
    return last


_WEEK: Final = timedelta(weeks=1)


def _weekly_periodic(
    schedule: Schedule, first: datetime, count: int
) -> tuple[datetime | None] | None:
    """``(count-th start,)`` of a rule whose starts repeat every lcm(period,
    week); None if the rule does not repeat so (or not before year 9999).

    From the first period boundary on, the anchored rule's starts shifted by
    ``span`` are its starts again (UTC has no DST; hour, minute and weekday
    filters repeat weekly), so only one span is iterated.
    """
    parts, base = schedule._parts, schedule._rule
    assert parts is not None and base is not None
    unit = _UNIT.get(parts.freq)
    if unit is None or parts.bymonth is not None or parts.bymonthday is not None:
        return None
    try:
        period_seconds = int((unit * parts.interval).total_seconds())
        week_seconds = int(_WEEK.total_seconds())
        span_seconds = period_seconds * week_seconds // gcd(period_seconds, week_seconds)
        boundary = schedule._boundary(1)
        span = timedelta(seconds=span_seconds)
        span_end = boundary + span
        if span_end.year > LATEST.year - 1:
            return None
    except OverflowError:
        return None
    head = list(takewhile(lambda start: start < boundary, base))
    if count <= len(head):
        return (head[count - 1],)
    repeating = list(takewhile(lambda start: start < span_end, parts.rrule(boundary, None)))
    if not repeating:
        return (head[-1] if head else first,)
    spans, index = divmod(count - len(head) - 1, len(repeating))
    try:
        return (repeating[index] + span * spans,)
    except OverflowError:
        return (None,)
