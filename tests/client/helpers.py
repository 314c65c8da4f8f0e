"""Synthetic dispatches and messages for the SDK's pure tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from frequenz.client.dispatch.types import TargetIds

from dispatchd.client import Announcement, Dispatch
from dispatchd.core import model, wire
from dispatchd.core.messages import Event, Occurrence, Reason, RunningMessage

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root (the examples run from there)."""

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """``T0`` plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def core(
    dispatch_id: int = 1,
    *,
    type: str = "T",
    start: float = 10,
    duration: float | None = 30,
    **fields: Any,
) -> model.Dispatch:
    """A core dispatch starting ``start`` s after ``T0``."""
    values: dict[str, Any] = {
        "id": dispatch_id,
        "microgrid_id": 7,
        "type": type,
        "start_time": at(start),
        "duration": None if duration is None else timedelta(seconds=duration),
        "target": TargetIds(1, 2),
        "create_time": T0,
        "update_time": T0,
    }
    values.update(fields)
    return model.Dispatch(**values)


def running_message(
    dispatch: model.Dispatch,
    sequence: int,
    *,
    event: Event = Event.RUNNING,
    reason: Reason = Reason.STARTED,
    at_seconds: float = 10,
) -> RunningMessage:
    """A running message for ``dispatch`` as the daemon would send it."""
    start = dispatch.start_time
    end = None if dispatch.duration is None else start + dispatch.duration
    return RunningMessage(
        event=event,
        reason=reason,
        dispatch=dispatch,
        occurrence=Occurrence(start, end),
        until=end if event is Event.RUNNING else None,
        scheduled_for=at(at_seconds),
        emitted_at=at(at_seconds),
        sequence=sequence,
        running_state_change_synced=None,
    )


def announced(
    dispatch: model.Dispatch, *, running: bool, sequence: int = 1, clock_at: float = 0
) -> Dispatch:
    """An SDK dispatch with an announcement, read at ``T0 + clock_at``."""
    return Dispatch(
        dispatch,
        announced=Announcement(
            event=Event.RUNNING if running else Event.STOPPED,
            reason=Reason.STARTED if running else Reason.ENDED,
            sequence=sequence,
            scheduled_for=at(clock_at),
            until=None,
        ),
        clock=lambda: at(clock_at),
    )


def snapshot(*entries: tuple[int, bool, int], type: str = "T") -> wire.SnapshotReply:
    """A reply listing (dispatch id, running, sequence)."""
    return wire.SnapshotReply(
        microgrid_id=7,
        as_of=at(0),
        synced=True,
        entries=tuple(
            wire.SnapshotEntry(
                dispatch=core(dispatch_id, type=type),
                running=running,
                until=at(40) if running else None,
                sequence=sequence,
            )
            for dispatch_id, running, sequence in entries
        ),
    )
