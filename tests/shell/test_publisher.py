"""The publisher against the real RabbitMQ, directly and through a TCP proxy that cuts it off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from dispatchd import memory, metrics
from dispatchd import publisher as publisher_module
from dispatchd.batchpublish import Outgoing
from dispatchd.core.wire import APP_ID, CONTENT_TYPE, Envelope
from dispatchd.publisher import CLOSE_GRACE, ExchangeTypeMismatch, Publisher
from dispatchd.store import OutboxItem, SqliteStore
from tests.shell.daemon_harness import poll
from tests.tcpproxy import TcpProxy

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/"


def proxied_url(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


def make_envelope(
    dispatch_id: int,
    n: int,
    *,
    microgrid_id: int = 7,
    event: str = "running",
    dispatch_type: str = "PEAK_SHAVING",
) -> Envelope:
    kind = "lifecycle" if event in ("created", "updated", "deleted") else "running"
    return Envelope(
        message_id=f"{microgrid_id}-{dispatch_id}-{n}",
        routing_key=f"microgrid.{microgrid_id}.{kind}.{event}.{dispatch_type}",
        body=json.dumps({"dispatch_id": dispatch_id, "n": n}).encode(),
        headers={
            "microgrid_id": microgrid_id,
            "dispatch_id": dispatch_id,
            "dispatch_type": dispatch_type,
            "event": event,
            "schema": "dispatchd/v1",
        },
        type=f"dispatch.{kind}",
        microgrid_id=microgrid_id,
        dispatch_id=dispatch_id,
    )


def interleaved(dispatches: int, per_dispatch: int) -> list[Envelope]:
    """``per_dispatch`` numbered messages for each dispatch, interleaved as an engine would."""
    return [make_envelope(d, n) for n in range(per_dispatch) for d in range(dispatches)]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Consumer:
    """Collects every message on the exchange, in arrival order."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()

    async def wait_ids(self, ids: Iterable[str], within: float = 30.0) -> None:
        wanted = set(ids)
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(
                lambda: wanted <= {m.message_id for m in self.messages if m.message_id}
            )

    def numbers_per_dispatch(self) -> dict[int, list[int]]:
        seen: dict[int, list[int]] = {}
        for message in self.messages:
            body = json.loads(message.body)
            # A republished message carries exactly the id of the original.
            assert message.message_id == f"7-{body['dispatch_id']}-{body['n']}"
            seen.setdefault(body["dispatch_id"], []).append(body["n"])
        return seen


def assert_in_order_without_loss(consumer: Consumer, dispatches: int, per_dispatch: int) -> None:
    """Per dispatch, first arrivals are 0..n-1 in order; duplicates only repeat earlier ones."""
    seen = consumer.numbers_per_dispatch()
    assert set(seen) == set(range(dispatches))
    for numbers in seen.values():
        first_arrivals = list(dict.fromkeys(numbers))
        assert first_arrivals == list(range(per_dispatch))


@pytest.fixture
async def exchange_name() -> AsyncIterator[str]:
    name = f"test-publisher-{uuid.uuid4().hex[:12]}"
    yield name
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)


@pytest.fixture
async def broker() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(BROKER_URL)
    async with connection:
        yield connection


@pytest.fixture
async def consumer(broker: AbstractRobustConnection, exchange_name: str) -> Consumer:
    """A queue bound to every routing key of the exchange (declared first, as an actor would)."""
    channel = await broker.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, "microgrid.#")
    collected = Consumer()
    await queue.consume(collected.on_message, no_ack=True)
    return collected


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "state.sqlite3")


async def commit(store: SqliteStore, envelopes: list[Envelope]) -> list[OutboxItem]:
    return await store.commit(envelopes=envelopes)


