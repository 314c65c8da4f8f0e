"""A budgeted walk over a rule's starts, day by day, that can stop when its budget is spent."""

from __future__ import annotations

import calendar
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Final

from dispatchd.core.model import Frequency
from dispatchd.core.recurrence.parts import (
    _Parts,
)
from dispatchd.core.times import LATEST

EVALUATION_BUDGET: Final = 100_000
"""Steps ``Schedule.build`` may spend on one rule before calling it invalid.

A step is one calendar day or one time of day looked at (a skipped month,
week or period counts as one). Finding the first start, the count-th start
or the last start before ``until`` each get this many. Walking 100 years day
by day takes about 37k steps; the slowest build seen is 0.25 s on a loaded
2-core machine (bench/bench_rule_budget.py). Rules needing more are
so sparse (a Tuesday the 1st at 05:40 on a 61-minute grid) that dateutil
would walk thousands of years: they are refused, not walked on the loop.
"""


class OverBudget(Exception):
    """A rule needed more than its step budget."""


class _Steps:
    """A step counter shared by the walks of one build."""

    __slots__ = ("left",)

    def __init__(self, budget: int) -> None:
        self.left = budget

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise OverBudget


_MINUTES_PER_DAY: Final = 1440


class _Walk:
    """The starts of a rule, enumerated by calendar day with a step budget.

    The set is RFC 5545's for the rules dispatches can express (no BYSETPOS,
    BYWEEKNO, BYYEARDAY; week start Monday; UTC): every ``dtstart``-seconds
    time at or after dtstart whose period (counted from dtstart's) is a
    multiple of ``interval`` and that every by-part allows. That is exactly
    what dateutil yields, but this walk can start anywhere, go either way and
    stop when its budget is spent.
    """

    def __init__(self, parts: _Parts, dtstart: datetime, steps: _Steps) -> None:
        self._parts = parts
        self._dtstart = dtstart
        self._steps = steps
        self._day0 = dtstart.date().toordinal()
        self._week0 = self._day0 - dtstart.weekday()
        self._month0 = dtstart.year * 12 + dtstart.month - 1
        self._minute0 = dtstart.hour * 60 + dtstart.minute
        self._months = frozenset(parts.bymonth) if parts.bymonth else None
        self._monthdays = frozenset(parts.bymonthday) if parts.bymonthday else None
        self._weekdays = frozenset(parts.byweekday) if parts.byweekday is not None else None
        self._hours = sorted(parts.byhour) if parts.byhour else list(range(24))
        self._minutes = sorted(parts.byminute) if parts.byminute else list(range(60))
        self._hour_set = frozenset(self._hours)
        self._every_day = (
            self._monthdays is None
            and self._weekdays is None
            and parts.freq not in (Frequency.DAILY, Frequency.WEEKLY)
        )
        self._minute_set = frozenset(self._minutes)
        self._every_minute = (
            parts.freq == Frequency.MINUTELY and len(self._hours) == 24 and len(self._minutes) == 60
        )

    def forward(self, t: datetime, stop: datetime = LATEST) -> Iterator[datetime]:
        """Starts in [t, stop], ascending."""
        t = max(t, self._dtstart)
        month = t.year * 12 + t.month - 1
        last_month = min(stop.year * 12 + stop.month - 1, _LAST_MONTH)
        first_day = t.date().toordinal()
        while month <= last_month:
            for day in self._days(month, reverse=False):
                if day < first_day:
                    continue
                positions = self._positions(day)
                if day == first_day:  # skip the times before t without building them
                    positions = positions[bisect_left(positions, self._position_from(t)) :]
                for moment in self._moments(day, positions):
                    if moment > stop:
                        return
                    yield moment
            month += 1

    def backward(self, t: datetime) -> Iterator[datetime]:
        """Starts <= t, descending."""
        month = t.year * 12 + t.month - 1
        last_day = t.date().toordinal()
        while month >= self._month0:
            for day in self._days(month, reverse=True):
                if day > last_day:
                    continue
                positions = self._positions(day)
                if day == last_day:  # skip the times after t without building them
                    positions = positions[: bisect_right(positions, self._position_to(t))]
                for moment in self._moments(day, positions[::-1]):
                    if moment < self._dtstart:
                        return
                    yield moment
            month -= 1

    def _position_from(self, t: datetime) -> int:
        """The first minute of t's day whose start (at dtstart's second) is at or after t."""
        position = t.hour * 60 + t.minute
        second = self._dtstart.second
        if (t.second, t.microsecond) > (second, 0):
            position += 1
        return position

    def _position_to(self, t: datetime) -> int:
        """The last minute of t's day whose start (at dtstart's second) is at or before t."""
        position = t.hour * 60 + t.minute
        if t.second < self._dtstart.second:
            position -= 1
        return position

    def _moments(self, ordinal: int, positions: Sequence[int]) -> Iterator[datetime]:
        """The starts at ``positions`` (minutes of the day), built one at a time."""
        if not positions:
            return
        day = date.fromordinal(ordinal)
        year, month, number, second = day.year, day.month, day.day, self._dtstart.second
        for position in positions:
            hour, minute = divmod(position, 60)
            yield datetime(year, month, number, hour, minute, second, tzinfo=UTC)

    def _days(self, month: int, *, reverse: bool) -> list[int]:
        """Ordinals of the days of ``month`` (years*12 + month-1) the rule allows."""
        parts = self._parts
        year, month_index = divmod(month, 12)
        self._steps.spend(1)
        if self._months is not None and month_index + 1 not in self._months:
            return []
        if parts.freq == Frequency.MONTHLY and (month - self._month0) % parts.interval:
            return []
        if parts.freq == Frequency.YEARLY and (month // 12 - self._month0 // 12) % parts.interval:
            return []
        length = calendar.monthrange(year, month_index + 1)[1]
        self._steps.spend(length)
        start = datetime(year, month_index + 1, 1).toordinal()
        if self._every_day:
            days = list(range(start, start + length))
        else:
            days = [
                start + offset
                for offset in range(length)
                if self._day_allowed(start + offset, offset + 1, length)
            ]
        return days[::-1] if reverse else days

    def _day_allowed(self, ordinal: int, day: int, length: int) -> bool:
        parts = self._parts
        if self._monthdays is not None and not (
            day in self._monthdays or day - length - 1 in self._monthdays
        ):
            return False
        weekday = (ordinal - 1) % 7  # ordinal 1 (0001-01-01) is a Monday
        if self._weekdays is not None and weekday not in self._weekdays:
            return False
        if parts.freq == Frequency.DAILY:
            return (ordinal - self._day0) % parts.interval == 0
        if parts.freq == Frequency.WEEKLY:
            return ((ordinal - weekday - self._week0) // 7) % parts.interval == 0
        return True

    def _positions(self, ordinal: int) -> Sequence[int]:
        """The allowed starts on one day as minutes of the day, ascending.

        Steps are spent as if every candidate time were looked at; an every-minute
        rule's grid is a ``range``, so a walk that takes one start builds one.
        """
        parts = self._parts
        hours, minutes = self._hours, self._minutes
        grid = self._grid(ordinal)
        if grid is None:
            self._steps.spend(len(hours) * len(minutes))
            return [h * 60 + m for h in hours for m in minutes]
        first, step = grid
        per_day = _MINUTES_PER_DAY if parts.freq == Frequency.MINUTELY else 24
        if first >= per_day:  # the grid skips this day
            self._steps.spend(1)
            return ()
        candidates = len(hours) * len(minutes)
        on_grid = (per_day - first + step - 1) // step
        if self._every_minute:
            self._steps.spend(candidates if candidates <= on_grid else on_grid + 1)
            return range(first, _MINUTES_PER_DAY, step)
        if candidates <= on_grid:
            self._steps.spend(candidates)
            return [h * 60 + m for h in hours for m in minutes if self._on_grid(h, m, grid)]
        pairs = self._grid_pairs(first, step)
        self._steps.spend(len(pairs) + 1)
        return [h * 60 + m for h, m in pairs]

    def _grid(self, ordinal: int) -> tuple[int, int] | None:
        """For HOURLY/MINUTELY: the first hour (minute) of the day on the
        interval's grid and the grid step; None for coarser rules."""
        parts = self._parts
        if parts.freq == Frequency.MINUTELY:
            offset = (ordinal - self._day0) * _MINUTES_PER_DAY - self._minute0
            return (-offset) % parts.interval, parts.interval
        if parts.freq == Frequency.HOURLY:
            offset = (ordinal - self._day0) * 24 - self._dtstart.hour
            return (-offset) % parts.interval, parts.interval
        return None

    def _on_grid(self, hour: int, minute: int, grid: tuple[int, int]) -> bool:
        first, step = grid
        position = hour * 60 + minute if self._parts.freq == Frequency.MINUTELY else hour
        return position >= first and (position - first) % step == 0

    def _grid_pairs(self, first: int, step: int) -> list[tuple[int, int]]:
        """The (hour, minute) pairs on the grid that the by-parts allow."""
        hours, minutes = self._hour_set, self._minute_set
        if self._parts.freq == Frequency.MINUTELY:
            return [
                divmod(position, 60)
                for position in range(first, _MINUTES_PER_DAY, step)
                if position // 60 in hours and position % 60 in minutes
            ]
        return [
            (hour, m) for hour in range(first, 24, step) if hour in hours for m in self._minutes
        ]


_LAST_MONTH: Final = 9999 * 12 + 11
