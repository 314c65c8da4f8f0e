"""The snapshot RPC: a late-joining actor's request and the daemon's reply.

Entries are encoded one by one (``encode_snapshot_entry``) so the daemon can
keep each dispatch's bytes and send them in many replies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatchd.core.messages import SnapshotEntry
from dispatchd.core.wire._reader import (
    SCHEMA,
    WireError,
    _bool,
    _check_schema,
    _dump,
    _dump_text,
    _format_optional_time,
    _get,
    _int,
    _list,
    _load,
    _object,
    _optional,
    _str,
    _time,
    _utf8,
    format_time,
)
from dispatchd.core.wire.dispatch import _dispatch_from_json, dispatch_to_json

SNAPSHOT_METHOD = "snapshot"


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Ask for the current state of one microgrid, optionally of one type."""

    microgrid_id: int
    type: str | None = None


@dataclass(frozen=True, slots=True)
class SnapshotReply:
    """The current state; ``synced`` is false until the first full sync finished."""

    microgrid_id: int
    as_of: datetime
    synced: bool
    entries: tuple[SnapshotEntry, ...]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The daemon could not answer (``malformed``, ``unknown_method``, ...)."""

    code: str
    message: str


def encode_snapshot_request(microgrid_id: int, dispatch_type: str | None = None) -> bytes:
    """The request body; ``type`` is left out to ask for all types."""
    body: dict[str, Any] = {"method": SNAPSHOT_METHOD, "microgrid_id": microgrid_id}
    if dispatch_type is not None:
        body["type"] = dispatch_type
    return _dump(body)


def decode_snapshot_request(body: bytes) -> SnapshotRequest:
    """Parse a request; ``WireError.code`` is what the error reply should say."""
    obj = _load(body)
    method = _str(_get(obj, "method"), "method")
    if method != SNAPSHOT_METHOD:
        raise WireError(f"method: unknown method {method!r}", code="unknown_method", key="method")
    return SnapshotRequest(
        microgrid_id=_int(_get(obj, "microgrid_id"), "microgrid_id"),
        type=_optional(_str, obj.get("type"), "type"),
    )


def encode_snapshot_reply(
    microgrid_id: int, as_of: datetime, synced: bool, entries: Iterable[SnapshotEntry]
) -> bytes:
    """The reply body for a successful snapshot."""
    return snapshot_reply_around(microgrid_id, as_of, synced, encode_snapshot_entries(entries))


def encode_snapshot_entries(entries: Iterable[SnapshotEntry]) -> bytes:
    """The ``dispatches`` array of a snapshot reply."""
    return b"[" + b",".join(encode_snapshot_entry(entry) for entry in entries) + b"]"


def encode_snapshot_entry(entry: SnapshotEntry) -> bytes:
    """One element of the ``dispatches`` array: encoded once, sent in many replies."""
    element = {
        "dispatch": dispatch_to_json(entry.dispatch),
        "running": entry.running,
        "until": _format_optional_time(entry.until),
        "sequence": entry.sequence,
    }
    return _utf8(_dump_text(element), "body")


def snapshot_reply_around(
    microgrid_id: int, as_of: datetime, synced: bool, encoded_entries: bytes
) -> bytes:
    """The reply body around an array from ``encode_snapshot_entries``."""
    head = _dump(
        {
            "schema": SCHEMA,
            "microgrid_id": microgrid_id,
            "as_of": format_time(as_of),
            "synced": synced,
        }
    )
    return b"".join((head[:-1], b',"dispatches":', encoded_entries, b"}"))


def encode_error_reply(code: str, message: str) -> bytes:
    """The reply body when the request could not be answered."""
    return _dump({"schema": SCHEMA, "error": {"code": code, "message": message}})


def decode_snapshot_reply(body: bytes) -> SnapshotReply | ErrorReply:
    """Parse a reply (for the SDK); a malformed one raises ``WireError``."""
    obj = _load(body)
    _check_schema(obj)
    if "error" in obj:
        error = _object(obj["error"], "error")
        return ErrorReply(
            code=_str(_get(error, "code", "error"), "error.code"),
            message=_str(_get(error, "message", "error"), "error.message"),
        )
    microgrid_id = _int(_get(obj, "microgrid_id"), "microgrid_id")
    entries = _list(_get(obj, "dispatches"), "dispatches")

    def entry(value: Any, path: str) -> SnapshotEntry:
        item = _object(value, path)
        return SnapshotEntry(
            dispatch=_dispatch_from_json(
                _get(item, "dispatch", path), microgrid_id, f"{path}.dispatch"
            ),
            running=_bool(_get(item, "running", path), f"{path}.running"),
            until=_optional(_time, _get(item, "until", path), f"{path}.until"),
            sequence=_int(_get(item, "sequence", path), f"{path}.sequence"),
        )

    return SnapshotReply(
        microgrid_id=microgrid_id,
        as_of=_time(_get(obj, "as_of"), "as_of"),
        synced=_bool(_get(obj, "synced"), "synced"),
        entries=tuple(entry(value, f"dispatches[{i}]") for i, value in enumerate(entries)),
    )
