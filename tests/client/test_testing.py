"""``dispatchd.client.testing``: the fake dispatcher behaves like the real one, on a fake clock."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from frequenz.channels import Receiver
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds

from dispatchd.client import Created, Deleted, DispatchInfo, MergeByType, RunningState, Updated
from dispatchd.client.testing import DEFAULT_START, FakeClock, FakeDispatcher
from dispatchd.core.messages import Reason

MINUTE = timedelta(minutes=1)


def pending(receiver: Receiver[object]) -> list[object]:
    """What a receiver holds now (the fake delivers synchronously)."""
    got = []
    while receiver._pending:  # type: ignore[attr-defined]
        got.append(receiver._pending.pop())  # type: ignore[attr-defined]
    return got


async def test_running_messages_come_at_the_instants_dispatchd_would_send_them() -> None:
    async with FakeDispatcher(microgrid_id=3) as dispatcher:
        receiver = await dispatcher.new_running_state_event_receiver("BATTERY")
        created = await dispatcher.create(
            "BATTERY", start_in=5 * MINUTE, duration=10 * MINUTE, payload={"power_w": 1}
        )
        assert created.microgrid_id == 3 and created.next_run == DEFAULT_START + 5 * MINUTE
        await dispatcher.advance(4 * MINUTE)
        assert pending(receiver) == []
        await dispatcher.advance(2 * MINUTE)
        [started] = pending(receiver)
        assert started.running("BATTERY") is RunningState.RUNNING and started.started
        assert started.announced.scheduled_for == DEFAULT_START + 5 * MINUTE
        assert started.until == DEFAULT_START + 15 * MINUTE
        assert dispatcher.now == DEFAULT_START + 6 * MINUTE
        await dispatcher.update(created.id, payload={"power_w": 2})
        [reconfigured] = pending(receiver)
        assert reconfigured.announced.reason is Reason.RECONFIGURED
        assert reconfigured.payload == {"power_w": 2}
        await dispatcher.advance(10 * MINUTE)
        [stopped] = pending(receiver)
        assert stopped.running("BATTERY") is RunningState.STOPPED
        assert stopped.announced.scheduled_for == DEFAULT_START + 15 * MINUTE


async def test_recurrences_lifecycle_and_merge_work_as_with_the_daemon() -> None:
    async with FakeDispatcher() as dispatcher:
        events = dispatcher.lifecycle_events.new_receiver()
        merged = await dispatcher.new_running_state_event_receiver("PV", MergeByType())
        every_minute = RecurrenceRule(frequency=Frequency.MINUTELY, interval=1)
        recurring = await dispatcher.create(
            "PV", start_in=MINUTE, duration=timedelta(seconds=10), recurrence=every_minute
        )
        overlapping = await dispatcher.create("PV", start_in=MINUTE, duration=30 * MINUTE)
        await dispatcher.advance(3 * MINUTE + timedelta(seconds=30))
        got = [(d.id, d.running("PV").name) for d in pending(merged)]
        # Both start at 1 min; the recurring one's stops are held back by the merge.
        assert (
            got
            == [(recurring.id, "RUNNING"), (overlapping.id, "RUNNING")]
            + [(recurring.id, "RUNNING")] * 2
        )
        await dispatcher.delete(recurring.id)
        assert [type(e) for e in pending(events)] == [Created, Created, Deleted]
        await dispatcher.update(overlapping.id, active=False)
        [stopped] = pending(merged)
        assert (stopped.id, stopped.running("PV")) == (overlapping.id, RunningState.STOPPED)
        [updated] = pending(events)
        assert isinstance(updated, Updated) and not updated.dispatch.active


async def test_a_dispatcher_started_late_begins_with_what_runs_now() -> None:
    dispatcher = FakeDispatcher(start=DEFAULT_START)
    running = await dispatcher.create("T", duration=MINUTE, target=TargetIds(4))
    await dispatcher.create("T", start_in=MINUTE, duration=MINUTE)
    async with dispatcher:
        receiver = dispatcher.running_status_change.new_receiver()
        [now] = pending(receiver)
        assert now.id == running.id and now.announced.from_snapshot
        assert now.target == TargetIds(4)


class Actor:
    """A managed actor that records what it was told."""

    def __init__(self, info: DispatchInfo, updates: Receiver[DispatchInfo], log: list[str]) -> None:
        self.info = info
        self.updates = updates
        self.log = log

    def start(self) -> None:
        self.log.append(f"start {self.info.options}")

    async def stop(self, msg: str | None = None) -> None:
        self.log.append("stop")


async def test_managed_actors_and_their_retries_follow_the_fake_clock() -> None:
    log: list[str] = []
    attempts: list[object] = []
    actors: list[Actor] = []

    async def factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> Actor:
        attempts.append(info)
        if len(attempts) <= 2:
            raise OSError("not yet")
        actors.append(Actor(info, updates, log))
        return actors[-1]

    async with FakeDispatcher() as dispatcher:
        await dispatcher.start_managing(
            "EV", actor_factory=factory, retry_interval=timedelta(seconds=30)
        )
        dispatch = await dispatcher.create("EV", duration=10 * MINUTE, payload={"a": 1})
        assert len(attempts) == 1 and log == []
        await dispatcher.advance(timedelta(seconds=29))
        assert len(attempts) == 1
        await dispatcher.advance(timedelta(seconds=31))  # two retries due, at 30 s and 60 s
        assert len(attempts) == 3 and log == ["start {'a': 1}"]
        await dispatcher.update(dispatch.id, payload={"a": 2})
        [info] = pending(actors[0].updates)
        assert info.options == {"a": 2}
        assert info.until == DEFAULT_START + 10 * MINUTE
        await dispatcher.advance(10 * MINUTE)
        assert log == ["start {'a': 1}", "stop"]
        assert dispatcher.is_managed("EV")
    assert not dispatcher.is_managed("EV")


async def test_the_clock_wakes_sleepers_in_order_and_never_goes_back() -> None:
    clock = FakeClock()
    woken: list[int] = []

    async def sleeper(seconds: int) -> None:
        await clock.sleep_until(DEFAULT_START + timedelta(seconds=seconds))
        woken.append(seconds)

    async with FakeDispatcher(clock=clock) as dispatcher:
        tasks = [asyncio.create_task(sleeper(s)) for s in (20, 10)]
        await asyncio.sleep(0)
        assert clock.next_wakeup() == DEFAULT_START + timedelta(seconds=10)
        await dispatcher.advance(timedelta(seconds=15))
        await asyncio.sleep(0)
        assert woken == [10]
        clock.set(DEFAULT_START)
        assert clock.now() == DEFAULT_START + timedelta(seconds=15)
        await dispatcher.advance(timedelta(seconds=5))
        await asyncio.gather(*tasks)
        assert woken == [10, 20]


async def test_feeding_errors_are_clear() -> None:
    dispatcher = FakeDispatcher()
    with pytest.raises(RuntimeError, match="create"):
        _ = dispatcher.client
    with pytest.raises(RuntimeError, match="start"):
        await dispatcher.new_running_state_event_receiver("T")
    with pytest.raises(KeyError, match="no dispatch 9"):
        await dispatcher.update(9, active=False)


async def test_settle_waits_for_consumer_tasks_not_for_receivers_the_test_reads() -> None:
    async with FakeDispatcher() as dispatcher:
        direct = dispatcher.running_status_change.new_receiver()
        background = dispatcher.running_status_change.new_receiver()
        seen: list[tuple[int, bool]] = []

        async def consume() -> None:
            async for dispatch in background:
                await asyncio.sleep(0)  # an actor that awaits while handling
                seen.append((dispatch.id, dispatch.started))

        task = asyncio.create_task(consume())
        await dispatcher.create("T", duration=MINUTE)
        assert seen == [(1, True)]
        assert (await direct.receive()).id == 1
        await dispatcher.create("T", start_in=2 * MINUTE, duration=MINUTE)
        await dispatcher.advance(4 * MINUTE)  # nobody reads `direct` meanwhile: fine
        assert seen == [(1, True), (1, False), (2, True), (2, False)]
        assert [(await direct.receive()).id for _ in range(3)] == [1, 2, 2]
        task.cancel()
