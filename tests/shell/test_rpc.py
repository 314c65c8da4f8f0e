"""SnapshotRpc.answer without a broker: every outcome; cached encodings never outlive a change."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from frequenz.client.dispatch.types import TargetIds

from dispatchd.core import wire
from dispatchd.core.engine import SnapshotEntry
from dispatchd.core.model import Dispatch
from dispatchd.rpc import STALE_ENCODINGS, SnapshotRpc

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def dispatch(dispatch_id: int, dispatch_type: str = "T", payload: int = 0) -> Dispatch:
    return Dispatch(
        id=dispatch_id,
        microgrid_id=7,
        type=dispatch_type,
        start_time=EPOCH,
        duration=timedelta(minutes=5),
        target=TargetIds(1),
        payload={"n": payload},
        create_time=EPOCH,
        update_time=EPOCH,
    )


def idle(of: Dispatch) -> SnapshotEntry:
    return SnapshotEntry(dispatch=of, running=False, until=None, sequence=0, occurrence=None)


class State:
    """A stand-in for the engine's snapshot, changed by the test between requests."""

    def __init__(self) -> None:
        self.entries = [idle(dispatch(1)), idle(dispatch(2, "U"))]
        self.calls = 0

    def snapshot(self, microgrid_id: int, dispatch_type: str | None) -> list[SnapshotEntry]:
        self.calls += 1
        return [e for e in self.entries if dispatch_type in (None, e.dispatch.type)]


def ask(rpc: SnapshotRpc, dispatch_type: str | None = None) -> dict[str, Any]:
    body, method, outcome = rpc.answer(wire.encode_snapshot_request(7, dispatch_type))
    assert (method, outcome) == ("snapshot", "ok")
    decoded = wire.decode_snapshot_reply(body)  # a well-formed reply, spliced or not
    assert isinstance(decoded, wire.SnapshotReply)
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def make_rpc(
    state: State, clock: list[datetime], synced: Callable[[int], bool] = lambda _: True
) -> SnapshotRpc:
    return SnapshotRpc(
        amqp_url="amqp://unused/",
        exchange="x",
        microgrid_ids=[7],
        snapshot=state.snapshot,
        synced=synced,
        clock=lambda: clock[0],
    )


def error_of(body: bytes) -> wire.ErrorReply:
    reply = wire.decode_snapshot_reply(body)
    assert isinstance(reply, wire.ErrorReply)
    return reply


def test_replies_follow_every_change_and_stay_byte_identical_to_a_fresh_encoding() -> None:
    state = State()
    clock = [EPOCH]
    rpc = make_rpc(state, clock)
    first = ask(rpc)
    clock[0] += timedelta(seconds=1)
    again = ask(rpc)
    assert again["as_of"] != first["as_of"]  # the time is always now
    assert again["dispatches"] == first["dispatches"]

    until = EPOCH + timedelta(minutes=5)
    changes = [
        lambda e: dataclasses.replace(e, running=True, until=until, sequence=1),
        lambda e: dataclasses.replace(e, dispatch=dispatch(1, payload=5)),  # same id, new version
        lambda e: dataclasses.replace(e, sequence=2),
    ]
    for change in changes:
        state.entries[0] = change(state.entries[0])
        body, _, _ = rpc.answer(wire.encode_snapshot_request(7))
        fresh = wire.encode_snapshot_reply(7, clock[0], True, state.entries)
        assert body == fresh
    state.entries.append(idle(dispatch(3)))
    assert [d["dispatch"]["id"] for d in ask(rpc)["dispatches"]] == [1, 2, 3]
    assert [d["dispatch"]["id"] for d in ask(rpc, "U")["dispatches"]] == [2]
    assert [d["dispatch"]["id"] for d in ask(rpc, "T")["dispatches"]] == [1, 3]


def test_encodings_of_deleted_dispatches_do_not_pile_up() -> None:
    state = State()
    rpc = make_rpc(state, [EPOCH])
    for n in range(3, 3 + STALE_ENCODINGS * 3):
        state.entries[1] = idle(dispatch(n))  # one dispatch deleted, another created
        assert [d["dispatch"]["id"] for d in ask(rpc)["dispatches"]] == [1, n]
    assert len(rpc._encoded) <= 2 + STALE_ENCODINGS


def test_a_reply_says_the_time_and_whether_the_microgrid_is_synced() -> None:
    state = State()
    rpc = make_rpc(state, [EPOCH + timedelta(seconds=3)], synced=lambda _: False)
    reply = ask(rpc)
    assert (reply["microgrid_id"], reply["as_of"], reply["synced"]) == (
        7,
        "2026-01-01T00:00:03Z",
        False,
    )


@pytest.mark.parametrize(
    ("request_body", "method", "outcome"),
    [
        (b"not json", "snapshot", "malformed"),
        (b'{"method": "snapshot"}', "snapshot", "malformed"),
        (b'{"method": "delete", "microgrid_id": 7}', "unknown", "unknown_method"),
    ],
)
def test_a_bad_request_gets_an_error_reply_named_by_its_code(
    request_body: bytes, method: str, outcome: str
) -> None:
    state = State()
    body, got_method, got_outcome = make_rpc(state, [EPOCH]).answer(request_body)
    assert (got_method, got_outcome) == (method, outcome)
    assert error_of(body).code == outcome
    assert state.calls == 0


def test_a_microgrid_this_daemon_does_not_sync_is_refused_by_name() -> None:
    state = State()
    body, method, outcome = make_rpc(state, [EPOCH]).answer(wire.encode_snapshot_request(8))
    assert (method, outcome) == ("snapshot", "error")
    error = error_of(body)
    assert error.code == "unknown_microgrid"
    assert "microgrid 8" in error.message and "[7]" in error.message
    assert state.calls == 0


def test_a_failing_snapshot_is_still_answered() -> None:
    def broken(microgrid_id: int, dispatch_type: str | None) -> list[SnapshotEntry]:
        raise RuntimeError("bug")

    rpc = SnapshotRpc(
        amqp_url="amqp://unused/",
        exchange="x",
        microgrid_ids=[7],
        snapshot=broken,
        synced=lambda _: True,
    )
    body, method, outcome = rpc.answer(wire.encode_snapshot_request(7))
    assert (method, outcome) == ("snapshot", "internal")
    assert error_of(body).code == "internal"
