"""Nothing is lost across a broker connection cut or while a durable actor is down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from dispatchd.client import Created, Dispatch, Dispatcher
from tests.client.receiver_helpers import create, expect_quiet, states, take, take_until
from tests.shell.daemon_harness import MG, DaemonHandle, QueueObserver, mg
from tests.tcpproxy import TcpProxy


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the broker, to cut the SDK's connection."""
    parts = urlsplit(amqp_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as running:
        yield running


def through(amqp_url: str, proxy: TcpProxy) -> str:
    """The broker URL via the proxy, reconnecting quickly."""
    parts = urlsplit(amqp_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "reconnect_interval=0.2", ""))


async def cut_while(
    proxy: TcpProxy, daemon: DaemonHandle, observer: QueueObserver
) -> tuple[int, int]:
    """With the SDK cut off: one dispatch ends, one begins, one runs and ends.

    Returns their ids (ending, beginning, short). The caller has seen the
    ending one running before.
    """
    await proxy.refuse()
    begins = await create(daemon.client, start_in=0.2, duration=30)
    short = await create(daemon.client, start_in=0.2, duration=0.2)
    await observer.wait_for(lambda r: r.is_(int(short.id), "stopped"), 5)
    return int(begins.id), int(short.id)


async def test_private_queue_re_asks_the_snapshot_after_a_cut(
    amqp_url: str,
    exchange: str,
    daemon: DaemonHandle,
    observer: QueueObserver,
    proxy: TcpProxy,
) -> None:
    async with Dispatcher(MG, through(amqp_url, proxy), exchange=exchange) as dispatcher:
        running = dispatcher.running_status_change.new_receiver()
        typed = await dispatcher.new_running_state_event_receiver("T")
        ending = await create(daemon.client, start_in=0.2, duration=1.5)
        assert states(await take(running, 1)) == [(int(ending.id), "RUNNING")]
        assert states(await take(typed, 1)) == [(int(ending.id), "RUNNING")]
        begins, _ = await cut_while(proxy, daemon, observer)
        await observer.wait_for(lambda r: r.is_(int(ending.id), "stopped"), 5)
        await proxy.accept()
        # The private queue missed everything; the snapshot tells the state:
        # the ended one stopped, the new one runs. (The short one began and
        # ended unseen: only a durable queue can tell that.)
        for receiver in (running, typed):
            got = await take(receiver, 2, timeout=15)
            assert states(got) == [(int(ending.id), "STOPPED"), (begins, "RUNNING")]
            assert all(d.announced is not None and d.announced.from_snapshot for d in got)
        # Live messages flow again after the recovery.
        after = await create(daemon.client, start_in=0.2, duration=0.2)
        assert states(await take(running, 2)) == [
            (int(after.id), "RUNNING"),
            (int(after.id), "STOPPED"),
        ]


async def test_durable_queue_keeps_every_message_across_a_cut(
    amqp_url: str,
    exchange: str,
    daemon: DaemonHandle,
    observer: QueueObserver,
    proxy: TcpProxy,
) -> None:
    queue = f"{exchange}.durable"
    try:
        async with Dispatcher(
            MG, through(amqp_url, proxy), exchange=exchange, queue=queue
        ) as dispatcher:
            running = dispatcher.running_status_change.new_receiver()
            lifecycle = dispatcher.lifecycle_events.new_receiver()
            ending = await create(daemon.client, start_in=0.2, duration=1.5)
            assert states(await take(running, 1)) == [(int(ending.id), "RUNNING")]
            begins, short = await cut_while(proxy, daemon, observer)
            await observer.wait_for(lambda r: r.is_(int(ending.id), "stopped"), 5)
            await proxy.accept()
            got = await take(running, 4, timeout=15)
            assert sorted(states(got)) == sorted(
                [
                    (int(ending.id), "STOPPED"),
                    (begins, "RUNNING"),
                    (short, "RUNNING"),
                    (short, "STOPPED"),
                ]
            )
            assert not any(d.announced is not None and d.announced.from_snapshot for d in got)
            events = await take_until(lifecycle, lambda e: len(e) >= 3, timeout=10)
            assert [(type(e), e.dispatch.id) for e in events] == [
                (Created, int(ending.id)),
                (Created, begins),
                (Created, short),
            ]
    finally:
        await delete_queue(amqp_url, queue)