async def test_message_carries_every_wire_property(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    assert publisher.connected
    assert publisher.last_error is None
    assert sample("dispatchd_broker_up") == 1
    before = sample("dispatchd_messages_published_total", kind="lifecycle", event="created")
    envelope = make_envelope(3, 0, event="created")
    publisher.submit(await commit(store, [envelope]))
    await consumer.wait_ids([envelope.message_id])
    assert await publisher.wait_idle(10)
    await publisher.close(5)

    (message,) = consumer.messages
    assert message.routing_key == envelope.routing_key
    assert message.body == envelope.body
    assert message.content_type == CONTENT_TYPE == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == envelope.message_id
    assert message.type == "dispatch.lifecycle"
    assert message.app_id == APP_ID == "dispatchd"
    assert message.headers == envelope.headers
    assert message.timestamp is not None
    assert abs(message.timestamp.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=30)
    assert store.count_outbox() == 0
    assert sample("dispatchd_outbox_messages") == 0
    after = sample("dispatchd_messages_published_total", kind="lifecycle", event="created")
    assert after == before + 1


async def test_a_thousand_messages_are_pipelined_and_ordered_per_dispatch(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange_name, store=store, max_in_flight=200
    )
    await publisher.start()
    envelopes = interleaved(dispatches=10, per_dispatch=100)
    for start in range(0, len(envelopes), 50):
        publisher.submit(await commit(store, envelopes[start : start + 50]))
    assert await publisher.wait_idle(60)
    await consumer.wait_ids(e.message_id for e in envelopes)
    await publisher.close(5)

    assert len(consumer.messages) == 1000  # no failure, so no duplicate either
    assert_in_order_without_loss(consumer, dispatches=10, per_dispatch=100)
    assert 1 < publisher.window.peak_in_flight <= 10  # one per dispatch at a time
    assert publisher.window.rounds == 1
    assert store.count_outbox() == 0


class RecordingStore(SqliteStore):
    """Records each batch the publisher removes from the outbox."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.removed_batches: list[list[int]] = []

    async def remove_from_outbox(self, seqs: Iterable[int]) -> None:
        batch = list(seqs)
        self.removed_batches.append(batch)
        await super().remove_from_outbox(batch)


async def test_a_burst_leaves_the_outbox_in_one_removal_after_its_last_confirm(
    tmp_path: Path, consumer: Consumer, exchange_name: str
) -> None:
    store = RecordingStore(tmp_path / "state.sqlite3")
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    burst = [make_envelope(d, 0) for d in range(1000)]
    items = await commit(store, burst)
    publisher.submit(items)
    assert await publisher.wait_idle(60)
    await consumer.wait_ids(e.message_id for e in burst)
    await publisher.close(5)

    assert publisher.window.rounds == 1
    # No removal (a commit with an fsync, in a thread) competes with the sends mid-burst.
    assert [sorted(batch) for batch in store.removed_batches] == [[i.seq for i in items]]
    assert store.count_outbox() == 0


async def test_a_burst_goes_to_the_broker_in_writes_of_many_messages_in_seq_order(
    store: SqliteStore,
    consumer: Consumer,
    exchange_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[list[str]] = []
    publish_batch = publisher_module.batchpublish.publish_batch

    async def recording(
        channel: Any, exchange: str, messages: Sequence[Outgoing], *, mandatory: bool
    ) -> list[asyncio.Future[object]]:
        batches.append([str(m.properties.message_id) for m in messages])
        return await publish_batch(channel, exchange, messages, mandatory=mandatory)

    monkeypatch.setattr(publisher_module.batchpublish, "publish_batch", recording)
    monkeypatch.setattr(publisher_module, "PUBLISH_BATCH", 300)
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    burst = [make_envelope(d, 0) for d in range(1000)]
    publisher.submit(await commit(store, burst))
    assert await publisher.wait_idle(60)
    await consumer.wait_ids(e.message_id for e in burst)
    await publisher.close(5)

    # Everything submitted at once is taken in one go, at most PUBLISH_BATCH a write.
    assert [len(batch) for batch in batches] == [300, 300, 300, 100]
    assert [m for batch in batches for m in batch] == [e.message_id for e in burst]
    assert [m.message_id for m in consumer.messages] == [e.message_id for e in burst]
    assert store.count_outbox() == 0


async def test_a_write_stops_taking_messages_once_it_holds_enough_bytes(
    store: SqliteStore,
    consumer: Consumer,
    exchange_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    publish_batch = publisher_module.batchpublish.publish_batch

    async def recording(
        channel: Any, exchange: str, messages: Sequence[Outgoing], *, mandatory: bool
    ) -> list[asyncio.Future[object]]:
        sizes.append(len(messages))
        return await publish_batch(channel, exchange, messages, mandatory=mandatory)

    monkeypatch.setattr(publisher_module.batchpublish, "publish_batch", recording)
    large = [make_envelope(d, 0) for d in range(10)]
    for index, envelope in enumerate(large):
        large[index] = dataclasses.replace(envelope, body=b"x" * 1000)
    monkeypatch.setattr(publisher_module, "PUBLISH_BATCH_BYTES", 2500)
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    publisher.submit(await commit(store, large))
    assert await publisher.wait_idle(60)
    await consumer.wait_ids(e.message_id for e in large)
    await publisher.close(5)

    # The message that reaches the limit is the write's last: 3 x 1000 bytes each.
    assert sizes == [3, 3, 3, 1]
    assert [m.body for m in consumer.messages] == [b"x" * 1000] * 10


async def test_once_a_large_backlog_is_out_the_idle_publisher_gives_its_memory_back(
    store: SqliteStore,
    consumer: Consumer,
    exchange_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(publisher_module, "TRIM_AFTER", 100)
    monkeypatch.setattr(memory, "settle", lambda: calls.append("settle"))
    monkeypatch.setattr(memory, "trim", lambda: calls.append("trim"))
    release_page_cache = store.release_memory

    async def release_memory() -> None:
        calls.append("release the store's cache")
        await release_page_cache()

    monkeypatch.setattr(store, "release_memory", release_memory)
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    few = [make_envelope(d, 0) for d in range(99)]
    publisher.submit(await commit(store, few))
    assert await publisher.wait_idle(30)
    assert calls == []  # below TRIM_AFTER: nothing to give back
    more = [make_envelope(d, 1) for d in range(99)]
    publisher.submit(await commit(store, more))
    assert await publisher.wait_idle(30)
    await consumer.wait_ids(e.message_id for e in few + more)
    await publisher.close(5)
    # Reading the backlog back and deleting it filled SQLite's page cache: it goes first.
    assert calls == ["release the store's cache", "settle", "trim"]


async def test_in_flight_is_bounded_globally_and_per_dispatch(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    publisher = Publisher(
        amqp_url=BROKER_URL,
        exchange=exchange_name,
        store=store,
        max_in_flight=200,
        max_in_flight_per_dispatch=3,
    )
    await publisher.start()
    many_dispatches = [make_envelope(d, 0) for d in range(1000)]
    publisher.submit(await commit(store, many_dispatches))
    assert await publisher.wait_idle(60)
    assert publisher.window.peak_in_flight == 200

    publisher.window.peak_in_flight = 0
    one_dispatch = [make_envelope(1000, n) for n in range(60)]
    publisher.submit(await commit(store, one_dispatch))
    assert await publisher.wait_idle(60)
    assert publisher.window.peak_in_flight == 3
    await consumer.wait_ids(e.message_id for e in many_dispatches + one_dispatch)
    await publisher.close(5)
    assert len(consumer.messages) == 1060
    assert [json.loads(m.body)["n"] for m in consumer.messages[1000:]] == list(range(60))


async def test_unroutable_messages_are_counted_and_removed(
    store: SqliteStore, exchange_name: str
) -> None:
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    unroutable_before = sample("dispatchd_messages_unroutable_total", kind="running")
    published_before = sample("dispatchd_messages_published_total", kind="running", event="running")
    publisher.submit(await commit(store, [make_envelope(1, n) for n in range(3)]))
    assert await publisher.wait_idle(10)
    await publisher.close(5)
    assert store.count_outbox() == 0
    unroutable = sample("dispatchd_messages_unroutable_total", kind="running") - unroutable_before
    published = (
        sample("dispatchd_messages_published_total", kind="running", event="running")
        - published_before
    )
    assert (unroutable, published) == (3, 0)
    assert publisher.window.rounds == 1  # returned messages are not retried


async def test_an_exchange_of_another_type_is_a_clear_start_error(
    store: SqliteStore, broker: AbstractRobustConnection, exchange_name: str
) -> None:
    channel = await broker.channel()
    await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT, durable=True)
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    with pytest.raises(ExchangeTypeMismatch) as error:
        await publisher.start()
    text = str(error.value)
    assert "\n" not in text
    assert exchange_name in text
    assert "PRECONDITION_FAILED" in text
    assert not publisher.connected


async def test_broker_cut_while_publishing_loses_nothing_and_keeps_order(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        publisher = Publisher(
            amqp_url=proxied_url(proxy),
            exchange=exchange_name,
            store=store,
            reconnect_interval=0.1,
            max_backoff=0.5,
            publish_timeout=5,
            max_in_flight=300,
        )
        await publisher.start()
        dispatches, per_dispatch = 8, 250
        envelopes = interleaved(dispatches, per_dispatch)
        batches = [envelopes[i : i + 100] for i in range(0, len(envelopes), 100)]
        half = len(batches) // 2
        for batch in batches[:half]:
            publisher.submit(await commit(store, batch))
        await poll(lambda: store.count_outbox() < 900)
        await proxy.refuse()
        for batch in batches[half:]:
            publisher.submit(await commit(store, batch))
        await poll(lambda: not publisher.connected)
        assert publisher.last_error is not None
        assert sample("dispatchd_broker_up") == 0
        assert store.count_outbox() > 0
        await proxy.accept()
        assert await publisher.wait_idle(60)
        await consumer.wait_ids(e.message_id for e in envelopes)
        assert publisher.connected
        assert sample("dispatchd_broker_up") == 1
        await publisher.close(5)

    assert publisher.window.rounds >= 2
    assert_in_order_without_loss(consumer, dispatches, per_dispatch)
    assert store.count_outbox() == 0
    assert sample("dispatchd_outbox_messages") == 0


async def test_unreachable_at_start_then_connects_when_the_broker_appears(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        await proxy.refuse()
        publisher = Publisher(
            amqp_url=proxied_url(proxy),
            exchange=exchange_name,
            store=store,
            reconnect_interval=0.05,
            max_backoff=0.2,
        )
        await publisher.start()  # returns although nothing is reachable
        assert not publisher.connected
        assert publisher.last_error is not None
        assert "unreachable" in publisher.last_error
        assert sample("dispatchd_broker_up") == 0
        envelopes = [make_envelope(0, n) for n in range(5)]
        publisher.submit(await commit(store, envelopes))
        assert not await publisher.wait_idle(0.2)
        assert store.count_outbox() == 5

        await proxy.accept()
        assert await publisher.wait_connected(10)
        assert publisher.last_error is None
        assert await publisher.wait_idle(10)
        await consumer.wait_ids(e.message_id for e in envelopes)
        await publisher.close(5)
    assert_in_order_without_loss(consumer, dispatches=1, per_dispatch=5)


async def test_outbox_left_by_a_previous_run_is_published_first(
    tmp_path: Path, consumer: Consumer, exchange_name: str
) -> None:
    path = tmp_path / "state.sqlite3"
    previous = SqliteStore(path)
    await commit(previous, [make_envelope(1, n) for n in range(3)])
    await previous.close()

    store = SqliteStore(path)
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    publisher.submit(await commit(store, [make_envelope(1, n) for n in range(3, 6)]))
    assert await publisher.wait_idle(10)
    await consumer.wait_ids(f"7-1-{n}" for n in range(6))
    await publisher.close(5)
    assert [json.loads(m.body)["n"] for m in consumer.messages] == list(range(6))
    assert store.count_outbox() == 0


async def test_close_drains_what_was_submitted(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    publisher = Publisher(amqp_url=BROKER_URL, exchange=exchange_name, store=store)
    await publisher.start()
    envelopes = interleaved(dispatches=5, per_dispatch=100)
    publisher.submit(await commit(store, envelopes))
    await publisher.close(30)
    assert store.count_outbox() == 0
    await consumer.wait_ids(e.message_id for e in envelopes)
    assert_in_order_without_loss(consumer, dispatches=5, per_dispatch=100)


async def test_close_with_the_broker_gone_keeps_the_outbox(
    store: SqliteStore, exchange_name: str
) -> None:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        publisher = Publisher(
            amqp_url=proxied_url(proxy),
            exchange=exchange_name,
            store=store,
            reconnect_interval=0.05,
            max_backoff=0.2,
        )
        await publisher.start()
        await proxy.refuse()
        await poll(lambda: not publisher.connected)
        publisher.submit(await commit(store, [make_envelope(1, n) for n in range(4)]))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await publisher.close(0.3)
        assert loop.time() - started < 5
    assert [item.envelope.message_id for item in await store.outbox()] == [
        f"7-1-{n}" for n in range(4)
    ]


async def test_a_broker_that_stops_confirming_times_out_and_gets_everything_republished(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        publisher = Publisher(
            amqp_url=proxied_url(proxy),
            exchange=exchange_name,
            store=store,
            publish_timeout=0.3,
            reconnect_interval=0.05,
            max_backoff=0.2,
        )
        await publisher.start()
        publisher.submit(await commit(store, [make_envelope(0, n) for n in range(5)]))
        assert await publisher.wait_idle(10)
        proxy.pause()  # publishes reach the broker, its confirms do not come back
        publisher.submit(await commit(store, [make_envelope(0, n) for n in range(5, 10)]))
        await poll(lambda: publisher.window.rounds >= 3)
        assert publisher.last_error is not None
        assert "no confirm" in publisher.last_error
        assert store.count_outbox() == 5
        proxy.resume()
        assert await publisher.wait_idle(30)
        await publisher.close(5)
    await consumer.wait_ids(f"7-0-{n}" for n in range(10))
    assert_in_order_without_loss(consumer, dispatches=1, per_dispatch=10)
    assert len(consumer.messages) > 10  # the timed-out ones went out again, with the same ids


async def test_nacked_messages_are_republished_in_order(
    store: SqliteStore, broker: AbstractRobustConnection, exchange_name: str
) -> None:
    channel = await broker.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    # A full queue with reject-publish makes the broker nack what it cannot enqueue.
    queue = await channel.declare_queue(
        exclusive=True,
        auto_delete=True,
        arguments={"x-max-length": 10, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange, "microgrid.#")
    publisher = Publisher(
        amqp_url=BROKER_URL,
        exchange=exchange_name,
        store=store,
        reconnect_interval=0.05,
        max_backoff=0.2,
    )
    await publisher.start()
    envelopes = [make_envelope(0, n) for n in range(25)]
    nacked_before = sample("dispatchd_publish_nacked_total", kind="running")
    publisher.submit(await commit(store, envelopes))
    await poll(
        lambda: sample("dispatchd_publish_nacked_total", kind="running") >= nacked_before + 2
    )
    assert publisher.last_error is not None
    assert "refused" in publisher.last_error
    assert store.count_outbox() == 15

    consumer = Consumer()
    await queue.consume(consumer.on_message, no_ack=True)
    assert await publisher.wait_idle(30)
    await consumer.wait_ids(e.message_id for e in envelopes)
    await publisher.close(5)
    assert_in_order_without_loss(consumer, dispatches=1, per_dispatch=25)
    assert store.count_outbox() == 0
    assert publisher.window.rounds == 1  # a nack is retried by its dispatch, not by a new round


async def test_a_rejecting_queue_delays_only_the_dispatch_it_refuses(
    store: SqliteStore, broker: AbstractRobustConnection, exchange_name: str
) -> None:
    channel = await broker.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    healthy_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await healthy_queue.bind(exchange, "microgrid.#")
    healthy = Consumer()
    await healthy_queue.consume(healthy.on_message, no_ack=True)
    # Bound to one dispatch's routing key only, full after one message, and nobody reads:
    # the broker nacks that dispatch's next messages (and still routes them to `healthy`).
    full_queue = await channel.declare_queue(
        exclusive=True,
        auto_delete=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await full_queue.bind(exchange, "microgrid.7.running.running.FULL")
    publisher = Publisher(
        amqp_url=BROKER_URL,
        exchange=exchange_name,
        store=store,
        reconnect_interval=2.0,
        max_backoff=4.0,
    )
    await publisher.start()
    stuck = [make_envelope(0, n, dispatch_type="FULL") for n in range(3)]
    nacked_before = sample("dispatchd_publish_nacked_total", kind="running")
    publisher.submit(await commit(store, stuck))
    await poll(lambda: "refused" in (publisher.last_error or ""))

    loop = asyncio.get_running_loop()
    took: list[float] = []
    others = []
    for wave in range(3):
        envelopes = [make_envelope(d, wave) for d in range(1, 11)]
        others += envelopes
        started = loop.time()
        publisher.submit(await commit(store, envelopes))
        await healthy.wait_ids(e.message_id for e in envelopes)
        took.append(loop.time() - started)
    # The refused dispatch waits out a 2 s backoff; the others must not wait with it.
    assert max(took) < 1.5, took
    assert publisher.window.rounds == 1

    drained = Consumer()
    await full_queue.consume(drained.on_message, no_ack=True)
    assert await publisher.wait_idle(30)
    await drained.wait_ids(e.message_id for e in stuck)
    await publisher.close(5)
    assert [json.loads(m.body)["n"] for m in drained.messages] == [0, 1, 2]
    arrivals = [m.message_id for m in healthy.messages]
    assert sorted(m for m in arrivals if not m.startswith("7-0-")) == sorted(
        e.message_id for e in others
    )  # no duplicate of any other dispatch's message
    refused = sample("dispatchd_publish_nacked_total", kind="running") - nacked_before
    assert refused == publisher.window.nacked >= 1
    stuck_arrivals = [m for m in arrivals if m.startswith("7-0-")]
    assert list(dict.fromkeys(stuck_arrivals)) == [e.message_id for e in stuck]  # in order
    assert len(stuck_arrivals) - len(stuck) == publisher.window.nacked  # one copy per refusal only
    assert store.count_outbox() == 0


async def test_repeated_cuts_lose_nothing(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        publisher = Publisher(
            amqp_url=proxied_url(proxy),
            exchange=exchange_name,
            store=store,
            reconnect_interval=0.05,
            max_backoff=0.2,
            max_in_flight=100,
        )
        await publisher.start()
        dispatches, per_dispatch = 6, 500
        envelopes = interleaved(dispatches, per_dispatch)
        for phase in range(3):
            part = envelopes[phase * 1000 : (phase + 1) * 1000]
            publisher.submit(await commit(store, part))
            waiting = publisher.unconfirmed

            def progressed(waiting: int = waiting) -> bool:
                return publisher.unconfirmed < waiting - 50

            await poll(progressed)
            await proxy.cut()
        assert await publisher.wait_idle(60)
        await consumer.wait_ids(e.message_id for e in envelopes)
        await publisher.close(5)
    assert proxy.connections_accepted >= 4
    assert_in_order_without_loss(consumer, dispatches, per_dispatch)
    assert store.count_outbox() == 0


async def test_on_declare_gets_the_connection_to_declare_its_own_things(
    store: SqliteStore, broker: AbstractRobustConnection, exchange_name: str
) -> None:
    queue_name = f"{exchange_name}.rpc"
    seen: list[AbstractRobustConnection] = []

    async def declare_rpc_queue(connection: AbstractRobustConnection) -> None:
        seen.append(connection)
        channel = await connection.channel()
        await channel.declare_queue(queue_name, auto_delete=True)

    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange_name, store=store, on_declare=declare_rpc_queue
    )
    await publisher.start()
    assert seen == [publisher.connection]
    channel = await broker.channel()
    await channel.declare_queue(queue_name, passive=True)  # raises if it does not exist
    await publisher.close(5)


async def test_close_with_a_silent_broker_keeps_its_time_budget(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        publisher = Publisher(amqp_url=proxied_url(proxy), exchange=exchange_name, store=store)
        await publisher.start()
        proxy.pause()  # the broker gets everything and answers nothing, not even close-ok
        publisher.submit(await commit(store, [make_envelope(0, n) for n in range(3)]))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await publisher.close(0.3)
        took = loop.time() - started
        proxy.resume()
    assert took < 0.3 + CLOSE_GRACE + 0.5
    assert store.count_outbox() == 3


async def test_a_dropped_microgrid_is_not_published_and_stays_in_the_outbox(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    """Another process runs microgrid 8 now: it publishes those, from the same outbox."""
    may_send = asyncio.Event()
    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange_name, store=store, may_send=may_send
    )
    await publisher.start()
    mine = await commit(store, [make_envelope(d, 0, microgrid_id=7) for d in range(3)])
    theirs = await commit(store, [make_envelope(d, 0, microgrid_id=8) for d in range(3)])
    publisher.submit(mine + theirs)
    assert publisher.drop(8) == 3
    assert await publisher.wait_drained(8, 0)  # nothing of it is left to wait for
    assert not await publisher.wait_drained(7, 0)
    may_send.set()
    assert await publisher.wait_drained(7, 10)
    await consumer.wait_ids(item.envelope.message_id for item in mine)
    assert await publisher.wait_idle(10)
    await publisher.close(5)
    published = {message.message_id for message in consumer.messages}
    assert published == {item.envelope.message_id for item in mine}
    assert [item.seq for item in await store.outbox()] == [item.seq for item in theirs]
    assert publisher.unconfirmed == 0


async def test_a_dropped_microgrid_leaves_the_bulk_backlog_too(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    """A first sync's backlog of a microgrid that moved is neither published nor waited for."""
    may_send = asyncio.Event()
    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange_name, store=store, may_send=may_send
    )
    await publisher.start()
    mine = await commit(store, [make_envelope(d, 0, microgrid_id=7) for d in range(3)])
    theirs = await commit(store, [make_envelope(d, 0, microgrid_id=8) for d in range(300)])
    publisher.submit(mine + theirs, lambda item: True)
    assert publisher.backlog > 0  # more than the window takes at once wait as bulk
    assert publisher.drop(8) == 300
    assert await publisher.wait_drained(8, 0)
    may_send.set()
    assert await publisher.wait_drained(7, 10)
    assert await publisher.wait_idle(10)
    await publisher.close(5)
    published = {message.message_id for message in consumer.messages}
    assert published == {item.envelope.message_id for item in mine}
    assert publisher.backlog == 0 and publisher.unconfirmed == 0
    assert len(await store.outbox()) == 300


