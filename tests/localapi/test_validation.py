"""Pure validation: whatever a client sends is accepted or refused by name, never a crash."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    DispatchData,
    RecurrenceRule,
    TargetComponents,
    UpdateMicrogridDispatchRequest,
)
from google.protobuf.struct_pb2 import Struct
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispatchd.localapi.validation import (
    UPDATABLE_PATHS,
    InvalidRequest,
    prepare_create,
    prepare_update,
    to_datetime,
    to_timestamp,
)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

moments = st.datetimes(
    min_value=datetime(2030, 5, 31), max_value=datetime(2031, 12, 31), timezones=st.just(UTC)
)
small_ints = st.integers(min_value=-2, max_value=70)


@st.composite
def targets(draw: st.DrawFn) -> TargetComponents | None:
    kind = draw(st.sampled_from(["none", "ids", "ids", "types", "types", "deprecated"]))
    if kind == "none":
        return None
    if kind == "ids":
        ids = draw(
            st.lists(st.integers(0, 2**64 - 1), min_size=draw(st.integers(0, 1)), max_size=4)
        )
        return TargetComponents(component_ids=TargetComponents.IdSet(ids=ids))
    if kind == "deprecated":
        categories = draw(st.lists(st.integers(0, 20), min_size=1, max_size=3))
        return TargetComponents(
            component_categories=TargetComponents.CategorySet(categories=categories)  # type: ignore[arg-type]
        )
    pairs = []
    for _ in range(draw(st.integers(1, 3))):
        pair = TargetComponents.CategoryAndType(category=draw(st.integers(0, 20)))  # type: ignore[arg-type]
        subtype = draw(st.sampled_from([None, "battery", "inverter", "ev_charger"]))
        if subtype is not None:
            setattr(pair, subtype, draw(st.integers(0, 6)))
        pairs.append(pair)
    return TargetComponents(
        component_categories_types=TargetComponents.CategoryTypeSet(categories=pairs)
    )


@st.composite
def recurrences(draw: st.DrawFn) -> RecurrenceRule | None:
    if draw(st.booleans()):
        return None
    rule = RecurrenceRule(
        freq=draw(st.integers(0, 8)),  # type: ignore[arg-type]
        interval=draw(st.integers(0, 12_000)),
        byminutes=draw(st.lists(small_ints.filter(lambda v: v >= 0), max_size=3)),
        byhours=draw(st.lists(st.integers(0, 25), max_size=3)),
        byweekdays=draw(st.lists(st.integers(0, 8), max_size=3)),  # type: ignore[arg-type]
        bymonthdays=draw(st.lists(st.integers(-33, 33), max_size=2)),
        bymonths=draw(st.lists(st.integers(0, 13), max_size=2)),
    )
    end = draw(st.sampled_from(["none", "count", "until"]))
    if end == "count":
        rule.end_criteria.count = draw(st.integers(0, 5000))
    elif end == "until":
        rule.end_criteria.until_time.CopyFrom(to_timestamp(draw(moments)))
    return rule


payloads = st.dictionaries(
    st.text(max_size=5),
    st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=10,
    ),
    max_size=3,
)


@st.composite
def dispatch_data(draw: st.DrawFn) -> DispatchData:
    payload = Struct()
    payload.update(draw(payloads))
    duration = draw(st.none() | st.integers(0, 2**32 - 1))
    return DispatchData(
        type="" if draw(st.integers(0, 9)) == 0 else "t" + draw(st.text(max_size=10)),
        start_time=to_timestamp(draw(moments)),
        duration=duration,
        target=draw(targets()),
        is_active=draw(st.booleans()),
        is_dry_run=draw(st.booleans()),
        payload=payload,
        recurrence=draw(recurrences()),
    )


@FUZZ
@given(data=dispatch_data(), start_immediately=st.booleans())
def test_create_accepts_or_names_the_field(data: DispatchData, start_immediately: bool) -> None:
    try:
        prepared = prepare_create(data, start_immediately=start_immediately, now=NOW)
    except InvalidRequest as error:
        event(f"rejected: {error.field}")
        assert error.field
        assert error.field.split(".")[0].split("[")[0] in {
            "type",
            "start_time",
            "duration",
            "target",
            "payload",
            "recurrence",
            "dispatch_data",
        }
        return
    event("accepted")
    stored = prepared.data
    start = to_datetime(stored.start_time)
    assert start >= NOW - timedelta(seconds=10)
    assert stored.type.strip()
    if stored.recurrence.freq:
        assert stored.recurrence.interval >= 1
    if not stored.HasField("duration"):
        assert prepared.end_time is None
    elif not stored.recurrence.freq:
        assert prepared.end_time == start + timedelta(seconds=stored.duration)
    elif not stored.recurrence.HasField("end_criteria"):
        assert prepared.end_time is None
    elif prepared.end_time is not None:
        assert prepared.end_time >= start.replace(microsecond=0) + timedelta(
            seconds=stored.duration
        )


@FUZZ
@given(
    paths=st.lists(st.sampled_from(sorted(UPDATABLE_PATHS)) | st.text(max_size=8), max_size=4),
    replacement=dispatch_data(),
)
def test_update_accepts_or_names_the_field(paths: list[str], replacement: DispatchData) -> None:
    stored = DispatchData(
        type="base",
        start_time=to_timestamp(NOW + timedelta(hours=1)),
        duration=60,
        target=TargetComponents(component_ids=TargetComponents.IdSet(ids=[1])),
    )
    update = UpdateMicrogridDispatchRequest.DispatchUpdate(
        start_time=replacement.start_time,
        duration=replacement.duration if replacement.HasField("duration") else None,
        target=replacement.target,
        is_active=replacement.is_active,
        payload=replacement.payload,
        recurrence=UpdateMicrogridDispatchRequest.DispatchUpdate.RecurrenceRuleUpdate(
            freq=replacement.recurrence.freq,
            interval=replacement.recurrence.interval,
            end_criteria=replacement.recurrence.end_criteria,
            byminutes=replacement.recurrence.byminutes,
            byhours=replacement.recurrence.byhours,
            byweekdays=replacement.recurrence.byweekdays,
            bymonthdays=replacement.recurrence.bymonthdays,
            bymonths=replacement.recurrence.bymonths,
        ),
    )
    request = UpdateMicrogridDispatchRequest(microgrid_id=1, dispatch_id=1, update=update)
    request.update_mask.paths.extend(paths)
    try:
        prepared = prepare_update(stored, request, NOW)
    except InvalidRequest as error:
        event(f"rejected: {error.field}")
        assert error.field
        return
    event("accepted")
    assert prepared.data.type == "base"
    assert stored.duration == 60  # the stored message is never modified in place
    if "duration" in paths:
        assert prepared.data.HasField("duration") == replacement.HasField("duration")


def test_start_time_tolerance() -> None:
    data = DispatchData(
        type="t",
        duration=1,
        target=TargetComponents(component_ids=TargetComponents.IdSet(ids=[1])),
    )
    data.start_time.CopyFrom(to_timestamp(NOW - timedelta(seconds=9)))
    assert prepare_create(data, start_immediately=False, now=NOW).end_time == NOW - timedelta(
        seconds=8
    )
    data.start_time.CopyFrom(to_timestamp(NOW - timedelta(seconds=11)))
    with pytest.raises(InvalidRequest, match="start_time"):
        prepare_create(data, start_immediately=False, now=NOW)
    assert to_datetime(prepare_create(data, start_immediately=True, now=NOW).data.start_time) == NOW


def test_payload_depth_and_size_limits() -> None:
    base = DispatchData(
        type="t",
        start_time=to_timestamp(NOW),
        target=TargetComponents(component_ids=TargetComponents.IdSet(ids=[1])),
    )
    nested: dict[str, object] = {"leaf": 1}
    for _ in range(5):
        nested = {"n": nested}
    base.payload.update(nested)
    with pytest.raises(InvalidRequest, match="payload"):
        prepare_create(base, start_immediately=False, now=NOW)
    base.payload.Clear()
    base.payload.update({"big": "x" * 60_000})
    with pytest.raises(InvalidRequest, match="payload"):
        prepare_create(base, start_immediately=False, now=NOW)
