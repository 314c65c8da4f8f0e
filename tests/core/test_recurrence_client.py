"""Differential test against ``frequenz-client-dispatch``'s own schedule answers.

``Dispatch.started_at(now)`` and ``Dispatch.next_run_after(after)`` of the
client library must agree with the schedule, except where we deliberately
differ. Excluded cases, each for a reason:

- Invalid rules (our ``Invalid``): the library raises from deep inside the
  query (interval 0, dateutil's "invalid combination" errors) or answers
  None for an UNSPECIFIED weekday; docs/scheduling.md makes them never run.
- An instant in ``[start_time truncated to the second, start_time)`` of a
  recurring dispatch whose start has microseconds: rrule (both sides) drops
  the microseconds, so the first occurrence starts before ``start_time``; the
  library's ``started_at`` additionally answers False before ``start_time``,
  contradicting its own ``next_run_after``. We follow rrule.

Everything else (overlaps included: the library's ``_until`` looks at the
latest start only, which is exact because all occurrences last equally long)
must agree. The library's scheduler-level differences (announcing at covered
end instants, only a stop for duration 0) are not in these two methods.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.core.model import Dispatch
from dispatchd.core.recurrence import Invalid, Schedule
from tests.core.recurrence_helpers import APPROX_UNIT, dispatch, recurring, starts

with_micros = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


@st.composite
def any_dispatch(draw: st.DrawFn) -> Dispatch:
    """Recurring, one-off or infinite, starting with or without microseconds."""
    template = draw(recurring())
    start = draw(with_micros | starts.map(lambda s: s.replace(microsecond=0)))
    shape = draw(st.sampled_from(["recurring", "recurring", "one-off", "infinite"]))
    if shape == "one-off":
        return dispatch(start, template.duration)
    if shape == "infinite":
        return dispatch(start, None, template.recurrence)
    return dispatch(start, template.duration, template.recurrence)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_dispatch(), st.data())
def test_agrees_with_the_client_library(d: Dispatch, data: st.DataObject) -> None:
    schedule = Schedule.build(d)
    if isinstance(schedule, Invalid):
        return  # excluded: see the module docstring
    client = d.to_client()
    rule = d.recurrence
    period = APPROX_UNIT[rule.frequency] * rule.interval if rule else timedelta(hours=1)
    span = min(period * 200, timedelta(days=365 * 100))
    near = list(islice(schedule.occurrences_between(d.start_time - span, d.start_time + span), 20))
    candidates = [d.start_time + span * data.draw(st.floats(-0.05, 1)) for _ in range(6)]
    for occurrence in near[:: max(1, len(near) // 5)]:
        candidates.append(occurrence.start)
        if occurrence.end is not None:
            candidates += [occurrence.end, occurrence.end - timedelta(microseconds=1)]
    truncated_gap_start = d.start_time.replace(microsecond=0) if d.is_recurring else d.start_time
    for t in candidates:
        assert schedule.next_run_after(t) == client.next_run_after(t), t
        if truncated_gap_start <= t < d.start_time:
            continue  # excluded: see the module docstring
        assert (schedule.occurrence_at(t) is not None) == client.started_at(t), t
