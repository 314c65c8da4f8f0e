"""Many publishes in one write: each message still gets its own broker answer, in order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from dispatchd.batchpublish import Outgoing, publish_batch

ANSWER_WITHIN = 10.0


@dataclass
class Broker:
    channel: AbstractChannel
    underlay: aiormq.Channel
    exchange: str
    received: asyncio.Queue[AbstractIncomingMessage]


@pytest.fixture
async def broker(amqp_url: str, unique_name: Callable[[str], str]) -> AsyncIterator[Broker]:
    """An exchange with a consumed queue on ``ok.#`` and a full rejecting queue on ``full.#``."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            unique_name("test.batch"), aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        consumed = await channel.declare_queue(exclusive=True)
        await consumed.bind(exchange, routing_key="ok.#")
        full = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(exchange, routing_key="full.#")
        received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await consumed.consume(received.put, no_ack=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        yield Broker(channel, underlay, exchange.name, received)


def outgoing(routing_key: str, text: str, *, message_id: str | None = None) -> Outgoing:
    return Outgoing(
        routing_key,
        text.encode(),
        Basic.Properties(
            message_id=message_id if message_id is not None else uuid.uuid4().hex,
            delivery_mode=2,
            headers={"text": text},
        ),
    )


async def outcomes(confirms: list[asyncio.Future[object]]) -> list[str]:
    async with asyncio.timeout(ANSWER_WITHIN):
        await asyncio.wait(confirms)
    names = []
    for confirm in confirms:
        exc = confirm.exception()
        names.append(
            "ack"
            if exc is None
            else "returned"
            if isinstance(exc, PublishError)
            else "nacked"
            if isinstance(exc, DeliveryError)
            else repr(exc)
        )
    return names


async def test_each_message_gets_its_own_answer_and_arrives_in_order(broker: Broker) -> None:
    batch = [
        outgoing("ok.1", "first"),
        outgoing("full.1", "refused by a full queue"),
        outgoing("nowhere.1", "routed nowhere"),
        outgoing("ok.2", "second"),
        outgoing("ok.3", "third", message_id="same-id"),
        outgoing("ok.4", "fourth", message_id="same-id"),  # a republish carries its id again
    ]
    confirms = await publish_batch(broker.underlay, broker.exchange, batch, mandatory=True)

    assert await outcomes(confirms) == ["ack", "nacked", "returned", "ack", "ack", "ack"]
    async with asyncio.timeout(ANSWER_WITHIN):
        arrived = [(await broker.received.get()).body.decode() for _ in range(4)]
    assert arrived == ["first", "second", "third", "fourth"]
    # Settled publishes leave nothing behind in the channel's bookkeeping.
    assert not broker.underlay.confirmations
    assert not broker.underlay.message_id_delivery_tag


async def test_a_batch_that_fails_before_it_is_queued_uses_no_delivery_tags(
    broker: Broker,
) -> None:
    await publish_batch(
        broker.underlay, broker.exchange, [outgoing("ok.0", "zero")], mandatory=True
    )
    tag_before = broker.underlay.delivery_tag

    broken = [outgoing("ok.1", "a"), outgoing("ok.2", "b", message_id=""), outgoing("ok.3", "c")]
    with pytest.raises(ValueError, match="message_id"):
        await publish_batch(broker.underlay, broker.exchange, broken, mandatory=True)

    assert broker.underlay.delivery_tag == tag_before
    # The broker numbers the next publishes from where it left off: if the failed
    # batch had used tags, these confirms would never be matched and would time out.
    confirms = await publish_batch(
        broker.underlay,
        broker.exchange,
        [outgoing("ok.4", "d"), outgoing("ok.5", "e")],
        mandatory=True,
    )
    assert await outcomes(confirms) == ["ack", "ack"]


async def test_a_channel_closed_by_the_broker_fails_every_message_of_the_batch(
    broker: Broker,
) -> None:
    confirms = await publish_batch(
        broker.underlay,
        f"{broker.exchange}.missing",  # publishing to a missing exchange closes the channel
        [outgoing("ok.1", "a"), outgoing("ok.2", "b")],
        mandatory=True,
    )
    results = await outcomes(confirms)
    assert all("NotFound" in result for result in results), results


async def test_needs_a_confirm_channel(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        with pytest.raises(RuntimeError, match="publisher confirms"):
            await publish_batch(underlay, "", [outgoing("q", "a")], mandatory=False)
