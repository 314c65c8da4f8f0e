"""A rule's by-parts with dateutil's defaults made explicit, and the calendar arithmetic on them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from dateutil import rrule as du

from dispatchd.core.model import Frequency, Recurrence, Weekday
from dispatchd.core.times import EARLIEST, LATEST

_FREQ: Final[dict[Frequency, int]] = {
    Frequency.MINUTELY: du.MINUTELY,
    Frequency.HOURLY: du.HOURLY,
    Frequency.DAILY: du.DAILY,
    Frequency.WEEKLY: du.WEEKLY,
    Frequency.MONTHLY: du.MONTHLY,
    Frequency.YEARLY: du.YEARLY,
}

# Fixed-length periods (UTC has no DST); months and years are counted instead.
_UNIT: Final[dict[Frequency, timedelta]] = {
    Frequency.MINUTELY: timedelta(minutes=1),
    Frequency.HOURLY: timedelta(hours=1),
    Frequency.DAILY: timedelta(days=1),
    Frequency.WEEKLY: timedelta(weeks=1),
}

_WEEKDAY: Final[dict[Weekday, int]] = {
    Weekday.MONDAY: 0,
    Weekday.TUESDAY: 1,
    Weekday.WEDNESDAY: 2,
    Weekday.THURSDAY: 3,
    Weekday.FRIDAY: 4,
    Weekday.SATURDAY: 5,
    Weekday.SUNDAY: 6,
}


def _add(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta`` clamped to the representable range."""
    try:
        return moment + delta
    except OverflowError:
        return LATEST if delta > timedelta(0) else EARLIEST


@dataclass(frozen=True, slots=True)
class _Parts:
    """The by-parts of a rule with dateutil's dtstart defaults made explicit."""

    freq: Frequency
    interval: int
    bymonth: tuple[int, ...] | None
    bymonthday: tuple[int, ...] | None
    byweekday: tuple[int, ...] | None
    byhour: tuple[int, ...] | None
    byminute: tuple[int, ...] | None
    bysecond: tuple[int, ...]

    @staticmethod
    def of(rule: Recurrence, dtstart: datetime) -> _Parts:
        """Mirror ``rrule.__init__``'s defaulting so a moved dtstart keeps the set."""
        freq = rule.frequency
        bymonth = rule.bymonths or None
        bymonthday = rule.bymonthdays or None
        byweekday = tuple(_WEEKDAY[d] for d in rule.byweekdays) or None
        if bymonthday is None and byweekday is None:
            if freq == Frequency.YEARLY:
                bymonth = bymonth or (dtstart.month,)
                bymonthday = (dtstart.day,)
            elif freq == Frequency.MONTHLY:
                bymonthday = (dtstart.day,)
            elif freq == Frequency.WEEKLY:
                byweekday = (dtstart.weekday(),)
        coarser_than_hour = freq not in (Frequency.HOURLY, Frequency.MINUTELY)
        byhour = rule.byhours or ((dtstart.hour,) if coarser_than_hour else None)
        byminute = rule.byminutes or ((dtstart.minute,) if freq != Frequency.MINUTELY else None)
        return _Parts(
            freq=freq,
            interval=rule.interval,
            bymonth=bymonth,
            bymonthday=bymonthday,
            byweekday=byweekday,
            byhour=byhour,
            byminute=byminute,
            bysecond=(dtstart.second,),
        )

    def rrule(self, dtstart: datetime, until: datetime | None) -> du.rrule:
        """An rrule with these explicit parts; may raise ValueError."""
        return du.rrule(
            _FREQ[self.freq],  # type: ignore[arg-type]
            dtstart=dtstart,
            interval=self.interval,
            until=until,
            bymonth=self.bymonth,
            bymonthday=self.bymonthday,
            byweekday=self.byweekday,
            byhour=self.byhour,
            byminute=self.byminute,
            bysecond=self.bysecond,
        )

    def per_period(self) -> int:
        """An upper estimate of occurrences in one period, to size the anchor step."""
        size = 1
        if self.freq not in (Frequency.HOURLY, Frequency.MINUTELY) and self.byhour:
            size *= len(self.byhour)
        if self.freq != Frequency.MINUTELY and self.byminute:
            size *= len(self.byminute)
        if self.freq == Frequency.WEEKLY:
            size *= len(self.byweekday or ()) or 7
        elif self.freq == Frequency.MONTHLY:
            size *= 31
        elif self.freq == Frequency.YEARLY:
            size *= 366
        return size

    @property
    def plain(self) -> bool:
        """Exactly one occurrence in every period, so the n-th is arithmetic."""
        one = (1,)
        single_time = {
            Frequency.MINUTELY: self.byhour is None and self.byminute is None,
            Frequency.HOURLY: self.byhour is None and _lens(self.byminute) == one,
        }.get(self.freq, _lens(self.byhour) == one and _lens(self.byminute) == one)
        if not single_time:
            return False
        if self.freq == Frequency.WEEKLY:
            days_ok = _lens(self.byweekday) == one and self.bymonth is None
            return days_ok and self.bymonthday is None
        if self.byweekday is not None:
            return False
        if self.freq == Frequency.MONTHLY:
            return self.bymonth is None and _early_single_day(self.bymonthday)
        if self.freq == Frequency.YEARLY:
            return _lens(self.bymonth) == one and _early_single_day(self.bymonthday)
        return self.bymonth is None and self.bymonthday is None


def _lens(values: tuple[int, ...] | None) -> tuple[int, ...]:
    return (len(values),) if values is not None else ()


def _early_single_day(days: tuple[int, ...] | None) -> bool:
    """One month day that every month has."""
    return days is not None and len(days) == 1 and 1 <= days[0] <= 28


def _month_add(moment: datetime, months: int) -> datetime:
    """``moment`` moved by whole months; the day must exist (<= 28 or day 1)."""
    total = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=total // 12, month=total % 12 + 1)
