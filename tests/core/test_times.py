"""The one home of time helpers: UTC normalisation, epoch microseconds, month days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core.times import EARLIEST, LATEST, epoch_micros, some_month_has_day, utc
from tests.core.wire_helpers import FEW, any_times, zoned_times

naive_times = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.none()
)
offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@given(naive_times)
def test_a_naive_time_is_read_as_utc(moment: datetime) -> None:
    normalised = utc(moment)
    assert normalised.tzinfo is UTC
    assert normalised.replace(tzinfo=None) == moment


@given(naive_times, offsets)
def test_an_aware_time_keeps_its_instant_and_becomes_utc(moment: datetime, zone: timezone) -> None:
    aware = moment.replace(tzinfo=zone)
    normalised = utc(aware)
    assert normalised.tzinfo is UTC
    assert normalised == aware
    assert utc(normalised) is normalised


@FEW
@given(st.one_of(any_times, zoned_times, st.datetimes()))
def test_epoch_micros_is_exact(moment: datetime) -> None:
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    expected = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert epoch_micros(moment) == expected


def test_the_ends_of_time_bound_every_instant() -> None:
    assert datetime.min.replace(tzinfo=UTC) == EARLIEST
    assert datetime.max.replace(tzinfo=UTC) == LATEST


def _exists_in_a_leap_year(month: int, day: int) -> bool:
    try:
        date(2000, month, abs(day))
    except ValueError:
        return False
    return True


@given(
    st.lists(st.integers(min_value=1, max_value=12), max_size=4),
    st.lists(
        st.integers(min_value=-31, max_value=31).filter(lambda day: day != 0),
        min_size=1,
        max_size=4,
    ),
)
def test_some_month_has_day_matches_the_calendar(months: list[int], days: list[int]) -> None:
    candidates = months or range(1, 13)
    expected = any(_exists_in_a_leap_year(month, day) for month in candidates for day in days)
    assert some_month_has_day(months, days) is expected


def test_the_30th_of_february_does_not_exist_but_the_29th_does() -> None:
    assert not some_month_has_day([2], [30, -30])
    assert some_month_has_day([2], [29])
    assert some_month_has_day([2, 4], [31]) is False
    assert some_month_has_day([], [31])
