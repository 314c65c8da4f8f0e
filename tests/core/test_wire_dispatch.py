"""The ``dispatch`` object inside a body (core/wire/dispatch.py): target forms,
recurrence, duration, round trips, and the text written directly."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch.types import (
    BatteryType,
    EvChargerType,
    InverterType,
    TargetCategories,
    TargetCategory,
)
from hypothesis import given

from dispatchd.core import wire
from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds, Weekday
from tests.core.wire_helpers import FEW, dispatches, spec_dispatch


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (TargetIds(9, 3, 4), {"component_ids": [3, 4, 9]}),
        (TargetIds(), {"component_ids": []}),
        (
            TargetCategories(
                ElectricalComponentCategory.INVERTER, ElectricalComponentCategory.BATTERY
            ),
            {"component_categories": ["BATTERY", "INVERTER"]},
        ),
        (TargetCategories(), {"component_categories": []}),
        (
            TargetCategories(
                ElectricalComponentCategory.METER,
                BatteryType.LI_ION,
                ElectricalComponentCategory.BATTERY,
                InverterType.PV,
            ),
            {
                "component_categories_types": [
                    {"category": "BATTERY", "type": None},
                    {"category": "BATTERY", "type": "LI_ION"},
                    {"category": "INVERTER", "type": "PV"},
                    {"category": "METER", "type": None},
                ]
            },
        ),
        (
            TargetCategories(EvChargerType.DC),
            {"component_categories_types": [{"category": "EV_CHARGER", "type": "DC"}]},
        ),
    ],
)
def test_target_forms(target: Any, expected: dict[str, Any]) -> None:
    dispatch = replace(spec_dispatch(), target=target)
    encoded = wire.dispatch_to_json(dispatch)
    assert encoded["target"] == expected
    decoded = wire.dispatch_from_json(encoded, 7)
    assert decoded == dispatch
    assert type(decoded.target) is type(target)


def test_typed_categories_with_null_type_decode_as_plain_categories() -> None:
    obj = wire.dispatch_to_json(spec_dispatch())
    obj["target"] = {"component_categories_types": [{"category": "BATTERY", "type": None}]}
    target = wire.dispatch_from_json(obj, 7).target
    assert target == TargetCategories(ElectricalComponentCategory.BATTERY)
    assert isinstance(target, TargetCategories)
    assert all(category.type is None for category in target)


def test_deprecated_solar_inverter_name_is_accepted_as_pv() -> None:
    obj = wire.dispatch_to_json(spec_dispatch())
    obj["target"] = {"component_categories_types": [{"category": "INVERTER", "type": "SOLAR"}]}
    assert wire.dispatch_from_json(obj, 7).target == TargetCategories(
        TargetCategory(target=InverterType.PV)
    )


def test_recurrence_shape() -> None:
    rule = Recurrence(
        frequency=Frequency.WEEKLY,
        interval=2,
        until=datetime(2027, 1, 1, tzinfo=UTC),
        byhours=(10, 8),
        byweekdays=(Weekday.MONDAY, Weekday.FRIDAY),
        bymonthdays=(-1,),
    )
    obj = wire.dispatch_to_json(replace(spec_dispatch(), recurrence=rule))
    assert obj["recurrence"] == {
        "frequency": "WEEKLY",
        "interval": 2,
        "end_criteria": {"until": "2027-01-01T00:00:00Z"},
        "byminutes": [],
        "byhours": [10, 8],
        "byweekdays": ["MONDAY", "FRIDAY"],
        "bymonthdays": [-1],
        "bymonths": [],
    }
    counted = replace(rule, until=None, count=5)
    assert wire.dispatch_to_json(replace(spec_dispatch(), recurrence=counted))["recurrence"][
        "end_criteria"
    ] == {"count": 5}
    endless = replace(rule, until=None)
    assert (
        wire.dispatch_to_json(replace(spec_dispatch(), recurrence=endless))["recurrence"][
            "end_criteria"
        ]
        is None
    )


def test_duration_null_and_fractional() -> None:
    assert wire.dispatch_to_json(replace(spec_dispatch(), duration=None))["duration"] is None
    half = replace(spec_dispatch(), duration=timedelta(seconds=1, microseconds=500000))
    assert wire.dispatch_to_json(half)["duration"] == 1.5
    assert wire.dispatch_from_json(wire.dispatch_to_json(half), 7) == half


@FEW
@given(dispatches())
def test_dispatch_json_round_trip(dispatch: Dispatch) -> None:
    obj = wire.dispatch_to_json(dispatch)
    # The store and the RPC keep it as JSON text, so go through text too.
    decoded = wire.dispatch_from_json(json.loads(json.dumps(obj)), dispatch.microgrid_id)
    assert decoded == dispatch
    assert type(decoded.target) is type(dispatch.target)


def test_dispatch_from_json_rejects_non_object() -> None:
    with pytest.raises(wire.WireError, match="dispatch: expected an object"):
        wire.dispatch_from_json([], 7)


@FEW
@given(dispatches())
def test_dispatch_json_text_is_the_compact_dump(dispatch: Dispatch) -> None:
    expected = json.dumps(
        wire.dispatch_to_json(dispatch), ensure_ascii=False, separators=(",", ":")
    )
    assert wire.dispatch_json_text(dispatch) == expected
