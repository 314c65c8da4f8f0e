"""The text-built bodies and the fast time format equal the plain JSON dump.

``wire.encode`` writes bodies by splicing the dispatch's JSON text into a
constant frame; these tests pin that to ``json.dumps`` of the body object
(docs/messages.md § 4), key by key, for random messages.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core import wire
from dispatchd.core.messages import Message, RunningMessage
from dispatchd.core.model import Dispatch
from dispatchd.core.wire import routing
from tests.core.test_wire import (
    FEW,
    any_times,
    dispatches,
    messages,
    spec_dispatch,
    spec_message,
)


def _reference_time(moment: datetime | None) -> str | None:
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


def _reference_body(message: Message) -> bytes:
    running = isinstance(message, RunningMessage)
    body: dict[str, Any] = {
        "schema": "dispatchd/v1",
        "kind": message.kind.value,
        "event": message.event.value,
        "reason": message.reason.value if running else None,
        "microgrid_id": message.dispatch.microgrid_id,
        "dispatch": wire.dispatch_to_json(message.dispatch),
        "occurrence": None,
        "until": None,
        "scheduled_for": None,
        "emitted_at": _reference_time(message.emitted_at),
        "sequence": None,
        "running_state_change_synced": None,
        "missed_runs": None,
    }
    if isinstance(message, RunningMessage):
        body |= {
            "occurrence": {
                "start": _reference_time(message.occurrence.start),
                "end": _reference_time(message.occurrence.end),
            },
            "until": _reference_time(message.until),
            "scheduled_for": _reference_time(message.scheduled_for),
            "sequence": message.sequence,
            "running_state_change_synced": _reference_time(message.running_state_change_synced),
            "missed_runs": [_reference_time(start) for start in message.missed_runs],
        }
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


@FEW
@given(messages)
def test_body_is_the_compact_dump_of_the_spec_object(message: Message) -> None:
    assert wire.encode(message).body == _reference_body(message)


@FEW
@given(messages)
def test_given_dispatch_text_gives_the_same_envelope(message: Message) -> None:
    text = wire.dispatch_json_text(message.dispatch)
    assert wire.encode(message, dispatch_text=text) == wire.encode(message)


@FEW
@given(dispatches())
def test_dispatch_json_text_is_the_compact_dump(dispatch: Dispatch) -> None:
    expected = json.dumps(
        wire.dispatch_to_json(dispatch), ensure_ascii=False, separators=(",", ":")
    )
    assert wire.dispatch_json_text(dispatch) == expected


offsets = st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)).map(timezone)
zoned_times = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 30), timezones=offsets
)


@FEW
@given(st.one_of(any_times, zoned_times, st.datetimes()))
def test_format_time_matches_the_reference(moment: datetime) -> None:
    assert wire.format_time(moment) == _reference_time(moment)


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


def test_non_json_payload_is_still_a_wire_error() -> None:
    dispatch = replace(spec_dispatch(), payload={"x": float("nan")})
    with pytest.raises(wire.WireError):
        wire.dispatch_json_text(dispatch)
    with pytest.raises(wire.WireError):
        wire.encode(replace(spec_message(), dispatch=dispatch))


@FEW
@given(st.one_of(any_times, zoned_times, st.datetimes()))
def test_epoch_micros_is_exact(moment: datetime) -> None:
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    expected = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert routing._epoch_micros(moment) == expected
