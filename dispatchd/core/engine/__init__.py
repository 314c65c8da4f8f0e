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
transitions. A dispatch idle for more than ``KEEP_SCHEDULE`` (5 minutes) has
its schedule dropped and rebuilt at its next boundary, which keeps memory per
dispatch around 0.4 KB; one that starts again sooner keeps it.
"""

from dispatchd.core.engine.engine import Engine, stored_snapshot
from dispatchd.core.engine.steps import Change, Created, Deleted, Step, Updated
from dispatchd.core.messages import SnapshotEntry

__all__ = [
    "Change",
    "Created",
    "Deleted",
    "Engine",
    "SnapshotEntry",
    "Step",
    "Updated",
    "stored_snapshot",
]
