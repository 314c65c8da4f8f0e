"""Many publishes in one write: each message still gets its own broker answer, in order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq.abc import ChannelFrame
from hypothesis import given
from hypothesis import strategies as st
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from dispatchd import batchpublish
from dispatchd.batchpublish import Outgoing, frames_bytes, publish_batch

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


# --- the frames of one publish, byte for byte as aiormq and pamqp make them ---


def pamqp_frames(
    channel_number: int, max_content_size: int, exchange: str, message: Outgoing, mandatory: bool
) -> bytes:
    """What ``basic_publish`` writes: pamqp's frame objects, the body split as aiormq splits it."""
    splitter = SimpleNamespace(max_content_size=max_content_size)
    frames = [
        Basic.Publish(exchange=exchange, routing_key=message.routing_key, mandatory=mandatory),
        ContentHeader(body_size=len(message.body), properties=message.properties),
        *aiormq.Channel._split_body(splitter, message.body),  # type: ignore[arg-type]
    ]
    return ChannelFrame.marshall(channel_number=channel_number, frames=frames).payload


short_text = st.text(max_size=40)
times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
header_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, width=32),
        short_text,
        times,
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=6,
)
properties = st.builds(
    Basic.Properties,
    content_type=st.none() | short_text,
    content_encoding=st.none() | short_text,
    headers=st.none() | st.dictionaries(short_text, header_values, max_size=6),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | short_text,
    reply_to=st.none() | short_text,
    expiration=st.none() | st.integers(0, 10**9).map(str),
    message_id=st.none() | short_text,
    timestamp=st.none() | times,
    message_type=st.none() | short_text,
    user_id=st.none() | short_text,
    app_id=st.none() | short_text,
    cluster_id=st.just(""),  # pamqp refuses any other (AMQP 0-9-1 deprecated it)
)


@given(
    channel_number=st.integers(1, 65535),
    max_content_size=st.integers(1, 64),
    exchange=st.from_regex(r"[a-zA-Z0-9_.:-]{0,20}", fullmatch=True),
    routing_key=short_text,
    body=st.binary(max_size=200),
    props=properties,
    mandatory=st.booleans(),
)
def test_frames_are_the_bytes_pamqp_marshals(
    channel_number: int,
    max_content_size: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    props: Basic.Properties,
    mandatory: bool,
) -> None:
    message = Outgoing(routing_key, body, props)
    expected = pamqp_frames(channel_number, max_content_size, exchange, message, mandatory)
    # Twice: the second time from what was kept of the first.
    for _ in range(2):
        got = frames_bytes(channel_number, max_content_size, exchange, message, mandatory=mandatory)
        assert got == expected


def test_kept_header_entries_are_bounded_and_stay_right() -> None:
    """Every dispatch id is a new entry: the kept ones are dropped when there are too many."""
    limit = batchpublish._HEADER_ENTRIES_KEPT
    for dispatch_id in range(limit + 100):
        headers: dict[str, Any] = {"dispatch_id": dispatch_id, "event": "running", "schema": "v1"}
        message = Outgoing(
            "k", b"{}", Basic.Properties(message_id=f"m{dispatch_id}", headers=headers)
        )
        got = frames_bytes(1, 1000, "x", message, mandatory=True)
        assert len(batchpublish._header_entries) <= limit
        if dispatch_id % 997 == 0 or dispatch_id >= limit - 2:
            assert got == pamqp_frames(1, 1000, "x", message, True)


def test_equal_header_values_of_other_types_are_kept_apart() -> None:
    """``True == 1 == 1.0``, but each has its own AMQP field type."""
    for value in (True, 1, 1.0, 1, True):
        message = Outgoing("k", b"", Basic.Properties(headers={"flag": value}))
        assert frames_bytes(1, 100, "x", message, mandatory=False) == pamqp_frames(
            1, 100, "x", message, False
        )
