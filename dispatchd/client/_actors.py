"""Managed actors: ``ActorDispatcher`` and ``Dispatcher.start_managing``.

The shape of the newest ``frequenz.dispatch``: an async factory builds an
actor when a dispatch of a type starts running, the actor gets a
``DispatchInfo`` receiver for updates while it runs, and it is stopped when
the dispatch stops. One actor per identity: the dispatch id without a merge
strategy, else ``merge_strategy.identity(dispatch)`` (e.g. type, dry_run and
target with ``MergeByTypeTarget``).

An actor is anything with ``start()`` and ``async stop(msg=None)``, so a
``frequenz.sdk.actor.Actor`` works as is.

A factory (or ``start()``) that raises is retried every ``retry_interval``
with the newest dispatch of that identity, until it succeeds or the
dispatch stops. Only the first failure is logged with its traceback; a
repeat with the same error is logged at DEBUG, so a broken factory does not
flood the logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self

from frequenz.channels import Receiver, ReceiverStoppedError

from dispatchd.client._dispatch import Dispatch, system_now
from dispatchd.client._fanout import _BufferedReceiver, _Pending
from dispatchd.client._merge import MergeStrategy
from dispatchd.core.model import TargetComponents

__all__ = [
    "ActorDispatcher",
    "ActorFactory",
    "DispatchInfo",
    "ManagedActor",
    "Timer",
]

_log = logging.getLogger(__name__)

DEFAULT_RETRY_INTERVAL = timedelta(seconds=60)


@dataclass(frozen=True, kw_only=True)
class DispatchInfo:
    """What a managed actor is told when it starts and whenever its dispatch changes."""

    target: TargetComponents
    """The components to act on (the dispatch's ``target``)."""

    dry_run: bool
    """Whether to only pretend."""

    options: dict[str, Any]
    """The dispatch's ``payload``."""

    until: datetime | None = None
    """When the running occurrence ends; ``None`` when it runs forever."""

    _src: Dispatch | None = field(default=None, repr=False)
    """The dispatch this was made from (as in ``frequenz.dispatch``)."""

    @property
    def components(self) -> TargetComponents:
        """The old name of ``target``."""
        return self.target

    @classmethod
    def of(cls, dispatch: Dispatch) -> DispatchInfo:
        """What an actor is told about ``dispatch``."""
        return cls(
            target=dispatch.target,
            dry_run=dispatch.dry_run,
            options=dict(dispatch.payload),
            until=dispatch.until,
            _src=dispatch,
        )


class ManagedActor(Protocol):
    """What ``ActorDispatcher`` needs of an actor (``frequenz.sdk.actor.Actor`` has it)."""

    def start(self) -> None:
        """Begin working (in a task of its own)."""

    async def stop(self, msg: str | None = None) -> None:
        """Stop working and wait until stopped."""


ActorFactory = Callable[[DispatchInfo, Receiver[DispatchInfo]], Awaitable[ManagedActor]]
"""Builds an actor from the first ``DispatchInfo`` and the receiver of later ones."""


class Timer(Protocol):
    """Where the retry interval is measured (the wall clock, or the testing fake's)."""

    def now(self) -> datetime:
        """The current time."""

    async def sleep_until(self, moment: datetime) -> None:
        """Return once ``moment`` has come."""


class WallClock:
    """The real time."""

    def now(self) -> datetime:
        """The wall clock, in UTC."""
        return system_now()

    async def sleep_until(self, moment: datetime) -> None:
        """``asyncio.sleep`` until ``moment``."""
        await asyncio.sleep(max(0.0, (moment - system_now()).total_seconds()))


@dataclass(slots=True)
class _Running:
    actor: ManagedActor
    updates: _BufferedReceiver[DispatchInfo]


@dataclass(slots=True)
class _Failed:
    dispatch: Dispatch
    retry_at: datetime
    attempts: int
    last_error: str


class ActorDispatcher:
    """Starts, updates and stops actors from a running-state receiver.

    ``dispatch_identity`` maps a dispatch to its actor (default: its id).
    Use ``Dispatcher.start_managing`` rather than building one yourself.
    """

    def __init__(
        self,
        actor_factory: ActorFactory,
        running_status_receiver: Receiver[Dispatch],
        dispatch_identity: Callable[[Dispatch], Hashable] | None = None,
        retry_interval: timedelta = DEFAULT_RETRY_INTERVAL,
        *,
        timer: Timer | None = None,
    ) -> None:
        """Nothing runs before ``start()``."""
        self._factory = actor_factory
        self._receiver = running_status_receiver
        self._identity: Callable[[Dispatch], Hashable] = dispatch_identity or _by_id
        self._retry_interval = retry_interval
        self._timer: Timer = timer or WallClock()
        self._actors: dict[Hashable, _Running] = {}
        self._failed: dict[Hashable, _Failed] = {}
        self._task: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Future[Any]] | None = None

    # --- the BackgroundService-like surface ---------------------------------------

    def start(self) -> None:
        """Begin following the receiver (in a task)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dispatchd.ActorDispatcher")

    @property
    def is_running(self) -> bool:
        """Whether the task follows the receiver."""
        return self._task is not None and not self._task.done()

    def cancel(self, msg: str | None = None) -> None:
        """Stop following the receiver (``stop()`` also stops the actors)."""
        if self._task is not None:
            self._task.cancel(msg)

    async def wait(self) -> None:
        """Until the task ended (the receiver stopped, or ``cancel()``)."""
        task = self._task
        if task is None:
            return
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            _log.error("the actor dispatcher failed", exc_info=task.exception())

    async def stop(self, msg: str | None = None) -> None:
        """Stop following the receiver and stop every actor it started."""
        self.cancel(msg)
        await self.wait()
        await self._stop_all(msg or "dispatcher stopped")

    async def __aenter__(self) -> Self:
        """``start()``."""
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """``stop()``."""
        await self.stop()

    # --- what it manages ----------------------------------------------------------

    @property
    def actors(self) -> dict[Hashable, ManagedActor]:
        """The running actors by identity."""
        return {identity: running.actor for identity, running in self._actors.items()}

    @property
    def failed_starts(self) -> dict[Hashable, int]:
        """Identities whose actor could not be started yet, with the attempts so far."""
        return {identity: failed.attempts for identity, failed in self._failed.items()}

    @property
    def settled(self) -> bool:
        """Waiting for news with nothing pending (for the testing fake)."""
        if self.is_running:
            waiting = self._waiting
            if waiting is None or any(future.done() for future in waiting):
                return False
            if any(failed.retry_at <= self._timer.now() for failed in self._failed.values()):
                return False
            receiver = self._receiver
            if isinstance(receiver, _BufferedReceiver) and not receiver.settled:
                return False
        return all(running.updates.settled for running in self._actors.values())

    # --- the loop -----------------------------------------------------------------

    async def _run(self) -> None:
        receiving: asyncio.Future[Dispatch] | None = None
        try:
            while True:
                if receiving is None:
                    receiving = asyncio.ensure_future(self._receiver.receive())
                waits: set[asyncio.Future[Any]] = {receiving}
                retry_at = min((f.retry_at for f in self._failed.values()), default=None)
                sleeping = (
                    asyncio.ensure_future(self._timer.sleep_until(retry_at))
                    if retry_at is not None
                    else None
                )
                if sleeping is not None:
                    waits.add(sleeping)
                self._waiting = waits
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._waiting = None
                    if sleeping is not None and not sleeping.done():
                        sleeping.cancel()
                if receiving.done():
                    done, receiving = receiving, None
                    try:
                        dispatch = done.result()
                    except ReceiverStoppedError:
                        break
                    await self._handle(dispatch)
                await self._retry_due()
        finally:
            if receiving is not None:
                receiving.cancel()
        await self._stop_all("the running-state receiver stopped")

    async def _handle(self, dispatch: Dispatch) -> None:
        """Start, update or stop the actor of the dispatch's identity."""
        identity = self._identity(dispatch)
        failed = self._failed.pop(identity, None)
        if dispatch.started:
            await self._start_or_update(identity, dispatch, failed)
        else:
            await self._stop(identity, dispatch)

    async def _start_or_update(
        self, identity: Hashable, dispatch: Dispatch, failed: _Failed | None
    ) -> None:
        info = DispatchInfo.of(dispatch)
        running = self._actors.get(identity)
        if running is not None:
            _log.info("updating actor %s with dispatch %s", identity, dispatch.id)
            running.updates.push(info)
            return
        updates = _BufferedReceiver(_Pending(f"dispatch updates of {identity}", 1, _same, None))
        try:
            actor = await self._factory(info, updates)
            actor.start()
        except Exception as error:
            self._record_failure(identity, dispatch, failed, error)
            return
        self._actors[identity] = _Running(actor, updates)
        if failed is not None:
            _log.info(
                "started actor %s for dispatch %s after %d failed attempts",
                identity,
                dispatch.id,
                failed.attempts,
            )
        else:
            _log.info("started actor %s for dispatch %s", identity, dispatch.id)

    def _record_failure(
        self, identity: Hashable, dispatch: Dispatch, failed: _Failed | None, error: Exception
    ) -> None:
        text = f"{type(error).__name__}: {error}"
        attempts = 1 if failed is None else failed.attempts + 1
        retry = self._retry_interval.total_seconds()
        if failed is None:
            _log.error(
                "could not start the actor %s for dispatch %s (retrying every %g s): %s",
                identity,
                dispatch.id,
                retry,
                text,
                exc_info=error,
            )
        elif text != failed.last_error:
            _log.warning(
                "actor %s still does not start (attempt %d, retrying every %g s): %s",
                identity,
                attempts,
                retry,
                text,
            )
        else:
            _log.debug("actor %s still does not start (attempt %d): %s", identity, attempts, text)
        self._failed[identity] = _Failed(
            dispatch=dispatch,
            retry_at=self._timer.now() + self._retry_interval,
            attempts=attempts,
            last_error=text,
        )

    async def _retry_due(self) -> None:
        now = self._timer.now()
        for identity, failed in list(self._failed.items()):
            if failed.retry_at <= now and self._failed.get(identity) is failed:
                del self._failed[identity]
                await self._start_or_update(identity, failed.dispatch, failed)

    async def _stop(self, identity: Hashable, dispatch: Dispatch) -> None:
        running = self._actors.pop(identity, None)
        if running is None:
            _log.debug("no actor %s to stop for dispatch %s", identity, dispatch.id)
            return
        _log.info("stopping actor %s: dispatch %s stopped", identity, dispatch.id)
        await self._stop_actor(identity, running, "dispatch stopped")

    async def _stop_all(self, msg: str) -> None:
        self._failed.clear()
        actors, self._actors = self._actors, {}
        for identity, running in actors.items():
            await self._stop_actor(identity, running, msg)

    async def _stop_actor(self, identity: Hashable, running: _Running, msg: str) -> None:
        running.updates.close()
        try:
            await running.actor.stop(msg)
        except Exception:
            _log.exception("stopping actor %s failed", identity)