async def test_durable_queue_keeps_messages_while_the_actor_is_down(
    amqp_url: str, exchange: str, daemon: DaemonHandle, observer: QueueObserver
) -> None:
    queue = f"{exchange}.actor"
    try:
        async with Dispatcher(MG, amqp_url, exchange=exchange, queue=queue):
            pass
        # The actor is down: one dispatch is created for later, one starts.
        later = await create(daemon.client, start_in=600)
        now = await create(daemon.client, start_in=0.2, duration=30)
        await observer.wait_for(lambda r: r.is_(int(now.id), "running"), 5)
        async with Dispatcher(MG, amqp_url, exchange=exchange, queue=queue) as dispatcher:
            running = dispatcher.running_status_change.new_receiver()
            lifecycle = dispatcher.lifecycle_events.new_receiver()
            events = await take(lifecycle, 2)
            assert [(type(e), e.dispatch.id) for e in events] == [
                (Created, int(later.id)),
                (Created, int(now.id)),
            ]
            # Running once: from the snapshot; the queued running message is
            # a duplicate of it (same sequence) and is dropped.
            [started] = await take(running, 1)
            assert isinstance(started, Dispatch)
            assert states([started]) == [(int(now.id), "RUNNING")]
            await daemon.client.delete(microgrid_id=mg(), dispatch_id=now.id)
            [stopped] = await take(running, 1)
            assert states([stopped]) == [(int(now.id), "STOPPED")] and stopped.deleted
    finally:
        await delete_queue(amqp_url, queue)


async def delete_queue(amqp_url: str, queue: str) -> None:
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


async def test_durable_backlog_is_delivered_in_order_then_the_snapshot_fills_in(
    amqp_url: str, exchange: str, daemon: DaemonHandle, observer: QueueObserver
) -> None:
    """A one-shot (duration 0) that ran entirely while the actor was down still reaches it."""
    queue = f"{exchange}.actor"
    typed_queue = f"{queue}.running.T"
    try:
        # Already running when the actor first starts: only the snapshot knows it.
        before = await create(daemon.client, start_in=0.1, duration=60)
        await observer.wait_for(lambda r: r.is_(int(before.id), "running"), 5)
        async with Dispatcher(MG, amqp_url, exchange=exchange, queue=queue) as dispatcher:
            typed = await dispatcher.new_running_state_event_receiver("T")
            assert states(await take(typed, 1)) == [(int(before.id), "RUNNING")]
        # The actor is down: a one-shot runs and a long one starts.
        one_shot = await create(daemon.client, start_in=0.2, duration=0)
        long = await create(daemon.client, start_in=0.4, duration=60)
        await observer.wait_for(lambda r: r.is_(int(long.id), "running"), 5)
        assert await queue_depth(amqp_url, typed_queue) == 3
        async with Dispatcher(MG, amqp_url, exchange=exchange, queue=queue) as dispatcher:
            typed = await dispatcher.new_running_state_event_receiver("T")
            got = await take(typed, 4)
            assert states(got) == [
                (int(one_shot.id), "RUNNING"),
                (int(one_shot.id), "STOPPED"),
                (int(long.id), "RUNNING"),
                (int(before.id), "RUNNING"),  # the snapshot fills in what the backlog lacks
            ]
            assert [d.announced.scheduled_for for d in got[:3] if d.announced] == [
                one_shot.start_time,
                one_shot.start_time,
                long.start_time,
            ]
            assert got[3].announced is not None and got[3].announced.from_snapshot
            await expect_quiet(typed, 0.3)  # the snapshot's copy of the long one is dropped
            # Live messages follow, deduplicated as before.
            await daemon.client.delete(microgrid_id=mg(), dispatch_id=long.id)
            assert states(await take(typed, 1)) == [(int(long.id), "STOPPED")]
    finally:
        await delete_queue(amqp_url, queue)
        await delete_queue(amqp_url, typed_queue)


async def test_durable_backlog_reaches_the_main_running_receiver_too(
    amqp_url: str, exchange: str, daemon: DaemonHandle, observer: QueueObserver
) -> None:
    queue = f"{exchange}.actor"
    try:
        async with Dispatcher(MG, amqp_url, exchange=exchange, queue=queue):
            pass
        one_shot = await create(daemon.client, start_in=0.2, duration=0)
        await observer.wait_for(lambda r: r.is_(int(one_shot.id), "stopped"), 5)
        async with Dispatcher(MG, amqp_url, exchange=exchange, queue=queue) as dispatcher:
            running = dispatcher.running_status_change.new_receiver()
            assert states(await take(running, 2)) == [
                (int(one_shot.id), "RUNNING"),
                (int(one_shot.id), "STOPPED"),
            ]
            [created] = await take(dispatcher.lifecycle_events.new_receiver(), 1)
            assert isinstance(created, Created) and created.dispatch.id == int(one_shot.id)
            await expect_quiet(running, 0.2)
    finally:
        await delete_queue(amqp_url, queue)


async def queue_depth(amqp_url: str, queue: str) -> int:
    """How many messages the queue holds (what ``rabbitmqctl list_queues`` shows)."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
