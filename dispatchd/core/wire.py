"""The wire-v1 encoding: routing keys, message ids, headers and JSON bodies.

Pure functions between the core's values (``Dispatch``, ``LifecycleMessage``,
``RunningMessage``) and what travels over AMQP. The publisher adds only the
publish ``timestamp`` and ``delivery_mode``; the SDK decodes with the same
module, so daemon and actors cannot disagree about the format.

Times are written in UTC with a ``Z`` and the shortest exact fraction: none
for whole seconds, milliseconds when the microseconds are a multiple of 1000,
microseconds otherwise. That reproduces the spec's examples
(``10:00:00Z``, ``10:00:00.004Z``) and still round-trips every ``datetime``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar

from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch.types import (
    BatteryType,
    EvChargerType,
    InverterType,
    TargetCategories,
    TargetCategory,
)

from dispatchd.core.messages import (
    Event,
    Kind,
    LifecycleMessage,
    Message,
    Occurrence,
    Reason,
    RunningMessage,
)
from dispatchd.core.model import (
    Dispatch,
    Frequency,
    Recurrence,
    TargetComponents,
    TargetIds,
    Weekday,
)

__all__ = [
    "APP_ID",
    "CONTENT_TYPE",
    "MAX_ROUTING_KEY_BYTES",
    "SCHEMA",
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
    "encode_snapshot_reply",
    "encode_snapshot_request",
    "escape_type",
    "format_time",
    "message_id",
    "parse_time",
    "routing_key",
]

CONTENT_TYPE = "application/json"
APP_ID = "dispatchd"
SCHEMA = "dispatchd/v1"
TYPE_LIFECYCLE = "dispatch.lifecycle"
TYPE_RUNNING = "dispatch.running"
MAX_ROUTING_KEY_BYTES = 255
SNAPSHOT_METHOD = "snapshot"

_LIFECYCLE_EVENTS = (Event.CREATED, Event.UPDATED, Event.DELETED)
_RUNNING_EVENTS = (Event.RUNNING, Event.STOPPED)
_EVENTS_OF_KIND = {Kind.LIFECYCLE: _LIFECYCLE_EVENTS, Kind.RUNNING: _RUNNING_EVENTS}
_TYPE_DIGEST_HEX = 16
_CUT_MARK = "~"
# Largest decimal microgrid id a binding with a wildcard id has to cover (uint64).
_MAX_MICROGRID_DIGITS = len(str(2**64 - 1))


class WireError(ValueError):
    """A body or request that does not follow wire-v1 (or cannot be encoded).

    ``code`` is the snapshot RPC error code (``malformed``, ``unknown_method``);
    ``key`` is the dotted path of the offending key when there is one.
    """

    def __init__(self, message: str, *, code: str = "malformed", key: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.key = key


# --------------------------------------------------------------------- routing


_UNESCAPED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def escape_type(dispatch_type: str) -> str:
    """Make any string one routing word: bytes outside ``[A-Za-z0-9_-]`` become ``%XX``."""
    return "".join(
        chr(byte) if byte in _UNESCAPED else f"%{byte:02X}" for byte in _utf8(dispatch_type, "type")
    )


_TYPE_CACHE_SIZE = 4096
"""Distinct types remembered by the routing-word caches; types repeat a lot."""


@lru_cache(maxsize=_TYPE_CACHE_SIZE)
def _type_digest(dispatch_type: str) -> str:
    return hashlib.sha256(_utf8(dispatch_type, "type")).hexdigest()[:_TYPE_DIGEST_HEX]


@lru_cache(maxsize=_TYPE_CACHE_SIZE)
def _type_word(dispatch_type: str, budget: int) -> str:
    """The escaped type, cut to ``budget`` bytes with ``~`` + digest when it is longer.

    ``~`` never occurs in an escaped type, so a cut word cannot equal an uncut one.
    """
    escaped = escape_type(dispatch_type)
    if len(escaped) <= budget:
        return escaped
    keep = budget - len(_CUT_MARK) - _TYPE_DIGEST_HEX
    if keep < 0:
        raise WireError(f"no room for the type in a {MAX_ROUTING_KEY_BYTES}-byte routing key")
    head = escaped[:keep]
    # A '%' in the last two kept bytes would split its escape: drop it and its digits.
    split_escape = head.rfind("%", max(0, keep - 2))
    if split_escape != -1:
        head = head[:split_escape]
    return head + _CUT_MARK + _type_digest(dispatch_type)


def _key_prefix(microgrid_word: str, kind: Kind, event_word: str) -> str:
    return f"microgrid.{microgrid_word}.{kind.value}.{event_word}."


@lru_cache(maxsize=_TYPE_CACHE_SIZE)
def _routing_key(microgrid_id: int, kind: Kind, event: Event, dispatch_type: str) -> str:
    prefix = _key_prefix(str(microgrid_id), kind, event.value)
    return prefix + _type_word(dispatch_type, MAX_ROUTING_KEY_BYTES - len(prefix))


def routing_key(message: Message) -> str:
    """``microgrid.<id>.<kind>.<event>.<escaped type>``, at most 255 bytes."""
    return _routing_key(
        message.dispatch.microgrid_id, message.kind, message.event, message.routing_type
    )


def binding_key(
    microgrid_id: int | None,
    kind: Kind | str,
    event: Event | str | None,
    dispatch_type: str | None,
) -> str:
    """A binding key matching the routing keys of these values; ``None`` is ``*``.

    A type long enough to be cut is cut where the routing key cuts it, which
    depends on the length of the microgrid id; with a wildcard id such a type
    cannot be matched by one binding, and that is a ``ValueError``.
    """
    kind = Kind(kind)
    events = _EVENTS_OF_KIND[kind]
    if event is not None:
        event = Event(event)
        if event not in events:
            raise ValueError(f"{event.value!r} is not a {kind.value} event")
    microgrid_word = "*" if microgrid_id is None else str(microgrid_id)
    event_word = "*" if event is None else event.value
    if dispatch_type is None:
        return _key_prefix(microgrid_word, kind, event_word) + "*"
    microgrid_words = (
        [str(microgrid_id)]
        if microgrid_id is not None
        else ["9" * digits for digits in range(1, _MAX_MICROGRID_DIGITS + 1)]
    )
    event_words = [event.value] if event is not None else [e.value for e in events]
    type_words = {
        _type_word(dispatch_type, MAX_ROUTING_KEY_BYTES - len(_key_prefix(mg, kind, ev)))
        for mg in microgrid_words
        for ev in event_words
    }
    if len(type_words) != 1:
        raise ValueError(
            "this type is cut in routing keys at a place that depends on the microgrid id; "
            "bind it with a concrete microgrid id"
        )
    return _key_prefix(microgrid_word, kind, event_word) + type_words.pop()


# ------------------------------------------------------------------ message id


def message_id(message: Message) -> str:
    """A deterministic id: the same transition always gets the same one.

    Running: ``<microgrid>.<dispatch>.r<sequence>``; the engine's per-dispatch
    sequence is strictly increasing and persisted, so it names the transition.
    Lifecycle: ``<microgrid>.<dispatch>.<event>.<update_time µs>.<type digest>``;
    ``created``/``deleted`` happen once per dispatch and ``updated`` once per
    strictly newer ``update_time``, except on a type change, where the two copies
    differ by routing type. The digest (64 bits of SHA-256) stands for the type
    only to bound the id's length; two types of one update colliding is
    practically impossible. ``emitted_at`` is left out on purpose: a retry or a
    recomputation emits later but is the same transition.
    """
    dispatch = message.dispatch
    if isinstance(message, RunningMessage):
        return f"{dispatch.microgrid_id}.{dispatch.id}.r{message.sequence}"
    return (
        f"{dispatch.microgrid_id}.{dispatch.id}.{message.event.value}."
        f"{_epoch_micros(dispatch.update_time)}.{_type_digest(message.routing_type)}"
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_micros(moment: datetime) -> int:
    """Exact (integer) microseconds since the epoch; a naive time is UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# -------------------------------------------------------------------- envelope


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
    """Parse a wire-v1 message body, ignoring keys it does not know.

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


# -------------------------------------------------------------------- dispatch


def dispatch_to_json(dispatch: Dispatch) -> dict[str, Any]:
    """The body's ``dispatch`` object (without the microgrid id, which is beside it)."""
    return {
        "id": dispatch.id,
        "type": dispatch.type,
        "start_time": format_time(dispatch.start_time),
        "duration": _duration_to_json(dispatch.duration),
        "target": _target_to_json(dispatch.target),
        "active": dispatch.active,
        "dry_run": dispatch.dry_run,
        "payload": dict(dispatch.payload),
        "recurrence": _recurrence_to_json(dispatch.recurrence),
        "create_time": format_time(dispatch.create_time),
        "update_time": format_time(dispatch.update_time),
        "end_time": _format_optional_time(dispatch.end_time),
    }


