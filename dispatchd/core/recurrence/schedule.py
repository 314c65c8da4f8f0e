"""The occurrences of one dispatch version: built once, queried many times."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from dateutil import rrule as du

from dispatchd.core.messages import Occurrence
from dispatchd.core.model import Dispatch, Frequency, Recurrence
from dispatchd.core.recurrence.bounds import (
    _PROBE_YEARS,
    _count_last,
    _off_the_grid,
    _probe_horizon,
)
from dispatchd.core.recurrence.parts import (
    _UNIT,
    _add,
    _month_add,
    _Parts,
)
from dispatchd.core.recurrence.validation import _validate
from dispatchd.core.recurrence.walk import EVALUATION_BUDGET, OverBudget, _Steps, _Walk
from dispatchd.core.times import utc

_ANCHOR_BUDGET: Final = 16
"""Roughly how many candidate occurrences a query may iterate past the anchor
before the anchor is moved forward."""


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a dispatch's schedule cannot be evaluated; it never runs."""

    reason: str


class Schedule:
    """Occurrences of one dispatch version; build once, query many times.

    Occurrences are ``[start, start + duration)``. Every query takes aware UTC
    datetimes (naive ones are read as UTC) and never raises.
    """

    __slots__ = (
        "_anchor",
        "_dtstart",
        "_first",
        "_last",
        "_parts",
        "_plain",
        "_rule",
        "_step",
        "duration",
    )

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
        # Worked out once here: every start and stop of a recurring dispatch asks.
        self._plain = _plain_step_of(parts)
        self._anchor: _Anchor | None = None

    @staticmethod
    def build(dispatch: Dispatch) -> Schedule | Invalid:
        """Validate once and prepare the rule; an ``Invalid`` says why not."""
        problem = _validate(dispatch)
        if problem is not None:
            return Invalid(problem)
        start = utc(dispatch.start_time)
        rule = dispatch.recurrence
        if dispatch.duration is None or rule is None:
            return Schedule(duration=dispatch.duration, first=start, last=start)
        return _build_recurring(rule, start, dispatch.duration)

    # --- the primitive queries -------------------------------------------------

    def next_run_after(self, t: datetime) -> datetime | None:
        """First occurrence start >= t (inclusive), like the client's
        ``Dispatch.next_run_after``."""
        return next(self._starts_from(utc(t), inclusive=True), None)

    def next_start_after(self, t: datetime) -> datetime | None:
        """First occurrence start strictly after t."""
        return next(self._starts_from(utc(t), inclusive=False), None)

    def last_start_at_or_before(self, t: datetime) -> datetime | None:
        """Latest occurrence start <= t."""
        t = utc(t)
        first = self._first
        if first is None or t < first:
            return None
        last = self._last
        if last is not None and t >= last:
            return last
        if self._rule is None:
            return first
        step = self._plain
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
        t = utc(t)
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
        b = utc(b)
        for start in self._starts_from(utc(a), inclusive=True):
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
        b = utc(b)
        missed: list[datetime] = []
        for start in self._starts_from(utc(a), inclusive=False):
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
        if self._rule is None or self._plain is not None:
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
        step = self._plain
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
    until = utc(rule.until) if rule.until is not None else None
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


def _plain_step_of(parts: _Parts | None) -> timedelta | int | None:
    """The fixed distance between the starts of a plain rule (a timedelta, or months), if any."""
    if parts is None or not parts.plain:
        return None
    unit = _UNIT.get(parts.freq)
    if unit is not None:
        try:
            return unit * parts.interval
        except OverflowError:
            return None
    return parts.interval * (12 if parts.freq == Frequency.YEARLY else 1)
