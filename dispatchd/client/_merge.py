"""Merge strategies: one running interval per actor identity.

Pure logic, fed with running-state dispatches in order; it needs no clock
because it tracks what was announced, not what the schedule says.

Rules, for dispatches of one identity (``MergeByType``: type and dry_run;
``MergeByTypeTarget``: type, dry_run and target):

- A running dispatch is always forwarded. The first one starts the merged
  interval; one that starts while another of its identity already runs is
  forwarded too, as a running *update* (the actor reconfigures to it), as
  ``frequenz.dispatch`` does. With A ``[10, 40)`` and B ``[20, 30)`` the
  receiver sees A running at 10, B running at 20, nothing at 30 and A
  stopped at 40.
- A stop is held back while another dispatch of the identity still runs;
  the stop of the last one is forwarded.
- A dispatch whose identity changes while it runs (e.g. its target with
  ``MergeByTypeTarget``) leaves its old identity: when nobody else runs
  there, a stopped copy of its previous version is forwarded first, so the
  old identity's actor stops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import replace

from dispatchd.client._dispatch import Announcement, Dispatch, RunningState
from dispatchd.core.messages import Event

__all__ = ["MergeByType", "MergeByTypeTarget", "MergeStrategy", "RunningMerger"]


class MergeStrategy(ABC):
    """Says which dispatches belong to one actor (one merged running interval)."""

    @abstractmethod
    def identity(self, dispatch: Dispatch) -> Hashable:
        """The actor identity of a dispatch; equal identities are merged."""


class MergeByType(MergeStrategy):
    """One running interval per type and dry_run."""

    def identity(self, dispatch: Dispatch) -> Hashable:
        """Type and dry_run (a dry run never merges with a real one)."""
        return (dispatch.type, dispatch.dry_run)


class MergeByTypeTarget(MergeByType):
    """One running interval per type, dry_run and target."""

    def identity(self, dispatch: Dispatch) -> Hashable:
        """Type, dry_run and target."""
        return (dispatch.type, dispatch.dry_run, dispatch.target)


class RunningMerger:
    """Applies a strategy to a stream of running-state dispatches (one receiver's)."""

    def __init__(self, strategy: MergeStrategy, running_type: str) -> None:
        """``running_type`` is the type the receiver reads ``running()`` with."""
        self._strategy = strategy
        self._type = running_type
        self._running: dict[Hashable, set[int]] = {}
        self._latest: dict[int, tuple[Hashable, Dispatch]] = {}

    def apply(self, dispatch: Dispatch) -> list[Dispatch]:
        """What to forward for this dispatch (possibly nothing)."""
        identity = self._strategy.identity(dispatch)
        forward: list[Dispatch] = []
        previous = self._latest.get(dispatch.id)
        if previous is not None and previous[0] != identity:
            forward.extend(self._leave(dispatch.id, previous))
        if dispatch.running(self._type) is RunningState.RUNNING:
            self._running.setdefault(identity, set()).add(dispatch.id)
            self._latest[dispatch.id] = (identity, dispatch)
            forward.append(dispatch)
            return forward
        self._latest.pop(dispatch.id, None)
        members = self._running.get(identity, set())
        members.discard(dispatch.id)
        if not members:
            self._running.pop(identity, None)
            forward.append(dispatch)
        return forward

    def _leave(self, dispatch_id: int, previous: tuple[Hashable, Dispatch]) -> list[Dispatch]:
        identity, old = previous
        self._latest.pop(dispatch_id, None)
        members = self._running.get(identity, set())
        members.discard(dispatch_id)
        if members:
            return []
        self._running.pop(identity, None)
        announced = old.announced
        stopped = (
            replace(announced, event=Event.STOPPED, until=None)
            if announced is not None
            else Announcement(
                event=Event.STOPPED, reason=None, sequence=0, scheduled_for=None, until=None
            )
        )
        return [Dispatch(old.core, announced=stopped)]
