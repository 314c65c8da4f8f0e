"""How the engine converges: the timer heap, the truth against the announcement, numbering.

The base of :class:`~dispatchd.core.engine.Engine`: everything that runs on
every call whatever its input (a stream change, a list, a timer), so the
engine's entry points only decide which records to converge and with what
start reason.
"""

from __future__ import annotations

import heapq
from datetime import datetime, timedelta

from dispatchd.core.engine.state import (
    _MISSED_LIMIT,
    _STATES,
    _ZERO,
    _build,
    _Draft,
    _due,
    _finished_from,
    _order_instant,
    _Record,
    _runtime,
    _schedule_of,
    _state_of,
    _stop_reason,
)
from dispatchd.core.engine.steps import Step
from dispatchd.core.messages import Event, Message, Occurrence, Reason, RunningMessage
from dispatchd.core.model import Dispatch
from dispatchd.core.records import DispatchKey, DispatchRecord, meta_to_json
from dispatchd.core.times import utc

KEEP_SCHEDULE = timedelta(minutes=5)
"""An idle dispatch whose next start is at most this far off keeps its schedule.

Rebuilding an every-minute rule's schedule at each of its starts cost more CPU
(about a twentieth of the daemon's, with 10,000 of them) than keeping it costs
memory; a dispatch idle for longer gives its schedule back until its next start.
"""


