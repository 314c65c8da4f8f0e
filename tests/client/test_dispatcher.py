"""``Dispatcher`` end to end: a real dispatchd, RabbitMQ and the official API client."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import RecurrenceRule as PBRecurrenceRule
from frequenz.channels import ReceiverStoppedError
from frequenz.client.dispatch.types import TargetIds

from dispatchd.client import (
    Created,
    Deleted,
    Dispatch,
    Dispatcher,
    DispatchEvent,
    MergeByType,
    RunningState,
    SnapshotError,
    Updated,
)
from dispatchd.core import wire
from dispatchd.core.messages import Event, Reason
from tests.client.helpers import core, running_message
from tests.client.receiver_helpers import create, expect_quiet, states, take, take_until
from tests.shell.daemon_harness import MG, DaemonHandle, QueueObserver, mg, running_daemon, soon
from tests.shell.scripted_api import CREATED, ScriptedApi, dispatch_pb


async def test_late_joiner_gets_running_dispatches_from_the_snapshot_then_transitions(
    amqp_url: str, exchange: str, daemon: DaemonHandle, observer: QueueObserver
) -> None:
    early = await create(daemon.client, start_in=0.2, duration=3.0)
    await observer.wait_for(lambda r: r.is_(int(early.id), "running"), 5)
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        running = dispatcher.running_status_change.new_receiver()
        [first] = await take(running, 1)
        assert states([first]) == [(int(early.id), "RUNNING")]
        assert first.announced is not None and first.announced.from_snapshot
        assert first.until == early.start_time + early.duration  # type: ignore[operator]
        short = await create(daemon.client, start_in=0.3, duration=0.5)
        later = await take(running, 3)
        assert states(later) == [
            (int(short.id), "RUNNING"),
            (int(short.id), "STOPPED"),
            (int(early.id), "STOPPED"),
        ]
        assert [d.announced.reason for d in later if d.announced] == [
            Reason.STARTED,
            Reason.ENDED,
            Reason.ENDED,
        ]
        assert later[1].running_state_change_synced is not None


async def test_duration_zero_reads_running_then_stopped(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        running = dispatcher.running_status_change.new_receiver()
        one_shot = await create(daemon.client, start_in=0.3, duration=0.0)
        got = await take(running, 2)
        assert states(got) == [(int(one_shot.id), "RUNNING"), (int(one_shot.id), "STOPPED")]
        assert got[0].started  # as running() reads it: the announcement decides
        assert not got[0].started_at(got[0].start_time)  # the schedule alone says no


async def test_lifecycle_events_reach_every_receiver(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        receivers = [dispatcher.lifecycle_events.new_receiver() for _ in range(2)]
        only_t = dispatcher.new_lifecycle_events_receiver("T")
        await create(daemon.client, "OTHER", start_in=60)
        created = await create(daemon.client, start_in=60, payload={"p": 1})
        await daemon.client.update(
            microgrid_id=mg(), dispatch_id=created.id, new_fields={"payload": {"p": 2}}
        )
        await daemon.client.delete(microgrid_id=mg(), dispatch_id=created.id)
        for receiver in receivers:
            [other] = await take(receiver, 1)
            assert other.dispatch.type == "OTHER"
        for receiver in (*receivers, only_t):  # only_t never sees OTHER
            events: list[DispatchEvent] = await take(receiver, 3)
            assert [type(e) for e in events] == [Created, Updated, Deleted]
            assert {e.dispatch.id for e in events} == {int(created.id)}
            assert events[1].dispatch.payload == {"p": 2}
            assert events[2].dispatch.deleted
            # Without an announcement, running() reads the schedule: not yet.
            assert events[0].dispatch.running("T") is RunningState.STOPPED


async def test_typed_receiver_is_selected_by_the_broker_binding(
    amqp_url: str,
    exchange: str,
    daemon: DaemonHandle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wild = "a.b*#"
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        typed = await dispatcher.new_running_state_event_receiver(wild)
        everything = dispatcher.running_status_change.new_receiver()
        typed_queue = dispatcher._typed[wild].queue_name
        for other in ("a.b", "a%2Eb", "a", "a.b.c"):
            await create(daemon.client, other, start_in=0.2, duration=0.3)
        mine = await create(daemon.client, wild, start_in=0.4, duration=0.3)
        got = await take(typed, 2)
        assert states(got, wild) == [(int(mine.id), "RUNNING"), (int(mine.id), "STOPPED")]
        seen = await take(everything, 10)
        assert {d.type for d in seen} == {"a.b", "a%2Eb", "a", "a.b.c", wild}
        await expect_quiet(typed, 0.3)
        # Broker-side: a malformed message under another type's key never
        # reaches the typed queue; under its own type's key it does (and is
        # rejected there).
        caplog.set_level(logging.ERROR, logger="dispatchd.client")
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            for key, message_id in (
                (f"microgrid.{MG}.running.running.a%2Eb", "bad-other"),
                (f"microgrid.{MG}.running.running.a%2Eb%2A%23", "bad-mine"),
            ):
                await target.publish(
                    aio_pika.Message(b"{not json", message_id=message_id), routing_key=key
                )
        after = await create(daemon.client, wild, start_in=0.3, duration=0.2)
        assert states(await take(typed, 2), wild) == [
            (int(after.id), "RUNNING"),
            (int(after.id), "STOPPED"),
        ]
        rejected = [
            tuple(r.args[:2])  # type: ignore[index, arg-type]
            for r in caplog.records
            if "malformed" in r.getMessage()
        ]
        assert ("bad-mine", typed_queue) in rejected
        assert ("bad-other", dispatcher.queue_name) in rejected
        assert ("bad-other", typed_queue) not in rejected


async def test_type_change_stops_old_type_actors(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    # The API client cannot change a type, so the daemon's two messages for
    # one (docs/scheduling.md: a type change while running) are encoded here and published as is.
    before = core(900, type="OLD", start=0, duration=3600, microgrid_id=MG)
    after = replace(before, type="NEW", update_time=before.update_time + timedelta(seconds=1))
    messages = [
        running_message(before, 1),
        running_message(before, 2, event=Event.STOPPED, reason=Reason.TYPE_CHANGED),
        running_message(after, 3, reason=Reason.RECONFIGURED),
    ]
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        old = await dispatcher.new_running_state_event_receiver("OLD")
        new = await dispatcher.new_running_state_event_receiver("NEW")
        await publish(amqp_url, exchange, [wire.encode(m) for m in messages])
        got = await take(old, 2)
        assert [d.running("OLD") for d in got] == [RunningState.RUNNING, RunningState.STOPPED]
        assert got[1].announced is not None
        assert got[1].announced.reason is Reason.TYPE_CHANGED
        [running] = await take(new, 1)
        assert running.running("NEW") is RunningState.RUNNING
        assert running.running("OLD") is RunningState.DIFFERENT_TYPE
        await expect_quiet(old, 0.2)


async def publish(amqp_url: str, exchange: str, envelopes: list[wire.Envelope]) -> None:
    """Publish encoded messages to the exchange as the daemon would."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange)
        for envelope in envelopes:
            await target.publish(
                aio_pika.Message(
                    envelope.body,
                    message_id=envelope.message_id,
                    headers=dict(envelope.headers),
                    content_type=wire.CONTENT_TYPE,
                    type=envelope.type,
                ),
                routing_key=envelope.routing_key,
            )


