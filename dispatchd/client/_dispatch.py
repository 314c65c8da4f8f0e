"""The actor's view of one dispatch: the ``frequenz.dispatch`` ``Dispatch`` surface.

A ``Dispatch`` wraps the core's immutable value together with what the message
that carried it announced. Time questions (``until``, ``next_run``,
``missed_runs``, ``started``) go through ``dispatchd.core.recurrence.Schedule``,
the daemon's own recurrence code, so daemon and actors agree on every instant.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from frequenz.api.dispatch.v1.dispatch_pb2 import Dispatch as PBDispatch
from frequenz.client.dispatch.recurrence import RecurrenceRule

from dispatchd.core import model
from dispatchd.core.messages import Event, Occurrence, Reason
from dispatchd.core.recurrence import Invalid, Schedule

__all__ = ["Announcement", "Dispatch", "MissedRuns", "RunningState"]

Clock = Callable[[], datetime]
"""What "now" is for a dispatch's time questions (the testing fake passes its own)."""


def system_now() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)


class RunningState(enum.Enum):
    """What a running-state message means for an actor of one type."""

    RUNNING = "RUNNING"
    """The dispatch is running: start, or reconfigure with these parameters."""

    STOPPED = "STOPPED"
    """The dispatch is not running: stop."""

    DIFFERENT_TYPE = "DIFFERENT_TYPE"
    """The dispatch is of another type: not for this actor."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """What the daemon said about the dispatch's running state in one message.

    Running messages fill every field. A snapshot entry (the state an actor
    gets at start-up or after a reconnect) has no ``reason`` nor
    ``scheduled_for`` and ``from_snapshot`` is true.
    """

    event: Event
    """``Event.RUNNING`` or ``Event.STOPPED``."""

    reason: Reason | None
    sequence: int
    scheduled_for: datetime | None
    until: datetime | None
    occurrence: Occurrence | None = None
    from_snapshot: bool = False

    @property
    def running(self) -> bool:
        """Whether the announced state is running."""
        return self.event is Event.RUNNING


class MissedRuns(tuple[datetime, ...]):
    """The message's ``missed_runs`` (a tuple, oldest first), also callable.

    Iterating gives what the daemon reported (occurrences that began and ended
    while it could not publish). Calling it with ``since`` computes, like
    ``frequenz.dispatch``'s ``Dispatch.missed_runs(since)``, every occurrence
    start after ``since`` and before now.
    """

    _runs_since: Callable[[datetime], Iterator[datetime]]

    def __new__(
        cls, runs: tuple[datetime, ...], runs_since: Callable[[datetime], Iterator[datetime]]
    ) -> MissedRuns:
        """Keep the reported runs and how to compute runs since a time."""
        instance = super().__new__(cls, runs)
        instance._runs_since = runs_since
        return instance

    def __call__(self, since: datetime | None = None) -> Iterator[datetime]:
        """The reported runs without ``since``; else the computed ones after ``since``."""
        if since is None:
            return iter(self)
        return self._runs_since(since)


class Dispatch:
    """One version of a dispatch as an actor sees it (immutable).

    The attributes mirror ``frequenz.dispatch.Dispatch``; ``selector`` is an
    alias of ``target``; ``announced`` is what the message said (``None`` for
    lifecycle events, which announce nothing about running).
    """

    def __init__(
        self,
        core: model.Dispatch,
        *,
        deleted: bool = False,
        announced: Announcement | None = None,
        running_state_change_synced: datetime | None = None,
        missed_runs: tuple[datetime, ...] = (),
        clock: Clock = system_now,
    ) -> None:
        """Wrap a core dispatch; ``clock`` is for tests that need a fixed now."""
        self.core = core
        self._deleted = deleted
        self._announced = announced
        self._synced = running_state_change_synced
        self._missed = missed_runs
        self._clock = clock

    # --- plain fields ---------------------------------------------------------

    @property
    def id(self) -> int:
        return self.core.id

    @property
    def microgrid_id(self) -> int:
        return self.core.microgrid_id

    @property
    def type(self) -> str:
        return self.core.type

    @property
    def start_time(self) -> datetime:
        return self.core.start_time

    @property
    def duration(self) -> timedelta | None:
        """``None``: runs forever once started."""
        return self.core.duration

    @property
    def target(self) -> model.TargetComponents:
        return self.core.target

    @property
    def selector(self) -> model.TargetComponents:
        """The components the dispatch is for (alias of ``target``)."""
        return self.core.target

    @property
    def active(self) -> bool:
        return self.core.active

    @property
    def dry_run(self) -> bool:
        return self.core.dry_run

    @property
    def payload(self) -> Mapping[str, Any]:
        return self.core.payload

    @property
    def recurrence(self) -> RecurrenceRule:
        """The client library's rule (frequency ``UNSPECIFIED`` for one-off)."""
        rule = self.core.recurrence
        return rule.to_client() if rule is not None else RecurrenceRule()

    @property
    def create_time(self) -> datetime:
        return self.core.create_time

    @property
    def update_time(self) -> datetime:
        return self.core.update_time

    @property
    def end_time(self) -> datetime | None:
        return self.core.end_time

    @property
    def deleted(self) -> bool:
        return self._deleted

    @property
    def announced(self) -> Announcement | None:
        """What the running message or snapshot said; ``None`` on lifecycle events."""
        return self._announced

    @property
    def running_state_change_synced(self) -> datetime | None:
        """When the previous running message of this dispatch was published."""
        return self._synced

    @property
    def missed_runs(self) -> MissedRuns:
        """Reported missed runs; call it with ``since`` to compute them instead."""
        return MissedRuns(self._missed, self._runs_since)

    # --- schedule questions ---------------------------------------------------

    @cached_property
    def _schedule(self) -> Schedule | None:
        built = Schedule.build(self.core)
        return None if isinstance(built, Invalid) else built

    def _scheduled_running_at(self, now: datetime) -> bool:
        schedule = self._schedule
        if self._deleted or not self.core.active or schedule is None:
            return False
        return schedule.occurrence_at(now) is not None

    @property
    def started(self) -> bool:
        """Whether an actor should run for this dispatch now (``frequenz.dispatch``'s test).

        With an announcement (running messages and the snapshot) the
        announcement decides, exactly as ``running(type)`` does: a
        ``running`` message reads started even when it arrives late or the
        occurrence lasts 0 s. Without one (lifecycle events) the schedule at
        now decides.
        """
        announced = self._announced
        if announced is not None:
            return announced.running and not self._deleted
        return self._scheduled_running_at(self._clock())

    def started_at(self, now: datetime) -> bool:
        """Whether the schedule says the dispatch runs at ``now`` (active, not deleted)."""
        return self._scheduled_running_at(now)

    @property
    def until(self) -> datetime | None:
        """When the running occurrence ends; ``None`` if infinite or not running.

        A running announcement's ``until`` is used as is (the daemon computed
        it); otherwise the schedule at now. Never raises.
        """
        announced = self._announced
        if announced is not None and announced.running:
            return announced.until
        schedule = self._schedule
        if schedule is None or not self._scheduled_running_at(self._clock()):
            return None
        return schedule.until(self._clock())

    @property
    def next_run(self) -> datetime | None:
        """The first occurrence start at or after now; ``None`` when finished."""
        return self.next_run_after(self._clock())

    def next_run_after(self, after: datetime) -> datetime | None:
        """The first occurrence start at or after ``after`` (inclusive)."""
        schedule = self._schedule
        return schedule.next_run_after(after) if schedule is not None else None

    def _runs_since(self, since: datetime) -> Iterator[datetime]:
        schedule = self._schedule
        if schedule is None:
            return iter(())
        now = self._clock()
        return (occurrence.start for occurrence in schedule.occurrences_between(since, now))

    def running(self, type: str) -> RunningState:
        """What an actor of ``type`` should do with this dispatch.

        With an announcement (running messages and the snapshot), the
        announcement decides: a ``running`` message reads ``RUNNING`` even for
        a duration-0 occurrence that is already over, so one-shot actors
        trigger. Without one (lifecycle events), the schedule at now decides.
        """
        if self.core.type != type:
            return RunningState.DIFFERENT_TYPE
        return RunningState.RUNNING if self.started else RunningState.STOPPED

    # --- conversions ----------------------------------------------------------

    @classmethod
    def from_protobuf(cls, message: PBDispatch, microgrid_id: int = 0) -> Dispatch:
        """From the ``frequenz-api-dispatch`` message (which has no microgrid id)."""
        return cls(model.Dispatch.from_protobuf(message, microgrid_id))

    def to_protobuf(self) -> PBDispatch:
        """The ``frequenz-api-dispatch`` message."""
        return self.core.to_protobuf()

    # --- value semantics ------------------------------------------------------

    def _value_fields(self) -> tuple[object, ...]:
        return (self.core, self._deleted, self._announced, self._synced, self._missed)

    def __eq__(self, other: object) -> bool:
        """Equal when the dispatch and what was announced about it are equal."""
        if not isinstance(other, Dispatch):
            return NotImplemented
        return self._value_fields() == other._value_fields()

    def __hash__(self) -> int:
        """Dispatches are immutable; hash by id and version."""
        return hash((self.core.id, self.core.update_time, self._announced))

    def __repr__(self) -> str:
        """Short: id, type, version and what was announced."""
        announced = self._announced
        state = "-" if announced is None else f"{announced.event.value}#{announced.sequence}"
        return (
            f"Dispatch(id={self.id}, type={self.type!r}, "
            f"update_time={self.update_time.isoformat()}, announced={state}, "
            f"deleted={self._deleted})"
        )
