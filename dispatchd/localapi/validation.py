"""Pure checks and transformations of what clients send (no I/O, ``now`` passed in).

Every rejection is a :class:`InvalidRequest` that names the offending field, so
the servicer can answer INVALID_ARGUMENT with a message a person can act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from frequenz.api.common.v1alpha8.microgrid.electrical_components import (
    electrical_components_pb2 as components_pb2,
)
from frequenz.api.dispatch.v1.dispatch_pb2 import Dispatch as PBDispatch
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    DispatchData,
    DispatchMetadata,
    RecurrenceRule,
    TargetComponents,
    UpdateMicrogridDispatchRequest,
)
from google.protobuf.struct_pb2 import ListValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from dispatchd.core.model import Dispatch
from dispatchd.core.recurrence import Invalid, Schedule
from dispatchd.core.times import EPOCH, some_month_has_day

START_TIME_TOLERANCE = timedelta(seconds=10)
"""How late a start time may be: a request built "now" needs time to arrive.

The real API rejects start times in the past; a client that computes
``now + a little`` and a slow network should not be punished for it.
"""

MAX_DURATION_SECONDS = 2**31 - 1
"""Larger values are what a negative number looks like after uint32 truncation."""

MAX_TYPE_LENGTH = 1024
MAX_PAYLOAD_BYTES = 50 * 1024
MAX_PAYLOAD_DEPTH = 5
MAX_INTERVAL = 10_000
MAX_COUNT = 4096
MAX_TARGET_ITEMS = 10_000
"""Component ids or categories one dispatch may target."""
MAX_DISPATCH_BYTES = 128 * 1024
"""Serialised size of one dispatch's data: a List page always has room for it."""
MAX_COMPONENT_ID = 2**63 - 1
"""SQLite's largest integer: the target side table cannot hold larger ids."""

UPDATABLE_PATHS = frozenset(
    {
        "start_time",
        "duration",
        "target",
        "is_active",
        "active",
        "payload",
        "recurrence",
        "recurrence.freq",
        "recurrence.interval",
        "recurrence.end_criteria",
        "recurrence.end_criteria.count",
        "recurrence.end_criteria.until_time",
        "recurrence.byminutes",
        "recurrence.byhours",
        "recurrence.byweekdays",
        "recurrence.bymonthdays",
        "recurrence.bymonths",
    }
)
"""Mask paths Update accepts: what the official client's ``update()`` sends, plus
the finer end-criteria paths; ``active`` is accepted as an alias of ``is_active``."""

IMMUTABLE_PATHS = frozenset({"type", "is_dry_run", "dry_run"})

