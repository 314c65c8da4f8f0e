"""The JSON behind the status page: a microgrid's schedule in a window, and recent messages.

The schedule is ``dispatchd.schedule.timelines`` (what ``dispatchd schedule``
prints) over the dispatches the daemon holds, with the running state the
daemon announced. Both are bounded: a window of at most ``MAX_WINDOW`` and at
most ``MAX_ROWS`` dispatches and ``MAX_OCCURRENCES`` occurrences per answer,
so no request can stall the daemon's loop; beyond them the answer is a 400
that says how to narrow the request.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from dispatchd import metrics
from dispatchd.core import wire
from dispatchd.core.engine import SnapshotEntry
from dispatchd.core.messages import Message, RunningMessage
from dispatchd.http import QueryError
from dispatchd.schedule import timelines

DEFAULT_BEFORE: Final = timedelta(hours=2)
DEFAULT_AFTER: Final = timedelta(hours=24)
MAX_WINDOW: Final = timedelta(days=31)
MAX_ROWS: Final = 1000
"""Dispatches in one schedule answer (filter by ``type`` for more)."""
MAX_OCCURRENCES: Final = 10000
"""Occurrences in one schedule answer, over all its dispatches."""
RECENT_MESSAGES: Final = 50


@dataclass(frozen=True, slots=True)
class ScheduleQuery:
    microgrid_id: int
    start: datetime
    end: datetime
    type: str | None


def parse_schedule_query(
    params: Mapping[str, str], now: datetime, microgrid_ids: Sequence[int]
) -> ScheduleQuery:
    """``microgrid_id`` (required), ``from`` and ``to`` (RFC 3339), ``type`` (optional)."""
    text = params.get("microgrid_id", "")
    try:
        microgrid_id = int(text)
    except ValueError:
        raise QueryError(f"microgrid_id must be an integer, got {text!r}") from None
    if microgrid_id not in microgrid_ids:
        known = ", ".join(str(known) for known in microgrid_ids)
        raise QueryError(f"microgrid {microgrid_id} is not synced here (known: {known})", 404)
    start = _time(params, "from", now - DEFAULT_BEFORE)
    end = _time(params, "to", now + DEFAULT_AFTER)
    if end <= start:
        raise QueryError("'to' must be after 'from'")
    if end - start > MAX_WINDOW:
        raise QueryError(
            f"the window may span at most {MAX_WINDOW.days} days, got {end - start}: "
            "ask for a shorter one"
        )
    return ScheduleQuery(microgrid_id, start, end, params.get("type") or None)


def _time(params: Mapping[str, str], name: str, default: datetime) -> datetime:
    text = params.get(name)
    if not text:
        return default
    try:
        return wire.parse_time(text)
    except ValueError:
        raise QueryError(f"{name!r} must be an RFC 3339 time, got {text!r}") from None


def check_rows(count: int, query: ScheduleQuery) -> None:
    """Refuse a microgrid (or type) with more dispatches than one answer holds.

    Callers that know the count cheaply check before building the rows.
    """
    if count > MAX_ROWS:
        raise QueryError(
            f"microgrid {query.microgrid_id} has {count} dispatches"
            f"{'' if query.type is None else f' of type {query.type!r}'}, "
            f"more than {MAX_ROWS} rows: filter by type"
        )


def schedule_document(
    entries: Sequence[SnapshotEntry], query: ScheduleQuery, now: datetime
) -> dict[str, Any]:
    """One row per dispatch with its occurrences in the window, ordered by id."""
    check_rows(len(entries), query)
    by_id = {entry.dispatch.id: entry for entry in entries}
    rows: list[dict[str, Any]] = []
    total = 0
    for timeline in timelines(
        (entry.dispatch for entry in entries), query.start, query.end, limit=MAX_OCCURRENCES
    ):
        total += len(timeline.occurrences)
        if timeline.truncated or total > MAX_OCCURRENCES:
            raise QueryError(
                f"more than {MAX_OCCURRENCES} occurrences between {wire.format_time(query.start)}"
                f" and {wire.format_time(query.end)}: ask for a shorter window or filter by type"
            )
        dispatch = timeline.dispatch
        entry = by_id[dispatch.id]
        rows.append(
            {
                "id": dispatch.id,
                "type": dispatch.type,
                "target": wire.dispatch_to_json(dispatch)["target"],
                "active": dispatch.active,
                "dry_run": dispatch.dry_run,
                "recurring": dispatch.recurrence is not None,
                "state": _state(entry, timeline.invalid, timeline.occurrences, now),
                "invalid": timeline.invalid,
                "running": entry.running,
                "running_until": _time_or_none(entry.until) if entry.running else None,
                "occurrences": [
                    {"start": wire.format_time(start), "end": _time_or_none(end)}
                    for start, end in timeline.occurrences
                ],
            }
        )
    return {
        "microgrid_id": query.microgrid_id,
        "from": wire.format_time(query.start),
        "to": wire.format_time(query.end),
        "now": wire.format_time(now),
        "type": query.type,
        "dispatches": rows,
    }


def _state(
    entry: SnapshotEntry,
    invalid: str | None,
    occurrences: Sequence[tuple[datetime, datetime | None]],
    now: datetime,
) -> str:
    """Like the ``state`` label of ``dispatchd_dispatches``, with ``idle`` for no more runs here."""
    if invalid is not None:
        return "invalid"
    if not entry.dispatch.active:
        return "inactive"
    if entry.running:
        return "running"
    if any(start > now for start, _ in occurrences):
        return "scheduled"
    return "idle"


def _time_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else wire.format_time(moment)


def microgrid_health(
    microgrid_id: int, first_sync: datetime | None, counts: Mapping[str, int]
) -> dict[str, Any]:
    """One microgrid's sync state for ``/api/v1/status``; the stream's from its metrics."""
    labels = {"microgrid_id": str(microgrid_id)}

    def sample(name: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(name, labels)

    last_sync = sample("dispatchd_api_last_sync_timestamp_seconds")
    return {
        "microgrid_id": microgrid_id,
        "first_sync": _time_or_none(first_sync),
        "last_sync": _time_or_none(datetime.fromtimestamp(last_sync, UTC) if last_sync else None),
        "stream_up": sample("dispatchd_api_stream_up") == 1,
        "reconnects": int(sample("dispatchd_api_reconnects_total") or 0),
        "dispatches": dict(counts),
    }


class RecentMessages:
    """The last messages the daemon queued for publishing, newest first, for the page."""

    def __init__(self, size: int = RECENT_MESSAGES) -> None:
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def extend(self, messages: Iterable[Message]) -> None:
        """Only the last ``size`` of a burst are kept (and summarised)."""
        size = self._items.maxlen or 0
        for message in list(messages)[-size:] if size else ():
            self._items.append(_summary(message))

    def newest_first(self) -> list[dict[str, Any]]:
        return list(reversed(self._items))


def _summary(message: Message) -> dict[str, Any]:
    dispatch = message.dispatch
    summary: dict[str, Any] = {
        "at": wire.format_time(message.emitted_at),
        "microgrid_id": dispatch.microgrid_id,
        "dispatch_id": dispatch.id,
        "type": dispatch.type,
        "kind": str(message.kind),
        "event": str(message.event),
        "reason": None,
        "lateness": None,
    }
    if isinstance(message, RunningMessage):
        summary["reason"] = str(message.reason)
        summary["lateness"] = round((message.emitted_at - message.scheduled_for).total_seconds(), 6)
    return summary