def dispatch_json_text(dispatch: Dispatch) -> str:
    """``dispatch_to_json`` as the compact JSON text that goes into a body.

    Written directly around the parts that need a JSON encoder (type,
    payload, recurrence): a first sync encodes every dispatch once.
    """
    duration = _duration_to_json(dispatch.duration)
    recurrence = dispatch.recurrence
    return (
        f'{{"id":{dispatch.id:d},"type":{_dump_text(dispatch.type)},'
        f'"start_time":"{format_time(dispatch.start_time)}",'
        f'"duration":{_number_text(duration)},'
        f'"target":{_target_text(dispatch.target)},'
        f'"active":{_BOOL_TEXT[dispatch.active]},"dry_run":{_BOOL_TEXT[dispatch.dry_run]},'
        f'"payload":{_dump_text(dict(dispatch.payload))},'
        f'"recurrence":'
        f"{'null' if recurrence is None else _dump_text(_recurrence_to_json(recurrence))},"
        f'"create_time":"{format_time(dispatch.create_time)}",'
        f'"update_time":"{format_time(dispatch.update_time)}",'
        f'"end_time":{_time_or_null(dispatch.end_time)}}}'
    )


_BOOL_TEXT = {False: "false", True: "true"}


@lru_cache(maxsize=1024, typed=True)
def _target_text(target: TargetComponents) -> str:
    """Cached: many dispatches share a target (targets are frozensets, hashable).

    ``typed``: an empty ``TargetIds`` equals an empty ``TargetCategories``.
    """
    if isinstance(target, TargetIds):  # the common case: ints, nothing to escape
        return f'{{"component_ids":[{",".join(str(int(i)) for i in sorted(target))}]}}'
    return _dump_text(_target_to_json(target))


