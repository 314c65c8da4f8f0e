"""The ``dispatch`` object inside a body: a ``Dispatch`` to JSON and back.

``dispatch_json_text`` writes the same compact text as dumping
``dispatch_to_json`` but directly, since a first sync encodes every dispatch.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch.types import (
    BatteryType,
    EvChargerType,
    InverterType,
    TargetCategories,
    TargetCategory,
)

from dispatchd.core.model import (
    Dispatch,
    Frequency,
    Recurrence,
    TargetComponents,
    TargetIds,
    Weekday,
    shared,
)
from dispatchd.core.wire._reader import (
    JSON_BOOL,
    WireError,
    _bool,
    _describe,
    _dump_text,
    _enum,
    _format_optional_time,
    _get,
    _int,
    _join,
    _list,
    _object,
    _optional,
    _str,
    _time,
    _time_or_null,
    format_time,
)


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
        f'"active":{JSON_BOOL[dispatch.active]},"dry_run":{JSON_BOOL[dispatch.dry_run]},'
        f'"payload":{_dump_text(dict(dispatch.payload))},'
        f'"recurrence":'
        f"{'null' if recurrence is None else _dump_text(_recurrence_to_json(recurrence))},"
        f'"create_time":"{format_time(dispatch.create_time)}",'
        f'"update_time":"{format_time(dispatch.update_time)}",'
        f'"end_time":{_time_or_null(dispatch.end_time)}}}'
    )


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
        target=shared(_target_from_json(*field("target"))),
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
