"""docs/scheduling.md consequences 1-18 observed end to end.

A dispatch is changed through the official client against the daemon's
embedded local API (gRPC); the daemon syncs it, schedules it and publishes to
RabbitMQ, where an exclusive queue bound to ``microgrid.#`` collects what an
actor would see. Every test checks the exact messages in order (so lifecycle
before running, and nothing spurious in between), and the fixture checks
properties, headers, deterministic message ids and per-dispatch sequences of
every message afterwards (``check_stream``).

Not produced here, covered by the engine's unit tests
(tests/core/test_engine_consequences.py):

- 3 (beyond the first occurrence), 4 and 5 need occurrences at least a minute
  apart (MINUTELY is the smallest frequency), too slow for this suite; the
  first occurrence of a MINUTELY rule and the inclusive ``until`` are checked.
  test_daemon_recurring.py produces all three end to end, in real time.
- 15 (type change) cannot be produced through the dispatch API: ``type`` is
  immutable there (Update rejects it), as is ``dry_run`` in 9. A scripted API
  produces 15 and the ``dry_run`` change of 9 end to end in
  test_daemon_scripted.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import CreateMicrogridDispatchResponse
from frequenz.client.dispatch._internal_types import DispatchCreateRequest
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from frequenz.client.dispatch.types import TargetIds

from tests.shell.daemon_harness import (
    MG,
    DaemonHandle,
    QueueObserver,
    Received,
    check_stream,
    mg,
    running_daemon,
    soon,
    until,
    whole_second,
)

WAIT = 15.0
"""Upper bound for a batch of messages (every transition here is due within seconds)."""

Site = tuple[QueueObserver, DaemonHandle]


@pytest.fixture
async def site(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[Site]:
    exchange = unique_name("e2e")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        yield observer, handle
        check_stream(observer.received)


async def expect(observer: QueueObserver, *expected: str) -> list[Received]:
    """The next messages are exactly these (``"<id>:<kind>.<event>/<reason>"``), in order."""
    got = await observer.take(len(expected), WAIT)
    assert [r.short() for r in got] == list(expected), [r.short() for r in got]
    return got


async def create_now(
    handle: DaemonHandle, seconds: int, *, type: str = "NOW", payload: dict[str, int] | None = None
) -> ClientDispatch:
    """A dispatch starting now (the server sets the start), so it is created running."""
    return await handle.client.create(
        mg(), type, "NOW", timedelta(seconds=seconds), TargetIds(1), payload=payload
    )


async def update(
    handle: DaemonHandle, dispatch: ClientDispatch, **fields: object
) -> ClientDispatch:
    return await handle.client.update(
        microgrid_id=mg(), dispatch_id=dispatch.id, new_fields=dict(fields)
    )


def i(dispatch: ClientDispatch) -> int:
    return int(dispatch.id)


async def test_1_one_shot_runs_at_start_and_stops_at_end(site: Site) -> None:
    observer, handle = site
    start = soon(1)
    end = start + timedelta(seconds=1)
    created = await handle.client.create(
        mg(), "ONE_SHOT", start, timedelta(seconds=1), TargetIds(1, 2)
    )
    d = i(created)
    lifecycle, running, stopped = await expect(
        observer,
        f"{d}:lifecycle.created/None",
        f"{d}:running.running/started",
        f"{d}:running.stopped/ended",
    )
    assert lifecycle.routing_key == f"microgrid.{MG}.lifecycle.created.ONE_SHOT"
    assert running.routing_key == f"microgrid.{MG}.running.running.ONE_SHOT"
    assert stopped.routing_key == f"microgrid.{MG}.running.stopped.ONE_SHOT"
    assert lifecycle.message.dispatch.end_time == end
    assert lifecycle.reason is None
    on, off = running.running, stopped.running
    assert (on.occurrence.start, on.occurrence.end, on.until) == (start, end, end)
    assert on.scheduled_for == start <= on.emitted_at
    assert (on.sequence, on.running_state_change_synced, on.missed_runs) == (1, None, ())
    assert on.dispatch.target == TargetIds(1, 2)
    assert (off.occurrence.start, off.occurrence.end, off.until) == (start, end, None)
    assert off.scheduled_for == end <= off.emitted_at
    assert off.sequence == 2
    assert off.running_state_change_synced is not None
    assert on.emitted_at <= off.running_state_change_synced <= off.emitted_at


async def test_2_infinite_duration_runs_forever_and_ignores_recurrence(site: Site) -> None:
    observer, handle = site
    start = soon(1)
    created = await handle.client.create(
        mg(),
        "FOREVER",
        start,
        None,
        TargetIds(1),
        recurrence=RecurrenceRule(frequency=Frequency.MINUTELY, end_criteria=EndCriteria(count=2)),
    )
    d = i(created)
    _, running = await expect(
        observer, f"{d}:lifecycle.created/None", f"{d}:running.running/started"
    )
    assert running.running.until is None
    assert running.running.occurrence.end is None
    assert running.running.occurrence.start == running.running.scheduled_for == start
    assert running.message.dispatch.duration is None
    await observer.expect_quiet(1.5)


async def test_3_first_occurrence_of_a_minutely_rule_and_inclusive_until(site: Site) -> None:
    """The later occurrences come a minute apart: the engine tests cover them."""
    observer, handle = site
    start = whole_second(1)
    last_start = start + timedelta(minutes=2)
    created = await handle.client.create(
        mg(),
        "RECURRING",
        start,
        timedelta(seconds=1),
        TargetIds(1),
        recurrence=RecurrenceRule(
            frequency=Frequency.MINUTELY, end_criteria=EndCriteria(until=last_start)
        ),
    )
    d = i(created)
    lifecycle, running, stopped = await expect(
        observer,
        f"{d}:lifecycle.created/None",
        f"{d}:running.running/started",
        f"{d}:running.stopped/ended",
    )
    # ``until`` names the last start and is inclusive: the dispatch ends one duration later.
    assert lifecycle.message.dispatch.end_time == last_start + timedelta(seconds=1)
    assert running.running.occurrence.start == start
    assert running.running.until == start + timedelta(seconds=1)
    assert stopped.running.scheduled_for == start + timedelta(seconds=1)


async def test_6_duration_zero_runs_and_stops_at_the_same_instant(site: Site) -> None:
    observer, handle = site
    start = soon(1)
    created = await handle.client.create(mg(), "PULSE", start, timedelta(0), TargetIds(1))
    d = i(created)
    _, running, stopped = await expect(
        observer,
        f"{d}:lifecycle.created/None",
        f"{d}:running.running/started",
        f"{d}:running.stopped/ended",
    )
    assert running.running.scheduled_for == stopped.running.scheduled_for == start
    assert running.running.occurrence.start == running.running.occurrence.end == start
    assert running.running.until == start


async def test_7_created_inside_an_occurrence_runs_at_once(site: Site) -> None:
    observer, handle = site
    created = await create_now(handle, 2)
    d = i(created)
    _, running, stopped = await expect(
        observer,
        f"{d}:lifecycle.created/None",
        f"{d}:running.running/created",
        f"{d}:running.stopped/ended",
    )
    end = created.start_time + timedelta(seconds=2)
    assert running.running.occurrence.start == created.start_time
    assert running.running.until == end
    assert stopped.running.scheduled_for == end


async def test_8_created_entirely_in_the_past_is_only_a_lifecycle_message(site: Site) -> None:
    """The client refuses past starts, so this goes through its stub (the server allows 10 s)."""
    observer, handle = site
    request = DispatchCreateRequest(
        microgrid_id=mg(),
        type="PAST",
        start_time=datetime.now(UTC) - timedelta(seconds=5),
        duration=timedelta(seconds=1),
        target=TargetIds(1),
        active=True,
        dry_run=False,
        payload={},
        recurrence=None,
    )
    response: CreateMicrogridDispatchResponse = await handle.client.stub.CreateMicrogridDispatch(
        request.to_protobuf(), timeout=10
    )
    past = response.dispatch.metadata.dispatch_id
    # A later dispatch as a marker: had the past one run, its messages would come first.
    marker = i(await create_now(handle, 5, type="MARKER"))
    await expect(
        observer,
        f"{past}:lifecycle.created/None",
        f"{marker}:lifecycle.created/None",
        f"{marker}:running.running/created",
    )


async def test_9_runtime_changes_while_running_reconfigure(site: Site) -> None:
    observer, handle = site
    created = await create_now(handle, 10, payload={"power_w": 1})
    d = i(created)
    await expect(observer, f"{d}:lifecycle.created/None", f"{d}:running.running/created")
    await update(handle, created, payload={"power_w": 2})
    _, payload = await expect(
        observer, f"{d}:lifecycle.updated/None", f"{d}:running.running/reconfigured"
    )
    assert payload.message.dispatch.payload == {"power_w": 2}
    await update(handle, created, target=TargetIds(3))
    _, target = await expect(
        observer, f"{d}:lifecycle.updated/None", f"{d}:running.running/reconfigured"
    )
    assert target.message.dispatch.target == TargetIds(3)
    await update(handle, created, duration=timedelta(seconds=20))
    _, longer = await expect(
        observer, f"{d}:lifecycle.updated/None", f"{d}:running.running/reconfigured"
    )
    assert longer.running.until == created.start_time + timedelta(seconds=20)
    assert longer.running.occurrence.start == created.start_time
    assert [r.running.sequence for r in (payload, target, longer)] == [2, 3, 4]


async def test_10_duration_shortened_past_now_stops_at_once(site: Site) -> None:
    observer, handle = site
    created = await create_now(handle, 30)
    d = i(created)
    await expect(observer, f"{d}:lifecycle.created/None", f"{d}:running.running/created")
    await until(created.start_time + timedelta(seconds=1))
    await update(handle, created, duration=timedelta(seconds=1))
    _, stopped = await expect(observer, f"{d}:lifecycle.updated/None", f"{d}:running.stopped/ended")
    assert stopped.running.until is None
    assert stopped.message.dispatch.duration == timedelta(seconds=1)


async def test_11_start_moved_later_stops_now_and_runs_at_the_new_start(site: Site) -> None:
    observer, handle = site
    created = await create_now(handle, 30)
    d = i(created)
    await expect(observer, f"{d}:lifecycle.created/None", f"{d}:running.running/created")
    new_start = soon(1.5)
    await update(handle, created, start_time=new_start)
    _, stopped, running = await expect(
        observer,
        f"{d}:lifecycle.updated/None",
        f"{d}:running.stopped/ended",
        f"{d}:running.running/started",
    )
    assert stopped.running.emitted_at < new_start
    assert running.running.scheduled_for == running.running.occurrence.start == new_start
    assert running.running.until == new_start + timedelta(seconds=30)


async def test_12_start_moved_earlier_around_now_runs_now(site: Site) -> None:
    observer, handle = site
    created = await handle.client.create(
        mg(), "LATER", soon(60), timedelta(seconds=30), TargetIds(1)
    )
    d = i(created)
    await expect(observer, f"{d}:lifecycle.created/None")
    new_start = soon(-2)
    await update(handle, created, start_time=new_start)
    _, running = await expect(
        observer, f"{d}:lifecycle.updated/None", f"{d}:running.running/started"
    )
    assert running.running.occurrence.start == new_start
    assert running.running.until == new_start + timedelta(seconds=30)


async def test_13_deactivated_stops_and_reactivated_runs_again(site: Site) -> None:
    observer, handle = site
    created = await create_now(handle, 30)
    d = i(created)
    await expect(observer, f"{d}:lifecycle.created/None", f"{d}:running.running/created")
    await update(handle, created, active=False)
    _, stopped = await expect(
        observer, f"{d}:lifecycle.updated/None", f"{d}:running.stopped/deactivated"
    )
    assert stopped.message.dispatch.active is False
    await update(handle, created, active=True)
    _, running = await expect(
        observer, f"{d}:lifecycle.updated/None", f"{d}:running.running/started"
    )
    assert running.running.occurrence.start == created.start_time


async def test_14_deleted_while_running_stops_and_while_idle_only_lifecycle(site: Site) -> None:
    observer, handle = site
    idle = await handle.client.create(mg(), "IDLE", soon(60), timedelta(seconds=5), TargetIds(1))
    busy = await create_now(handle, 30)
    a, b = i(idle), i(busy)
    await expect(
        observer,
        f"{a}:lifecycle.created/None",
        f"{b}:lifecycle.created/None",
        f"{b}:running.running/created",
    )
    await handle.client.delete(microgrid_id=mg(), dispatch_id=idle.id)
    await handle.client.delete(microgrid_id=mg(), dispatch_id=busy.id)
    await expect(
        observer,
        f"{a}:lifecycle.deleted/None",
        f"{b}:lifecycle.deleted/None",
        f"{b}:running.stopped/deleted",
    )


async def test_16_updates_exactly_at_the_boundaries_lose_nothing(site: Site) -> None:
    """Updates land at the instants the timer is due, before or after it fires.

    Which side of the boundary each lands on is up to timing; either way both
    transitions arrive exactly once, each running message carries the data of
    the lifecycle message before it, and an update inside the occurrence is
    announced as ``reconfigured``.
    """
    observer, handle = site
    start = soon(1.5)
    end = start + timedelta(seconds=2)
    created = await handle.client.create(
        mg(), "RACE", start, timedelta(seconds=2), TargetIds(1), payload={"v": 0}
    )
    d = i(created)
    await until(start - timedelta(milliseconds=5))
    await update(handle, created, payload={"v": 1})
    await until(end - timedelta(milliseconds=5))
    last = await update(handle, created, payload={"v": 2})
    await observer.wait_for(lambda r: r.is_(d, "stopped"), WAIT)
    await observer.wait_for(lambda r: r.message.dispatch.update_time == last.update_time, WAIT)
    seen = observer.of(d)
    events = [r.short() for r in seen]
    assert events.count(f"{d}:running.running/started") == 1, events
    assert events.count(f"{d}:running.stopped/ended") == 1, events
    assert events.count(f"{d}:lifecycle.updated/None") == 2, events
    running = [r for r in seen if r.kind == "running"]
    assert running[-1].short() == f"{d}:running.stopped/ended", events
    assert running[-1].running.scheduled_for == end
    running_now = False
    lifecycle = None
    for index, received in enumerate(seen):
        if received.kind == "lifecycle":
            lifecycle = received
            if received.event == "updated" and running_now:
                assert seen[index + 1].short() == f"{d}:running.running/reconfigured", events
        else:
            running_now = received.event == "running"
            assert lifecycle is not None
            assert received.message.dispatch == lifecycle.message.dispatch, events


async def test_17_due_at_the_same_instant_starts_before_stops_by_id(site: Site) -> None:
    observer, handle = site
    instant = soon(2)
    ending = await handle.client.create(
        mg(), "SAME", instant - timedelta(seconds=1), timedelta(seconds=1), TargetIds(1)
    )
    first = await handle.client.create(mg(), "SAME", instant, timedelta(seconds=1), TargetIds(1))
    second = await handle.client.create(mg(), "SAME", instant, timedelta(seconds=1), TargetIds(1))
    a, b, c = i(ending), i(first), i(second)
    await expect(
        observer,
        f"{a}:lifecycle.created/None",
        f"{b}:lifecycle.created/None",
        f"{c}:lifecycle.created/None",
        f"{a}:running.running/started",
    )
    at_instant = await expect(
        observer,
        f"{b}:running.running/started",
        f"{c}:running.running/started",
        f"{a}:running.stopped/ended",
    )
    assert {r.running.scheduled_for for r in at_instant} == {instant}


async def test_18_changes_the_actor_cannot_see_are_lifecycle_only(site: Site) -> None:
    observer, handle = site
    created = await handle.client.create(
        mg(), "QUIET", whole_second(0.5), timedelta(seconds=30), TargetIds(1), payload={"p": 1}
    )
    d = i(created)
    await expect(observer, f"{d}:lifecycle.created/None", f"{d}:running.running/started")
    await update(handle, created, payload={"p": 1})
    await update(
        handle,
        created,
        **{
            "recurrence.frequency": Frequency.HOURLY,
            "recurrence.end_criteria": EndCriteria(count=2),
        },
    )
    # A visible change as a marker: nothing may come between the two quiet updates and it.
    await update(handle, created, payload={"p": 2})
    *_, reconfigured = await expect(
        observer,
        f"{d}:lifecycle.updated/None",
        f"{d}:lifecycle.updated/None",
        f"{d}:lifecycle.updated/None",
        f"{d}:running.running/reconfigured",
    )
    assert reconfigured.running.sequence == 2
    assert reconfigured.message.dispatch.recurrence is not None


async def test_idle_dispatch_changes_are_lifecycle_only(site: Site) -> None:
    """The table's last row: stopped and still stopped publishes no running message."""
    observer, handle = site
    idle = await handle.client.create(mg(), "IDLE", soon(60), timedelta(seconds=5), TargetIds(1))
    d = i(idle)
    await expect(observer, f"{d}:lifecycle.created/None")
    await update(handle, idle, payload={"p": 2})
    await update(handle, idle, target=TargetIds(4), duration=timedelta(seconds=9))
    await update(handle, idle, active=False)
    marker = i(await create_now(handle, 30, type="MARKER"))
    updates = await expect(
        observer,
        f"{d}:lifecycle.updated/None",
        f"{d}:lifecycle.updated/None",
        f"{d}:lifecycle.updated/None",
        f"{marker}:lifecycle.created/None",
        f"{marker}:running.running/created",
    )
    assert updates[1].message.dispatch.target == TargetIds(4)
    assert updates[2].message.dispatch.active is False
