"""Managed actors end to end: a real dispatchd, RabbitMQ and the official API client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from frequenz.channels import Broadcast, Receiver
from frequenz.client.dispatch.types import TargetIds

from dispatchd.client import (
    ActorDispatcher,
    Dispatch,
    Dispatcher,
    DispatchInfo,
    MergeByTypeTarget,
)
from dispatchd.client.testing import FakeClock
from tests.client.helpers import T0, announced, core
from tests.client.receiver_helpers import create
from tests.shell.daemon_harness import MG, DaemonHandle, mg, soon

WAIT = 10.0


@dataclass
class ActorEvent:
    """What a test actor did: ``started``, ``updated`` or ``stopped``."""

    what: str
    actor: int
    info: DispatchInfo | None = None
    at: float = field(default_factory=time.monotonic)


class Actors:
    """A factory of recording actors, and what they did, in order."""

    def __init__(self, failures: int = 0) -> None:
        self.events: asyncio.Queue[ActorEvent] = asyncio.Queue()
        self.failures = failures
        self.calls: list[float] = []
        self.built = 0
        self.called = asyncio.Event()

    async def factory(self, info: DispatchInfo, updates: Receiver[DispatchInfo]) -> RecordingActor:
        self.calls.append(time.monotonic())
        self.called.set()
        if len(self.calls) <= self.failures:
            raise ConnectionError("battery inverter unreachable")
        self.built += 1
        return RecordingActor(self.built, info, updates, self.events)

    async def next(self) -> ActorEvent:
        async with asyncio.timeout(WAIT):
            return await self.events.get()

    async def expect_quiet(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                unexpected = await self.events.get()
            raise AssertionError(f"unexpected: {unexpected}")


class RecordingActor:
    """Says when it starts, gets an update and stops."""

    def __init__(
        self,
        number: int,
        info: DispatchInfo,
        updates: Receiver[DispatchInfo],
        events: asyncio.Queue[ActorEvent],
    ) -> None:
        self.number = number
        self.info = info
        self._updates = updates
        self._events = events
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._events.put_nowait(ActorEvent("started", self.number, self.info))
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for info in self._updates:
            self.info = info
            self._events.put_nowait(ActorEvent("updated", self.number, info))

    async def stop(self, msg: str | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._events.put_nowait(ActorEvent("stopped", self.number))


async def test_an_actor_starts_is_reconfigured_and_stops_with_its_dispatch(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    actors = Actors()
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        await dispatcher.start_managing("M", actor_factory=actors.factory)
        assert dispatcher.is_managed("M") and not dispatcher.is_managed("T")
        await create(daemon.client, "T", start_in=0.2, duration=0.5)  # another type
        dispatch = await create(daemon.client, "M", start_in=0.3, duration=30, payload={"kw": 5})
        started = await actors.next()
        assert (started.what, started.actor) == ("started", 1)
        assert started.info is not None
        assert started.info.target == TargetIds(1, 2)
        assert started.info.options == {"kw": 5} and not started.info.dry_run
        assert started.info.until == dispatch.start_time + timedelta(seconds=30)
        await daemon.client.update(
            microgrid_id=mg(),
            dispatch_id=dispatch.id,
            new_fields={"payload": {"kw": 7}, "duration": timedelta(seconds=40)},
        )
        updated = await actors.next()
        assert (updated.what, updated.actor) == ("updated", 1)
        assert updated.info is not None and updated.info.options == {"kw": 7}
        assert updated.info.until == dispatch.start_time + timedelta(seconds=40)
        await daemon.client.delete(microgrid_id=mg(), dispatch_id=dispatch.id)
        stopped = await actors.next()
        assert (stopped.what, stopped.actor) == ("stopped", 1)
        await actors.expect_quiet(0.3)


async def test_a_failing_factory_is_retried_until_it_starts_without_a_log_storm(
    amqp_url: str, exchange: str, daemon: DaemonHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatchd.client")
    actors = Actors(failures=2)
    retry = 0.5
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        await dispatcher.start_managing(
            "M", actor_factory=actors.factory, retry_interval=timedelta(seconds=retry)
        )
        await create(daemon.client, "M", start_in=0.2, duration=30)
        started = await actors.next()
        assert started.what == "started"
        assert len(actors.calls) == 3
        gaps = [b - a for a, b in zip(actors.calls, actors.calls[1:], strict=False)]
        assert all(gap >= retry * 0.9 for gap in gaps), gaps
    failures = [
        r for r in caplog.records if "start" in r.getMessage() and r.levelno >= logging.DEBUG
    ]
    levels = [r.levelname for r in failures if "unreachable" in r.getMessage()]
    assert levels == ["ERROR", "DEBUG"]  # the repeat of the same error is not shouted
    assert failures[0].exc_info is not None
    assert any("after 2 failed attempts" in r.getMessage() for r in caplog.records)
    # Stopping the dispatcher stopped the actor it had started.
    assert (await actors.next()).what == "stopped"


async def test_two_identities_of_one_type_get_one_actor_each_with_merge_by_type_target(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    actors = Actors()
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        await dispatcher.start_managing(
            "M", actor_factory=actors.factory, merge_strategy=MergeByTypeTarget()
        )
        client = daemon.client
        await client.create(mg(), "M", soon(0.3), timedelta(seconds=4), TargetIds(1))
        first = await actors.next()
        await client.create(mg(), "M", soon(0.2), timedelta(seconds=1), TargetIds(2))
        second = await actors.next()
        await client.create(
            mg(), "M", soon(0.2), timedelta(seconds=0.5), TargetIds(1), payload={"p": 1}
        )
        update = await actors.next()
        assert (first.what, first.actor) == ("started", 1)
        assert first.info is not None and first.info.target == TargetIds(1)
        assert (second.what, second.actor) == ("started", 2)
        assert second.info is not None and second.info.target == TargetIds(2)
        # Same type and target as the first: an update of actor 1, not a third actor.
        assert (update.what, update.actor) == ("updated", 1)
        assert update.info is not None and update.info.options == {"p": 1}
        # also_one ends first (held back: one still runs), then two, then one.
        ends = [await actors.next(), await actors.next()]
        assert [(e.what, e.actor) for e in ends] == [("stopped", 2), ("stopped", 1)]
        assert actors.built == 2
        await actors.expect_quiet(0.3)


async def test_stopping_the_dispatcher_stops_every_managed_actor(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    actors = Actors()
    dispatcher = Dispatcher(MG, amqp_url, exchange=exchange)
    await dispatcher.start()
    await dispatcher.start_managing("A", actor_factory=actors.factory)
    await dispatcher.start_managing("B", actor_factory=actors.factory)
    await dispatcher.start_managing("B", actor_factory=actors.factory)  # ignored
    await create(daemon.client, "A", start_in=0.2, duration=30)
    await create(daemon.client, "B", start_in=0.2, duration=30)
    assert {(await actors.next()).what for _ in range(2)} == {"started"}
    await dispatcher.stop()
    stopped = [await actors.next(), await actors.next()]
    assert sorted((e.what, e.actor) for e in stopped) == [("stopped", 1), ("stopped", 2)]
    assert not dispatcher.is_managed("A") and not dispatcher.is_managed("B")
    await actors.expect_quiet(0.2)


async def test_stop_managing_stops_the_actors_of_that_type_only(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    actors = Actors()
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        await dispatcher.start_managing("A", actor_factory=actors.factory)
        await dispatcher.start_managing("B", actor_factory=actors.factory)
        await create(daemon.client, "A", start_in=0.2, duration=30)
        assert (await actors.next()).what == "started"
        await dispatcher.stop_managing("A")
        assert (await actors.next()).what == "stopped"
        assert not dispatcher.is_managed("A") and dispatcher.is_managed("B")
        await create(daemon.client, "B", start_in=0.2, duration=30)
        assert (await actors.next()).what == "started"


async def test_actor_dispatcher_alone_on_a_plain_channel_and_a_fake_clock() -> None:
    """Built by hand over any ``frequenz.channels`` receiver, as in frequenz.dispatch."""
    channel: Broadcast[Dispatch] = Broadcast(name="running")
    sender = channel.new_sender()
    clock = FakeClock(T0)
    actors = Actors(failures=1)
    manager = ActorDispatcher(
        actors.factory,
        channel.new_receiver(),
        dispatch_identity=lambda dispatch: dispatch.type,
        retry_interval=timedelta(seconds=10),
        timer=clock,
    )
    async with manager:
        await sender.send(announced(core(1, type="A"), running=True))
        async with asyncio.timeout(WAIT):
            await actors.called.wait()  # the failure is recorded in the same step
        assert manager.failed_starts == {"A": 1} and actors.events.empty()
        clock.set(T0 + timedelta(seconds=10))
        assert (await actors.next()).what == "started"
        assert list(manager.actors) == ["A"] and manager.failed_starts == {}
        await sender.send(announced(core(2, type="A"), running=True))
        assert (await actors.next()).what == "updated"
        await sender.send(announced(core(2, type="A"), running=False))
        assert (await actors.next()).what == "stopped"
        await sender.send(announced(core(3, type="B"), running=True))
        assert (await actors.next()).what == "started"
    assert (await actors.next()).what == "stopped"  # leaving stops the rest
    assert not manager.is_running
