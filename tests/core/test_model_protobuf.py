"""``Dispatch.from_protobuf`` is the client's conversion followed by ``from_client``."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from hypothesis import assume, given
from hypothesis import strategies as st

from dispatchd.core.model import Dispatch, Frequency, Payload, Recurrence
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


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=5,
)


@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=20), st.randoms())
def test_a_payload_is_the_mapping_it_was_built_from(items: dict[str, Any], rng: Any) -> None:
    payload = Payload.of(items)
    assert payload == items and items == payload
    assert dict(payload) == items and list(payload) == list(items)
    shuffled = list(items.items())
    rng.shuffle(shuffled)
    assert payload == Payload.of(dict(shuffled))
    for key, value in items.items():
        assert payload[key] == value
    if "\x00missing" not in items:
        with pytest.raises(KeyError):
            payload["\x00missing"]
    if items:
        changed = {**items, next(iter(items)): "changed"}
        assert (payload == Payload.of(changed)) == (items == changed)


def test_listed_dispatches_share_their_targets_and_payload_keys() -> None:
    first, second = (
        Dispatch.from_protobuf(replace(spec_dispatch(), id=n).to_protobuf(), 7) for n in (1, 2)
    )
    assert first.target is second.target
    assert isinstance(first.payload, Payload) and isinstance(second.payload, Payload)
    assert first.payload == second.payload and len(first.payload) > 0
    assert first.payload._keys is second.payload._keys