def _number_text(value: int | float | None) -> str:
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)  # what the JSON encoder writes for an int
    return _dump_text(value)


def dispatch_from_json(obj: Any, microgrid_id: int) -> Dispatch:
    """The inverse of ``dispatch_to_json``; raises ``WireError`` naming a bad key."""
    return _dispatch_from_json(obj, microgrid_id, "")


def _dispatch_from_json(obj: Any, microgrid_id: int, path: str) -> Dispatch:
    obj = _object(obj, path or "dispatch")

    def field(key: str) -> tuple[Any, str]:
        return _get(obj, key, path), _join(path, key)

    def time(key: str) -> datetime:
        return _time(*field(key))

    return Dispatch(
        id=_int(*field("id")),
        microgrid_id=microgrid_id,
        type=_str(*field("type")),
        start_time=time("start_time"),
        duration=_optional(_duration_from_json, *field("duration")),
        target=_target_from_json(*field("target")),
        active=_bool(*field("active")),
        dry_run=_bool(*field("dry_run")),
        payload=_object(*field("payload")),
        recurrence=_optional(_recurrence_from_json, *field("recurrence")),
        create_time=time("create_time"),
        update_time=time("update_time"),
        end_time=_optional(_time, *field("end_time")),
    )


def _duration_to_json(duration: timedelta | None) -> int | float | None:
    """Whole seconds as an int (the API's case); else a float, exact to the µs
    for any duration under about 285 years."""
    if duration is None:
        return None
    if duration.microseconds == 0:
        return duration // timedelta(seconds=1)
    return duration.total_seconds()


def _duration_from_json(value: Any, path: str) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"{path}: expected seconds (a number), got {_describe(value)}", key=path)
    try:
        return timedelta(seconds=value)
    except OverflowError as error:
        raise WireError(f"{path}: duration out of range: {value!r}", key=path) from error


_TYPE_ENUM_OF_CATEGORY: dict[
    ElectricalComponentCategory, type[BatteryType] | type[EvChargerType] | type[InverterType]
] = {
    ElectricalComponentCategory.BATTERY: BatteryType,
    ElectricalComponentCategory.EV_CHARGER: EvChargerType,
    ElectricalComponentCategory.INVERTER: InverterType,
}


def _target_to_json(target: TargetComponents) -> dict[str, Any]:
    """One of the three target forms; sorted, so equal targets give equal bodies.

    Categories given as the older ``ComponentCategory`` are written under their
    ``ElectricalComponentCategory`` name, as the client's own conversion does.
    """
    if isinstance(target, TargetIds):
        return {"component_ids": sorted(target)}
    if all(category.type is None for category in target):
        return {"component_categories": sorted(c.category2.name for c in target)}
    pairs = [
        (category.category2.name, None if category.type is None else category.type.name)
        for category in target
    ]
    pairs.sort(key=lambda pair: (pair[0], pair[1] or ""))
    return {
        "component_categories_types": [
            {"category": category, "type": type_name} for category, type_name in pairs
        ]
    }


