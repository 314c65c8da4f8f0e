"""The loop's shared dispatch text: records and bodies as if encoded separately."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime

from hypothesis import given

from dispatchd.core import wire
from dispatchd.core.messages import Event, LifecycleMessage
from dispatchd.core.model import Dispatch
from dispatchd.core.records import DispatchRecord, record_to_json
from dispatchd.loop import DispatchTexts
from tests.core.test_records import records
from tests.core.wire_helpers import FEW, spec_dispatch


def _separately(record: DispatchRecord) -> str:
    return json.dumps(record_to_json(record), separators=(",", ":"))


@FEW
@given(records())
def test_record_text_is_what_encoding_it_alone_gives(record: DispatchRecord) -> None:
    texts = DispatchTexts()
    assert texts.record_text(record) == _separately(record)
    # The body text cached for the same dispatch is the one encode would make.
    assert texts.body_text(record.dispatch) == wire.dispatch_json_text(record.dispatch)


def _record_of(dispatch: Dispatch) -> DispatchRecord:
    return DispatchRecord(
        dispatch=dispatch, announced=None, sequence=0, last_emitted_at=None, tombstone=False
    )


def test_text_is_computed_once_per_dispatch_object() -> None:
    dispatch = spec_dispatch()
    texts = DispatchTexts()
    record_text = texts.record_text(_record_of(dispatch))
    body_text = texts.body_text(dispatch)
    assert record_text.startswith('{"dispatch":' + body_text + ",")
    assert texts.body_text(dispatch) is body_text


def test_escapes_that_differ_between_record_and_body_are_kept_apart() -> None:
    """Records escape non-ASCII and DEL as ``\\uXXXX``; bodies write them raw."""
    for odd in ("Wärme", "del\x7f", "snow ☃ \U0001f600"):
        dispatch = replace(spec_dispatch(), type=odd, payload={odd: odd})
        texts = DispatchTexts()
        record = _record_of(dispatch)
        assert texts.record_text(record) == _separately(record)
        message = LifecycleMessage(
            event=Event.CREATED,
            dispatch=dispatch,
            routing_type=dispatch.type,
            emitted_at=datetime(2026, 1, 1),
        )
        shared = wire.encode(message, dispatch_text=texts.body_text(dispatch))
        assert shared == wire.encode(message)
        assert odd in shared.body.decode()


def test_a_payload_no_body_can_carry_still_gets_its_record() -> None:
    dispatch = replace(spec_dispatch(), payload={"x": float("nan")})
    record = _record_of(dispatch)
    assert DispatchTexts().record_text(record) == _separately(record)