_FREQUENCIES = frozenset(
    number
    for number in RecurrenceRule.Frequency.DESCRIPTOR.values_by_number
    if number != RecurrenceRule.FREQUENCY_UNSPECIFIED
)
_WEEKDAYS = frozenset(
    number
    for number in RecurrenceRule.Weekday.DESCRIPTOR.values_by_number
    if number != RecurrenceRule.WEEKDAY_UNSPECIFIED
)
_CATEGORIES = frozenset(
    number
    for number in components_pb2.ElectricalComponentCategory.DESCRIPTOR.values_by_number
    if number != 0
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """Data ready to store, with the end time the daemon's scheduler computes for it."""

    data: DispatchData
    end_time: datetime | None


class InvalidRequest(ValueError):
    """A request field is unacceptable; ``field`` names it for the client."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def to_datetime(stamp: Timestamp, field: str = "timestamp") -> datetime:
    """An aware UTC datetime (microsecond precision, like the clients).

    Timestamps outside years 1..9999 are refused by name instead of overflowing.
    """
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos < 10**9:
        raise InvalidRequest(field, "timestamp out of range (years 1 to 9999)")
    return EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


_MIN_SECONDS = int((datetime(1, 1, 1, tzinfo=UTC) - EPOCH).total_seconds())
_MAX_SECONDS = int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - EPOCH).total_seconds())


def to_timestamp(moment: datetime) -> Timestamp:
    """The protobuf form of an aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def check_microgrid_id(microgrid_id: int) -> None:
    """Zero is protobuf's "unset", never a real microgrid."""
    if microgrid_id <= 0:
        raise InvalidRequest("microgrid_id", "must be set (a positive integer)")


def check_start_time(start: datetime, now: datetime) -> None:
    """Start times in the past are rejected, as the real API does."""
    if start < now - START_TIME_TOLERANCE:
        raise InvalidRequest(
            "start_time",
            f"{start.isoformat()} is in the past (now is {now.isoformat()})",
        )


def prepare_create(data: DispatchData, *, start_immediately: bool, now: datetime) -> Prepared:
    """Validate a new dispatch and return the data to store (a copy).

    ``start_immediately`` sets the start time to ``now``; an unset interval of
    a recurrence becomes 1, the RFC 5545 default.
    """
    prepared = DispatchData()
    prepared.CopyFrom(data)
    if start_immediately:
        prepared.start_time.CopyFrom(to_timestamp(now))
    elif not data.HasField("start_time"):
        raise InvalidRequest("start_time", "is required unless start_immediately is set")
    else:
        check_start_time(to_datetime(data.start_time, "start_time"), now)
    _normalise_recurrence(prepared.recurrence)
    return Prepared(prepared, check_dispatch_data(prepared))


def prepare_update(
    stored: DispatchData, request: UpdateMicrogridDispatchRequest, now: datetime
) -> Prepared:
    """Apply the field mask of an Update to the stored data, then validate the result."""
    paths = list(request.update_mask.paths)
    if not paths:
        raise InvalidRequest("update_mask", "must name at least one field")
    for path in paths:
        if path in IMMUTABLE_PATHS:
            raise InvalidRequest(f"update_mask.{path}", "cannot be updated")
        if path not in UPDATABLE_PATHS:
            raise InvalidRequest("update_mask", f"unknown field {path!r}")

    update = request.update
    result = DispatchData()
    result.CopyFrom(stored)
    for path in paths:
        _apply_path(result, update, path, now)
    _normalise_recurrence(result.recurrence)
    return Prepared(result, check_dispatch_data(result))


def _apply_path(
    result: DispatchData,
    update: UpdateMicrogridDispatchRequest.DispatchUpdate,
    path: str,
    now: datetime,
) -> None:
    """Copy one masked field from the update into the result."""
    recurrence = result.recurrence
    source = update.recurrence
    match path:
        case "start_time":
            if not update.HasField("start_time"):
                raise InvalidRequest("start_time", "is in the mask but not set")
            check_start_time(to_datetime(update.start_time, "start_time"), now)
            result.start_time.CopyFrom(update.start_time)
        case "duration":
            if update.HasField("duration"):
                result.duration = update.duration
            else:
                result.ClearField("duration")
        case "target":
            result.target.CopyFrom(update.target)
        case "is_active" | "active":
            result.is_active = update.is_active
        case "payload":
            result.payload.CopyFrom(update.payload)
        case "recurrence":
            result.recurrence.CopyFrom(
                RecurrenceRule(
                    freq=source.freq,
                    interval=source.interval,
                    end_criteria=source.end_criteria if source.HasField("end_criteria") else None,
                    byminutes=source.byminutes,
                    byhours=source.byhours,
                    byweekdays=source.byweekdays,
                    bymonthdays=source.bymonthdays,
                    bymonths=source.bymonths,
                )
            )
        case "recurrence.freq":
            recurrence.freq = source.freq
        case "recurrence.interval":
            recurrence.interval = source.interval
        case "recurrence.end_criteria":
            if source.HasField("end_criteria"):
                recurrence.end_criteria.CopyFrom(source.end_criteria)
            else:
                recurrence.ClearField("end_criteria")
        case "recurrence.end_criteria.count":
            recurrence.end_criteria.count = source.end_criteria.count
        case "recurrence.end_criteria.until_time":
            recurrence.end_criteria.until_time.CopyFrom(source.end_criteria.until_time)
        case _:
            _replace_repeated(recurrence, source, path.removeprefix("recurrence."))


def _replace_repeated(
    recurrence: RecurrenceRule,
    source: UpdateMicrogridDispatchRequest.DispatchUpdate.RecurrenceRuleUpdate,
    name: str,
) -> None:
    """Replace one of the by* lists (the mask names the whole list)."""
    target_list = getattr(recurrence, name)
    del target_list[:]
    target_list.extend(getattr(source, name))


def _normalise_recurrence(recurrence: RecurrenceRule) -> None:
    """An interval of 0 (protobuf's unset) means 1 when a frequency is given;
    repeated by-values are kept once (first occurrence), so no list outgrows its range."""
    if recurrence.freq != RecurrenceRule.FREQUENCY_UNSPECIFIED and recurrence.interval == 0:
        recurrence.interval = 1
    for name in ("byminutes", "byhours", "byweekdays", "bymonthdays", "bymonths"):
        values = getattr(recurrence, name)
        unique = list(dict.fromkeys(values))
        if len(unique) != len(values):
            del values[:]
            values.extend(unique)


def check_dispatch_data(data: DispatchData) -> datetime | None:
    """Every rule a stored dispatch must satisfy; returns its end time.

    Field checks come first so the message names the field; then the daemon's
    own scheduler (``Schedule.build``) must accept the dispatch, and its
    ``last_end`` is the end time: one-off start + duration, the end of the
    last occurrence of a bounded rule, else unknown (``None``).
    """
    if not data.type.strip():
        raise InvalidRequest("type", "must not be empty")
    if len(data.type) > MAX_TYPE_LENGTH:
        raise InvalidRequest("type", f"longer than {MAX_TYPE_LENGTH} characters")
    if data.HasField("duration") and data.duration > MAX_DURATION_SECONDS:
        raise InvalidRequest("duration", "out of range (negative or larger than 2^31-1 seconds)")
    check_target(data.target, "target")
    _check_payload(data.payload)
    if data.ByteSize() > MAX_DISPATCH_BYTES:
        raise InvalidRequest("dispatch_data", f"larger than {MAX_DISPATCH_BYTES} bytes serialised")
    check_recurrence(data.recurrence, to_datetime(data.start_time, "start_time"))
    schedule = Schedule.build(_as_model(data))
    if isinstance(schedule, Invalid):
        raise InvalidRequest("recurrence", schedule.reason)
    return schedule.last_end()


def _as_model(data: DispatchData) -> Dispatch:
    """The core model of the data (id and times are irrelevant to the schedule)."""
    epoch = Timestamp()
    message = PBDispatch(
        metadata=DispatchMetadata(dispatch_id=1, create_time=epoch, update_time=epoch),
        data=data,
    )
    try:
        return Dispatch.from_protobuf(message, microgrid_id=1)
    except (ValueError, TypeError) as error:
        raise InvalidRequest("dispatch_data", f"cannot be interpreted: {error}") from error


def check_target(target: TargetComponents, field: str) -> None:
    """A target names at least one component id or category."""
    match target.WhichOneof("components"):
        case None:
            raise InvalidRequest(field, "is required (component ids or categories)")
        case "component_ids":
            ids = target.component_ids.ids
            if not ids:
                raise InvalidRequest(f"{field}.component_ids", "must not be empty")
            if len(ids) > MAX_TARGET_ITEMS:
                raise InvalidRequest(f"{field}.component_ids", f"more than {MAX_TARGET_ITEMS}")
            if max(ids) > MAX_COMPONENT_ID:
                raise InvalidRequest(
                    f"{field}.component_ids", f"component id larger than {MAX_COMPONENT_ID}"
                )
        case "component_categories":
            categories = list(target.component_categories.categories)
            if not categories:
                raise InvalidRequest(f"{field}.component_categories", "must not be empty")
            if len(categories) > MAX_TARGET_ITEMS:
                raise InvalidRequest(
                    f"{field}.component_categories", f"more than {MAX_TARGET_ITEMS}"
                )
            _check_categories(categories, f"{field}.component_categories")
        case "component_categories_types":
            pairs = target.component_categories_types.categories
            if not pairs:
                raise InvalidRequest(f"{field}.component_categories_types", "must not be empty")
            if len(pairs) > MAX_TARGET_ITEMS:
                raise InvalidRequest(
                    f"{field}.component_categories_types", f"more than {MAX_TARGET_ITEMS}"
                )
            _check_categories(
                (pair.category for pair in pairs), f"{field}.component_categories_types"
            )
            for pair in pairs:
                _check_subtype(pair, f"{field}.component_categories_types")


def _check_categories(categories: Iterable[int], field: str) -> None:
    for category in categories:
        if category not in _CATEGORIES:
            raise InvalidRequest(field, f"unknown or unspecified category {category}")


def _check_subtype(pair: TargetComponents.CategoryAndType, field: str) -> None:
    """The battery/inverter/EV charger type must be one the API defines."""
    kind = pair.WhichOneof("type")
    if kind is None:
        return
    enum = TargetComponents.CategoryAndType.DESCRIPTOR.fields_by_name[kind].enum_type
    if enum is None or getattr(pair, kind) not in enum.values_by_number:
        raise InvalidRequest(field, f"unknown {kind} type {getattr(pair, kind)}")


def _check_payload(payload: Struct) -> None:
    if payload.ByteSize() > MAX_PAYLOAD_BYTES:
        raise InvalidRequest("payload", f"larger than {MAX_PAYLOAD_BYTES} bytes")
    if _struct_depth(payload) > MAX_PAYLOAD_DEPTH:
        raise InvalidRequest("payload", f"nested deeper than {MAX_PAYLOAD_DEPTH} levels")


def _struct_depth(node: Struct | ListValue) -> int:
    """Depth of nested objects and lists; a flat object is 1."""
    values: Iterable[Value] = node.fields.values() if isinstance(node, Struct) else node.values
    deepest = 0
    for value in values:
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            deepest = max(deepest, _struct_depth(value.struct_value))
        elif kind == "list_value":
            deepest = max(deepest, _struct_depth(value.list_value))
    return deepest + 1


def check_recurrence(rule: RecurrenceRule, start: datetime) -> None:
    """The recurrence is either unset (freq unspecified) or a rule dateutil accepts."""
    if rule.freq == RecurrenceRule.FREQUENCY_UNSPECIFIED:
        return
    if rule.freq not in _FREQUENCIES:
        raise InvalidRequest("recurrence.freq", f"unknown frequency {rule.freq}")
    if not 1 <= rule.interval <= MAX_INTERVAL:
        raise InvalidRequest("recurrence.interval", f"must be between 1 and {MAX_INTERVAL}")
    if rule.HasField("end_criteria"):
        match rule.end_criteria.WhichOneof("count_or_until"):
            case "count":
                if not 1 <= rule.end_criteria.count <= MAX_COUNT:
                    raise InvalidRequest(
                        "recurrence.end_criteria.count", f"must be between 1 and {MAX_COUNT}"
                    )
            case "until_time":
                if (
                    to_datetime(rule.end_criteria.until_time, "recurrence.end_criteria.until_time")
                    < start
                ):
                    raise InvalidRequest(
                        "recurrence.end_criteria.until_time", "is before start_time"
                    )
    _check_range(rule.byminutes, 0, 59, "recurrence.byminutes")
    _check_range(rule.byhours, 0, 23, "recurrence.byhours")
    _check_range(rule.bymonths, 1, 12, "recurrence.bymonths")
    for weekday in rule.byweekdays:
        if weekday not in _WEEKDAYS:
            raise InvalidRequest("recurrence.byweekdays", f"invalid weekday {weekday}")
    for monthday in rule.bymonthdays:
        if monthday == 0 or not -31 <= monthday <= 31:
            raise InvalidRequest("recurrence.bymonthdays", f"invalid day {monthday}")
    if rule.bymonthdays and rule.freq == RecurrenceRule.FREQUENCY_WEEKLY:
        raise InvalidRequest("recurrence.bymonthdays", "must not be set with a weekly frequency")
    if (
        rule.bymonths
        and rule.bymonthdays
        and not some_month_has_day(rule.bymonths, rule.bymonthdays)
    ):
        raise InvalidRequest("recurrence.bymonthdays", "no such day in the given months")


def _check_range(values: Iterable[int], low: int, high: int, field: str) -> None:
    for value in values:
        if not low <= value <= high:
            raise InvalidRequest(field, f"{value} is not between {low} and {high}")