class GatedReads(SqliteStore):
    """Holds every read of outbox items until ``gate`` is set; ``reading`` tells one began."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reading = asyncio.Event()
        self.gate = asyncio.Event()

    async def outbox_items(self, seqs: Sequence[int]) -> list[OutboxItem]:
        self.reading.set()
        await self.gate.wait()
        return await super().outbox_items(seqs)


def _position(consumer: Consumer, microgrid_id: int, dispatch_id: int, n: int) -> int:
    ids = [message.message_id for message in consumer.messages]
    return ids.index(f"{microgrid_id}-{dispatch_id}-{n}")


async def test_a_live_message_takes_its_dispatchs_bulk_along_read_back_from_the_store(
    tmp_path: Path, consumer: Consumer, exchange_name: str
) -> None:
    """The backlog holds seqs; a live message read in behind them keeps its dispatch's order,
    even one submitted while the send loop is still reading them back."""
    store = GatedReads(tmp_path / "state.sqlite3")
    may_send = asyncio.Event()
    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange_name, store=store, may_send=may_send
    )
    await publisher.start()
    created = await commit(store, [make_envelope(d, 0, event="created") for d in range(300)])
    publisher.submit(created, lambda item: item.envelope.headers["event"] == "created")
    publisher.submit(await commit(store, [make_envelope(299, 1, event="updated")]))
    may_send.set()
    await asyncio.wait_for(store.reading.wait(), 10)  # the promotion's read
    publisher.submit(await commit(store, [make_envelope(299, 2, event="updated")]))
    assert publisher.unconfirmed == 302
    store.gate.set()
    await consumer.wait_ids([f"7-{d}-0" for d in range(300)] + ["7-299-1", "7-299-2"])
    assert await publisher.wait_idle(10)
    await publisher.close(5)
    own = [_position(consumer, 7, 299, n) for n in range(3)]
    assert own == sorted(own)
    last_created = max(_position(consumer, 7, d, 0) for d in range(299))
    assert own[2] < last_created  # the live ones did not wait for the whole backlog
    assert await store.outbox() == []
    await store.close()


async def test_bulk_messages_gone_from_the_outbox_are_not_waited_for(
    store: SqliteStore, consumer: Consumer, exchange_name: str
) -> None:
    """The microgrid's new owner published and removed them before this process dropped it."""
    may_send = asyncio.Event()
    publisher = Publisher(
        amqp_url=BROKER_URL, exchange=exchange_name, store=store, may_send=may_send
    )
    await publisher.start()
    mine = await commit(store, [make_envelope(d, 0, microgrid_id=7) for d in range(3)])
    theirs = await commit(store, [make_envelope(d, 0, microgrid_id=8) for d in range(300)])
    publisher.submit(theirs + mine, lambda item: True)
    publisher.submit(await commit(store, [make_envelope(5, 1, microgrid_id=8)]))  # a promotion
    await store.remove_from_outbox(item.seq for item in theirs)
    may_send.set()
    assert await publisher.wait_drained(8, 10)
    assert await publisher.wait_idle(10)
    await publisher.close(5)
    published = {message.message_id for message in consumer.messages}
    assert published == {item.envelope.message_id for item in mine} | {"8-5-1"}
    assert publisher.backlog == 0 and publisher.unconfirmed == 0
