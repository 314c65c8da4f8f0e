"""``dispatchd.status`` without a daemon: the schedule document's rows, states and bounds."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from dispatchd import status
from dispatchd.core.engine import SnapshotEntry
from dispatchd.core.messages import Event, LifecycleMessage, Occurrence
from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds
from dispatchd.http import QueryError
from dispatchd.schedule import print_schedule

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def dispatch(dispatch_id: int, start: datetime, **fields: object) -> Dispatch:
    values: dict[str, object] = {
        "id": dispatch_id,
        "microgrid_id": 7,
        "type": "T",
        "start_time": start,
        "duration": timedelta(minutes=30),
        "target": TargetIds(dispatch_id),
        "create_time": NOW - timedelta(days=1),
        "update_time": NOW - timedelta(days=1),
    }
    values.update(fields)
    return Dispatch(**values)  # type: ignore[arg-type]


def entry(value: Dispatch, running: Occurrence | None = None) -> SnapshotEntry:
    return SnapshotEntry(
        dispatch=value,
        running=running is not None,
        until=running.end if running else None,
        sequence=1 if running else 0,
        occurrence=running,
    )


def query(**params: str) -> status.ScheduleQuery:
    return status.parse_schedule_query({"microgrid_id": "7", **params}, NOW, [7])


def test_rows_states_and_occurrences() -> None:
    running = dispatch(1, NOW - timedelta(minutes=10))
    occurrence = Occurrence(NOW - timedelta(minutes=10), NOW + timedelta(minutes=20))
    never = dispatch(
        2,
        datetime(2026, 3, 2, 10, 0, tzinfo=UTC),  # an even hour, stepping 2 hours: never 1 o'clock
        recurrence=Recurrence(frequency=Frequency.HOURLY, interval=2, byhours=(1,)),
    )
    done = dispatch(3, NOW - timedelta(hours=1, minutes=30))
    off = dispatch(4, NOW + timedelta(hours=1), active=False)
    later = dispatch(5, NOW + timedelta(hours=30))  # after the default window
    doc = status.schedule_document(
        [entry(running, occurrence), entry(never), entry(done), entry(off), entry(later)],
        query(),
        NOW,
    )
    rows = {row["id"]: row for row in doc["dispatches"]}
    assert {i: row["state"] for i, row in rows.items()} == {
        1: "running",
        2: "invalid",
        3: "idle",
        4: "inactive",
        5: "idle",
    }
    assert rows[1]["running_until"] == "2026-03-02T12:20:00Z"
    assert rows[1]["occurrences"] == [
        {"start": "2026-03-02T11:50:00Z", "end": "2026-03-02T12:20:00Z"}
    ]
    assert rows[2]["invalid"] and rows[2]["occurrences"] == []
    assert rows[3]["occurrences"] == [
        {"start": "2026-03-02T10:30:00Z", "end": "2026-03-02T11:00:00Z"}
    ]
    assert rows[5]["occurrences"] == []
    assert (doc["from"], doc["to"]) == ("2026-03-02T10:00:00Z", "2026-03-03T12:00:00Z")
    # ``dispatchd schedule`` prints the same occurrences from the same function.
    out, err = io.StringIO(), io.StringIO()
    print_schedule(
        [running, never, done, off, later],
        NOW - timedelta(hours=2),
        NOW + timedelta(hours=24),
        out,
        err,
    )
    printed = [line.split()[:3] for line in out.getvalue().splitlines()[1:]]
    assert printed == [
        ["2026-03-02T10:30:00Z", "2026-03-02T11:00:00Z", "3"],
        ["2026-03-02T11:50:00Z", "2026-03-02T12:20:00Z", "1"],
        ["2026-03-02T13:00:00Z", "2026-03-02T13:30:00Z", "4"],
    ]
    assert f"dispatch 2 (T): invalid, never runs: {rows[2]['invalid']}" in err.getvalue()


def test_bounds_answer_400_with_what_to_do() -> None:
    with pytest.raises(QueryError, match="at most 31 days"):
        query(**{"from": "2026-01-01T00:00:00Z", "to": "2027-12-31T00:00:00Z"})
    with pytest.raises(QueryError, match="'to' must be after 'from'"):
        query(**{"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"})
    with pytest.raises(QueryError) as unknown:
        status.parse_schedule_query({"microgrid_id": "8"}, NOW, [7])
    assert unknown.value.status == 404
    many = [entry(dispatch(i, NOW + timedelta(hours=1))) for i in range(status.MAX_ROWS + 1)]
    with pytest.raises(QueryError, match="filter by type"):
        status.schedule_document(many, query(), NOW)
    minutely = dispatch(
        1, NOW, duration=timedelta(seconds=5), recurrence=Recurrence(frequency=Frequency.MINUTELY)
    )
    month = query(**{"to": "2026-04-01T00:00:00Z"})
    with pytest.raises(QueryError, match="shorter window"):
        status.schedule_document([entry(minutely)], month, NOW)


def test_recent_messages_keep_the_last_newest_first() -> None:
    recent = status.RecentMessages(size=3)
    made = [
        LifecycleMessage(
            dispatch=dispatch(i, NOW),
            event=Event.CREATED,
            routing_type="T",
            emitted_at=NOW + timedelta(seconds=i),
        )
        for i in range(5)
    ]
    recent.extend(made[:2])
    recent.extend(made[2:])
    assert [m["dispatch_id"] for m in recent.newest_first()] == [4, 3, 2]
    assert recent.newest_first()[0]["kind"] == "lifecycle"
