"""Message bodies: a lifecycle or running message to the AMQP message and back.

The publisher adds only the publish ``timestamp`` and ``delivery_mode``; the
SDK decodes with the same module, so daemon and actors cannot disagree about
the format (docs/messages.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatchd.core.messages import (
    Event,
    Kind,
    LifecycleMessage,
    Message,
    Occurrence,
    Reason,
    RunningMessage,
)
from dispatchd.core.wire._reader import (
    SCHEMA,
    WireError,
    _check_schema,
    _enum,
    _get,
    _int,
    _list,
    _load,
    _object,
    _optional,
    _time,
    _time_or_null,
    _utf8,
    format_time,
)
from dispatchd.core.wire.dispatch import _dispatch_from_json, dispatch_json_text
from dispatchd.core.wire.routing import _EVENTS_OF_KIND, message_id, routing_key

CONTENT_TYPE = "application/json"
APP_ID = "dispatchd"
TYPE_LIFECYCLE = "dispatch.lifecycle"
TYPE_RUNNING = "dispatch.running"


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """Everything the publisher needs for one AMQP message except its timestamp."""

    message_id: str
    routing_key: str
    body: bytes
    headers: dict[str, int | str]
    type: str
    microgrid_id: int
    dispatch_id: int


_BODY_HEADS = {
    (kind, event): f'{{"schema":"{SCHEMA}","kind":"{kind.value}","event":"{event.value}",'
    for kind in Kind
    for event in Event
}
"""The constant start of a body, per kind and event."""


def encode(message: Message, *, dispatch_text: str | None = None) -> Envelope:
    """The AMQP message for a lifecycle or running message.

    ``dispatch_text`` is ``dispatch_json_text(message.dispatch)`` when the
    caller already has it (the daemon writes the same text into its record),
    so a large sync serialises each dispatch once.
    """
    dispatch = message.dispatch
    if dispatch_text is None:
        dispatch_text = dispatch_json_text(dispatch)
    # Built as text around the dispatch's JSON; the same bytes as dumping the
    # whole dict compactly (the enum values and times need no escaping).
    head = _BODY_HEADS[message.kind, message.event]
    if isinstance(message, RunningMessage):
        # Every value below is a number, null, or a time (digits and ``-:.TZ``):
        # nothing to escape, so the text is written directly.
        occurrence = message.occurrence
        missed = ",".join(f'"{format_time(start)}"' for start in message.missed_runs)
        text = (
            f'{head}"reason":"{message.reason.value}","microgrid_id":{dispatch.microgrid_id:d},'
            f'"dispatch":{dispatch_text},'
            f'"occurrence":{{"start":"{format_time(occurrence.start)}",'
            f'"end":{_time_or_null(occurrence.end)}}},'
            f'"until":{_time_or_null(message.until)},'
            f'"scheduled_for":"{format_time(message.scheduled_for)}",'
            f'"emitted_at":"{format_time(message.emitted_at)}",'
            f'"sequence":{message.sequence:d},'
            f'"running_state_change_synced":{_time_or_null(message.running_state_change_synced)},'
            f'"missed_runs":[{missed}]}}'
        )
    else:
        text = (
            f'{head}"reason":null,"microgrid_id":{dispatch.microgrid_id:d},'
            f'"dispatch":{dispatch_text},"occurrence":null,"until":null,"scheduled_for":null,'
            f'"emitted_at":"{format_time(message.emitted_at)}","sequence":null,'
            '"running_state_change_synced":null,"missed_runs":null}'
        )
    return Envelope(
        message_id=message_id(message),
        routing_key=routing_key(message),
        body=_utf8(text, "body"),
        headers={
            "microgrid_id": dispatch.microgrid_id,
            "dispatch_id": dispatch.id,
            "dispatch_type": message.routing_type,
            "event": message.event.value,
            "schema": SCHEMA,
        },
        type=TYPE_RUNNING if isinstance(message, RunningMessage) else TYPE_LIFECYCLE,
        microgrid_id=dispatch.microgrid_id,
        dispatch_id=dispatch.id,
    )


DecodedMessage = LifecycleMessage | RunningMessage
"""What ``decode`` gives back: the same values the engine emitted."""


def decode(body: bytes, headers: Mapping[str, Any] | None = None) -> DecodedMessage:
    """Parse a message body, ignoring keys it does not know.

    A lifecycle message's ``routing_type`` comes from the ``dispatch_type``
    header when given (it differs from the body's type for the copy of an
    ``updated`` sent under the old type), else from the body.
    """
    obj = _load(body)
    _check_schema(obj)
    kind = _enum(Kind, _get(obj, "kind"), "kind", by_value=True)
    event = _enum(Event, _get(obj, "event"), "event", by_value=True)
    if event not in _EVENTS_OF_KIND[kind]:
        raise WireError(f"event: {event.value!r} is not a {kind.value} event", key="event")
    microgrid_id = _int(_get(obj, "microgrid_id"), "microgrid_id")
    dispatch = _dispatch_from_json(_get(obj, "dispatch"), microgrid_id, "dispatch")
    emitted_at = _time(_get(obj, "emitted_at"), "emitted_at")
    if kind is Kind.LIFECYCLE:
        routing_type = dispatch.type
        header_type = (headers or {}).get("dispatch_type")
        if isinstance(header_type, bytes):
            header_type = header_type.decode("utf-8", errors="replace")
        if isinstance(header_type, str):
            routing_type = header_type
        return LifecycleMessage(
            event=event, dispatch=dispatch, routing_type=routing_type, emitted_at=emitted_at
        )
    occurrence = _object(_get(obj, "occurrence"), "occurrence")
    missed_runs = _list(_get(obj, "missed_runs"), "missed_runs")
    return RunningMessage(
        event=event,
        reason=_enum(Reason, _get(obj, "reason"), "reason", by_value=True),
        dispatch=dispatch,
        occurrence=Occurrence(
            start=_time(_get(occurrence, "start", "occurrence"), "occurrence.start"),
            end=_optional(_time, _get(occurrence, "end", "occurrence"), "occurrence.end"),
        ),
        until=_optional(_time, _get(obj, "until"), "until"),
        scheduled_for=_time(_get(obj, "scheduled_for"), "scheduled_for"),
        emitted_at=emitted_at,
        sequence=_int(_get(obj, "sequence"), "sequence"),
        running_state_change_synced=_optional(
            _time, _get(obj, "running_state_change_synced"), "running_state_change_synced"
        ),
        missed_runs=tuple(
            _time(start, f"missed_runs[{index}]") for index, start in enumerate(missed_runs)
        ),
    )
