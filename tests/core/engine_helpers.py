"""Shared helpers for the engine tests: a fake clock in seconds and summaries.

Times are seconds after ``T0`` so expected sequences read like docs/scheduling.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from dispatchd.core.engine import Created, Engine
from dispatchd.core.messages import LifecycleMessage, Message, RunningMessage
from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds
from dispatchd.core.records import record_from_text, record_to_text

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MG = 7


def at(seconds: float) -> datetime:
    """The instant ``seconds`` after ``T0``."""
    return T0 + timedelta(seconds=seconds)


def sec(moment: datetime | None) -> float | None:
    """Seconds after ``T0`` (``None`` stays ``None``)."""
    return None if moment is None else (moment - T0).total_seconds()


def make(
    dispatch_id: int = 1,
    *,
    start: float = 10,
    duration: float | None = 20,
    type: str = "PEAK",
    active: bool = True,
    payload: dict[str, Any] | None = None,
    every: int | None = None,
    count: int | None = None,
    until: float | None = None,
    interval: int = 1,
    frequency: Frequency = Frequency.MINUTELY,
    updated: float = 0,
    microgrid_id: int = MG,
) -> Dispatch:
    """A dispatch; ``every`` (seconds, a multiple of 60) makes it MINUTELY."""
    recurrence = None
    if every is not None:
        interval = every // 60
    if every is not None or frequency is not Frequency.MINUTELY or interval != 1:
        recurrence = Recurrence(
            frequency=frequency,
            interval=interval,
            count=count,
            until=None if until is None else at(until),
        )
    return Dispatch(
        id=dispatch_id,
        microgrid_id=microgrid_id,
        type=type,
        start_time=at(start),
        duration=None if duration is None else timedelta(seconds=duration),
        target=TargetIds(1, 2),
        active=active,
        payload=payload if payload is not None else {"power": 1},
        recurrence=recurrence,
        create_time=T0,
        update_time=at(updated),
    )


def bump(dispatch: Dispatch, updated: float, **changes: Any) -> Dispatch:
    """A newer version of ``dispatch`` with ``changes`` (times in seconds)."""
    for name in ("start_time",):
        if name in changes and not isinstance(changes[name], datetime):
            changes[name] = at(changes[name])
    if "duration" in changes and changes["duration"] is not None:
        changes["duration"] = timedelta(seconds=changes["duration"])
    return replace(dispatch, update_time=at(updated), **changes)


def summary(message: Message) -> tuple[Any, ...]:
    """Every field a test pins, compactly."""
    if isinstance(message, LifecycleMessage):
        return ("L", message.dispatch.id, message.event.value, message.routing_type)
    assert isinstance(message, RunningMessage)
    return (
        "R",
        message.dispatch.id,
        message.event.value,
        message.reason.value,
        sec(message.occurrence.start),
        sec(message.occurrence.end),
        sec(message.until),
        sec(message.scheduled_for),
        sec(message.emitted_at),
        message.sequence,
        sec(message.running_state_change_synced),
    )


def summaries(messages: list[Message]) -> list[tuple[Any, ...]]:
    return [summary(message) for message in messages]


def run_until(engine: Engine, horizon: float) -> list[Message]:
    """Fire the timer at every deadline up to ``horizon``, like the daemon."""
    out: list[Message] = []
    while (deadline := engine.next_deadline()) is not None and deadline <= at(horizon):
        out.extend(engine.advance(deadline).messages)
    out.extend(engine.advance(at(horizon)).messages)
    return out


def engine_with(*dispatches: Dispatch, now: float = 0) -> tuple[Engine, list[Message]]:
    """A fresh engine told about ``dispatches`` through the stream at ``now``."""
    engine = Engine()
    out: list[Message] = []
    for dispatch in dispatches:
        out.extend(engine.apply(Created(dispatch), at(now)).messages)
    return engine, out


def persist(engine: Engine, store: dict[Any, Any]) -> None:
    """What a store does: every record and the meta through their stored text."""
    records, meta = engine.export()
    for record in records:
        store[(record.dispatch.microgrid_id, record.dispatch.id)] = record_to_text(record)
    store["meta"] = json.loads(json.dumps(meta))


def reload(store: dict[Any, Any]) -> Engine:
    records = [
        record_from_text(text, key[0]) for key, text in store.items() if isinstance(key, tuple)
    ]
    return Engine.restore(records, store["meta"])
