"""The broker path itself: a confirmed, mandatory publish to a topic exchange arrives intact.

Everything the publisher, RPC server, tail and SDK do rests on this; if it
fails, the broker or aio-pika set-up is broken, not our code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError

from dispatchd import broker


async def test_confirmed_mandatory_publish_is_routed_to_a_bound_queue(
    amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            unique_name("test.broker"), aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="dispatch.running.*.#")

        received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(received.put)

        body = json.dumps({"dispatch_id": 42, "state": "running"}).encode()
        timestamp = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
        confirmation = await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                message_id="msg-42-1",
                timestamp=timestamp,
                headers={"x-schema": "dispatch.v1"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="dispatch.running.7.42",
            mandatory=True,
        )
        assert confirmation is not None  # the broker confirmed it

        message = await asyncio.wait_for(received.get(), timeout=10)
        await message.ack()
        assert message.body == body
        assert message.routing_key == "dispatch.running.7.42"
        assert message.exchange == exchange.name
        assert message.content_type == "application/json"
        assert message.message_id == "msg-42-1"
        assert message.timestamp == timestamp
        assert message.headers == {"x-schema": "dispatch.v1"}
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_unroutable_mandatory_publish_is_returned(
    amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            unique_name("test.broker.unroutable"), aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        try:
            with pytest.raises(DeliveryError):
                await exchange.publish(
                    aio_pika.Message(b"{}"), routing_key="nobody.listens", mandatory=True
                )
        finally:
            # Never bound, so auto-delete would never remove it.
            await exchange.delete()


def _tasks_started_since(before: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if task not in before and task is not asyncio.current_task() and not task.done()
    ]


async def test_a_first_attempt_cancelled_leaves_no_connection_retrying() -> None:
    """Cancelled while the broker does not answer (dispatchd stopping): aio-pika's own
    connect_robust leaves a task retrying forever, and the event loop never closes."""
    reached = asyncio.Event()
    silent = await asyncio.start_server(lambda reader, writer: reached.set(), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    async with silent:
        before = set(asyncio.all_tasks())
        attempt = asyncio.create_task(
            broker.connect_robust(
                f"amqp://guest:guest@127.0.0.1:{port}/", timeout=30, reconnect_interval=0.05
            )
        )
        async with asyncio.timeout(5):
            await reached.wait()  # the attempt is on the wire, waiting for the broker
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        assert _tasks_started_since(before) == []


async def test_a_refused_first_attempt_leaves_no_connection_retrying(amqp_url: str) -> None:
    before = set(asyncio.all_tasks())
    refused = amqp_url.replace("guest:guest@", "guest:wrong@", 1)
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await broker.connect_robust(refused, timeout=5, reconnect_interval=0.05)
    assert _tasks_started_since(before) == []
