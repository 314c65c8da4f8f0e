"""The live state of one dispatch inside the engine, and pure functions of it.

Nothing here touches more than one record: the engine-wide timer heap, the
counts and the numbering of messages live in ``convergence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from dispatchd.core.messages import (
    Event,
    LifecycleMessage,
    Message,
    Occurrence,
    Reason,
)
from dispatchd.core.model import Dispatch
from dispatchd.core.records import DispatchKey
from dispatchd.core.recurrence import Invalid, Schedule
from dispatchd.core.times import EARLIEST, LATEST

_ZERO = timedelta(0)
_MISSED_LIMIT = 100
"""docs/messages.md § 4: ``missed_runs`` holds at most this many starts, oldest first."""


class _Mode(Enum):
    """Why the engine is converging, which decides the reason of a start."""

    CHANGE = "change"  # an API change learnt as it happened
    LATE = "late"  # learnt late: restart or a re-list after a lost stream


@dataclass(slots=True)
class _Record:
    """Live state of one dispatch (mutable, engine-internal)."""

    key: DispatchKey
    dispatch: Dispatch
    schedule: Schedule | None
    """Dropped while idle and rebuilt on demand (see ``_schedule_of``)."""
    invalid: str | None
    announced: Occurrence | None = None
    sequence: int = 0
    last_emitted_at: datetime | None = None
    tombstone: bool = False
    forgotten: bool = False
    pending_missed: tuple[datetime, ...] = ()
    last_pulse: datetime | None = None
    deadline: datetime | None = None
    version: int = 0
    finished_from: datetime | None = None
    """From when the schedule is finished (``LATEST``: infinite or endless)."""
    counted: str | None = None
    """The metric state this record is counted in (``None``: hidden)."""


@dataclass(slots=True)
class _Draft:
    """A running transition before its sequence number is known."""

    record: _Record
    event: Event
    reason: Reason
    dispatch: Dispatch
    occurrence: Occurrence
    scheduled_for: datetime


_STATES = ("scheduled", "running", "finished", "inactive", "invalid")


def _build(dispatch: Dispatch) -> tuple[Schedule | None, str | None]:
    """The schedule of a version, or why it has none."""
    built = Schedule.build(dispatch)
    if isinstance(built, Invalid):
        return None, built.reason
    return built, None


def _lifecycle(event: Event, dispatch: Dispatch, routing_type: str, now: datetime) -> Message:
    return LifecycleMessage(
        event=event, dispatch=dispatch, routing_type=routing_type, emitted_at=now
    )


def _runtime(dispatch: Dispatch) -> tuple[object, ...]:
    """The fields an actor acts on; a change of any of them while running re-announces."""
    return (dispatch.type, dispatch.target, dispatch.duration, dispatch.dry_run, dispatch.payload)


def _stop_reason(record: _Record) -> Reason:
    if record.tombstone:
        return Reason.DELETED
    if not record.dispatch.active:
        return Reason.DEACTIVATED
    return Reason.ENDED


def _due(boundary: datetime | None, since: datetime | None, now: datetime) -> datetime:
    """When a transition was due: the boundary if it fell in the downtime, else now."""
    if since is not None and boundary is not None and since < boundary <= now:
        return boundary
    return now


def _order_instant(drafts: list[_Draft]) -> list[_Draft]:
    """Starts before stops, by key within each, keeping each dispatch's own order."""
    phase_of: dict[DispatchKey, int] = {}
    keyed = []
    for index, draft in enumerate(drafts):
        key = draft.record.key
        phase = max(phase_of.get(key, 0), 0 if draft.event is Event.RUNNING else 1)
        phase_of[key] = phase
        keyed.append((phase, key, index, draft))
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def _schedule_of(record: _Record) -> Schedule | None:
    """The record's schedule, rebuilt if it was dropped; ``None`` if it has none."""
    if record.invalid is not None or record.tombstone or record.forgotten:
        return None
    schedule = record.schedule
    if schedule is None:
        built = Schedule.build(record.dispatch)
        if isinstance(built, Invalid):  # validity depends on the version only
            return None
        record.schedule = schedule = built
    return schedule


def _finished_from(schedule: Schedule | None, end_time: datetime | None) -> datetime | None:
    """The instant from which the schedule has nothing left to run, computed once.

    ``end_time`` is the dispatch's, as the API sent it: usually that instant
    for a one-off, and then the same object is kept (one per dispatch in memory).
    """
    if schedule is None:
        return None
    last_end = schedule.last_end()
    if last_end is not None:
        return end_time if last_end == end_time else last_end
    if schedule.next_run_after(EARLIEST) is None:
        return EARLIEST  # no occurrence at all
    return LATEST


def _is_finished(record: _Record, now: datetime) -> bool:
    finished_from = record.finished_from
    return finished_from is not None and finished_from <= now and finished_from != LATEST


def _state_of(record: _Record, now: datetime) -> str:
    if record.invalid is not None:
        return "invalid"
    if not record.dispatch.active:
        return "inactive"
    if record.announced is not None:
        return "running"
    if _is_finished(record, now):
        return "finished"
    return "scheduled"