def _by_id(dispatch: Dispatch) -> Hashable:
    return dispatch.id


def _same(_: DispatchInfo) -> Hashable:
    """Every update of one actor supersedes the previous one."""
    return None


class Managing:
    """``start_managing``/``stop_managing``/``is_managed`` for the dispatcher and its fake."""

    _managed: dict[str, ActorDispatcher]

    def _managing_timer(self) -> Timer:
        return WallClock()

    async def new_running_state_event_receiver(
        self,
        type: str,
        merge_strategy: MergeStrategy | None = None,
        *,
        name: str | None = None,
        limit: int = 50,
    ) -> Receiver[Dispatch]:
        raise NotImplementedError

    def is_managed(self, dispatch_type: str) -> bool:
        """Whether actors of ``dispatch_type`` are managed."""
        return dispatch_type in self._managed

    async def start_managing(
        self,
        dispatch_type: str,
        *,
        actor_factory: ActorFactory,
        merge_strategy: MergeStrategy | None = None,
        retry_interval: timedelta = DEFAULT_RETRY_INTERVAL,
    ) -> None:
        """Start an actor whenever a dispatch of ``dispatch_type`` starts running.

        ``actor_factory(info, updates)`` is awaited to build it; ``start()``
        is called on it; later changes while it runs arrive on ``updates``
        (only the newest is kept); it is stopped (``await actor.stop()``)
        when the dispatch stops. One actor per dispatch, or per identity of
        ``merge_strategy``. A failed start is retried every
        ``retry_interval``. A second call for a managed type is ignored.
        """
        if dispatch_type in self._managed:
            _log.debug("actors of %r are already managed", dispatch_type)
            return
        receiver = await self.new_running_state_event_receiver(
            dispatch_type, merge_strategy, name=f"managed:{dispatch_type}"
        )
        manager = ActorDispatcher(
            actor_factory,
            receiver,
            merge_strategy.identity if merge_strategy is not None else None,
            retry_interval,
            timer=self._managing_timer(),
        )
        self._managed[dispatch_type] = manager
        manager.start()

    async def stop_managing(self, dispatch_type: str) -> None:
        """Stop managing ``dispatch_type`` and stop its running actors."""
        manager = self._managed.pop(dispatch_type, None)
        if manager is not None:
            await manager.stop(f"stopped managing {dispatch_type}")

    async def _stop_managing_all(self) -> None:
        for dispatch_type in list(self._managed):
            await self.stop_managing(dispatch_type)
