"""Hypothesis strategies and the golden example shared by the wire, record and time tests.

The golden example is docs/messages.md's running message, byte for byte.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch.types import (
    BatteryType,
    EvChargerType,
    InverterType,
    TargetCategories,
)
from hypothesis import settings
from hypothesis import strategies as st

from dispatchd.core.messages import (
    Event,
    LifecycleMessage,
    Message,
    Occurrence,
    Reason,
    RunningMessage,
)
from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds, Weekday

# ------------------------------------------------------------------ strategies

times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2300, 1, 1), timezones=st.just(UTC)
)
whole_second_times = times.map(lambda moment: moment.replace(microsecond=0))
any_times = st.one_of(whole_second_times, times)

durations = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=10**9).map(lambda s: timedelta(seconds=s)),
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=36500)),
)

component_categories = st.sampled_from(list(ElectricalComponentCategory))
category_types = st.one_of(
    st.sampled_from(list(BatteryType)),
    st.sampled_from(list(EvChargerType)),
    st.sampled_from(list(InverterType)),
)
targets = st.one_of(
    st.lists(st.integers(min_value=0, max_value=2**63)).map(lambda ids: TargetIds(*ids)),
    st.lists(component_categories).map(lambda cats: TargetCategories(*cats)),
    st.lists(st.one_of(component_categories, category_types)).map(
        lambda cats: TargetCategories(*cats)
    ),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(), json_values, max_size=5)


@st.composite
def recurrences(draw: st.DrawFn) -> Recurrence:
    end = draw(st.sampled_from(["none", "count", "until"]))
    small_ints = st.lists(st.integers(min_value=-400, max_value=400), max_size=5)
    return Recurrence(
        frequency=draw(st.sampled_from(list(Frequency))),
        interval=draw(st.integers(min_value=0, max_value=1000)),
        count=draw(st.integers(min_value=0, max_value=10**6)) if end == "count" else None,
        until=draw(any_times) if end == "until" else None,
        byminutes=tuple(draw(small_ints)),
        byhours=tuple(draw(small_ints)),
        byweekdays=tuple(draw(st.lists(st.sampled_from(list(Weekday)), max_size=7))),
        bymonthdays=tuple(draw(small_ints)),
        bymonths=tuple(draw(small_ints)),
    )


dispatch_types = st.one_of(
    st.sampled_from(["PEAK_SHAVING", "a.b", "*", "#", "", "Wärme pumpe"]), st.text()
)


@st.composite
def dispatches(draw: st.DrawFn, microgrid_id: int | None = None) -> Dispatch:
    return Dispatch(
        id=draw(st.integers(min_value=0, max_value=2**63)),
        microgrid_id=(
            microgrid_id
            if microgrid_id is not None
            else draw(st.integers(min_value=0, max_value=2**64 - 1))
        ),
        type=draw(dispatch_types),
        start_time=draw(any_times),
        duration=draw(durations),
        target=draw(targets),
        active=draw(st.booleans()),
        dry_run=draw(st.booleans()),
        payload=draw(payloads),
        recurrence=draw(st.one_of(st.none(), recurrences())),
        create_time=draw(any_times),
        update_time=draw(any_times),
        end_time=draw(st.one_of(st.none(), any_times)),
    )


@st.composite
def lifecycle_messages(draw: st.DrawFn) -> LifecycleMessage:
    dispatch = draw(dispatches())
    return LifecycleMessage(
        event=draw(st.sampled_from([Event.CREATED, Event.UPDATED, Event.DELETED])),
        dispatch=dispatch,
        routing_type=draw(st.one_of(st.just(dispatch.type), dispatch_types)),
        emitted_at=draw(any_times),
    )


@st.composite
def running_messages(draw: st.DrawFn) -> RunningMessage:
    return RunningMessage(
        event=draw(st.sampled_from([Event.RUNNING, Event.STOPPED])),
        reason=draw(st.sampled_from(list(Reason))),
        dispatch=draw(dispatches()),
        occurrence=Occurrence(draw(any_times), draw(st.one_of(st.none(), any_times))),
        until=draw(st.one_of(st.none(), any_times)),
        scheduled_for=draw(any_times),
        emitted_at=draw(any_times),
        sequence=draw(st.integers(min_value=0, max_value=2**63)),
        running_state_change_synced=draw(st.one_of(st.none(), any_times)),
        missed_runs=tuple(draw(st.lists(any_times, max_size=5))),
    )


messages: st.SearchStrategy[Message] = st.one_of(lifecycle_messages(), running_messages())

FEW = settings(max_examples=150, deadline=None)

offsets = st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)).map(timezone)
zoned_times = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 30), timezones=offsets
)


def reference_time(moment: datetime | None) -> str | None:
    """Independent of ``format_time``: strftime plus the shortest exact fraction."""
    if moment is None:
        return None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    base = f"{moment.year:04d}" + moment.strftime("-%m-%dT%H:%M:%S")
    micros = moment.microsecond
    if micros == 0:
        return base + "Z"
    if micros % 1000 == 0:
        return f"{base}.{micros // 1000:03d}Z"
    return f"{base}.{micros:06d}Z"


# ---------------------------------------------------------------------- golden

SPEC_EXAMPLE = """
{
  "schema": "dispatchd/v1",
  "kind": "running",
  "event": "running",
  "reason": "started",
  "microgrid_id": 7,
  "dispatch": {
    "id": 42,
    "type": "PEAK_SHAVING",
    "start_time": "2026-11-23T10:00:00Z",
    "duration": 900,
    "target": {"component_ids": [3, 4]},
    "active": true,
    "dry_run": false,
    "payload": {"power_w": -5000},
    "recurrence": null,
    "create_time": "2026-11-20T08:00:00Z",
    "update_time": "2026-11-22T09:30:00Z",
    "end_time": "2026-11-23T10:15:00Z"
  },
  "occurrence": {"start": "2026-11-23T10:00:00Z", "end": "2026-11-23T10:15:00Z"},
  "until": "2026-11-23T10:15:00Z",
  "scheduled_for": "2026-11-23T10:00:00Z",
  "emitted_at": "2026-11-23T10:00:00.004Z",
  "sequence": 3,
  "running_state_change_synced": "2026-11-22T10:15:00Z",
  "missed_runs": []
}
"""


def spec_dispatch() -> Dispatch:
    start = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    return Dispatch(
        id=42,
        microgrid_id=7,
        type="PEAK_SHAVING",
        start_time=start,
        duration=timedelta(seconds=900),
        target=TargetIds(4, 3),
        active=True,
        dry_run=False,
        payload={"power_w": -5000},
        recurrence=None,
        create_time=datetime(2026, 11, 20, 8, 0, tzinfo=UTC),
        update_time=datetime(2026, 11, 22, 9, 30, tzinfo=UTC),
        end_time=start + timedelta(minutes=15),
    )


def spec_message() -> RunningMessage:
    dispatch = spec_dispatch()
    end = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
    return RunningMessage(
        event=Event.RUNNING,
        reason=Reason.STARTED,
        dispatch=dispatch,
        occurrence=Occurrence(dispatch.start_time, end),
        until=end,
        scheduled_for=dispatch.start_time,
        emitted_at=dispatch.start_time + timedelta(milliseconds=4),
        sequence=3,
        running_state_change_synced=datetime(2026, 11, 22, 10, 15, tzinfo=UTC),
        missed_runs=(),
    )
