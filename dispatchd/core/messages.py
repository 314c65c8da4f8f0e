"""What the engine decides to say: lifecycle and running messages, and snapshot entries.

These are plain values; ``wire`` turns them into AMQP envelopes and snapshot
replies. They carry everything a message body (docs/messages.md § 4) needs
except the publish timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from dispatchd.core.model import Dispatch


class Kind(StrEnum):
    """The two message families (docs/messages.md § 1)."""

    LIFECYCLE = "lifecycle"
    RUNNING = "running"


class Event(StrEnum):
    """Lifecycle events and running states, as they appear in routing keys."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    RUNNING = "running"
    STOPPED = "stopped"


class Reason(StrEnum):
    """Why a running message was sent (docs/scheduling.md)."""

    STARTED = "started"
    ENDED = "ended"
    RECONFIGURED = "reconfigured"
    DEACTIVATED = "deactivated"
    DELETED = "deleted"
    TYPE_CHANGED = "type_changed"
    CREATED = "created"
    RESUMED = "resumed"


@dataclass(frozen=True, slots=True)
class Occurrence:
    """``[start, end)``; ``end`` is ``None`` for an infinite duration."""

    start: datetime
    end: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LifecycleMessage:
    """A dispatch was created, updated or deleted.

    ``routing_type`` is the type the message is routed under: on a type
    change, ``updated`` goes out once under the old and once under the new.
    """

    event: Event
    dispatch: Dispatch
    routing_type: str
    emitted_at: datetime

    @property
    def kind(self) -> Kind:
        return Kind.LIFECYCLE


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningMessage:
    """A dispatch started running, was reconfigured, or stopped."""

    event: Event
    reason: Reason
    dispatch: Dispatch
    occurrence: Occurrence
    until: datetime | None
    scheduled_for: datetime
    emitted_at: datetime
    sequence: int
    running_state_change_synced: datetime | None
    missed_runs: tuple[datetime, ...] = ()

    @property
    def kind(self) -> Kind:
        return Kind.RUNNING

    @property
    def routing_type(self) -> str:
        return self.dispatch.type


Message = LifecycleMessage | RunningMessage


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One dispatch in a snapshot and what was last announced for it.

    What a late-joining actor needs to know. ``occurrence`` is the announced
    occurrence as the engine knows it; the wire does not carry it, so an
    entry read from a reply has ``None``.
    """

    dispatch: Dispatch
    running: bool
    until: datetime | None
    sequence: int
    occurrence: Occurrence | None = None