class _Converger:
    """The engine's state and the mechanics every entry point shares."""

    def __init__(self) -> None:
        """Start empty, with no notion of time yet."""
        self._microgrids: dict[int, dict[int, _Record]] = {}
        self._heap: list[tuple[datetime, int, int, int]] = []
        self._scheduled = 0
        self._now: datetime | None = None
        self._down_since: datetime | None = None
        self._dirty: set[DispatchKey] = set()
        self._new_invalid: list[tuple[DispatchKey, str]] = []
        self._counts: dict[int, dict[str, int]] = {}
        self._held: dict[int, datetime] = {}
        """Restored microgrids whose downtime waits for their first list (see :meth:`hold`),
        with the instant they were held at."""
        self._down_since_of: dict[int, datetime | None] = {}
        """Adopted microgrids: when their previous owner was last seen (see :meth:`adopt`)."""

    # ----------------------------------------------------------------- timing

    def next_deadline(self) -> datetime | None:
        """When :meth:`advance` must next be called (``None``: nothing pending)."""
        heap = self._heap
        while heap:
            deadline, microgrid_id, dispatch_id, version = heap[0]
            record = self._microgrids.get(microgrid_id, {}).get(dispatch_id)
            if record is not None and record.version == version and record.deadline is not None:
                return deadline
            heapq.heappop(heap)
        return None

    def prepare(self, until: datetime) -> list[Dispatch]:
        """Rebuild ahead the schedules of the dispatches with a boundary due by ``until``.

        Idle records drop their schedules (see ``_reschedule``); doing the
        rebuild shortly before a burst of boundaries, instead of at the
        instant, takes it off the start lag. Returns the dispatches so the
        shell can ready their encodings too. Changes no state the messages
        depend on: the same schedule is built either way.
        """
        heap = self._heap
        microgrids = self._microgrids
        due: list[Dispatch] = []
        pending = [0] if heap else []
        while pending:  # the heap's tree, pruned below the first entry past ``until``
            index = pending.pop()
            deadline, microgrid_id, dispatch_id, version = heap[index]
            if deadline > until:
                continue
            record = microgrids.get(microgrid_id, {}).get(dispatch_id)
            if record is not None and record.version == version and record.deadline is not None:
                _schedule_of(record)
                due.append(record.dispatch)
            pending.extend(child for child in (2 * index + 1, 2 * index + 2) if child < len(heap))
        return due

    # ------------------------------------------------------------ persistence

    def export_record(self, key: DispatchKey) -> DispatchRecord | None:
        """The record to persist for ``key``; ``None``: delete it from the store."""
        record = self._get(key)
        return None if record is None else self._export(record)

    @staticmethod
    def _export(record: _Record) -> DispatchRecord:
        return DispatchRecord(
            dispatch=record.dispatch,
            announced=record.announced,
            sequence=record.sequence,
            last_emitted_at=record.last_emitted_at,
            tombstone=record.tombstone,
            forgotten=record.forgotten,
            pending_missed=record.pending_missed,
            last_pulse=record.last_pulse,
        )

    # --------------------------------------------------------------- internal

    def _step(self, messages: list[Message]) -> Step:
        """Hand out the messages with everything the call changed since the last step."""
        dirty, self._dirty = self._dirty, set()
        invalid, self._new_invalid = self._new_invalid, []
        return Step(
            messages=messages,
            records={key: self.export_record(key) for key in dirty},
            invalid=invalid,
            meta=meta_to_json(self._now),
        )

    def _since(self, microgrid_id: int) -> datetime | None:
        """When the microgrid's downtime began: its adoption's, else the restart's."""
        return self._down_since_of.get(microgrid_id, self._down_since)

    def _tick(self, now: datetime) -> datetime:
        """Keep time monotonic: a clock that steps back must not replay."""
        now = utc(now)
        if self._now is not None and now < self._now:
            return self._now
        self._now = now
        return now

    def _get(self, key: DispatchKey) -> _Record | None:
        records = self._microgrids.get(key[0])
        return records.get(key[1]) if records is not None else None

    def _new_record(self, dispatch: Dispatch) -> _Record:
        key = (dispatch.microgrid_id, dispatch.id)
        schedule, invalid = _build(dispatch)
        if invalid is not None:
            self._new_invalid.append((key, invalid))
        record = _Record(key=key, dispatch=dispatch, schedule=schedule, invalid=invalid)
        record.finished_from = _finished_from(schedule, dispatch.end_time)
        return record

    def _set_missed(self, record: _Record, since: datetime, now: datetime) -> None:
        """Remember the occurrences that began and ended unseen in ``(since, now]``.

        Runs missed in an earlier downtime and not reported yet are kept; those
        of this downtime are replaced (the initial re-list may know better).
        """
        schedule = _schedule_of(record)
        assert schedule is not None
        if record.last_emitted_at is not None and record.last_emitted_at > since:
            since = record.last_emitted_at
        if since >= now:
            return
        earlier = tuple(start for start in record.pending_missed if start <= since)
        missed = (earlier + schedule.missed_runs(since, now))[:_MISSED_LIMIT]
        if missed != record.pending_missed:
            record.pending_missed = missed
            self._dirty.add(record.key)

    @staticmethod
    def _truth(record: _Record, at: datetime) -> Occurrence | None:
        """The occurrence the dispatch is running at ``at``, if it is running."""
        if not record.dispatch.active:
            return None
        schedule = _schedule_of(record)
        return schedule.occurrence_at(at) if schedule is not None else None

    def _converge(
        self,
        record: _Record,
        at: datetime,
        start_reason: Reason,
        *,
        announced_as: Dispatch | None = None,
        since: datetime | None = None,
        pulse: bool,
    ) -> list[_Draft]:
        """Compare the truth at ``at`` with the announcement; draft the difference.

        ``announced_as`` is the version whose runtime fields were announced
        (the previous one during an update). ``since`` marks a restart: the
        transitions are dated at the boundary that fell in the downtime.
        ``pulse`` emits a zero-duration occurrence starting exactly at ``at``.
        """
        current = record.dispatch
        before = announced_as if announced_as is not None else current
        announced = record.announced
        truth = self._truth(record, at)
        drafts: list[_Draft] = []
        if announced is not None and before.type != current.type:
            # Actors bind by type: the old type's actors must hear the stop.
            drafts.append(_Draft(record, Event.STOPPED, Reason.TYPE_CHANGED, before, announced, at))
            if truth is not None:
                drafts.append(
                    _Draft(record, Event.RUNNING, Reason.RECONFIGURED, current, truth, at)
                )
        elif announced is None:
            if truth is not None:
                due = _due(truth.start, since, at)
                drafts.append(_Draft(record, Event.RUNNING, start_reason, current, truth, due))
        elif truth is None:
            due = _due(announced.end, since, at)
            reason = _stop_reason(record)
            drafts.append(_Draft(record, Event.STOPPED, reason, current, announced, due))
        elif truth.start != announced.start:
            due = _due(truth.start, since, at)
            drafts.append(_Draft(record, Event.RUNNING, start_reason, current, truth, due))
        elif truth != announced or _runtime(before) != _runtime(current):
            drafts.append(_Draft(record, Event.RUNNING, Reason.RECONFIGURED, current, truth, at))
        if truth != announced:
            record.announced = truth
            self._dirty.add(record.key)
        if pulse and self._pulses_at(record, at):
            pulse_occurrence = Occurrence(start=at, end=at)
            drafts.append(
                _Draft(record, Event.RUNNING, start_reason, current, pulse_occurrence, at)
            )
            drafts.append(
                _Draft(record, Event.STOPPED, Reason.ENDED, current, pulse_occurrence, at)
            )
            record.last_pulse = at
            self._dirty.add(record.key)
        return drafts

    def _pulses_at(self, record: _Record, at: datetime) -> bool:
        """Whether a zero-duration occurrence starts exactly at ``at`` (once)."""
        if record.dispatch.duration != _ZERO or record.last_pulse == at:
            return False
        if not record.dispatch.active:
            return False
        schedule = _schedule_of(record)
        return schedule is not None and schedule.last_start_at_or_before(at) == at

    def _recount(self, record: _Record, at: datetime) -> None:
        """Move the record to the metric state it is in at ``at``."""
        counts = self._counts.get(record.key[0])
        if counts is None:
            counts = self._counts[record.key[0]] = dict.fromkeys(_STATES, 0)
        state = None if record.tombstone or record.forgotten else _state_of(record, at)
        if state == record.counted:
            return
        if record.counted is not None:
            counts[record.counted] -= 1
        if state is not None:
            counts[state] += 1
        record.counted = state

    def _reschedule(self, record: _Record, after: datetime) -> None:
        """Put the record's next boundary strictly after ``after`` on the heap.

        Every change of a record's state ends here, so it is recounted too.
        """
        self._recount(record, after)
        deadline: datetime | None = None
        schedule = _schedule_of(record) if record.dispatch.active else None
        if schedule is not None:
            deadline = schedule.next_start_after(after)
        if record.announced is None and (deadline is None or deadline - after > KEEP_SCHEDULE):
            # Idle until a deadline that is far off: drop the schedule (most of a
            # record's memory) and rebuild it then; a running one keeps it.
            record.schedule = None
        announced = record.announced
        ends = announced.end if announced is not None else None
        held_at = self._held.get(record.key[0]) if self._held else None
        if ends is not None and held_at is not None and ends <= held_at:
            ends = None  # fell in the downtime: converged with the first list
        if ends is not None and (deadline is None or ends < deadline):
            deadline = ends
        if deadline == record.deadline:
            return
        if record.deadline is None:
            self._scheduled += 1
        elif deadline is None:
            self._scheduled -= 1
        record.deadline = deadline
        record.version += 1
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, record.key[0], record.key[1], record.version))
            if len(self._heap) > 2 * self._scheduled + 1024:
                self._compact()

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the live ones."""
        self._heap = [
            (record.deadline, record.key[0], record.key[1], record.version)
            for records in self._microgrids.values()
            for record in records.values()
            if record.deadline is not None
        ]
        heapq.heapify(self._heap)

    def _advance(self, now: datetime) -> list[Message]:
        """Process due boundaries instant by instant, each dated at its instant."""
        out: list[Message] = []
        heap = self._heap
        microgrids = self._microgrids
        while heap and heap[0][0] <= now:
            instant = heap[0][0]
            drafts: list[_Draft] = []
            while heap and heap[0][0] == instant:
                _, microgrid_id, dispatch_id, version = heapq.heappop(heap)
                record = microgrids.get(microgrid_id, {}).get(dispatch_id)
                if record is None or record.version != version or record.deadline is None:
                    continue
                record.deadline = None
                self._scheduled -= 1
                since = self._since(microgrid_id)
                if (
                    since is not None
                    and microgrid_id in self._held
                    and record.dispatch.active
                    and _schedule_of(record)
                ):
                    self._set_missed(record, since, instant)
                drafts.extend(self._converge(record, instant, Reason.STARTED, pulse=True))
                self._reschedule(record, instant)
            out.extend(self._finish(_order_instant(drafts), now))
        return out

    def _finish(self, drafts: list[_Draft], now: datetime) -> list[Message]:
        """Number the drafts per dispatch and turn them into messages."""
        out: list[Message] = []
        for draft in drafts:
            record = draft.record
            record.sequence += 1
            missed: tuple[datetime, ...] = ()
            if draft.event is Event.RUNNING and record.pending_missed:
                missed, record.pending_missed = record.pending_missed, ()
            occurrence = draft.occurrence
            out.append(
                RunningMessage(
                    event=draft.event,
                    reason=draft.reason,
                    dispatch=draft.dispatch,
                    occurrence=occurrence,
                    until=occurrence.end if draft.event is Event.RUNNING else None,
                    scheduled_for=draft.scheduled_for,
                    emitted_at=now,
                    sequence=record.sequence,
                    running_state_change_synced=record.last_emitted_at,
                    missed_runs=missed,
                )
            )
            record.last_emitted_at = now
            self._dirty.add(record.key)
        return out