def _target_from_json(value: Any, path: str) -> TargetComponents:
    obj = _object(value, path)
    forms = [key for key in _TARGET_FORMS if key in obj]
    if len(forms) != 1:
        raise WireError(
            f"{path}: expected exactly one of {', '.join(_TARGET_FORMS)}, got {sorted(obj)}",
            key=path,
        )
    form = forms[0]
    items = _list(obj[form], _join(path, form))
    if form == "component_ids":
        return TargetIds(*(_int(item, f"{path}.{form}[{i}]") for i, item in enumerate(items)))
    if form == "component_categories":
        return TargetCategories(
            *(
                _enum(ElectricalComponentCategory, item, f"{path}.{form}[{i}]")
                for i, item in enumerate(items)
            )
        )
    return TargetCategories(
        *(_category_and_type(item, f"{path}.{form}[{i}]") for i, item in enumerate(items))
    )


_TARGET_FORMS = ("component_ids", "component_categories", "component_categories_types")


def _category_and_type(value: Any, path: str) -> TargetCategory:
    obj = _object(value, path)
    category = _enum(ElectricalComponentCategory, _get(obj, "category", path), f"{path}.category")
    type_name = obj.get("type")
    if type_name is None:
        return TargetCategory(target=category)
    type_enum = _TYPE_ENUM_OF_CATEGORY.get(category)
    if type_enum is None:
        raise WireError(f"{path}.type: category {category.name} has no types", key=f"{path}.type")
    type_member: BatteryType | EvChargerType | InverterType = _enum(
        type_enum, type_name, f"{path}.type"
    )
    return TargetCategory(target=type_member)


_BY_RULES = ("byminutes", "byhours", "bymonthdays", "bymonths")


def _recurrence_to_json(recurrence: Recurrence | None) -> dict[str, Any] | None:
    """Rules keep their order; ``count`` wins over ``until`` as in the API's protobuf."""
    if recurrence is None:
        return None
    end_criteria: dict[str, Any] | None = None
    if recurrence.count is not None:
        end_criteria = {"count": recurrence.count}
    elif recurrence.until is not None:
        end_criteria = {"until": format_time(recurrence.until)}
    return {
        "frequency": recurrence.frequency.name,
        "interval": recurrence.interval,
        "end_criteria": end_criteria,
        "byminutes": list(recurrence.byminutes),
        "byhours": list(recurrence.byhours),
        "byweekdays": [weekday.name for weekday in recurrence.byweekdays],
        "bymonthdays": list(recurrence.bymonthdays),
        "bymonths": list(recurrence.bymonths),
    }


def _recurrence_from_json(value: Any, path: str) -> Recurrence:
    obj = _object(value, path)
    end = _optional(_object, _get(obj, "end_criteria", path), _join(path, "end_criteria"))
    count = until = None
    if end is not None:
        end_path = _join(path, "end_criteria")
        if ("count" in end) == ("until" in end):
            raise WireError(f"{end_path}: expected exactly one of count, until", key=end_path)
        if "count" in end:
            count = _int(end["count"], f"{end_path}.count")
        else:
            until = _time(end["until"], f"{end_path}.until")

    def ints(key: str) -> tuple[int, ...]:
        key_path = _join(path, key)
        items = _list(_get(obj, key, path), key_path)
        return tuple(_int(item, f"{key_path}[{i}]") for i, item in enumerate(items))

    weekdays_path = _join(path, "byweekdays")
    weekdays = _list(_get(obj, "byweekdays", path), weekdays_path)
    byminutes, byhours, bymonthdays, bymonths = (ints(key) for key in _BY_RULES)
    return Recurrence(
        frequency=_enum(Frequency, _get(obj, "frequency", path), _join(path, "frequency")),
        interval=_int(_get(obj, "interval", path), _join(path, "interval")),
        count=count,
        until=until,
        byminutes=byminutes,
        byhours=byhours,
        byweekdays=tuple(
            _enum(Weekday, item, f"{weekdays_path}[{i}]") for i, item in enumerate(weekdays)
        ),
        bymonthdays=bymonthdays,
        bymonths=bymonths,
    )


# -------------------------------------------------------------------- snapshot


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Ask for the current state of one microgrid, optionally of one type."""

    microgrid_id: int
    type: str | None = None


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One dispatch in a snapshot and what was last announced for it."""

    dispatch: Dispatch
    running: bool
    until: datetime | None
    sequence: int


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


