"""The time format and parser shared by the wire modules (core/wire/_reader.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core import wire
from tests.core.wire_helpers import FEW, any_times, reference_time, times, zoned_times


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 11, 23, 10, 0, tzinfo=UTC), "2026-11-23T10:00:00Z"),
        (datetime(2026, 11, 23, 10, 0, 0, 4000, tzinfo=UTC), "2026-11-23T10:00:00.004Z"),
        (datetime(2026, 11, 23, 10, 0, 0, 4001, tzinfo=UTC), "2026-11-23T10:00:00.004001Z"),
        (datetime(2026, 11, 23, 10, 0, 0, 120000, tzinfo=UTC), "2026-11-23T10:00:00.120Z"),
        (datetime(2026, 11, 23, 10, 0), "2026-11-23T10:00:00Z"),
        (
            datetime(2026, 11, 23, 11, 30, tzinfo=timezone(timedelta(hours=1, minutes=30))),
            "2026-11-23T10:00:00Z",
        ),
        (datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC), "0005-01-02T03:04:05Z"),
    ],
)
def test_format_time(moment: datetime, text: str) -> None:
    assert wire.format_time(moment) == text


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-23T10:00:00Z",
        "2026-11-23T10:00:00+00:00",
        "2026-11-23T10:00:00-00:00",
        "2026-11-23t10:00:00z",
        "2026-11-23 10:00:00Z",
        "2026-11-23T11:00:00+01:00",
        "2026-11-23T08:30:00-01:30",
        "2026-11-23T10:00:00.000Z",
        "2026-11-23T10:00:00.000000000Z",
    ],
)
def test_parse_time_accepts_rfc3339(text: str) -> None:
    assert wire.parse_time(text) == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert wire.parse_time(text).tzinfo is UTC


def test_parse_time_truncates_below_microseconds() -> None:
    assert wire.parse_time("2026-11-23T10:00:00.1234569Z") == datetime(
        2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-23",
        "2026-11-23T10:00:00",
        "2026-11-23T10:00Z",
        "20261123T100000Z",
        "2026-13-01T00:00:00Z",
        "2026-11-23T24:00:00Z",
        "2026-11-23T10:00:00+24:00",
        "2026-11-23T10:00:00.Z",
        "2026-11-23T10:00:00Z ",
        "0001-01-01T00:00:00+01:00",
        "\uff12\uff10\uff12\uff16-11-23T10:00:00Z",  # full-width digits
    ],
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|range|month|hour"):
        wire.parse_time(text)


@FEW
@given(times)
def test_time_round_trip(moment: datetime) -> None:
    assert wire.parse_time(wire.format_time(moment)) == moment


@FEW
@given(st.one_of(any_times, zoned_times, st.datetimes()))
def test_format_time_matches_the_reference(moment: datetime) -> None:
    assert wire.format_time(moment) == reference_time(moment)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(1, 1, 1), "0001-01-01T00:00:00Z"),
        (datetime(999, 1, 2, 3, 4, 5, 6000, tzinfo=UTC), "0999-01-02T03:04:05.006Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), "2026-01-01T00:00:00.001Z"),
        (
            datetime(2026, 1, 1, tzinfo=timezone(timedelta(microseconds=5))),
            "2025-12-31T23:59:59.999995Z",
        ),
    ],
)
def test_format_time_edges(moment: datetime, text: str) -> None:
    assert wire.format_time(moment) == text
