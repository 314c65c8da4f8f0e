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