# ----------------------------------------------------------------------- times


@lru_cache(maxsize=4096)
def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with ``Z`` and the shortest exact fraction (0, 3 or 6 digits).

    A naive datetime is taken to be UTC, as the model does. Cached: a burst of
    messages repeats the same few instants (equal instants in other zones
    share an entry, rightly: they have the same UTC text).
    """
    return _format_time(moment)


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = _as_utc(moment)
    # isoformat (C code) writes a four-digit year, 0 or 6 fraction digits and
    # "+00:00"; only that suffix and the millisecond case need cutting.
    text = moment.isoformat()[:-6]
    micros = moment.microsecond
    if micros and micros % 1000 == 0:
        return text[:-3] + "Z"
    return text + "Z"


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_time(text: str) -> datetime:
    """Any RFC 3339 time (``Z`` or an offset) as an aware UTC datetime.

    Fractions finer than a microsecond are truncated: ``datetime`` cannot hold them.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(group) for group in match.groups()[:6])
    fraction, zulu, sign, offset_hours, offset_minutes = match.groups()[6:]
    micros = int((fraction or "")[:6].ljust(6, "0"))
    moment = datetime(year, month, day, hour, minute, second, micros, tzinfo=UTC)
    if zulu is None:
        if int(offset_hours) > 23 or int(offset_minutes) > 59:
            raise ValueError(f"offset out of range: {text!r}")
        offset = timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
        try:
            moment -= offset if sign == "+" else -offset
        except OverflowError as error:
            raise ValueError(f"out of range in UTC: {text!r}") from error
    return moment


def _format_optional_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _time_or_null(moment: datetime | None) -> str:
    """A time as a JSON string, or ``null``."""
    return "null" if moment is None else f'"{format_time(moment)}"'


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# ------------------------------------------------------------- reading helpers


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise WireError(f"{what}: not encodable as UTF-8: {text!r}", key=what) from error


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _dump_text(obj: Any) -> str:
    try:
        return _ENCODER.encode(obj)
    except (TypeError, ValueError) as error:
        raise WireError(f"cannot encode as JSON: {error}") from error


def _dump(obj: dict[str, Any]) -> bytes:
    return _utf8(_dump_text(obj), "body")


def _reject_constant(name: str) -> Any:
    raise WireError(f"body: {name} is not JSON")


def _load(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise WireError(f"body: not UTF-8: {error}") from error
    except json.JSONDecodeError as error:
        raise WireError(f"body: not JSON: {error}") from error
    except WireError:
        raise
    except ValueError as error:  # an integer beyond Python's digit limit for conversions
        raise WireError("body: a number has too many digits") from error
    except RecursionError as error:
        raise WireError("body: nested too deeply") from error
    return _object(obj, "body")


def _check_schema(obj: dict[str, Any]) -> None:
    schema = _str(_get(obj, "schema"), "schema")
    if schema != SCHEMA:
        raise WireError(f"schema: expected {SCHEMA!r}, got {schema!r}", key="schema")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _get(obj: dict[str, Any], key: str, path: str = "") -> Any:
    if key not in obj:
        full = _join(path, key)
        raise WireError(f"{full}: missing", key=full)
    return obj[key]


def _describe(value: Any) -> str:
    text = json.dumps(value) if _is_json_scalar(value) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{path}: expected an object, got {_describe(value)}", key=path)
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{path}: expected a list, got {_describe(value)}", key=path)
    return value


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{path}: expected an integer, got {_describe(value)}", key=path)
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{path}: expected true or false, got {_describe(value)}", key=path)
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{path}: expected a string, got {_describe(value)}", key=path)
    return value


def _time(value: Any, path: str) -> datetime:
    try:
        return parse_time(_str(value, path))
    except WireError:
        raise
    except ValueError as error:
        raise WireError(f"{path}: {error}", key=path) from error


_EnumT = TypeVar("_EnumT", bound=Enum)


def _enum(enum: type[_EnumT], value: Any, path: str, *, by_value: bool = False) -> _EnumT:
    """A member by name (or, for our own string enums, by value)."""
    text = _str(value, path)
    try:
        return enum(text) if by_value else enum[text]
    except (KeyError, ValueError) as error:
        raise WireError(f"{path}: unknown value {text!r}", key=path) from error


_ValueT = TypeVar("_ValueT")


def _optional(parse: Callable[[Any, str], _ValueT], value: Any, path: str) -> _ValueT | None:
    return None if value is None else parse(value, path)
