"""Occurrences of one dispatch version, from dateutil's ``rrule`` in UTC.

``Schedule.build`` validates a dispatch once and returns either a ``Schedule``
(queried many times by the engine, the RPC and the SDK) or an ``Invalid`` with
a human-readable reason. Queries never raise.

Speed: a plain ``rrule.before``/``after`` iterates from ``dtstart``, so a
MINUTELY rule started a year ago costs ~500k steps per question. Instead:

- Rules with exactly one start per period (no by-parts, or one hour and one
  minute, one weekday for WEEKLY, one month day <= 28 for MONTHLY/YEARLY) are
  pure arithmetic: start k is ``first + k * period``.
- Other rules are re-anchored: an equivalent ``rrule`` whose ``dtstart`` is
  moved forward by a whole number of periods (interval x frequency unit) to a
  period boundary, with every by-part that ``rrule`` would default from
  ``dtstart`` made explicit, so the set of occurrences after the anchor is
  unchanged. The anchor is cached and moved only when queries move a few
  periods on; the last start before it is searched (backwards, doubling)
  only when a query needs it.
- A ``count`` becomes an inclusive ``until`` at its last start, found once:
  by arithmetic, or by weekly periodicity for MINUTELY..WEEKLY rules without
  month or month-day parts, else by a walk; an ``until`` becomes the last
  start before it, by arithmetic or by a walk backwards.

Budget: rule evaluation must never stall the event loop (dateutil has no
iteration limit, and a sparse rule can take it seconds to walk to the year
9999). The searches ``build`` does (first start, count-th start, last start
before ``until``) run on ``_Walk``, which enumerates the same starts as
dateutil by calendar day and counts its steps; a rule needing more than
``EVALUATION_BUDGET`` steps for one of them is ``Invalid``.

Emptiness: a rule without any occurrence within ``_PROBE_YEARS`` of its start
is ``Invalid`` (its by-rules never match), unless its ``until`` comes before
that horizon: then it is a valid, empty schedule.

Like plain ``rrule``, a recurring rule drops the microseconds of
``start_time``; one-off and infinite dispatches keep them.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import islice, takewhile
from math import gcd
from typing import Final

from dateutil import rrule as du

from dispatchd.core.messages import Occurrence
from dispatchd.core.model import Dispatch, Frequency, Recurrence, Weekday

__all__ = ["Invalid", "Schedule"]

_MAX: Final = datetime.max.replace(tzinfo=UTC)
_MIN: Final = datetime.min.replace(tzinfo=UTC)

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

_PROBE_YEARS: Final = 100
"""A rule with no occurrence this long after its start is reported invalid:
its by-rules can (practically) never match, and searching further is slow."""

_ANCHOR_BUDGET: Final = 16
"""Roughly how many candidate occurrences a query may iterate past the anchor
before the anchor is moved forward."""


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a dispatch's schedule cannot be evaluated; it never runs."""

    reason: str


def _utc(moment: datetime) -> datetime:
    """Aware UTC, treating a naive datetime as UTC, so comparisons never raise."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    if moment.utcoffset() == timedelta(0):
        return moment
    return moment.astimezone(UTC)


def _add(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta`` clamped to the representable range."""
    try:
        return moment + delta
    except OverflowError:
        return _MAX if delta > timedelta(0) else _MIN


def _validate(dispatch: Dispatch) -> str | None:
    """The first problem with the dispatch's fields, or None."""
    if dispatch.duration is not None and dispatch.duration < timedelta(0):
        return f"duration must not be negative, got {dispatch.duration}"
    rule = dispatch.recurrence
    if rule is None or dispatch.duration is None:
        return None
    if rule.frequency not in _FREQ:
        return f"frequency must be MINUTELY..YEARLY, got {rule.frequency!r}"
    if rule.interval < 1:
        return f"interval must be >= 1, got {rule.interval}"
    if rule.count is not None and rule.until is not None:
        return "count and until are mutually exclusive"
    if rule.count is not None and rule.count < 1:
        return f"count must be >= 1, got {rule.count}"
    for name, values, low, high in (
        ("byminutes", rule.byminutes, 0, 59),
        ("byhours", rule.byhours, 0, 23),
        ("bymonths", rule.bymonths, 1, 12),
    ):
        bad = [v for v in values if not low <= v <= high]
        if bad:
            return f"{name} must be within {low}..{high}, got {bad}"
    bad = [v for v in rule.bymonthdays if v == 0 or not -31 <= v <= 31]
    if bad:
        return f"bymonthdays must be within -31..-1 or 1..31, got {bad}"
    bad_days = [d for d in rule.byweekdays if d not in _WEEKDAY]
    if bad_days:
        return f"byweekdays must be MONDAY..SUNDAY, got {[str(d) for d in bad_days]}"
    if rule.bymonthdays and not _some_month_has_day(rule):
        return (
            f"bymonthdays {list(rule.bymonthdays)} never fall in "
            f"bymonths {list(rule.bymonths) or 'any'}"
        )
    return None


