"""The receivers and ``async with`` that ``Dispatcher`` and ``FakeDispatcher`` share.

Both offer the same actor interface; they differ only in where the messages
come from (a queue or dispatchd's engine in process) and in how they start
and stop, which each of them says.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from frequenz.channels import Receiver

from dispatchd.client._actors import Managing
from dispatchd.client._dispatch import Dispatch
from dispatchd.client._events import DispatchEvent
from dispatchd.client._fanout import FanOut, ReceiverFetcher
from dispatchd.client._merge import MergeStrategy, RunningMerger


class DispatcherInterface(Managing):
    """The ``frequenz.dispatch`` receivers over a lifecycle and a running fan-out."""

    _lifecycle: FanOut[DispatchEvent]

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _all_running(self) -> FanOut[Dispatch]:
        """The running states of every type."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        """``start()``."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """``stop()``."""
        await self.stop()

    @property
    def lifecycle_events(self) -> ReceiverFetcher[DispatchEvent]:
        """``Created``/``Updated``/``Deleted`` of every dispatch of the microgrid.

        Events that arrive while no receiver exists (up to 1000, e.g. the
        backlog of a durable queue) go to the next receiver created.
        """
        return ReceiverFetcher(self._lifecycle)

    def new_lifecycle_events_receiver(
        self, type: str, *, name: str | None = None, limit: int = 50
    ) -> Receiver[DispatchEvent]:
        """Lifecycle events of one type (``frequenz.dispatch``'s method, filtered here).

        Unlike running states, lifecycle events of all types share the main
        queue, so this filter runs in Python.
        """
        return self._lifecycle.new_receiver(name=name, limit=limit).filter(
            lambda event: event.dispatch.type == type
        )

    @property
    def running_status_change(self) -> ReceiverFetcher[Dispatch]:
        """Running-state changes of every type.

        A new receiver starts with every dispatch running now (from the
        snapshot, or the last running message since), then every transition.
        """
        return ReceiverFetcher(self._all_running())

    @staticmethod
    def _typed_receiver(
        running: FanOut[Dispatch],
        type: str,
        merge_strategy: MergeStrategy | None,
        name: str | None,
        limit: int,
    ) -> Receiver[Dispatch]:
        """A receiver of one type's running states, merged by ``merge_strategy`` if given.

        Merged, a full buffer coalesces per dispatch *and identity*: when a
        running dispatch changes identity (its target, say), the merger sends
        a ``stopped`` for the old identity and a ``running`` for the new one,
        both of the same dispatch, and the old identity's actor must still get
        its stop.
        """
        if merge_strategy is None:
            return running.new_receiver(name=name, limit=limit)
        merger = RunningMerger(merge_strategy, type)
        identity = merge_strategy.identity
        return running.new_receiver(
            name=name,
            limit=limit,
            transform=merger.apply,
            key=lambda dispatch: (dispatch.id, identity(dispatch)),
        )
