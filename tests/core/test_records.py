"""The stored record's codec: dict and fast text agree, and both read back what they wrote."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core import wire
from dispatchd.core.messages import Occurrence
from dispatchd.core.records import (
    DispatchRecord,
    last_seen_from_meta,
    meta_to_json,
    record_from_json,
    record_from_text,
    record_to_json,
    record_to_text,
)
from tests.core.wire_helpers import FEW, any_times, dispatches, spec_dispatch

_OFFSET = re.compile(r"\d[+-]\d\d:\d\d\"")


@st.composite
def records(draw: st.DrawFn) -> DispatchRecord:
    optional_times = st.one_of(st.none(), any_times)
    announced = draw(st.one_of(st.none(), st.builds(Occurrence, any_times, optional_times)))
    return DispatchRecord(
        dispatch=draw(dispatches()),
        announced=announced,
        sequence=draw(st.integers(min_value=0, max_value=2**63)),
        last_emitted_at=draw(optional_times),
        tombstone=draw(st.booleans()),
        pending_missed=tuple(draw(st.lists(any_times, max_size=3))),
        last_pulse=draw(optional_times),
        forgotten=draw(st.booleans()),
    )


@FEW
@given(records())
def test_fast_text_is_the_dict_as_json(record: DispatchRecord) -> None:
    dispatch_text = json.dumps(wire.dispatch_to_json(record.dispatch), separators=(",", ":"))
    expected = json.dumps(record_to_json(record), separators=(",", ":"))
    assert record_to_text(record, dispatch_text) == expected
    assert record_to_text(record) == expected


@FEW
@given(records())
def test_a_record_reads_back_as_written_with_one_time_format(record: DispatchRecord) -> None:
    text = record_to_text(record)
    assert _OFFSET.search(text) is None  # every time ends in Z, none in +00:00
    microgrid_id = record.dispatch.microgrid_id
    assert record_from_text(text, microgrid_id) == record
    assert record_from_json(json.loads(text), microgrid_id) == record


def test_times_written_before_with_an_offset_still_read() -> None:
    record = DispatchRecord(
        dispatch=spec_dispatch(),
        announced=None,
        sequence=3,
        last_emitted_at=datetime(2026, 1, 1, 0, 9, 30, 500000, tzinfo=UTC),
        tombstone=False,
    )
    data = record_to_json(record)
    data["last_emitted_at"] = "2026-01-01T00:09:30.500000+00:00"
    assert record_from_json(data, record.dispatch.microgrid_id) == record


def test_meta_round_trips_and_reads_the_old_offset() -> None:
    moment = datetime(2026, 1, 1, 0, 10, 0, 250000, tzinfo=UTC)
    assert meta_to_json(moment) == {"last_seen": "2026-01-01T00:10:00.250Z"}
    assert last_seen_from_meta(meta_to_json(moment)) == moment
    assert last_seen_from_meta({"last_seen": "2026-01-01T00:10:00.250000+00:00"}) == moment
    assert last_seen_from_meta(meta_to_json(None)) is None
    assert last_seen_from_meta({}) is None
