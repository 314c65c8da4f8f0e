"""The actor SDK: the ``frequenz.dispatch`` interface, fed from dispatchd over RabbitMQ.

An actor written against ``frequenz.dispatch`` moves over by changing how it
constructs the ``Dispatcher``; see docs/sdk.md and
docs/migrating-from-frequenz-dispatch.md.
"""

from dispatchd.client._actors import ActorDispatcher, ActorFactory, DispatchInfo, ManagedActor
from dispatchd.client._dispatch import Announcement, Dispatch, MissedRuns, RunningState
from dispatchd.client._dispatcher import Dispatcher
from dispatchd.client._events import Created, Deleted, DispatchEvent, Updated
from dispatchd.client._fanout import DeliveryCounts, ReceiverFetcher
from dispatchd.client._merge import MergeByType, MergeByTypeTarget, MergeStrategy
from dispatchd.client._snapshot import SnapshotError

__all__ = [
    "ActorDispatcher",
    "ActorFactory",
    "Announcement",
    "Created",
    "Deleted",
    "DeliveryCounts",
    "Dispatch",
    "DispatchEvent",
    "DispatchInfo",
    "Dispatcher",
    "ManagedActor",
    "MergeByType",
    "MergeByTypeTarget",
    "MergeStrategy",
    "MissedRuns",
    "ReceiverFetcher",
    "RunningState",
    "SnapshotError",
    "Updated",
]
