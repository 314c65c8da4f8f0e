"""One writer per exchange, at the RPC consumer: the broker decides who may serve.

With the SQLite store the snapshot RPC queue is consumed exclusively; a cluster
replica consumes it non-exclusively. RabbitMQ refuses either beside the other
(``ACCESS_REFUSED ... in exclusive use``), and the refused side gets one error
that names the exchange. The publisher sends nothing before the consumer is held.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from dispatchd.publisher import Publisher
from dispatchd.rpc import ExchangeTaken, SnapshotRpc
from dispatchd.store import SqliteStore
from tests.shell.test_publisher import BROKER_URL, commit, make_envelope


@pytest.fixture
async def exchange() -> AsyncIterator[str]:
    name = f"test-rpc-exclusive-{uuid.uuid4().hex[:12]}"
    yield name
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{name}.rpc")
        await channel.exchange_delete(name)


def make_rpc(exchange: str, *, exclusive: bool) -> SnapshotRpc:
    return SnapshotRpc(
        amqp_url=BROKER_URL,
        exchange=exchange,
        microgrid_ids=[7],
        snapshot=lambda _microgrid_id, _type: [],
        synced=lambda _microgrid_id: True,
        exclusive=exclusive,
        reconnect_interval=0.1,
    )


@pytest.mark.parametrize(
    ("first_exclusive", "second_exclusive", "says"),
    [
        (True, True, "only one process may run per exchange"),
        (True, False, "a cluster replica cannot run beside it"),
        (False, True, "only one process may run per exchange"),
    ],
)
async def test_the_second_consumer_is_refused_with_the_exchange_named(
    exchange: str, first_exclusive: bool, second_exclusive: bool, says: str
) -> None:
    first = make_rpc(exchange, exclusive=first_exclusive)
    second = make_rpc(exchange, exclusive=second_exclusive)
    await first.start()
    try:
        assert first.consuming.is_set()
        with pytest.raises(ExchangeTaken) as refused:
            await second.start()
        assert f"exchange {exchange!r}" in str(refused.value)
        assert says in str(refused.value)
        assert "\n" not in str(refused.value)
        assert not second.consuming.is_set()
    finally:
        await second.close()
        await first.close()


async def test_replicas_share_the_queue(exchange: str) -> None:
    replicas = [make_rpc(exchange, exclusive=False) for _ in range(3)]
    try:
        for replica in replicas:
            await replica.start()
        assert all(replica.consuming.is_set() for replica in replicas)
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_refusal_found_in_the_background_comes_out_of_wait_fatal(exchange: str) -> None:
    first = make_rpc(exchange, exclusive=True)
    second = make_rpc(exchange, exclusive=True)
    await first.start()
    try:
        await second.start(wait=False)
        async with asyncio.timeout(30):
            error = await second.wait_fatal()
        assert f"exchange {exchange!r}" in str(error)
    finally:
        await second.close()
        await first.close()


async def test_the_publisher_sends_nothing_while_another_process_holds_the_exchange(
    exchange: str, tmp_path: Path
) -> None:
    holder = make_rpc(exchange, exclusive=True)
    store = SqliteStore(tmp_path / "state.sqlite3")
    left_by_a_previous_run = await commit(store, [make_envelope(d, 0) for d in range(50)])
    assert len(left_by_a_previous_run) == 50
    await holder.start()
    rpc = make_rpc(exchange, exclusive=True)
    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange, store=store, may_send=rpc.consuming
    )
    try:
        await publisher.start()  # connected: without the gate it would send at once
        assert publisher.connected
        with pytest.raises(ExchangeTaken):
            await rpc.start()
    finally:
        await publisher.close(1)
        await rpc.close()
        await holder.close()
    assert await store.outbox_size() == 50
    await store.close()
