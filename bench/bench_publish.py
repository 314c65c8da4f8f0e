"""Publish throughput with confirms: the Publisher against a bare aio-pika pipelined loop.

Run: ``python bench/bench_publish.py [--amqp-url URL] [--sizes 1000 10000]``.

First, the CPU to marshal one message's frames (publish method, content
header, body), with pamqp's frame objects as aiormq's ``basic_publish`` does
and with ``batchpublish.frames_bytes``: rounds of each, alternated so a change
in the machine's speed hits both, the fastest round of each reported.

"window" is ``max_in_flight_per_dispatch``: 1 (the default) keeps per-dispatch
order even when the broker nacks, so a few dispatches with many messages each
are confirm-latency bound; bursts over many dispatches are not.

Every run publishes persistent messages with confirms to a fresh topic
exchange with one bound queue that a consumer drains, so the broker routes
every message as it would for an actor. The bare loop (the ceiling) keeps up
to ``--in-flight`` publishes outstanding; the Publisher run includes the
outbox bookkeeping (removal of confirmed items from SQLite, synchronous=FULL)
and is timed from ``submit`` until ``wait_idle``. Committing to the outbox is
the engine's cost and is timed separately.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from dispatchd.batchpublish import Outgoing, frames_bytes
from dispatchd.core.wire import APP_ID, CONTENT_TYPE, Envelope
from dispatchd.publisher import Publisher, outgoing
from dispatchd.store import OutboxItem, SqliteStore

FRAME_ROUNDS = 7
MAX_CONTENT_SIZE = 131_072 - 8
"""RabbitMQ's default frame_max less a body frame's overhead, as aiormq splits bodies."""


def envelopes(count: int, dispatches: int, types: int | None = None) -> list[Envelope]:
    """``count`` messages over ``dispatches`` dispatches of ``types`` types (default: one each)."""
    return [
        Envelope(
            message_id=f"bench-{n}",
            routing_key=f"microgrid.7.running.running.BENCH{n % (types or dispatches)}",
            body=json.dumps({"n": n, "pad": "x" * 600}).encode(),
            headers={
                "microgrid_id": 7,
                "dispatch_id": n % dispatches,
                "dispatch_type": "BENCH",
                "event": "running",
                "schema": "dispatchd/v1",
            },
            type="dispatch.running",
            microgrid_id=7,
            dispatch_id=n % dispatches,
        )
        for n in range(count)
    ]


def marshal_with_frame_objects(messages: list[Outgoing]) -> None:
    for message in messages:
        frames = [
            Basic.Publish(exchange="bench", routing_key=message.routing_key, mandatory=True),
            ContentHeader(body_size=len(message.body), properties=message.properties),
            *aiormq.Channel._split_body(
                SimpleNamespace(max_content_size=MAX_CONTENT_SIZE), message.body
            ),  # type: ignore[arg-type]
        ]
        ChannelFrame.marshall(channel_number=1, frames=frames)


def marshal_with_frames_bytes(messages: list[Outgoing]) -> None:
    for message in messages:
        frames_bytes(1, MAX_CONTENT_SIZE, "bench", message, mandatory=True)


def frame_costs(count: int) -> dict[str, float]:
    """Fastest round's µs per message of each way to marshal, rounds alternated.

    A message per dispatch, of three types: routing keys repeat, dispatch ids do not.
    """
    messages = [outgoing(envelope) for envelope in envelopes(count, count, types=3)]
    ways = {
        "pamqp frame objects (basic_publish)": marshal_with_frame_objects,
        "batchpublish.frames_bytes": marshal_with_frames_bytes,
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(FRAME_ROUNDS):
        for label, marshal in ways.items():
            started = time.process_time()
            marshal(messages)
            best[label] = min(best[label], (time.process_time() - started) / count * 1e6)
    return best


async def drained_exchange(connection: AbstractRobustConnection, name: str) -> None:
    """Declare the exchange with a bound queue and a consumer that drains it."""
    channel = await connection.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, "#")

    async def drop(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        del message

    await queue.consume(drop, no_ack=True)


async def bare(url: str, exchange_name: str, batch: list[Envelope], in_flight: int) -> float:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name)
        slots = asyncio.Semaphore(in_flight)

        async def one(envelope: Envelope) -> None:
            try:
                await exchange.publish(
                    aio_pika.Message(
                        envelope.body,
                        headers=dict(envelope.headers),
                        content_type=CONTENT_TYPE,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=envelope.message_id,
                        type=envelope.type,
                        app_id=APP_ID,
                    ),
                    envelope.routing_key,
                    mandatory=True,
                    timeout=30,
                )
            finally:
                slots.release()

        started = time.perf_counter()
        tasks = []
        for envelope in batch:
            await slots.acquire()
            tasks.append(asyncio.create_task(one(envelope)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - started


async def through_publisher(
    url: str, exchange_name: str, batch: list[Envelope], in_flight: int, per_dispatch: int
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.sqlite3")
        publisher = Publisher(
            amqp_url=url,
            exchange=exchange_name,
            store=store,
            max_in_flight=in_flight,
            max_in_flight_per_dispatch=per_dispatch,
        )
        await publisher.start()
        started = time.perf_counter()
        items: list[OutboxItem] = []
        for start in range(0, len(batch), 100):
            items += await store.commit(envelopes=batch[start : start + 100])
        commit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        publisher.submit(items)
        if not await publisher.wait_idle(600):
            raise RuntimeError("publisher did not finish")
        seconds = time.perf_counter() - started
        await publisher.close(5)
        await store.close()
        return seconds, commit_seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--in-flight", type=int, default=1000)
    args = parser.parse_args()

    for label, micros in frame_costs(10_000).items():
        print(f"frames of one message, {label:<38} {micros:>5.1f} us CPU")
    exchange_name = f"bench-publish-{uuid.uuid4().hex[:8]}"
    consumer = await aio_pika.connect_robust(args.amqp_url)
    try:
        await drained_exchange(consumer, exchange_name)
        print(f"in flight <= {args.in_flight}; msgs/s with broker confirms")
        for size in args.sizes:
            ceiling = size / await bare(
                args.amqp_url, exchange_name, envelopes(size, size), args.in_flight
            )
            label = "bare aio-pika pipelined loop"
            print(f"{size:>6} messages  {label:<38} {ceiling:>7.0f} msgs/s")
            shapes = ((size, 1), (max(1, size // 10), 1), (10, 1), (10, args.in_flight))
            for dispatches, per_dispatch in shapes:
                seconds, commit_seconds = await through_publisher(
                    args.amqp_url,
                    exchange_name,
                    envelopes(size, dispatches),
                    args.in_flight,
                    per_dispatch,
                )
                label = f"Publisher {dispatches:>5} dispatches, window {per_dispatch:>4}"
                print(
                    f"{size:>6} messages  {label:<38} {size / seconds:>7.0f} msgs/s"
                    f"   (outbox commit {commit_seconds / size * 1e6:.0f} us/msg in batches of 100)"
                )
    finally:
        channel = await consumer.channel()
        await channel.exchange_delete(exchange_name)
        await consumer.close()


if __name__ == "__main__":
    asyncio.run(main())
