"""``Dispatch.from_protobuf`` is the client's conversion followed by ``from_client``."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from hypothesis import assume, given

from dispatchd.core.model import Dispatch, Frequency, Recurrence
from dispatchd.core.recurrence import Invalid, Schedule
from tests.core.wire_helpers import FEW, dispatches, spec_dispatch


def _via_client(dispatch: Dispatch) -> Dispatch:
    return Dispatch.from_client(
        ClientDispatch.from_protobuf(dispatch.to_protobuf()), dispatch.microgrid_id
    )


@FEW
@given(dispatches(microgrid_id=7))
def test_direct_conversion_equals_the_one_via_the_client(dispatch: Dispatch) -> None:
    try:
        message = dispatch.to_protobuf()
    except ValueError:
        assume(False)  # not representable in the API's protobuf (e.g. a negative id)
    try:
        expected = Dispatch.from_client(ClientDispatch.from_protobuf(message), 7)
    except ValueError:
        with pytest.raises(ValueError):
            Dispatch.from_protobuf(message, 7)
        return
    assert Dispatch.from_protobuf(message, 7) == expected


def test_one_off_and_recurring_without_end_time() -> None:
    base = replace(spec_dispatch(), end_time=None)
    daily = Recurrence(frequency=Frequency.DAILY, count=3, byhours=(1, 2))
    for dispatch in (replace(base, recurrence=None), replace(base, recurrence=daily)):
        converted = Dispatch.from_protobuf(dispatch.to_protobuf(), dispatch.microgrid_id)
        assert converted == _via_client(dispatch)
        assert converted.recurrence == dispatch.recurrence
        assert converted.end_time is None


def test_times_come_back_as_utc() -> None:
    dispatch = replace(
        spec_dispatch(),
        start_time=datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))),
    )
    converted = Dispatch.from_protobuf(dispatch.to_protobuf(), dispatch.microgrid_id)
    assert converted.start_time.utcoffset() == timedelta(0)
    assert converted.start_time == dispatch.start_time


def test_by_rules_without_a_frequency_stay_a_rule_and_are_invalid() -> None:
    """``byhours=[8]`` with frequency UNSPECIFIED is a malformed rule, not a one-off."""
    base = replace(spec_dispatch(), end_time=None)
    malformed = Recurrence(frequency=Frequency.UNSPECIFIED, byhours=(8,))
    dispatch = replace(base, recurrence=malformed)
    for converted in (
        Dispatch.from_protobuf(dispatch.to_protobuf(), dispatch.microgrid_id),
        _via_client(dispatch),
    ):
        assert converted.recurrence is not None
        assert converted.recurrence.byhours == (8,)
        built = Schedule.build(converted)
        assert isinstance(built, Invalid) and "frequency" in built.reason
    # Without by-rules an UNSPECIFIED frequency still means one-off.
    plain = replace(base, recurrence=None)
    assert Dispatch.from_protobuf(plain.to_protobuf(), plain.microgrid_id).recurrence is None
    assert _via_client(plain).recurrence is None
