"""The wire format: routing keys, message ids, headers and JSON bodies.

Pure functions between the core's values (``Dispatch``, ``LifecycleMessage``,
``RunningMessage``) and what travels over AMQP, as docs/messages.md describes
it. One module per part, all reachable from here (``wire.encode``,
``wire.routing_key``, ...):

- ``routing``: routing keys, binding keys and message ids;
- ``body``: lifecycle and running message bodies and their headers;
- ``dispatch``: the ``dispatch`` object inside a body;
- ``snapshot``: the snapshot RPC's request and reply;
- ``_reader``: ``WireError``, the time format and the typed JSON readers.
"""

from dispatchd.core.messages import SnapshotEntry
from dispatchd.core.wire._reader import JSON_BOOL, SCHEMA, WireError, format_time, parse_time
from dispatchd.core.wire.body import (
    APP_ID,
    CONTENT_TYPE,
    TYPE_LIFECYCLE,
    TYPE_RUNNING,
    DecodedMessage,
    Envelope,
    decode,
    encode,
)
from dispatchd.core.wire.dispatch import dispatch_from_json, dispatch_json_text, dispatch_to_json
from dispatchd.core.wire.routing import (
    MAX_ROUTING_KEY_BYTES,
    binding_key,
    escape_type,
    message_id,
    routing_key,
)
from dispatchd.core.wire.snapshot import (
    SNAPSHOT_METHOD,
    ErrorReply,
    SnapshotReply,
    SnapshotRequest,
    decode_snapshot_reply,
    decode_snapshot_request,
    encode_error_reply,
    encode_snapshot_entries,
    encode_snapshot_entry,
    encode_snapshot_reply,
    encode_snapshot_request,
    snapshot_reply_around,
)

__all__ = [
    "APP_ID",
    "CONTENT_TYPE",
    "JSON_BOOL",
    "MAX_ROUTING_KEY_BYTES",
    "SCHEMA",
    "SNAPSHOT_METHOD",
    "TYPE_LIFECYCLE",
    "TYPE_RUNNING",
    "DecodedMessage",
    "Envelope",
    "ErrorReply",
    "SnapshotEntry",
    "SnapshotReply",
    "SnapshotRequest",
    "WireError",
    "binding_key",
    "decode",
    "decode_snapshot_reply",
    "decode_snapshot_request",
    "dispatch_from_json",
    "dispatch_json_text",
    "dispatch_to_json",
    "encode",
    "encode_error_reply",
    "encode_snapshot_entries",
    "encode_snapshot_entry",
    "encode_snapshot_reply",
    "encode_snapshot_request",
    "escape_type",
    "format_time",
    "message_id",
    "parse_time",
    "routing_key",
    "snapshot_reply_around",
]
