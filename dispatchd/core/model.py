"""The dispatch model: an immutable value for one version of one dispatch.

Everything downstream (recurrence, engine, wire, SDK) works on this type, so
it is a frozen dataclass with plain, comparable fields. The target and the
enums are reused from ``frequenz-client-dispatch`` (so its conversions apply);
the recurrence is our own frozen copy of its mutable ``RecurrenceRule``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from frequenz.api.dispatch.v1.dispatch_pb2 import Dispatch as PBDispatch
from frequenz.api.dispatch.v1.dispatch_pb2 import RecurrenceRule as PBRecurrenceRule
from frequenz.client.base.conversion import to_datetime
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule, Weekday
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from frequenz.client.dispatch.types import (
    DispatchId,
    TargetCategories,
    TargetComponents,
    TargetIds,
    _target_components_from_protobuf,
)
from google.protobuf.struct_pb2 import Struct, Value

from dispatchd.core.times import utc

__all__ = [
    "Dispatch",
    "Frequency",
    "Payload",
    "Recurrence",
    "TargetCategories",
    "TargetComponents",
    "TargetIds",
    "Weekday",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Recurrence:
    """An RFC 5545-style rule; ``None`` on a dispatch means one-off.

    Count and until are mutually exclusive, as in the API's ``EndCriteria``.
    """

    frequency: Frequency
    interval: int = 1
    count: int | None = None
    until: datetime | None = None
    byminutes: tuple[int, ...] = ()
    byhours: tuple[int, ...] = ()
    byweekdays: tuple[Weekday, ...] = ()
    bymonthdays: tuple[int, ...] = ()
    bymonths: tuple[int, ...] = ()

    @classmethod
    def from_client(cls, rule: RecurrenceRule) -> Recurrence | None:
        """Freeze the client's rule; an UNSPECIFIED frequency without by-rules means one-off.

        With by-rules (e.g. ``byhours=[8]``) it is a malformed rule, kept as
        is so that the schedule rejects it (it never runs), in the daemon and
        in every actor alike.
        """
        if rule.frequency == Frequency.UNSPECIFIED and not _has_by_rules(rule):
            return None
        end = rule.end_criteria
        return cls(
            frequency=rule.frequency,
            interval=rule.interval,
            count=end.count if end else None,
            until=end.until if end else None,
            byminutes=tuple(rule.byminutes),
            byhours=tuple(rule.byhours),
            byweekdays=tuple(rule.byweekdays),
            bymonthdays=tuple(rule.bymonthdays),
            bymonths=tuple(rule.bymonths),
        )

    def to_client(self) -> RecurrenceRule:
        """The client's mutable rule, for protobuf conversion and the API client."""
        end = None
        if self.count is not None or self.until is not None:
            end = EndCriteria(count=self.count, until=self.until)
        return RecurrenceRule(
            frequency=self.frequency,
            interval=self.interval,
            end_criteria=end,
            byminutes=list(self.byminutes),
            byhours=list(self.byhours),
            byweekdays=list(self.byweekdays),
            bymonthdays=list(self.bymonthdays),
            bymonths=list(self.bymonths),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch:
    """One version of a dispatch, as the API last described it.

    ``payload`` is a plain mapping that nobody mutates; equality compares
    every field, which is how the engine tells a real change from a no-op.
    """

    id: int
    microgrid_id: int
    type: str
    start_time: datetime
    duration: timedelta | None
    target: TargetComponents
    active: bool = True
    dry_run: bool = False
    payload: Mapping[str, Any] = field(default_factory=dict)
    recurrence: Recurrence | None = None
    create_time: datetime
    update_time: datetime
    end_time: datetime | None = None

    @classmethod
    def from_client(cls, dispatch: ClientDispatch, microgrid_id: int) -> Dispatch:
        """Convert what ``DispatchApiClient`` yields."""
        return cls(
            id=int(dispatch.id),
            microgrid_id=microgrid_id,
            type=sys.intern(dispatch.type),
            start_time=utc(dispatch.start_time),
            duration=dispatch.duration,
            target=shared(dispatch.target),
            active=dispatch.active,
            dry_run=dispatch.dry_run,
            payload=dict(dispatch.payload),
            recurrence=Recurrence.from_client(dispatch.recurrence),
            create_time=utc(dispatch.create_time),
            update_time=utc(dispatch.update_time),
            end_time=utc(dispatch.end_time) if dispatch.end_time else None,
        )

    def to_client(self) -> ClientDispatch:
        """The ``frequenz-client-dispatch`` value with the same fields."""
        return ClientDispatch(
            id=DispatchId(self.id),
            type=self.type,
            start_time=self.start_time,
            duration=self.duration,
            target=self.target,
            active=self.active,
            dry_run=self.dry_run,
            payload=dict(self.payload),
            recurrence=self.recurrence.to_client() if self.recurrence else RecurrenceRule(),
            create_time=self.create_time,
            update_time=self.update_time,
            end_time=self.end_time,
        )

    @classmethod
    def from_protobuf(cls, message: PBDispatch, microgrid_id: int) -> Dispatch:
        """Convert the API's protobuf message (the microgrid id is not in it).

        The same value as ``from_client(ClientDispatch.from_protobuf(message))``,
        built with the client's own field conversions but without the
        intermediate client object: a first sync converts every dispatch.
        """
        metadata = message.metadata
        data = message.data
        rule = data.recurrence
        create_time = utc(to_datetime(metadata.create_time))
        update_time = utc(to_datetime(metadata.update_time))
        return cls(
            id=metadata.dispatch_id,
            microgrid_id=microgrid_id,
            type=sys.intern(data.type),
            start_time=utc(to_datetime(data.start_time)),
            duration=shared(timedelta(seconds=data.duration))
            if data.HasField("duration")
            else None,
            target=shared(_target_components_from_protobuf(data.target)),
            active=data.is_active,
            dry_run=data.is_dry_run,
            payload=Payload.of(_struct_to_dict(data.payload)),
            recurrence=(
                None
                if rule.freq == PBRecurrenceRule.FREQUENCY_UNSPECIFIED and not _has_by_rules(rule)
                else Recurrence.from_client(RecurrenceRule.from_protobuf(rule))
            ),
            create_time=create_time,
            # Never updated: one object for both (a dispatch is kept for its lifetime).
            update_time=create_time if update_time == create_time else update_time,
            end_time=(
                utc(to_datetime(metadata.end_time)) if metadata.HasField("end_time") else None
            ),
        )

    def to_protobuf(self) -> PBDispatch:
        """The API's protobuf message."""
        return self.to_client().to_protobuf()

    @property
    def is_recurring(self) -> bool:
        """Whether the recurrence rule applies (infinite dispatches ignore it)."""
        return self.recurrence is not None and self.duration is not None


def _has_by_rules(rule: RecurrenceRule | PBRecurrenceRule) -> bool:
    """Whether any by-rule is set (the client's and the protobuf rule name them alike)."""
    return bool(
        rule.byminutes or rule.byhours or rule.byweekdays or rule.bymonthdays or rule.bymonths
    )


_SHARED_LIMIT = 4096
"""Distinct values ``shared`` remembers; past it, values are simply not shared."""
_SHARED: dict[tuple[type, object], Any] = {}

_HashableT = TypeVar("_HashableT", bound=Hashable)


def shared(value: _HashableT) -> _HashableT:
    """One object for equal values of the same type (targets and durations repeat a lot).

    Every known dispatch is kept in memory; at 50,000 dispatches one target
    object each is 11 MB (docs/architecture.md, "Memory at scale"). Values are
    immutable, so sharing them changes nothing but the memory.
    """
    key = (type(value), value)
    found: _HashableT | None = _SHARED.get(key)
    if found is not None:
        return found
    if len(_SHARED) < _SHARED_LIMIT:
        _SHARED[key] = value
    return value


class Payload(Mapping[str, Any]):
    """A listed dispatch's payload: an immutable mapping kept as two tuples.

    A dict of two keys takes 200 bytes; this takes about 100, and the keys
    tuple is shared by every payload with the same keys (docs/architecture.md,
    "Memory at scale"). Equal to any mapping with the same items, like a dict.
    """

    __slots__ = ("_keys", "_values")

    _LARGEST = 16
    """Payloads with more keys stay dicts: a lookup here walks the keys."""

    def __init__(self, keys: tuple[str, ...], values: tuple[Any, ...]) -> None:
        self._keys = keys
        self._values = values

    @classmethod
    def of(cls, items: dict[str, Any]) -> Mapping[str, Any]:
        """``items`` as a ``Payload``, or as it is when it is large."""
        if len(items) > cls._LARGEST:
            return items
        return cls(shared(tuple(items)), tuple(items.values()))

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[self._keys.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Payload) and other._keys is self._keys:
            return self._values == other._values
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(dict(self))


def _struct_to_dict(struct: Struct) -> dict[str, Any]:
    """What ``MessageToDict`` gives for a ``Struct`` (the payload), without its descriptor walk.

    The keys are interned: every dispatch of a type has the same ones.
    """
    return {sys.intern(key): _value_to_python(value) for key, value in struct.fields.items()}


def _value_to_python(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError(f"payload: {number} is not a JSON number")
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value_to_python(item) for item in value.list_value.values]
    return None