async def test_merge_by_type_over_overlaps_and_dry_run(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        merged = await dispatcher.new_running_state_event_receiver("M", MergeByType())
        plain = await dispatcher.new_running_state_event_receiver("M")
        a = await create(daemon.client, "M", start_in=0.5, duration=2.5)
        b = await create(daemon.client, "M", start_in=1.0, duration=1.0)
        dry = await create(daemon.client, "M", start_in=1.2, duration=0.5, dry_run=True)
        got = await take(merged, 5)
        assert states(got, "M") == [
            (int(a.id), "RUNNING"),
            (int(b.id), "RUNNING"),  # a running update: the actor gets B's data
            (int(dry.id), "RUNNING"),  # dry run: another identity, not merged
            (int(dry.id), "STOPPED"),
            (int(a.id), "STOPPED"),  # B's stop was held back while A ran
        ]
        await expect_quiet(merged, 0.2)
        assert len(await take(plain, 6)) == 6


async def test_republished_messages_are_dropped(
    amqp_url: str, exchange: str, daemon: DaemonHandle, observer: QueueObserver
) -> None:
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        running = dispatcher.running_status_change.new_receiver()
        lifecycle = dispatcher.lifecycle_events.new_receiver()
        first = await create(daemon.client, start_in=0.2, duration=0.3)
        await take(running, 2)
        await take(lifecycle, 1)
        # The observer's queue is not the SDK's: wait for its copy of the stop.
        await observer.seen(
            lambda r: r.dispatch_id == int(first.id) and ".running.stopped." in r.routing_key,
            5,
        )
        originals = observer.of(int(first.id))
        assert len(originals) == 3
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            for received in originals:
                await target.publish(
                    aio_pika.Message(
                        received.body,
                        message_id=received.message_id,
                        headers=dict(received.headers),
                        content_type=received.content_type,
                    ),
                    routing_key=received.routing_key,
                )
        second = await create(daemon.client, start_in=0.2, duration=0.3)
        # The copies were queued before the new messages: had they passed,
        # they would come first.
        assert states(await take(running, 2)) == [
            (int(second.id), "RUNNING"),
            (int(second.id), "STOPPED"),
        ]
        [event] = await take(lifecycle, 1)
        assert isinstance(event, Created) and event.dispatch.id == int(second.id)


async def test_malformed_message_is_rejected_to_the_dead_letter_queue_and_receivers_go_on(
    amqp_url: str,
    exchange: str,
    daemon: DaemonHandle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="dispatchd.client")
    queue_name = f"{exchange}.actor"
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        dlx = await channel.declare_exchange(f"{exchange}.dlx", aio_pika.ExchangeType.FANOUT)
        dead = await channel.declare_queue(exclusive=True)
        await dead.bind(dlx)
        try:
            async with Dispatcher(
                MG,
                amqp_url,
                exchange=exchange,
                queue=queue_name,
                queue_arguments={"x-dead-letter-exchange": dlx.name},
            ) as dispatcher:
                running = dispatcher.running_status_change.new_receiver()
                target = await channel.get_exchange(exchange)
                for message_id, body in (
                    ("garbage-utf8", b"\xff not utf-8"),
                    ("garbage-kind", b'{"schema": "dispatchd/v1", "kind": "x"}'),
                ):
                    await target.publish(
                        aio_pika.Message(body, message_id=message_id),
                        routing_key=f"microgrid.{MG}.running.running.T",
                    )
                after = await create(daemon.client, start_in=0.2, duration=0.2)
                assert states(await take(running, 2)) == [
                    (int(after.id), "RUNNING"),
                    (int(after.id), "STOPPED"),
                ]
            dead_letters: list[str | None] = []
            async with asyncio.timeout(5):
                async with dead.iterator() as messages:
                    async for message in messages:
                        await message.ack()
                        dead_letters.append(message.message_id)
                        if len(dead_letters) == 2:
                            break
            assert set(dead_letters) == {"garbage-kind", "garbage-utf8"}
            logged = " ".join(r.getMessage() for r in caplog.records)
            assert "garbage-utf8" in logged and "garbage-kind" in logged
        finally:
            await channel.queue_delete(queue_name)
            await channel.exchange_delete(dlx.name)


async def test_snapshot_errors_are_clear(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    with pytest.raises(SnapshotError) as refused:
        await Dispatcher(99, amqp_url, exchange=exchange).start()
    assert refused.value.code == "unknown_microgrid"
    nobody = Dispatcher(MG, amqp_url, exchange=f"{exchange}.nobody", snapshot_timeout=5)
    async with asyncio.timeout(4):  # fails fast: the request is returned unroutable
        with pytest.raises(SnapshotError, match="nobody serves"):
            await nobody.start()
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await channel.exchange_delete(f"{exchange}.nobody")


async def test_client_needs_api_url_and_stop_ends_receivers(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    without = Dispatcher(MG, amqp_url, exchange=exchange)
    with pytest.raises(RuntimeError, match="api_url"):
        _ = without.client
    assert daemon.daemon.api_url is not None
    dispatcher = Dispatcher(MG, amqp_url, exchange=exchange, api_url=daemon.daemon.api_url)
    await dispatcher.start()
    receiver = dispatcher.running_status_change.new_receiver()
    lifecycle = dispatcher.lifecycle_events.new_receiver()
    created = await dispatcher.client.create(mg(), "T", soon(60), None, TargetIds(3))
    events = await take_until(
        lifecycle, lambda got: any(e.dispatch.id == int(created.id) for e in got)
    )
    assert isinstance(events[-1], Created)
    await dispatcher.stop()
    with pytest.raises(ReceiverStoppedError):
        await asyncio.wait_for(receiver.receive(), 5)
    with pytest.raises(RuntimeError):
        await dispatcher.new_running_state_event_receiver("T")


async def test_a_receiver_created_later_starts_with_what_runs_now(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        first = dispatcher.running_status_change.new_receiver()
        long = await create(daemon.client, start_in=0.2, duration=30)
        [started] = await take(first, 1)
        later = dispatcher.running_status_change.new_receiver()
        [primed] = await take(later, 1)
        assert primed == started
        typed = await dispatcher.new_running_state_event_receiver("T")
        [from_snapshot] = await take(typed, 1)
        assert (from_snapshot.id, from_snapshot.running("T")) == (
            int(long.id),
            RunningState.RUNNING,
        )
        assert isinstance(from_snapshot, Dispatch)


async def test_a_slow_running_receiver_coalesces_and_never_loses_a_stop(
    amqp_url: str, exchange: str, daemon: DaemonHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatchd.client")
    async with Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher:
        slow = dispatcher.running_status_change.new_receiver(name="slow", limit=2)
        fast = dispatcher.running_status_change.new_receiver(name="fast")
        first = await create(daemon.client, start_in=0.2, duration=0.2)
        second = await create(daemon.client, start_in=0.3, duration=0.3)
        everything = await take(fast, 4)
        assert sorted(states(everything)) == [
            (int(first.id), "RUNNING"),
            (int(first.id), "STOPPED"),
            (int(second.id), "RUNNING"),
            (int(second.id), "STOPPED"),
        ]
        # The slow one kept the newest message of each dispatch, in order of
        # arrival: both stops (dropping the oldest would have lost the first).
        kept = await take(slow, 2)
        assert kept == [d for d in everything if d.running("T") is RunningState.STOPPED]
        await expect_quiet(slow, 0.1)
        assert dispatcher.delivery_counts.coalesced == 2
        coalesced = [r for r in caplog.records if "coalesced" in r.getMessage()]
        assert len(coalesced) == 2 and all("slow" in r.getMessage() for r in coalesced)


async def test_a_by_rule_without_frequency_never_runs_in_daemon_or_sdk(
    amqp_url: str, exchange: str, observer: QueueObserver, tmp_path: Path
) -> None:
    # The local API refuses such a rule, a real API may not: script one.
    malformed_rule = PBRecurrenceRule(freq=PBRecurrenceRule.FREQUENCY_UNSPECIFIED, byhours=[8])
    second = timedelta(seconds=1)
    async with (
        ScriptedApi() as api,
        running_daemon(tmp_path, amqp_url, exchange, api_url=api.url),
        Dispatcher(MG, amqp_url, exchange=exchange) as dispatcher,
    ):
        running = dispatcher.running_status_change.new_receiver()
        lifecycle = dispatcher.lifecycle_events.new_receiver()
        malformed = dispatch_pb(1, "T", soon(0.5), second, recurrence=malformed_rule)
        control = dispatch_pb(2, "T", soon(1.0), second)
        for created in (malformed, control):
            api.put(created)
            await api.push(CREATED, created)
        [first, _] = await take(lifecycle, 2)
        assert first.dispatch.id == 1 and first.dispatch.recurrence.byhours == [8]
        assert not first.dispatch.started_at(first.dispatch.start_time)
        # Only the control dispatch runs: the malformed one is no one-off.
        assert states(await take(running, 2)) == [(2, "RUNNING"), (2, "STOPPED")]
        await expect_quiet(running, 0.3)
    assert [r.event for r in observer.of(1)] == ["created"]
