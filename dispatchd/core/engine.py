"""The scheduling engine: API changes and time in, messages out.

A pure, deterministic state machine over every known dispatch of every
microgrid. Per dispatch it remembers what it last announced (stopped, or
running with an occurrence and the runtime fields of ``dispatch``) and, at
every instant something can change, compares that with the truth and emits
only the difference (docs/scheduling.md). The caller owns the clock: every entry
point takes ``now``, and :meth:`Engine.next_deadline` says when to call
:meth:`Engine.advance` next.

Choices docs/scheduling.md leaves open:

- ``apply`` and ``relist`` first process every boundary due at ``now``, so an
  update arriving exactly at a boundary gives the same messages whether or
  not the timer fired first (docs/scheduling.md, consequence 16).
- ``scheduled_for`` is the boundary instant for timer transitions and for
  boundaries that fell into a downtime (``resume``); otherwise ``now``.
- Start reasons: ``started`` at a boundary or through a stream update,
  ``created`` for a dispatch seen for the first time, ``resumed`` for a
  change learnt through a re-list or on restart. Stop reasons: ``deleted``,
  else ``deactivated``, else ``ended`` (also when a version became invalid).
- A finished dispatch that falls out of the list is hidden, not dropped: its
  version and sequence stay, so a stale event stays ignored and a revival
  continues the sequence (consumers drop repeated sequence numbers).
- Time never goes backwards: an earlier ``now`` is treated as the latest seen.

Scale: each dispatch has at most one live entry in a timer heap; entries are
invalidated lazily by a per-dispatch version, so a change costs O(log n) plus
the cost of building its schedule, and waking costs O(k log n) for k due
transitions. An idle dispatch's schedule is dropped and rebuilt at its next
boundary, which keeps memory per dispatch around 0.4 KB.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from dispatchd.core.messages import (
    Event,
    LifecycleMessage,
    Message,
    Occurrence,
    Reason,
    RunningMessage,
)
from dispatchd.core.model import Dispatch
from dispatchd.core.records import (
    DispatchKey,
    DispatchRecord,
    last_seen_from_meta,
    meta_to_json,
)
from dispatchd.core.recurrence import Invalid, Schedule

__all__ = [
    "Change",
    "Created",
    "Deleted",
    "Engine",
    "SnapshotEntry",
    "Step",
    "Updated",
]

_ZERO = timedelta(0)
_MISSED_LIMIT = 100
"""docs/messages.md § 4: ``missed_runs`` holds at most this many starts, oldest first."""
_NEVER = datetime.max.replace(tzinfo=UTC)
_ALWAYS = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Created:
    """The stream reported a new dispatch."""

    dispatch: Dispatch


@dataclass(frozen=True, slots=True)
class Updated:
    """The stream reported a new version of a dispatch."""

    dispatch: Dispatch


@dataclass(frozen=True, slots=True)
class Deleted:
    """The stream reported a dispatch deleted."""

    dispatch: Dispatch


Change = Created | Updated | Deleted


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """What one call of the engine decided, and what must be stored with it.

    The shell writes ``records`` and ``meta`` in the same transaction as the
    messages, so no change exists without its message.
    """

    messages: list[Message]
    records: dict[DispatchKey, DispatchRecord | None]
    """Every record the call changed (``None``: remove it from the store)."""
    invalid: list[tuple[DispatchKey, str]]
    """Versions found invalid in this call (each is reported once)."""
    meta: dict[str, Any]
    """The engine-wide state (see ``records.meta_to_json``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotEntry:
    """What a late-joining actor needs to know about one dispatch."""

    dispatch: Dispatch
    running: bool
    until: datetime | None
    sequence: int
    occurrence: Occurrence | None


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
    """From when the schedule is finished (``_NEVER``: infinite or endless)."""
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


class Engine:
    """Decides every lifecycle and running message of every dispatch."""

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
        self._held: set[int] = set()
        """Restored microgrids whose downtime waits for their first list (see :meth:`hold`)."""
        self._held_at: datetime | None = None

    # ------------------------------------------------------------------ input

    def apply(self, change: Change, now: datetime) -> Step:
        """A stream event: lifecycle message(s), then the running difference."""
        now = self._tick(now)
        out: list[Message] = self._advance(now)
        dispatch = change.dispatch
        key = (dispatch.microgrid_id, dispatch.id)
        if isinstance(change, Deleted):
            out.extend(self._delete(key, dispatch, now))
        else:
            out.extend(self._upsert(dispatch, now, _Mode.CHANGE))
        return self._step(out)

    def relist(
        self,
        microgrid_id: int,
        dispatches: Iterable[Dispatch],
        now: datetime,
        *,
        initial: bool,
        unseen_since: datetime | None = None,
    ) -> Step:
        """A full list of one microgrid: diff it against the view and converge.

        Changes of known dispatches were learnt late (reason ``resumed``). With
        ``initial`` (the first list since start-up) after a restore, dispatches
        that are new or changed get ``missed_runs`` for the downtime too; after
        a lost stream, for the time since ``unseen_since`` (when it was lost).
        """
        now = self._tick(now)
        out: list[Message] = self._advance(now)
        missed_since = self._down_since if initial else unseen_since
        seen: set[int] = set()
        for dispatch in dispatches:
            if dispatch.microgrid_id != microgrid_id:
                raise ValueError(
                    f"dispatch {dispatch.id} belongs to microgrid {dispatch.microgrid_id}, "
                    f"not {microgrid_id}"
                )
            seen.add(dispatch.id)
            out.extend(self._upsert(dispatch, now, _Mode.LATE, missed_since=missed_since))
        records = self._microgrids.get(microgrid_id, {})
        missing = [
            record
            for dispatch_id, record in records.items()
            if dispatch_id not in seen and not record.tombstone and not record.forgotten
        ]
        held = microgrid_id in self._held
        for record in sorted(missing, key=lambda r: r.key):
            if self._could_be_listed(record, now):
                out.extend(self._delete(record.key, record.dispatch, now))
            else:
                if held:  # it may have been running when dispatchd went down
                    out.extend(self._resume_records([record], now))
                self._forget(record)
        if held:
            out.extend(self._resume_microgrids([microgrid_id], now))
        return self._step(out)

    def advance(self, now: datetime) -> Step:
        """Every transition due at or before ``now``, in time order."""
        return self._step(self._advance(self._tick(now)))

    def hold(self, now: datetime) -> None:
        """After a restore: run the clock from ``now``, keep the downtime for the lists.

        What fell due while dispatchd was down is not announced from the stored
        view, which may be stale (a start moved, a dispatch deactivated or
        deleted meanwhile): each microgrid converges when its first list
        arrives (:meth:`relist`), or from what it has when :meth:`resume` is
        called for it. Boundaries after ``now`` are still announced on time.
        """
        now = self._tick(now)
        self._held = set(self._microgrids)
        self._held_at = now
        for records in self._microgrids.values():
            for record in records.values():
                # A deadline after ``now`` stays what it is: no boundary fell in between.
                if record.deadline is not None and record.deadline <= now:
                    self._reschedule(record, now)

    def held(self) -> set[int]:
        """Microgrids restored and not converged yet."""
        return set(self._held)

    def resume(self, now: datetime, microgrid_id: int | None = None) -> Step:
        """Converge the restored view after a restart (reason ``resumed``).

        Occurrences that began and ended while dispatchd was down are kept as
        ``missed_runs`` for each dispatch's next ``running`` message. With a
        ``microgrid_id`` (after :meth:`hold`): that microgrid only, from what
        is known, e.g. when its first list does not come in time.
        """
        now = self._tick(now)
        if microgrid_id is None:
            return self._step(self._resume_microgrids(sorted(self._microgrids), now))
        out = self._advance(now)
        out.extend(self._resume_microgrids([microgrid_id], now))
        return self._step(out)

    def _resume_microgrids(self, microgrid_ids: list[int], now: datetime) -> list[Message]:
        records: list[_Record] = []
        for microgrid_id in microgrid_ids:
            self._held.discard(microgrid_id)
            by_id = self._microgrids.get(microgrid_id, {})
            records.extend(by_id[dispatch_id] for dispatch_id in sorted(by_id))
        return self._resume_records(records, now)

    def _resume_records(self, records: list[_Record], now: datetime) -> list[Message]:
        """Converge records learnt from the store, dating what fell due in the downtime."""
        since = self._down_since
        drafts: list[_Draft] = []
        for record in records:
            if record.tombstone or record.forgotten:
                continue
            if since is not None and record.dispatch.active and _schedule_of(record):
                self._set_missed(record, since, now)
            drafts.extend(self._converge(record, now, Reason.RESUMED, since=since, pulse=False))
            self._reschedule(record, now)
        return self._finish(_order_instant(drafts), now)

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

    # ---------------------------------------------------------------- queries

    def snapshot(self, microgrid_id: int, type: str | None = None) -> list[SnapshotEntry]:
        """The announced state of every known, non-deleted dispatch, by id."""
        records = self._microgrids.get(microgrid_id, {})
        entries = []
        for dispatch_id in sorted(records):
            record = records[dispatch_id]
            if record.tombstone or record.forgotten:
                continue
            if type is not None and record.dispatch.type != type:
                continue
            announced = record.announced
            entries.append(
                SnapshotEntry(
                    dispatch=record.dispatch,
                    running=announced is not None,
                    until=announced.end if announced is not None else None,
                    sequence=record.sequence,
                    occurrence=announced,
                )
            )
        return entries

    def counts(self, now: datetime) -> dict[int, dict[str, int]]:
        """Per microgrid, how many dispatches are in each metric state.

        Kept up to date at every step (a dispatch only changes state at one of
        its boundaries or through a change), so this is O(microgrids). The
        counts are those of the last step; ``now`` is accepted so callers need
        not know that.
        """
        return {microgrid_id: dict(counts) for microgrid_id, counts in self._counts.items()}

    def invalid_reason(self, key: DispatchKey) -> str | None:
        """Why the dispatch's schedule cannot be evaluated, if it cannot."""
        record = self._get(key)
        return record.invalid if record is not None else None

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

    def export(self) -> tuple[list[DispatchRecord], dict[str, Any]]:
        """Every record and the meta, as :meth:`restore` takes them: a full export.

        Each :class:`Step` carries only what its call changed.
        """
        records = [
            self._export(record) for by_id in self._microgrids.values() for record in by_id.values()
        ]
        return records, meta_to_json(self._now)

    @classmethod
    def restore(cls, records: Iterable[DispatchRecord], meta: dict[str, Any]) -> Engine:
        """Rebuild from persisted records; call :meth:`resume` next."""
        engine = cls()
        last_seen = last_seen_from_meta(meta)
        engine._now = last_seen
        engine._down_since = last_seen
        for stored in records:
            dispatch = stored.dispatch
            if stored.tombstone or stored.forgotten:
                key = (dispatch.microgrid_id, dispatch.id)
                record = _Record(key=key, dispatch=dispatch, schedule=None, invalid=None)
                record.tombstone = stored.tombstone
                record.forgotten = stored.forgotten
            else:
                record = engine._new_record(dispatch)
            record.announced = stored.announced
            record.sequence = stored.sequence
            record.last_emitted_at = stored.last_emitted_at
            record.pending_missed = stored.pending_missed
            record.last_pulse = stored.last_pulse
            engine._microgrids.setdefault(dispatch.microgrid_id, {})[dispatch.id] = record
            if last_seen is not None:
                engine._reschedule(record, last_seen)
            else:
                engine._recount(record, _ALWAYS)
        engine._dirty.clear()
        return engine

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

    def _tick(self, now: datetime) -> datetime:
        """Keep time monotonic: a clock that steps back must not replay."""
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
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
        record.finished_from = _finished_from(schedule)
        return record

    def _upsert(
        self,
        dispatch: Dispatch,
        now: datetime,
        mode: _Mode,
        *,
        missed_since: datetime | None = None,
    ) -> list[Message]:
        """Create or update from a stream event or a list entry."""
        key = (dispatch.microgrid_id, dispatch.id)
        record = self._get(key)
        out: list[Message] = []
        if record is None:
            record = self._new_record(dispatch)
            self._microgrids.setdefault(key[0], {})[key[1]] = record
            out.append(_lifecycle(Event.CREATED, dispatch, dispatch.type, now))
            announced_as = dispatch
            start_reason = Reason.CREATED
        elif record.tombstone or dispatch.update_time <= record.dispatch.update_time:
            return out
        else:
            announced_as = record.dispatch
            if announced_as.type != dispatch.type:
                out.append(_lifecycle(Event.UPDATED, dispatch, announced_as.type, now))
            out.append(_lifecycle(Event.UPDATED, dispatch, dispatch.type, now))
            previous_invalid = record.invalid
            record.dispatch = dispatch
            record.forgotten = False
            record.schedule, record.invalid = _build(dispatch)
            record.finished_from = _finished_from(record.schedule)
            if record.invalid is not None and record.invalid != previous_invalid:
                self._new_invalid.append((key, record.invalid))
            start_reason = Reason.STARTED if mode is _Mode.CHANGE else Reason.RESUMED
        self._dirty.add(key)
        if missed_since is not None and dispatch.active and _schedule_of(record):
            self._set_missed(record, missed_since, now)
        drafts = self._converge(
            record,
            now,
            start_reason,
            announced_as=announced_as,
            pulse=missed_since is None,
        )
        self._reschedule(record, now)
        out.extend(self._finish(drafts, now))
        return out

    def _delete(self, key: DispatchKey, dispatch: Dispatch, now: datetime) -> list[Message]:
        """Tombstone ``key``: lifecycle ``deleted``, then ``stopped`` if running."""
        record = self._get(key)
        if record is None:
            # Never seen: remember the deletion so a late event cannot revive it.
            record = _Record(key=key, dispatch=dispatch, schedule=None, invalid=None)
            record.tombstone = True
            self._microgrids.setdefault(key[0], {})[key[1]] = record
            self._recount(record, now)
            self._dirty.add(key)
            return []
        if record.tombstone:
            return []
        held = record.dispatch
        newest = dispatch if dispatch.update_time > held.update_time else held
        out: list[Message] = []
        if newest.type != held.type:
            out.append(_lifecycle(Event.DELETED, newest, held.type, now))
        out.append(_lifecycle(Event.DELETED, newest, newest.type, now))
        record.tombstone = True
        self._dirty.add(key)
        # The stop carries what was announced, so it reaches the actors running it.
        drafts = self._converge(record, now, Reason.STARTED, pulse=False)
        record.dispatch = newest
        record.schedule = None
        self._reschedule(record, now)
        out.extend(self._finish(drafts, now))
        return out

    def _forget(self, record: _Record) -> None:
        """Hide a finished dispatch that fell out of the list, silently.

        Its version and sequence stay, so a late stale event stays ignored and
        a revival continues the sequence (consumers drop repeated numbers).
        """
        record.forgotten = True
        record.schedule = None
        self._reschedule(record, _ALWAYS)
        self._dirty.add(record.key)

    @staticmethod
    def _could_be_listed(record: _Record, now: datetime) -> bool:
        """Whether the API would still list it, so its absence means deletion."""
        if record.invalid is not None:
            end = record.dispatch.end_time
            return end is None or end > now
        return not _is_finished(record, now)

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
        if record.announced is None:
            # Idle until the deadline: drop the schedule (most of a record's
            # memory) and rebuild it then; a running one keeps it.
            record.schedule = None
        announced = record.announced
        ends = announced.end if announced is not None else None
        held_at = self._held_at
        if (
            ends is not None
            and held_at is not None
            and ends <= held_at
            and record.key[0] in self._held
        ):
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
                since = self._down_since
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


def _finished_from(schedule: Schedule | None) -> datetime | None:
    """The instant from which the schedule has nothing left to run, computed once."""
    if schedule is None:
        return None
    last_end = schedule.last_end()
    if last_end is not None:
        return last_end
    if schedule.next_run_after(_ALWAYS) is None:
        return _ALWAYS  # no occurrence at all
    return _NEVER


def _is_finished(record: _Record, now: datetime) -> bool:
    finished_from = record.finished_from
    return finished_from is not None and finished_from <= now and finished_from != _NEVER


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
