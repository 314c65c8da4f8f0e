"""Time in one place: aware UTC everywhere, epoch microseconds, month lengths.

Every instant the daemon compares, stores or sends is an aware UTC
``datetime``; a naive one is read as UTC, as the API's timestamps are. Mixing
naive and aware values would make comparisons raise, so each way in goes
through :func:`utc`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Final

EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
"""Before every instant (``datetime.min`` as aware UTC)."""
LATEST: Final = datetime.max.replace(tzinfo=UTC)
"""After every instant (``datetime.max`` as aware UTC)."""
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_DAYS_IN_MONTH: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
"""The longest each month gets (February in a leap year)."""


def utc(moment: datetime) -> datetime:
    """``moment`` as aware UTC; naive is read as UTC, so comparisons never raise."""
    if moment.tzinfo is UTC:
        return moment
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def epoch_micros(moment: datetime) -> int:
    """Exact (integer) microseconds since the epoch; naive is read as UTC.

    Integer arithmetic on the ``timedelta``'s parts: ``timestamp()`` is a
    float and loses microseconds far from 1970.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def some_month_has_day(months: Collection[int], days: Iterable[int]) -> bool:
    """Whether one of ``days`` (1..31, or -31..-1 from the end) falls in one of ``months``.

    No ``months`` means any month. Without this check dateutil searches a
    rule like "the 30th of February" up to the year 9999.
    """
    longest = max((_DAYS_IN_MONTH[month - 1] for month in months), default=31)
    return any(abs(day) <= longest for day in days)
