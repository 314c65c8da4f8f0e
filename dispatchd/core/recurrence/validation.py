"""Whether a dispatch's fields describe a schedule at all, and if not, why."""

from __future__ import annotations

from datetime import timedelta

from dispatchd.core.model import Dispatch
from dispatchd.core.recurrence.parts import (
    _FREQ,
    _WEEKDAY,
)
from dispatchd.core.times import some_month_has_day


def _validate(dispatch: Dispatch) -> str | None:
    """The first problem with the dispatch's fields, or None."""
    if dispatch.duration is not None and dispatch.duration < timedelta(0):
        return f"duration must not be negative, got {dispatch.duration}"
    rule = dispatch.recurrence
    if rule is None or dispatch.duration is None:
        return None
    if rule.frequency not in _FREQ:
        return f"frequency must be MINUTELY..YEARLY, got {rule.frequency!r}"
    if rule.interval < 1:
        return f"interval must be >= 1, got {rule.interval}"
    if rule.count is not None and rule.until is not None:
        return "count and until are mutually exclusive"
    if rule.count is not None and rule.count < 1:
        return f"count must be >= 1, got {rule.count}"
    for name, values, low, high in (
        ("byminutes", rule.byminutes, 0, 59),
        ("byhours", rule.byhours, 0, 23),
        ("bymonths", rule.bymonths, 1, 12),
    ):
        bad = [v for v in values if not low <= v <= high]
        if bad:
            return f"{name} must be within {low}..{high}, got {bad}"
    bad = [v for v in rule.bymonthdays if v == 0 or not -31 <= v <= 31]
    if bad:
        return f"bymonthdays must be within -31..-1 or 1..31, got {bad}"
    bad_days = [d for d in rule.byweekdays if d not in _WEEKDAY]
    if bad_days:
        return f"byweekdays must be MONDAY..SUNDAY, got {[str(d) for d in bad_days]}"
    if rule.bymonthdays and not some_month_has_day(rule.bymonths, rule.bymonthdays):
        return (
            f"bymonthdays {list(rule.bymonthdays)} never fall in "
            f"bymonths {list(rule.bymonths) or 'any'}"
        )
    return None
