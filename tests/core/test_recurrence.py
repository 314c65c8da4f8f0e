"""Schedule against brute force: every query equals plain, un-anchored rrule.

The oracle is ``frequenz-client-dispatch``'s own ``RecurrenceRule._as_rrule``
(dtstart = start_time, nothing moved), asked with ``before``/``after``, which
iterate from dtstart. The schedule under test re-anchors its rule; these tests
prove that this changes nothing, including when one schedule is asked many
questions in random order (the anchor is cached state).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice

from dateutil import rrule as du
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dispatchd.core.messages import Occurrence
from dispatchd.core.model import Dispatch, Frequency, Recurrence, Weekday
from dispatchd.core.recurrence import Invalid, Schedule
from tests.core.recurrence_helpers import (
    PROPERTY,
    WEEKDAYS,
    at,
    built,
    by_part,
    dispatch,
    instants,
    oracle,
    recurring,
    starts,
)

# --- properties ----------------------------------------------------------------


@PROPERTY
@given(st.data(), recurring() | recurring(by_parts=False))
def test_every_query_equals_brute_force(data: st.DataObject, d: Dispatch) -> None:
    rule = oracle(d)
    schedule = Schedule.build(d)
    if isinstance(schedule, Invalid):
        assert_really_empty_or_unevaluable(rule, d.start_time, schedule)
        return
    assert rule is not None
    duration = d.duration
    assert duration is not None
    for t in instants(data, d, rule, 12):
        latest = rule.before(t, inc=True)
        assert schedule.last_start_at_or_before(t) == latest
        covering = (
            Occurrence(latest, latest + duration)
            if latest is not None and t < latest + duration
            else None
        )
        assert schedule.occurrence_at(t) == covering
        assert schedule.until(t) == (covering.end if covering else None)
        assert schedule.next_start_after(t) == rule.after(t)
        assert schedule.next_run_after(t) == rule.after(t, inc=True)
        assert schedule.is_finished(t) == (covering is None and rule.after(t) is None)


@PROPERTY
@given(st.data(), recurring() | recurring(by_parts=False))
def test_ranges_equal_brute_force(data: st.DataObject, d: Dispatch) -> None:
    rule = oracle(d)
    schedule = Schedule.build(d)
    assume(isinstance(schedule, Schedule))
    assert isinstance(schedule, Schedule) and rule is not None
    duration = d.duration
    assert duration is not None
    a, b = sorted(instants(data, d, rule, 2))
    expected = []
    for start in rule.xafter(a, inc=True):
        if start >= b or len(expected) > 400:
            break
        expected.append(Occurrence(start, start + duration))
    assert list(islice(schedule.occurrences_between(a, b), 401)) == expected
    limit = data.draw(st.integers(1, 20))
    # Starts are sorted and durations equal: stop at the first start that cannot fit.
    missed = []
    for start in rule.xafter(a):
        if start + duration > b or len(missed) == limit:
            break
        missed.append(start)
    assert schedule.missed_runs(a, b, limit) == tuple(missed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recurring() | recurring(by_parts=False), st.integers(1, 40))
def test_walking_forward_sees_every_occurrence(d: Dispatch, stride: int) -> None:
    """Ascending queries move the cached anchor forward period by period."""
    rule = oracle(d)
    schedule = Schedule.build(d)
    assume(isinstance(schedule, Schedule))
    assert isinstance(schedule, Schedule) and rule is not None
    second = timedelta(seconds=1)
    every = list(islice(rule, 600))
    for i in range(0, len(every), stride):
        start = every[i]
        assert schedule.last_start_at_or_before(start) == start
        assert schedule.next_run_after(start) == start
        if i > 0:
            earlier = every[i - 1]
            assert schedule.next_start_after(earlier) == start
            assert schedule.last_start_at_or_before(start - second) == earlier


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recurring() | recurring(by_parts=False))
def test_last_end_is_end_of_the_last_occurrence(d: Dispatch) -> None:
    rule = oracle(d)
    schedule = Schedule.build(d)
    assume(isinstance(schedule, Schedule))
    assert isinstance(schedule, Schedule) and d.recurrence is not None and rule is not None
    if d.recurrence.count is None and d.recurrence.until is None:
        assert schedule.last_end() is None
        return
    every = list(rule)
    expected = every[-1] + d.duration if every and d.duration is not None else None
    assert schedule.last_end() == expected


@settings(max_examples=25, deadline=None)
@given(
    st.data(),
    st.sampled_from([Frequency.MINUTELY, Frequency.HOURLY]),
    st.integers(1, 3),
    by_part(st.integers(0, 59)),
    by_part(st.integers(0, 23)),
    by_part(st.sampled_from(WEEKDAYS)),
)
def test_far_from_start_equals_brute_force(
    data: st.DataObject,
    frequency: Frequency,
    interval: int,
    byminutes: tuple[int, ...],
    byhours: tuple[int, ...],
    byweekdays: tuple[Weekday, ...],
) -> None:
    """Tens of thousands of periods after start, where anchoring matters most."""
    start = data.draw(starts)
    rule_fields = Recurrence(
        frequency=frequency,
        interval=interval,
        byminutes=byminutes,
        byhours=byhours,
        byweekdays=byweekdays,
    )
    d = dispatch(start, timedelta(minutes=data.draw(st.integers(0, 120))), rule_fields)
    schedule = Schedule.build(d)
    rule = oracle(d)
    if isinstance(schedule, Invalid):
        assert_really_empty_or_unevaluable(rule, start, schedule)
        return
    assert rule is not None
    base = start + timedelta(days=data.draw(st.integers(10, 40)))
    for _ in range(4):
        t = base + timedelta(seconds=data.draw(st.integers(-3 * 86400, 3 * 86400)))
        assert schedule.last_start_at_or_before(t) == rule.before(t, inc=True)
        assert schedule.next_start_after(t) == rule.after(t)


_NOT_WALKED_HERE = ("rule too sparse to evaluate", "the interval never lands")


def assert_really_empty_or_unevaluable(
    rule: du.rrule | None, start: datetime, invalid: Invalid
) -> None:
    """An ``Invalid`` for in-range fields: rrule raises, finds nothing for 100
    years, or the rule is over the evaluation budget (see test_recurrence_budget).

    A rule off its interval's grid is not walked here: dateutil would walk it to
    the year 9999 (it hung CI); test_recurrence_grid checks that verdict
    exactly against a brute-force walk of one cycle of the grid.
    """
    if rule is None or invalid.reason.startswith(_NOT_WALKED_HERE):
        return
    try:
        found = rule.between(start, start + timedelta(days=365 * 100), inc=True, count=1)
    except ValueError:
        return
    assert found == []


# --- one-off and infinite --------------------------------------------------------


@given(starts, st.integers(0, 10_000), starts)
def test_one_off_is_one_half_open_occurrence(start: datetime, seconds: int, t: datetime) -> None:
    duration = timedelta(seconds=seconds)
    schedule = built(dispatch(start, duration))
    covering = Occurrence(start, start + duration) if start <= t < start + duration else None
    assert schedule.occurrence_at(t) == covering
    assert schedule.next_run_after(t) == (start if t <= start else None)
    assert schedule.next_start_after(t) == (start if t < start else None)
    assert schedule.last_start_at_or_before(t) == (start if start <= t else None)
    assert schedule.last_end() == start + duration
    assert schedule.is_finished(t) == (t >= start + duration)


@given(starts, recurring(), starts)
def test_infinite_duration_ignores_the_recurrence(
    start: datetime, template: Dispatch, t: datetime
) -> None:
    schedule = built(dispatch(start, None, template.recurrence))
    assert schedule.duration is None
    assert schedule.occurrence_at(t) == (Occurrence(start, None) if start <= t else None)
    assert schedule.until(t) is None
    assert schedule.next_run_after(t) == (start if t <= start else None)
    assert not schedule.is_finished(t)
    assert schedule.last_end() is None
    assert schedule.missed_runs(start - timedelta(days=1), start + timedelta(days=999)) == ()


# --- docs/scheduling.md consequences --------------------------------------------


def test_consequence_1_one_shot() -> None:
    schedule = built(dispatch(at(10), timedelta(seconds=20)))
    assert schedule.occurrence_at(at(10)) == Occurrence(at(10), at(30))
    assert schedule.until(at(29)) == at(30)
    assert schedule.occurrence_at(at(30)) is None
    assert schedule.is_finished(at(30)) and not schedule.is_finished(at(29))


def test_consequence_2_infinite() -> None:
    schedule = built(dispatch(at(10), None))
    assert schedule.occurrence_at(at(9)) is None
    assert schedule.occurrence_at(at(10)) == Occurrence(at(10), None)
    assert schedule.until(at(10**9)) is None
    assert schedule.next_start_after(at(10)) is None


def test_consequence_3_minutely_count_and_inclusive_until() -> None:
    by_count = built(
        dispatch(at(60), timedelta(seconds=10), Recurrence(frequency=Frequency.MINUTELY, count=3))
    )
    by_until = built(
        dispatch(
            at(60), timedelta(seconds=10), Recurrence(frequency=Frequency.MINUTELY, until=at(180))
        )
    )
    expected = [Occurrence(at(s), at(s + 10)) for s in (60, 120, 180)]
    for schedule in (by_count, by_until):
        assert list(schedule.occurrences_between(at(0), at(10_000))) == expected
        assert schedule.occurrence_at(at(185)) == expected[2]
        assert schedule.occurrence_at(at(190)) is None
        assert schedule.last_end() == at(190)
        assert schedule.is_finished(at(190))


def test_consequence_4_overlap_takes_the_latest_start() -> None:
    schedule = built(
        dispatch(at(60), timedelta(seconds=90), Recurrence(frequency=Frequency.MINUTELY, count=3))
    )
    assert schedule.until(at(60)) == at(150)
    assert schedule.until(at(120)) == at(210)
    assert schedule.until(at(180)) == at(270)
    assert schedule.occurrence_at(at(150)) == Occurrence(at(120), at(210))
    assert schedule.occurrence_at(at(269)) == Occurrence(at(180), at(270))
    assert schedule.occurrence_at(at(270)) is None
    assert schedule.last_end() == at(270)


def test_consequence_5_back_to_back_runs_continuously() -> None:
    schedule = built(
        dispatch(at(60), timedelta(seconds=60), Recurrence(frequency=Frequency.MINUTELY, count=3))
    )
    for second in range(60, 240):
        occurrence = schedule.occurrence_at(at(second))
        assert occurrence is not None and occurrence.start <= at(second) < occurrence.end
    assert schedule.occurrence_at(at(120)) == Occurrence(at(120), at(180))
    assert schedule.occurrence_at(at(240)) is None
    assert schedule.last_end() == at(240)


def test_consequence_6_zero_duration_covers_nothing_but_counts_as_run() -> None:
    schedule = built(
        dispatch(at(60), timedelta(0), Recurrence(frequency=Frequency.MINUTELY, count=3))
    )
    assert schedule.occurrence_at(at(60)) is None
    assert schedule.next_run_after(at(60)) == at(60)
    assert schedule.next_start_after(at(60)) == at(120)
    assert schedule.last_start_at_or_before(at(179)) == at(120)
    assert schedule.missed_runs(at(0), at(180)) == (at(60), at(120), at(180))
    assert schedule.missed_runs(at(60), at(179)) == (at(120),)
    assert not schedule.is_finished(at(179))
    assert schedule.is_finished(at(180))


# --- specific rules ---------------------------------------------------------------


def test_start_not_matching_by_rules_starts_at_next_match() -> None:
    monday_noon = datetime(2026, 11, 23, 12, tzinfo=UTC)
    rule = Recurrence(frequency=Frequency.WEEKLY, byweekdays=(Weekday.WEDNESDAY,), count=2)
    schedule = built(dispatch(monday_noon, timedelta(hours=1), rule))
    assert [
        o.start for o in schedule.occurrences_between(monday_noon, monday_noon.replace(year=2027))
    ] == [
        datetime(2026, 11, 25, 12, tzinfo=UTC),
        datetime(2026, 12, 2, 12, tzinfo=UTC),
    ]


def test_monthly_on_the_31st_skips_short_months_far_ahead() -> None:
    start = datetime(2024, 1, 31, 8, tzinfo=UTC)
    schedule = built(dispatch(start, timedelta(hours=1), Recurrence(frequency=Frequency.MONTHLY)))
    after = datetime(2030, 2, 1, tzinfo=UTC)
    assert schedule.next_start_after(after) == datetime(2030, 3, 31, 8, tzinfo=UTC)
    assert schedule.last_start_at_or_before(after) == datetime(2030, 1, 31, 8, tzinfo=UTC)


def test_yearly_on_february_29_and_negative_month_days() -> None:
    leap = built(
        dispatch(
            datetime(2024, 2, 29, tzinfo=UTC),
            timedelta(hours=1),
            Recurrence(frequency=Frequency.YEARLY),
        )
    )
    assert leap.next_start_after(datetime(2024, 3, 1, tzinfo=UTC)) == datetime(
        2028, 2, 29, tzinfo=UTC
    )
    last_day = built(
        dispatch(
            datetime(2026, 1, 1, tzinfo=UTC),
            timedelta(hours=1),
            Recurrence(frequency=Frequency.MONTHLY, bymonthdays=(-1,)),
        )
    )
    assert last_day.next_start_after(datetime(2028, 2, 1, tzinfo=UTC)) == datetime(
        2028, 2, 29, tzinfo=UTC
    )


def test_queries_accept_naive_and_non_utc_instants() -> None:
    schedule = built(
        dispatch(at(60), timedelta(seconds=10), Recurrence(frequency=Frequency.MINUTELY))
    )
    naive = at(125).replace(tzinfo=None)
    assert schedule.occurrence_at(naive) == Occurrence(at(120), at(130))
    plus_one = at(125).astimezone(__import__("datetime").timezone(timedelta(hours=1)))
    assert schedule.occurrence_at(plus_one) == Occurrence(at(120), at(130))


def test_microseconds_of_a_recurring_start_are_dropped_like_rrule() -> None:
    start = at(60) + timedelta(microseconds=500)
    schedule = built(
        dispatch(start, timedelta(seconds=10), Recurrence(frequency=Frequency.MINUTELY))
    )
    assert schedule.next_run_after(at(0)) == at(60)
    assert built(dispatch(start, timedelta(seconds=10))).next_run_after(at(0)) == start


def test_huge_count_without_by_parts_is_arithmetic() -> None:
    schedule = built(
        dispatch(at(0), timedelta(seconds=1), Recurrence(frequency=Frequency.MINUTELY, count=10**9))
    )
    assert schedule.last_end() == at(0) + timedelta(minutes=10**9 - 1, seconds=1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    st.sampled_from([Frequency.MINUTELY, Frequency.HOURLY, Frequency.DAILY, Frequency.WEEKLY]),
    st.integers(1, 20),
    st.integers(50, 4000),
)
def test_large_counts_end_where_brute_force_ends(
    data: st.DataObject, frequency: Frequency, interval: int, count: int
) -> None:
    """Counts beyond one weekly span go through the periodic shortcut."""
    rule = Recurrence(
        frequency=frequency,
        interval=interval,
        count=count,
        byminutes=data.draw(by_part(st.integers(0, 59))),
        byhours=data.draw(by_part(st.integers(0, 23))),
        byweekdays=tuple(data.draw(by_part(st.sampled_from(WEEKDAYS)))),
    )
    d = dispatch(data.draw(starts), timedelta(seconds=1), rule)
    schedule = Schedule.build(d)
    reference = oracle(d)
    if isinstance(schedule, Invalid):
        assert_really_empty_or_unevaluable(reference, d.start_time, schedule)
        return
    assert reference is not None
    every = list(reference)
    assert schedule.last_end() == every[-1] + timedelta(seconds=1)
    assert schedule.next_start_after(every[-1]) is None
    assert schedule.last_start_at_or_before(every[-1] + timedelta(days=9999)) == every[-1]
