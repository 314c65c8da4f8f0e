"""The engine's entry points: changes, lists, time and restarts in; queries and exports out.

See the package docstring for the choices it makes; the mechanics shared by
every entry point are in ``convergence``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from dispatchd.core.engine.convergence import _Converger
from dispatchd.core.engine.state import (
    _build,
    _Draft,
    _finished_from,
    _is_finished,
    _lifecycle,
    _Mode,
    _order_instant,
    _Record,
    _schedule_of,
)
from dispatchd.core.engine.steps import Change, Deleted, Step
from dispatchd.core.messages import Event, Message, Occurrence, Reason, SnapshotEntry
from dispatchd.core.model import Dispatch
from dispatchd.core.records import (
    DispatchKey,
    DispatchRecord,
    last_seen_from_meta,
    meta_to_json,
)
from dispatchd.core.times import EARLIEST


class Engine(_Converger):
    """Decides every lifecycle and running message of every dispatch."""

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
        missed_since = self._since(microgrid_id) if initial else unseen_since
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
        for microgrid_id, records in self._microgrids.items():
            self._hold_microgrid(microgrid_id, records.values(), now)

    def _hold_microgrid(self, microgrid_id: int, records: Iterable[_Record], now: datetime) -> None:
        self._held[microgrid_id] = now
        for record in records:
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
            self._held.pop(microgrid_id, None)
            by_id = self._microgrids.get(microgrid_id, {})
            records.extend(by_id[dispatch_id] for dispatch_id in sorted(by_id))
        return self._resume_records(records, now)

    def _resume_records(self, records: list[_Record], now: datetime) -> list[Message]:
        """Converge records learnt from the store, dating what fell due in the downtime."""
        drafts: list[_Draft] = []
        for record in records:
            if record.tombstone or record.forgotten:
                continue
            since = self._since(record.key[0])
            if since is not None and record.dispatch.active and _schedule_of(record):
                self._set_missed(record, since, now)
            drafts.extend(self._converge(record, now, Reason.RESUMED, since=since, pulse=False))
            self._reschedule(record, now)
        return self._finish(_order_instant(drafts), now)

    # ---------------------------------------------------------------- queries

    def snapshot(self, microgrid_id: int, type: str | None = None) -> list[SnapshotEntry]:
        """The announced state of every known, non-deleted dispatch, by id."""
        records = self._microgrids.get(microgrid_id, {})
        return _entries((records[dispatch_id] for dispatch_id in sorted(records)), type)

    def counts(self) -> dict[int, dict[str, int]]:
        """Per microgrid, how many dispatches are in each metric state, as of the last step.

        Kept up to date at every step (a dispatch only changes state at one of
        its boundaries or through a change), so this is O(microgrids).
        """
        return {microgrid_id: dict(counts) for microgrid_id, counts in self._counts.items()}

    def invalid_reason(self, key: DispatchKey) -> str | None:
        """Why the dispatch's schedule cannot be evaluated, if it cannot."""
        record = self._get(key)
        return record.invalid if record is not None else None

    # ------------------------------------------------------------ persistence

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
            engine._restore_record(stored, last_seen)
        engine._dirty.clear()
        return engine

    def _restore_record(self, stored: DispatchRecord, last_seen: datetime | None) -> _Record:
        dispatch = stored.dispatch
        if stored.tombstone or stored.forgotten:
            key = (dispatch.microgrid_id, dispatch.id)
            record = _Record(key=key, dispatch=dispatch, schedule=None, invalid=None)
            record.tombstone = stored.tombstone
            record.forgotten = stored.forgotten
        else:
            record = self._new_record(dispatch)
        record.announced = stored.announced
        record.sequence = stored.sequence
        record.last_emitted_at = stored.last_emitted_at
        record.pending_missed = stored.pending_missed
        record.last_pulse = stored.last_pulse
        self._microgrids.setdefault(dispatch.microgrid_id, {})[dispatch.id] = record
        if last_seen is not None:
            self._reschedule(record, last_seen)
        else:
            self._recount(record, EARLIEST)
        return record

    # ------------------------------------------------------- one microgrid

    def adopt(
        self,
        microgrid_id: int,
        records: Iterable[DispatchRecord],
        last_seen: datetime | None,
        now: datetime,
        *,
        converge: bool = True,
    ) -> Step:
        """Take over one microgrid from its stored records, as a restart restores it.

        ``last_seen`` is when its previous owner last stepped: what fell due
        since is dated at its boundary, and occurrences that began and ended
        meanwhile go into ``missed_runs``. With ``converge`` the microgrid
        converges at ``now`` (reason ``resumed``) like :meth:`resume`;
        without, it is held like after :meth:`hold` until its first
        :meth:`relist` (or :meth:`resume`). State held for it is replaced.
        The other microgrids are advanced to ``now`` first, as by any call.
        """
        now = self._tick(now)
        out = self._advance(now)
        self._drop_microgrid(microgrid_id)
        self._down_since_of[microgrid_id] = last_seen
        self._microgrids[microgrid_id] = {}  # held here even before its first dispatch
        restored = []
        for stored in records:
            if stored.dispatch.microgrid_id != microgrid_id:
                raise ValueError(
                    f"record of dispatch {stored.dispatch.id} belongs to microgrid "
                    f"{stored.dispatch.microgrid_id}, not {microgrid_id}"
                )
            restored.append(self._restore_record(stored, last_seen))
        self._hold_microgrid(microgrid_id, restored, now)
        if converge:
            out.extend(self._resume_microgrids([microgrid_id], now))
        return self._step(out)

    def forget(self, microgrid_id: int) -> None:
        """Drop everything about one microgrid, without a message (another process owns it).

        What it changed and did not hand out in a :class:`Step` yet is dropped too.
        """
        self._drop_microgrid(microgrid_id)

    def microgrids(self) -> set[int]:
        """The microgrids the engine holds state for."""
        return set(self._microgrids)

    def _drop_microgrid(self, microgrid_id: int) -> None:
        records = self._microgrids.pop(microgrid_id, None)
        self._held.pop(microgrid_id, None)
        self._down_since_of.pop(microgrid_id, None)
        self._counts.pop(microgrid_id, None)
        if records is None:
            return
        self._scheduled -= sum(1 for record in records.values() if record.deadline is not None)
        # Not left to lazy invalidation: a record adopted again restarts its versions.
        self._heap = [entry for entry in self._heap if entry[1] != microgrid_id]
        heapq.heapify(self._heap)
        self._dirty = {key for key in self._dirty if key[0] != microgrid_id}
        self._new_invalid = [item for item in self._new_invalid if item[0][0] != microgrid_id]

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
            record.finished_from = _finished_from(record.schedule, dispatch.end_time)
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
        self._reschedule(record, EARLIEST)
        self._dirty.add(record.key)

    @staticmethod
    def _could_be_listed(record: _Record, now: datetime) -> bool:
        """Whether the API would still list it, so its absence means deletion."""
        if record.invalid is not None:
            end = record.dispatch.end_time
            return end is None or end > now
        return not _is_finished(record, now)


def stored_snapshot(
    records: Iterable[DispatchRecord], type: str | None = None
) -> list[SnapshotEntry]:
    """What :meth:`Engine.snapshot` answers, from a microgrid's stored records.

    For a microgrid another process runs: its committed records say what was
    announced, as the engine's would.
    """
    return _entries(sorted(records, key=lambda record: record.dispatch.id), type)


class _Announced(Protocol):
    """What a snapshot needs of a record, live or stored."""

    @property
    def dispatch(self) -> Dispatch: ...
    @property
    def announced(self) -> Occurrence | None: ...
    @property
    def sequence(self) -> int: ...
    @property
    def tombstone(self) -> bool: ...
    @property
    def forgotten(self) -> bool: ...


def _entries(records: Iterable[_Announced], type: str | None) -> list[SnapshotEntry]:
    entries = []
    for record in records:
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
