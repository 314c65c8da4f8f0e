"""Dispatches, strategies and the brute-force oracle shared by the recurrence tests.

The oracle is ``frequenz-client-dispatch``'s own ``RecurrenceRule._as_rrule``
(dtstart = start_time, nothing moved), asked with ``before``/``after``, which
iterate from dtstart.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice

from dateutil import rrule as du
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds, Weekday
from dispatchd.core.recurrence import Schedule

FREQUENCIES = [
    Frequency.MINUTELY,
    Frequency.HOURLY,
    Frequency.DAILY,
    Frequency.WEEKLY,
    Frequency.MONTHLY,
    Frequency.YEARLY,
]
WEEKDAYS = [d for d in Weekday if d != Weekday.UNSPECIFIED]
APPROX_UNIT = {
    Frequency.MINUTELY: timedelta(minutes=1),
    Frequency.HOURLY: timedelta(hours=1),
    Frequency.DAILY: timedelta(days=1),
    Frequency.WEEKLY: timedelta(weeks=1),
    Frequency.MONTHLY: timedelta(days=31),
    Frequency.YEARLY: timedelta(days=366),
}
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dispatch(
    start: datetime, duration: timedelta | None, recurrence: Recurrence | None = None
) -> Dispatch:
    return Dispatch(
        id=1,
        microgrid_id=1,
        type="T",
        start_time=start,
        duration=duration,
        target=TargetIds(1),
        recurrence=recurrence,
        create_time=EPOCH,
        update_time=EPOCH,
    )


def at(seconds: float) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


def built(d: Dispatch) -> Schedule:
    schedule = Schedule.build(d)
    assert isinstance(schedule, Schedule), schedule
    return schedule


# --- strategies ----------------------------------------------------------------

starts = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


def by_part(values: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[int, ...]]:
    return st.one_of(
        st.just(()),
        st.lists(values, min_size=1, max_size=3, unique=True).map(lambda v: tuple(sorted(v))),
    )


@st.composite
def recurring(
    draw: st.DrawFn, frequencies: list[Frequency] = FREQUENCIES, by_parts: bool = True
) -> Dispatch:
    """A recurring dispatch with in-range fields (it may still be empty/invalid).

    Without ``by_parts`` at most one hour and one minute are given: one start
    per period, the schedule's arithmetic path.
    """
    frequency = draw(st.sampled_from(frequencies))
    interval = draw(st.integers(1, 4) | st.integers(5, 40))
    start = draw(starts)
    period = APPROX_UNIT[frequency] * interval
    end = draw(st.sampled_from(["none", "count", "until"]))
    count = draw(st.integers(1, 60)) if end == "count" else None
    until = None
    if end == "until":
        until = (
            start + period * draw(st.floats(-1, 80)) + timedelta(seconds=draw(st.integers(-1, 1)))
        )
    single = st.lists(st.integers(0, 23), max_size=1).map(tuple)
    if by_parts:
        rule = Recurrence(
            frequency=frequency,
            interval=interval,
            count=count,
            until=until,
            byminutes=draw(by_part(st.integers(0, 59))),
            byhours=draw(by_part(st.integers(0, 23))),
            byweekdays=tuple(draw(by_part(st.sampled_from(WEEKDAYS)))),
            bymonthdays=draw(by_part(st.integers(-31, 31).filter(bool))),
            bymonths=draw(by_part(st.integers(1, 12))),
        )
    else:
        rule = Recurrence(
            frequency=frequency,
            interval=interval,
            count=count,
            until=until,
            byminutes=draw(single),
            byhours=draw(single) if frequency != Frequency.HOURLY else (),
        )
    duration = draw(
        st.sampled_from([timedelta(0), period, period / 2, period * 3])
        | st.integers(0, int(3 * period.total_seconds())).map(lambda s: timedelta(seconds=s))
    )
    return dispatch(start, duration, rule)


def oracle(d: Dispatch) -> du.rrule | None:
    """The unmoved rule; None when dateutil refuses to construct it."""
    assert d.recurrence is not None
    try:
        return d.recurrence.to_client()._as_rrule(d.start_time)
    except ValueError:
        return None


def instants(data: st.DataObject, d: Dispatch, rule: du.rrule, how_many: int) -> list[datetime]:
    """Random instants, many of them on or next to occurrence boundaries."""
    assert d.duration is not None
    period = APPROX_UNIT[d.recurrence.frequency] * d.recurrence.interval  # type: ignore[union-attr]
    latest = datetime(9000, 1, 1, tzinfo=UTC) - d.start_time
    span = min(period * 300, latest, timedelta(days=365 * 150))
    starts_seen = list(islice(rule, 60))
    result = []
    for _ in range(how_many):
        if starts_seen and data.draw(st.booleans()):
            start = data.draw(st.sampled_from(starts_seen))
            edge = data.draw(st.sampled_from([timedelta(0), d.duration]))
            nudge = timedelta(seconds=data.draw(st.sampled_from([-1, 0, 0, 1])))
            result.append(start + edge + nudge)
        else:
            fraction = data.draw(st.floats(-0.01, 1))
            result.append(d.start_time + span * fraction)
    return result
