"""Message bodies (core/wire/body.py, docs/messages.md § 4): the golden example,
round trips, malformed input, and the text-built bodies against a plain JSON dump.

The hypothesis strategies and the golden example are in ``wire_helpers``, shared with
the other test_wire_*.py files, one per module of ``dispatchd.core.wire``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given

from dispatchd.core import wire
from dispatchd.core.messages import (
    Event,
    LifecycleMessage,
    Message,
    RunningMessage,
)
from tests.core.wire_helpers import (
    FEW,
    SPEC_EXAMPLE,
    messages,
    reference_time,
    running_messages,
    spec_dispatch,
    spec_message,
)


def test_spec_example_is_reproduced_exactly() -> None:
    envelope = wire.encode(spec_message())

    assert json.loads(envelope.body) == json.loads(SPEC_EXAMPLE)
    assert envelope.routing_key == "microgrid.7.running.running.PEAK_SHAVING"
    assert envelope.type == "dispatch.running"
    assert envelope.headers == {
        "microgrid_id": 7,
        "dispatch_id": 42,
        "dispatch_type": "PEAK_SHAVING",
        "event": "running",
        "schema": "dispatchd/v1",
    }
    assert (envelope.microgrid_id, envelope.dispatch_id) == (7, 42)


def test_spec_example_decodes_to_the_message() -> None:
    assert wire.decode(SPEC_EXAMPLE.encode()) == spec_message()


def test_constants() -> None:
    assert (wire.CONTENT_TYPE, wire.APP_ID, wire.SCHEMA) == (
        "application/json",
        "dispatchd",
        "dispatchd/v1",
    )


def test_body_is_utf8_not_ascii_escaped() -> None:
    message = replace(spec_message(), dispatch=replace(spec_dispatch(), type="Wärme"))
    assert "Wärme".encode() in wire.encode(message).body


def test_lifecycle_body_has_every_key_with_running_ones_null() -> None:
    dispatch = spec_dispatch()
    message = LifecycleMessage(
        event=Event.UPDATED,
        dispatch=dispatch,
        routing_type="OLD_TYPE",
        emitted_at=datetime(2026, 11, 22, 9, 30, 0, 123456, tzinfo=UTC),
    )
    envelope = wire.encode(message)
    body = json.loads(envelope.body)

    assert set(body) == set(json.loads(SPEC_EXAMPLE))
    assert (body["kind"], body["event"], body["microgrid_id"]) == ("lifecycle", "updated", 7)
    assert body["emitted_at"] == "2026-11-22T09:30:00.123456Z"
    running_only = ["reason", "occurrence", "until", "scheduled_for", "sequence"]
    running_only += ["running_state_change_synced", "missed_runs"]
    assert all(body[key] is None for key in running_only)
    assert body["dispatch"] == json.loads(SPEC_EXAMPLE)["dispatch"]
    assert envelope.type == "dispatch.lifecycle"
    assert envelope.routing_key == "microgrid.7.lifecycle.updated.OLD_TYPE"
    assert envelope.headers["dispatch_type"] == "OLD_TYPE"
    assert envelope.headers["event"] == "updated"
    assert wire.decode(envelope.body, envelope.headers) == message
    # Without the header the routing type falls back to the body's type.
    assert wire.decode(envelope.body).routing_type == "PEAK_SHAVING"


# ---------------------------------------------------------------- round trips


@FEW
@given(messages)
def test_message_round_trip(message: Message) -> None:
    envelope = wire.encode(message)
    decoded = wire.decode(envelope.body, envelope.headers)
    assert decoded == message
    assert type(decoded.dispatch.target) is type(message.dispatch.target)
    # Deterministic: encoding again gives the very same bytes.
    assert wire.encode(message) == envelope


@FEW
@given(running_messages())
def test_running_decode_needs_no_headers(message: RunningMessage) -> None:
    assert wire.decode(wire.encode(message).body) == message


# ------------------------------------------------------------------- malformed


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[key]
    if value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


_DELETE = object()
_SPEC = json.loads(SPEC_EXAMPLE)
_SPEC_WITH_RULE = copy.deepcopy(_SPEC)
_SPEC_WITH_RULE["dispatch"]["recurrence"] = {
    "frequency": "DAILY",
    "interval": 1,
    "end_criteria": {"count": 3},
    "byminutes": [],
    "byhours": [],
    "byweekdays": ["MONDAY"],
    "bymonthdays": [],
    "bymonths": [],
}


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("schema", _DELETE, "schema"),
        ("schema", "dispatchd/v2", "schema"),
        ("kind", _DELETE, "kind"),
        ("kind", "status", "kind"),
        ("event", "created", "event"),
        ("event", 1, "event"),
        ("reason", "bored", "reason"),
        ("reason", None, "reason"),
        ("microgrid_id", "7", "microgrid_id"),
        ("microgrid_id", True, "microgrid_id"),
        ("dispatch", _DELETE, "dispatch"),
        ("dispatch", [], "dispatch"),
        ("dispatch.id", 42.0, "dispatch.id"),
        ("dispatch.type", None, "dispatch.type"),
        ("dispatch.start_time", "yesterday", "dispatch.start_time"),
        ("dispatch.start_time", "2026-11-23T10:00:00", "dispatch.start_time"),
        ("dispatch.start_time", _DELETE, "dispatch.start_time"),
        ("dispatch.duration", "900", "dispatch.duration"),
        ("dispatch.duration", True, "dispatch.duration"),
        ("dispatch.duration", 1e300, "dispatch.duration"),
        ("dispatch.target", {}, "dispatch.target"),
        ("dispatch.target", None, "dispatch.target"),
        (
            "dispatch.target",
            {"component_ids": [1], "component_categories": ["BATTERY"]},
            "dispatch.target",
        ),
        ("dispatch.target", {"component_ids": 3}, "dispatch.target.component_ids"),
        ("dispatch.target", {"component_ids": [1, "2"]}, "dispatch.target.component_ids[1]"),
        (
            "dispatch.target",
            {"component_categories": ["BATTERY", "TOASTER"]},
            "dispatch.target.component_categories[1]",
        ),
        (
            "dispatch.target",
            {"component_categories_types": [{"category": "METER", "type": "LI_ION"}]},
            "dispatch.target.component_categories_types[0].type",
        ),
        (
            "dispatch.target",
            {"component_categories_types": [{"category": "BATTERY", "type": "PV"}]},
            "dispatch.target.component_categories_types[0].type",
        ),
        (
            "dispatch.target",
            {"component_categories_types": [{"type": "LI_ION"}]},
            "dispatch.target.component_categories_types[0].category",
        ),
        ("dispatch.active", "true", "dispatch.active"),
        ("dispatch.dry_run", _DELETE, "dispatch.dry_run"),
        ("dispatch.payload", [1], "dispatch.payload"),
        ("dispatch.payload", None, "dispatch.payload"),
        ("dispatch.recurrence", "DAILY", "dispatch.recurrence"),
        ("dispatch.create_time", None, "dispatch.create_time"),
        ("dispatch.update_time", 1700000000, "dispatch.update_time"),
        ("dispatch.end_time", "soon", "dispatch.end_time"),
        ("occurrence", None, "occurrence"),
        ("occurrence.start", None, "occurrence.start"),
        ("occurrence.end", _DELETE, "occurrence.end"),
        ("until", "later", "until"),
        ("scheduled_for", None, "scheduled_for"),
        ("emitted_at", _DELETE, "emitted_at"),
        ("sequence", 3.0, "sequence"),
        ("sequence", None, "sequence"),
        ("running_state_change_synced", 0, "running_state_change_synced"),
        ("missed_runs", None, "missed_runs"),
        ("missed_runs", ["2026-11-23T10:00:00Z", "x"], "missed_runs[1]"),
    ],
)
def test_malformed_body_names_the_key(path: str, value: Any, named: str) -> None:
    body = copy.deepcopy(_SPEC)
    _set(body, path, value)
    with pytest.raises(wire.WireError) as raised:
        wire.decode(json.dumps(body).encode())
    assert raised.value.key == named
    assert named in str(raised.value)
    assert raised.value.code == "malformed"


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("frequency", "FORTNIGHTLY", "dispatch.recurrence.frequency"),
        ("interval", "1", "dispatch.recurrence.interval"),
        ("end_criteria", {}, "dispatch.recurrence.end_criteria"),
        (
            "end_criteria",
            {"count": 3, "until": "2026-11-23T10:00:00Z"},
            "dispatch.recurrence.end_criteria",
        ),
        ("end_criteria", {"count": "3"}, "dispatch.recurrence.end_criteria.count"),
        ("end_criteria", {"until": "never"}, "dispatch.recurrence.end_criteria.until"),
        ("byweekdays", ["MONDAY", "FUNDAY"], "dispatch.recurrence.byweekdays[1]"),
        ("byhours", [1, None], "dispatch.recurrence.byhours[1]"),
        ("bymonths", _DELETE, "dispatch.recurrence.bymonths"),
    ],
)
def test_malformed_recurrence_names_the_key(path: str, value: Any, named: str) -> None:
    body = copy.deepcopy(_SPEC_WITH_RULE)
    _set(body, "dispatch.recurrence." + path, value)
    with pytest.raises(wire.WireError) as raised:
        wire.decode(json.dumps(body).encode())
    assert raised.value.key == named
    assert named in str(raised.value)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "body: expected an object"),
        (b'"running"', "body: expected an object"),
        (b"null", "body: expected an object"),
        (b'{"schema": NaN}', "NaN is not JSON"),
        (b"[" * 100000 + b"]" * 100000, "body"),
    ],
)
def test_not_a_json_object_is_rejected(body: bytes, says: str) -> None:
    with pytest.raises(wire.WireError, match=says):
        wire.decode(body)


def test_nan_in_payload_is_rejected() -> None:
    text = SPEC_EXAMPLE.replace('"power_w": -5000', '"power_w": Infinity')
    with pytest.raises(wire.WireError, match="Infinity"):
        wire.decode(text.encode())


def test_unknown_keys_are_ignored_everywhere() -> None:
    body = copy.deepcopy(_SPEC_WITH_RULE)
    body["priority"] = "high"
    body["dispatch"]["labels"] = {"team": "ops"}
    body["dispatch"]["target"]["component_ids_v2"] = None
    body["dispatch"]["recurrence"]["bysetpos"] = [1]
    body["dispatch"]["recurrence"]["end_criteria"]["note"] = 1
    body["occurrence"]["label"] = "x"
    decoded = wire.decode(json.dumps(body).encode())
    assert decoded == wire.decode(json.dumps(_SPEC_WITH_RULE).encode())
    assert isinstance(decoded, RunningMessage)
    assert decoded.dispatch.recurrence is not None
    assert decoded.dispatch.recurrence.count == 3


def test_lifecycle_ignores_running_only_keys() -> None:
    body = copy.deepcopy(_SPEC)
    body |= {"kind": "lifecycle", "event": "deleted", "reason": None}
    del body["sequence"]
    decoded = wire.decode(json.dumps(body).encode())
    assert decoded == LifecycleMessage(
        event=Event.DELETED,
        dispatch=spec_dispatch(),
        routing_type="PEAK_SHAVING",
        emitted_at=datetime(2026, 11, 23, 10, 0, 0, 4000, tzinfo=UTC),
    )


def test_non_json_payload_cannot_be_encoded() -> None:
    dispatch = replace(spec_dispatch(), payload={"power_w": float("nan")})
    with pytest.raises(wire.WireError, match="JSON"):
        wire.encode(replace(spec_message(), dispatch=dispatch))


# ------------------------------------------------------------ text-built bodies
# ``wire.encode`` splices the dispatch's JSON text into a constant frame; these
# pin that to ``json.dumps`` of the body object, key by key, for random messages.


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
        "emitted_at": reference_time(message.emitted_at),
        "sequence": None,
        "running_state_change_synced": None,
        "missed_runs": None,
    }
    if isinstance(message, RunningMessage):
        body |= {
            "occurrence": {
                "start": reference_time(message.occurrence.start),
                "end": reference_time(message.occurrence.end),
            },
            "until": reference_time(message.until),
            "scheduled_for": reference_time(message.scheduled_for),
            "sequence": message.sequence,
            "running_state_change_synced": reference_time(message.running_state_change_synced),
            "missed_runs": [reference_time(start) for start in message.missed_runs],
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


def test_non_json_payload_is_still_a_wire_error() -> None:
    dispatch = replace(spec_dispatch(), payload={"x": float("nan")})
    with pytest.raises(wire.WireError):
        wire.dispatch_json_text(dispatch)
    with pytest.raises(wire.WireError):
        wire.encode(replace(spec_message(), dispatch=dispatch))