def _some_month_has_day(rule: Recurrence) -> bool:
    """Whether some month of ``bymonths`` has one of ``bymonthdays`` (Feb: leap)."""
    months = rule.bymonths or tuple(range(1, 13))
    for month in months:
        length = calendar.monthrange(2000, month)[1]
        if any(-length <= day <= length for day in rule.bymonthdays):
            return True
    return False


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


class Schedule:
    """Occurrences of one dispatch version; build once, query many times.

    Occurrences are ``[start, start + duration)``. Every query takes aware UTC
    datetimes (naive ones are read as UTC) and never raises.
    """

    __slots__ = ("_anchor", "_dtstart", "_first", "_last", "_parts", "_rule", "_step", "duration")

    duration: timedelta | None
    """None means infinite: one occurrence from ``start_time`` that never ends."""

    def __init__(
        self,
        *,
        duration: timedelta | None,
        first: datetime | None,
        last: datetime | None,
        rule: du.rrule | None = None,
        parts: _Parts | None = None,
        dtstart: datetime | None = None,
    ) -> None:
        """Use ``build``; this only stores what it prepared."""
        self.duration = duration
        self._first = first
        self._last = last
        self._rule = rule
        self._parts = parts
        self._dtstart = dtstart if dtstart is not None else first
        self._step = max(1, _ANCHOR_BUDGET // parts.per_period()) if parts else 1
        self._anchor: _Anchor | None = None

    @staticmethod
    def build(dispatch: Dispatch) -> Schedule | Invalid:
        """Validate once and prepare the rule; an ``Invalid`` says why not."""
        problem = _validate(dispatch)
        if problem is not None:
            return Invalid(problem)
        start = _utc(dispatch.start_time)
        rule = dispatch.recurrence
        if dispatch.duration is None or rule is None:
            return Schedule(duration=dispatch.duration, first=start, last=start)
        return _build_recurring(rule, start, dispatch.duration)

    # --- the primitive queries -------------------------------------------------

    def next_run_after(self, t: datetime) -> datetime | None:
        """First occurrence start >= t (inclusive), like the client's
        ``Dispatch.next_run_after``."""
        return next(self._starts_from(_utc(t), inclusive=True), None)

    def next_start_after(self, t: datetime) -> datetime | None:
        """First occurrence start strictly after t."""
        return next(self._starts_from(_utc(t), inclusive=False), None)

    def last_start_at_or_before(self, t: datetime) -> datetime | None:
        """Latest occurrence start <= t."""
        t = _utc(t)
        first = self._first
        if first is None or t < first:
            return None
        last = self._last
        if last is not None and t >= last:
            return last
        if self._rule is None:
            return first
        step = self._plain_step()
        if step is not None:
            return self._plain_start(step, self._plain_index(step, t))
        anchor = self._anchor_for(t)
        found: datetime | None = anchor.rule.before(t, inc=True)
        return found if found is not None else self._previous(anchor)

    # --- derived queries -------------------------------------------------------

    def occurrence_at(self, t: datetime) -> Occurrence | None:
        """The occurrence covering t (start <= t < end), the latest-starting
        one if several overlap; None if none. Duration 0 covers nothing.

        All occurrences last equally long, so the latest start at or before t
        is the only candidate: it also ends last.
        """
        t = _utc(t)
        duration = self.duration
        if duration is None:
            start = self.last_start_at_or_before(t)
            return Occurrence(start, None) if start is not None else None
        start = self._start_covering(t, duration)
        if start is None:
            return None
        end = _add(start, duration)
        return Occurrence(start, end) if t < end else None

    def until(self, t: datetime) -> datetime | None:
        """End of the occurrence covering t; None if infinite or not running."""
        occurrence = self.occurrence_at(t)
        return occurrence.end if occurrence is not None else None

    def occurrences_between(self, a: datetime, b: datetime) -> Iterator[Occurrence]:
        """Occurrences whose start is in [a, b), in order."""
        b = _utc(b)
        for start in self._starts_from(_utc(a), inclusive=True):
            if start >= b:
                return
            end = None if self.duration is None else _add(start, self.duration)
            yield Occurrence(start, end)

    def missed_runs(self, a: datetime, b: datetime, limit: int = 100) -> tuple[datetime, ...]:
        """Starts of occurrences that began and ended within (a, b]: start > a
        and end <= b (the daemon was down from a to b).

        Oldest first; when more than ``limit`` qualify, the OLDEST ``limit``
        are kept (docs/messages.md § 4: oldest first, at most 100).
        """
        duration = self.duration
        if duration is None or limit <= 0:
            return ()
        b = _utc(b)
        missed: list[datetime] = []
        for start in self._starts_from(_utc(a), inclusive=False):
            if len(missed) >= limit or _add(start, duration) > b:
                break
            missed.append(start)
        return tuple(missed)

    def is_finished(self, t: datetime) -> bool:
        """No occurrence covers t or starts after t (never true for infinite)."""
        if self.duration is None:
            return False
        return self.occurrence_at(t) is None and self.next_start_after(t) is None

    def last_end(self) -> datetime | None:
        """End of the last occurrence; None if unbounded (infinite duration or
        an endless rule) or if there is no occurrence at all."""
        if self.duration is None or self._last is None:
            return None
        return _add(self._last, self.duration)

    # --- recurring machinery ---------------------------------------------------

    def _start_covering(self, t: datetime, duration: timedelta) -> datetime | None:
        """The latest start <= t, or None when no start lies in (t - duration, t].

        Only that window matters, so when it spans a few anchor steps the rule
        anchored before ``t - duration`` answers without any backward search
        (which sparse rules would otherwise pay on a cold cache).
        """
        first = self._first
        if first is None or t < first or duration <= timedelta(0):
            return None
        if self._rule is None or self._plain_step() is not None:
            return self.last_start_at_or_before(t)
        low = _add(t, -duration)
        window = self._period_index(t) - self._period_index(low)
        if window > 4 * self._step:
            return self.last_start_at_or_before(t)
        found: datetime | None = self._anchor_for(max(low, first)).rule.before(t, inc=True)
        return found if found is not None and found > low else None

    def _starts_from(self, t: datetime, *, inclusive: bool) -> Iterator[datetime]:
        """Occurrence starts after t (or at t if inclusive), in order."""
        first = self._first
        if first is None:
            return
        if self._rule is None or t < first:
            if t < first or (inclusive and t == first):
                yield first
            if self._rule is None:
                return
            t, inclusive = first, False
        last = self._last
        if last is not None and (t > last or (not inclusive and t == last)):
            return
        step = self._plain_step()
        if step is None:
            yield from self._anchor_for(t).rule.xafter(t, inc=inclusive)
            return
        index = self._plain_index(step, t)
        start = self._plain_start(step, index)
        if start is None or start < t or (start == t and not inclusive):
            index += 1
        while (start := self._plain_start(step, index)) is not None:
            yield start
            index += 1

    def _plain_step(self) -> timedelta | int | None:
        """The fixed distance between starts (a timedelta, or months), if any."""
        parts = self._parts
        if parts is None or not parts.plain:
            return None
        unit = _UNIT.get(parts.freq)
        if unit is not None:
            try:
                return unit * parts.interval
            except OverflowError:
                return None
        return parts.interval * (12 if parts.freq == Frequency.YEARLY else 1)

    def _plain_index(self, step: timedelta | int, t: datetime) -> int:
        """Index of the last start <= t of a plain rule (t >= first)."""
        first = self._first
        assert first is not None
        if isinstance(step, timedelta):
            return (t - first) // step
        index = ((t.year - first.year) * 12 + t.month - first.month) // step
        start = self._plain_start(step, index)
        return index - 1 if start is None or start > t else index

    def _plain_start(self, step: timedelta | int, index: int) -> datetime | None:
        """Start number ``index`` of a plain rule; None past the last or year 9999."""
        first, last = self._first, self._last
        assert first is not None
        try:
            if isinstance(step, timedelta):
                start = first + step * index
            else:
                start = _month_add(first, step * index)
        except (OverflowError, ValueError):
            return None
        return None if last is not None and start > last else start

    def _anchor_for(self, t: datetime) -> _Anchor:
        """A rule equal to the dispatch's from a period boundary <= t on."""
        assert self._rule is not None and self._parts is not None
        index = self._period_index(t)
        index -= index % self._step
        if index <= 0:
            return _Anchor(0, self._rule, None, known=True)
        anchor = self._anchor
        if anchor is not None and anchor.index == index:
            return anchor
        boundary = self._boundary(index)
        rule = self._parts.rrule(boundary, self._last)
        self._anchor = _Anchor(index, rule, None, known=False)
        if anchor is not None and anchor.index < index <= anchor.index + 4 * self._step:
            # Moving forward a little: only the gap is iterated.
            in_gap: datetime | None = anchor.rule.before(boundary)
            if in_gap is not None or anchor.known:
                self._anchor.previous = in_gap if in_gap is not None else anchor.previous
                self._anchor.known = True
        return self._anchor

    def _previous(self, anchor: _Anchor) -> datetime | None:
        """The last start before the anchor's boundary, searched only when asked."""
        if not anchor.known:
            anchor.previous = self._search_back(anchor.index, self._boundary(anchor.index))
            anchor.known = True
        return anchor.previous

    def _search_back(self, index: int, boundary: datetime) -> datetime | None:
        """Last occurrence before ``boundary``, looking back 1, 2, 4... steps."""
        assert self._parts is not None and self._rule is not None
        back = self._step
        while True:
            earlier = index - back
            rule = self._rule if earlier <= 0 else self._parts.rrule(self._boundary(earlier), None)
            found: datetime | None = rule.before(boundary)
            if found is not None or earlier <= 0:
                return found
            back *= 2

    def _period_index(self, t: datetime) -> int:
        """How many whole periods (interval x unit) t is after dtstart."""
        assert self._parts is not None and self._dtstart is not None
        parts, start = self._parts, self._dtstart
        unit = _UNIT.get(parts.freq)
        if unit is not None:
            try:
                return (t - start) // (unit * parts.interval)
            except OverflowError:
                return 0
        if parts.freq == Frequency.YEARLY:
            return (t.year - start.year) // parts.interval
        return ((t.year - start.year) * 12 + t.month - start.month) // parts.interval

    def _boundary(self, index: int) -> datetime:
        """Start of period ``index``: all its occurrences are at or after it."""
        assert self._parts is not None and self._dtstart is not None
        parts, start = self._parts, self._dtstart
        moved = index * parts.interval
        if parts.freq == Frequency.MINUTELY:
            return start + timedelta(minutes=moved)
        if parts.freq == Frequency.HOURLY:
            return (start + timedelta(hours=moved)).replace(minute=0, second=0)
        day = start.replace(hour=0, minute=0, second=0)
        if parts.freq == Frequency.DAILY:
            return day + timedelta(days=moved)
        if parts.freq == Frequency.WEEKLY:
            return day + timedelta(weeks=moved, days=-start.weekday())
        if parts.freq == Frequency.MONTHLY:
            return _month_add(day.replace(day=1), moved)
        return day.replace(year=start.year + moved, month=1, day=1)


@dataclass(slots=True)
class _Anchor:
    """A re-anchored rule for period ``index`` on, and (once ``known``) the
    last start before it."""

    index: int
    rule: du.rrule
    previous: datetime | None
    known: bool


def _build_recurring(rule: Recurrence, start: datetime, duration: timedelta) -> Schedule | Invalid:
    """Probe the rule once (errors, emptiness) and pin down its last start,
    within ``EVALUATION_BUDGET`` steps for each of the three searches."""
    dtstart = start.replace(microsecond=0)
    until = _utc(rule.until) if rule.until is not None else None
    parts = _Parts.of(rule, dtstart)
    horizon = _probe_horizon(dtstart)
    try:
        base = parts.rrule(dtstart, until)
        if _off_the_grid(parts, dtstart):
            # dateutil checks ``until`` only on matches: such a rule would be walked
            # to the year 9999 (17 s for some MINUTELY rules) to find it empty.
            return Invalid(
                "the interval never lands on the allowed weekdays, hours and minutes "
                "(counted from start_time)"
            )
        probe = _Walk(parts, dtstart, _Steps(EVALUATION_BUDGET))
        first = next(
            probe.forward(dtstart, horizon if until is None else min(until, horizon)), None
        )
    except (ValueError, OverflowError) as error:
        return Invalid(f"rule cannot be evaluated: {error}")
    except OverBudget:
        return _over_budget("its first start")
    if first is None:
        if until is not None and until < horizon:
            return Schedule(duration=duration, first=None, last=None)
        return Invalid(
            f"no occurrence within {_PROBE_YEARS} years of start_time: the by-rules never match"
        )
    schedule = Schedule(
        duration=duration, first=first, last=None, rule=base, parts=parts, dtstart=dtstart
    )
    try:
        if rule.count is not None:
            last = _count_last(schedule, first, rule.count)
            schedule._last = last
            if last is not None:
                schedule._rule = parts.rrule(dtstart, last)
        elif until is not None:
            schedule._last = (
                schedule.last_start_at_or_before(until)
                if parts.plain
                else next(_Walk(parts, dtstart, _Steps(EVALUATION_BUDGET)).backward(until), None)
            )
    except OverBudget:
        return _over_budget("its last start (count or until)")
    # Anchors built while pinning ``_last`` down ignore it: drop them.
    schedule._anchor = None
    return schedule


def _over_budget(what: str) -> Invalid:
    return Invalid(
        f"rule too sparse to evaluate: finding {what} takes more than "
        f"{EVALUATION_BUDGET} steps (by-rules that rarely meet the interval)"
    )


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
        return _MAX


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
        if span_end.year > _MAX.year - 1:
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

    def forward(self, t: datetime, stop: datetime = _MAX) -> Iterator[datetime]:
        """Starts in [t, stop], ascending."""
        t = max(t, self._dtstart)
        month = t.year * 12 + t.month - 1
        last_month = min(stop.year * 12 + stop.month - 1, _LAST_MONTH)
        first_day = t.date().toordinal()
        while month <= last_month:
            for day in self._days(month, reverse=False):
                if day < first_day:
                    continue
                for moment in self._times(day, reverse=False):
                    if moment > stop:
                        return
                    if moment >= t:
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
                for moment in self._times(day, reverse=True):
                    if self._dtstart <= moment <= t:
                        yield moment
                    elif moment < self._dtstart:
                        return
            month -= 1

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

    def _times(self, ordinal: int, *, reverse: bool) -> list[datetime]:
        """The allowed starts on one day, in order."""
        parts = self._parts
        hours, minutes = self._hours, self._minutes
        grid = self._grid(ordinal)
        if grid is None:
            pairs = [(h, m) for h in hours for m in minutes]
            self._steps.spend(len(pairs))
        else:
            first, step = grid
            per_day = _MINUTES_PER_DAY if parts.freq == Frequency.MINUTELY else 24
            if first >= per_day:  # the grid skips this day
                self._steps.spend(1)
                return []
            candidates = len(hours) * len(minutes)
            if candidates <= (per_day - first + step - 1) // step:
                pairs = [(h, m) for h in hours for m in minutes if self._on_grid(h, m, grid)]
                self._steps.spend(candidates)
            else:
                pairs = self._grid_pairs(first, step)
                self._steps.spend(len(pairs) + 1)
        if not pairs:
            return []
        day = date.fromordinal(ordinal)
        second = self._dtstart.second
        moments = [
            datetime(day.year, day.month, day.day, h, m, second, tzinfo=UTC) for h, m in pairs
        ]
        return moments[::-1] if reverse else moments

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
