"""Snapshot RPC bodies (docs/messages.md § 6)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core import wire
from tests.core.wire_helpers import FEW, any_times, dispatch_types, dispatches, spec_dispatch

# --------------------------------------------------------------------- request


def test_request_shape() -> None:
    assert json.loads(wire.encode_snapshot_request(7, "PEAK_SHAVING")) == {
        "method": "snapshot",
        "microgrid_id": 7,
        "type": "PEAK_SHAVING",
    }
    # All types: the optional key is left out.
    assert json.loads(wire.encode_snapshot_request(7)) == {"method": "snapshot", "microgrid_id": 7}


@FEW
@given(st.integers(min_value=0, max_value=2**64 - 1), st.one_of(st.none(), dispatch_types))
def test_request_round_trip(microgrid_id: int, dispatch_type: str | None) -> None:
    body = wire.encode_snapshot_request(microgrid_id, dispatch_type)
    assert wire.decode_snapshot_request(body) == wire.SnapshotRequest(microgrid_id, dispatch_type)


def test_request_with_null_type_and_unknown_keys() -> None:
    body = b'{"method": "snapshot", "microgrid_id": 7, "type": null, "trace": "x"}'
    assert wire.decode_snapshot_request(body) == wire.SnapshotRequest(7, None)


@pytest.mark.parametrize(
    ("body", "code", "key"),
    [
        (b"snapshot please", "malformed", None),
        (b"[]", "malformed", "body"),
        (b'{"microgrid_id": 7}', "malformed", "method"),
        (b'{"method": 1, "microgrid_id": 7}', "malformed", "method"),
        (b'{"method": "list", "microgrid_id": 7}', "unknown_method", "method"),
        (b'{"method": "snapshot"}', "malformed", "microgrid_id"),
        (b'{"method": "snapshot", "microgrid_id": "7"}', "malformed", "microgrid_id"),
        (b'{"method": "snapshot", "microgrid_id": 7, "type": 3}', "malformed", "type"),
    ],
)
def test_bad_request_carries_an_error_code(body: bytes, code: str, key: str | None) -> None:
    with pytest.raises(wire.WireError) as raised:
        wire.decode_snapshot_request(body)
    assert raised.value.code == code
    assert raised.value.key == key


# ----------------------------------------------------------------------- reply


def test_reply_shape() -> None:
    dispatch = spec_dispatch()
    until = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
    body = wire.encode_snapshot_reply(
        7,
        datetime(2026, 11, 23, 10, 1, tzinfo=UTC),
        True,
        [wire.SnapshotEntry(dispatch, True, until, 3)],
    )
    assert json.loads(body) == {
        "schema": "dispatchd/v1",
        "microgrid_id": 7,
        "as_of": "2026-11-23T10:01:00Z",
        "synced": True,
        "dispatches": [
            {
                "dispatch": wire.dispatch_to_json(dispatch),
                "running": True,
                "until": "2026-11-23T10:15:00Z",
                "sequence": 3,
            }
        ],
    }


@st.composite
def replies(draw: st.DrawFn) -> wire.SnapshotReply:
    microgrid_id = draw(st.integers(min_value=0, max_value=2**64 - 1))
    entries = draw(
        st.lists(
            st.builds(
                wire.SnapshotEntry,
                dispatches(microgrid_id),
                st.booleans(),
                st.one_of(st.none(), any_times),
                st.integers(min_value=0, max_value=2**63),
            ),
            max_size=3,
        )
    )
    return wire.SnapshotReply(microgrid_id, draw(any_times), draw(st.booleans()), tuple(entries))


@FEW
@given(replies())
def test_reply_round_trip(reply: wire.SnapshotReply) -> None:
    body = wire.encode_snapshot_reply(reply.microgrid_id, reply.as_of, reply.synced, reply.entries)
    assert wire.decode_snapshot_reply(body) == reply


@pytest.mark.parametrize("code", ["malformed", "unknown_method", "unknown_microgrid"])
def test_error_reply_round_trip(code: str) -> None:
    body = wire.encode_error_reply(code, "microgrid 9 is not served here")
    assert json.loads(body) == {
        "schema": "dispatchd/v1",
        "error": {"code": code, "message": "microgrid 9 is not served here"},
    }
    assert wire.decode_snapshot_reply(body) == wire.ErrorReply(
        code, "microgrid 9 is not served here"
    )


def _reply(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "schema": "dispatchd/v1",
        "microgrid_id": 7,
        "as_of": "2026-11-23T10:01:00Z",
        "synced": False,
        "dispatches": [
            {
                "dispatch": wire.dispatch_to_json(spec_dispatch()),
                "running": False,
                "until": None,
                "sequence": 0,
            }
        ],
    }
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


def test_reply_ignores_unknown_keys() -> None:
    reply = wire.decode_snapshot_reply(_reply(server="dispatchd 0.1"))
    assert isinstance(reply, wire.SnapshotReply)
    assert reply.entries == (wire.SnapshotEntry(spec_dispatch(), False, None, 0),)
    assert not reply.synced


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"schema": "dispatchd/v0"}, "schema"),
        ({"as_of": None}, "as_of"),
        ({"synced": "yes"}, "synced"),
        ({"dispatches": {}}, "dispatches"),
        (
            {"dispatches": [{"running": True, "until": None, "sequence": 1}]},
            "dispatches[0].dispatch",
        ),
        (
            {"dispatches": [{"dispatch": {}, "running": True, "until": None, "sequence": 1}]},
            "dispatches[0].dispatch.id",
        ),
        ({"error": {"code": "malformed"}}, "error.message"),
    ],
)
def test_malformed_reply_names_the_key(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(wire.WireError) as raised:
        wire.decode_snapshot_reply(_reply(**changes))
    assert raised.value.key == named
    assert named in str(raised.value)
